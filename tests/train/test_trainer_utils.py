"""Choosing the checkpoint a killed stage resumes from."""

import json

from train.stages.trainer_utils import last_complete_checkpoint


def write_checkpoint(root, step, state="complete"):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if state == "complete":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif state == "empty":
        (folder / "trainer_state.json").write_text("")
    elif state == "cut":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step})[:7])
    return folder


def test_newest_finished_checkpoint_is_chosen_by_step_not_by_name(tmp_path):
    write_checkpoint(tmp_path, 9)
    newest = write_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoint-notes").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(newest)


def test_checkpoints_killed_mid_save_are_skipped(tmp_path, caplog):
    finished = write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8, state="missing")
    write_checkpoint(tmp_path, 12, state="empty")
    write_checkpoint(tmp_path, 16, state="cut")
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(tmp_path) == str(finished)
    assert "checkpoint-16" in caplog.text and "checkpoint-8" in caplog.text


def test_no_finished_checkpoint_means_start_afresh(tmp_path):
    assert last_complete_checkpoint(tmp_path / "not-there") is None
    write_checkpoint(tmp_path, 3, state="empty")
    assert last_complete_checkpoint(tmp_path) is None
