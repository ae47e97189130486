"""Atomic JSON files: results, stage markers, split files and benchmark output."""

import json
import stat

import pytest

from train.infra.files import write_json_atomic


def test_json_is_written_whole_and_readable_by_others(tmp_path):
    path = write_json_atomic({"accuracy": 0.5, "labels": ["a", "b"]}, tmp_path / "new" / "results.json")
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "labels": ["a", "b"]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # split files are shared between users and ranks
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = write_json_atomic({"accuracy": 0.5}, tmp_path / "results.json")
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic({"accuracy": object()}, path)
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert json.loads(write_json_atomic({"s": {1, 2}}, path, default=sorted).read_text()) == {"s": [1, 2]}
