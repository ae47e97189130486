"""The Hub-ready folder is readable by anyone, like any saved model (it is written through a private temp folder)."""

import stat


def test_hub_folder_is_world_readable(tiny_checkpoint):
    assert stat.S_IMODE(tiny_checkpoint.stat().st_mode) == 0o755
    paths = list(tiny_checkpoint.rglob("*"))
    assert any(p.name == "model.safetensors" for p in paths)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_push_refuses_a_folder_missing_a_file_its_remote_code_imports(tiny_checkpoint, tmp_path):
    import shutil

    import pytest

    from train.commands.publish import HubFolder, PublishError

    for name in ("fast_path.py", "fusion.py", "inference.py", "pipeline_emovlm_kd.py"):
        folder = shutil.copytree(tiny_checkpoint, tmp_path / name)
        HubFolder.load(folder).check()  # complete: accepted
        (folder / name).unlink()
        with pytest.raises(PublishError, match=rf"lacks the remote-code files \['{name}'\]"):
            HubFolder.load(folder).check()


def test_hub_folder_config_names_no_local_path(tiny_checkpoint, tiny_base):
    text = (tiny_checkpoint / "config.json").read_text()
    assert str(tiny_base["vlm"]) not in text and '"_name_or_path": "/' not in text
