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


def _model_and_processor(tiny_base):
    import torch

    from train.infra.assemble import assemble

    torch.manual_seed(0)
    return assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])


def test_a_killed_save_leaves_nothing_behind_after_the_next(tiny_base, tmp_path):
    """An export killed while writing leaves its staging folder `.final.<random>` (and, killed between the two
    renames, the previous model as `.final.old` with no `final/`): the next save removes the leftovers."""
    from train.infra.assemble import save_hub_folder

    model, processor = _model_and_processor(tiny_base)
    final = save_hub_folder(model, processor, tmp_path / "final")
    staging = tmp_path / ".final.k1ll3d"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half a file")
    final.rename(tmp_path / ".final.old")  # killed after moving the old model aside, before the new one landed
    save_hub_folder(model, processor, tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_a_failed_save_keeps_the_model_that_was_there(tiny_base, tmp_path, monkeypatch):
    """A save that fails (here: the processor cannot be written) leaves the previous model in place, whole."""
    import pytest

    from train.infra.assemble import save_hub_folder

    model, processor = _model_and_processor(tiny_base)
    final = save_hub_folder(model, processor, tmp_path / "final")
    before = (final / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(processor), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hub_folder(model, processor, tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (final / "model.safetensors").read_bytes() == before
