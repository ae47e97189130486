"""The Hub-ready folder is readable by anyone, like any saved model (it is written through a private temp folder)."""

import stat


def test_hub_folder_is_world_readable(tiny_checkpoint):
    assert stat.S_IMODE(tiny_checkpoint.stat().st_mode) == 0o755
    paths = list(tiny_checkpoint.rglob("*"))
    assert any(p.name == "model.safetensors" for p in paths)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
