"""`python -m train verify`: a clean run verifies; a swapped teacher, an edited results.json, a replaced gate and a
stale cache are each caught and named; a published model's numbers are checked against the model itself."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import LABELS
from safetensors.torch import save_file

from modeling_emovlm_kd.fusion import new_gate


def verify(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "train", "verify", *map(str, args)], capture_output=True,
                          text=True, env=env)


def copy_run(tiny_run, tmp_path):
    """A private copy of the finished shared run (no checkpoints) and its recipe pointed at it."""
    source, recipe_path, _ = tiny_run
    target = tmp_path / "run"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_path.read_text().replace(str(source), str(target)))
    return target, recipe


def failing_rows(stdout: str) -> list[str]:
    return [line.split("|")[1].strip() for line in stdout.splitlines() if line.endswith("| **NO** |")]


@pytest.mark.slow
def test_a_clean_run_verifies(tiny_run):
    result = verify(tiny_run[0], "--device", "cpu")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert failing_rows(result.stdout) == []
    for row in ("teacher/: validation accuracy (teacher/stage_done.json)",
                "distill/head.safetensors: validation accuracy (distill/stage_done.json)",
                "gate/gate.safetensors: validation accuracy (gate/stage_done.json)",
                "features/test.safetensors: fingerprint", "features: read sft, teacher (provenance)",
                "final/: weights SHA-256 (export/stage_done.json)", "results.json fused accuracy (caches)",
                "results.json fused accuracy (final/ on the test images)", "results.json teacher accuracy (caches)",
                "final/: gate is gate/gate.safetensors", "results.json fused accuracy (caches, validation split)",
                "results.json validation_in_sample (gate/stage_done.json fit_on)"):
        assert f"| {row} |" in result.stdout, row
    assert "All " in result.stdout and " checks agree." in result.stdout
    # The recomputed accuracies are compared exactly: the tolerance column says 0 and on what.
    assert "| 0 (float32 on cpu, as recorded) | yes |" in result.stdout
    (teacher,) = [line for line in result.stdout.splitlines() if line.startswith("| teacher/: validation accuracy")]
    assert teacher.endswith("| 0 (float32 on cpu) | yes |"), teacher


@pytest.mark.slow
def test_a_swapped_teacher_file_is_caught(tiny_run, tmp_path):
    run, _ = copy_run(tiny_run, tmp_path)
    # The untrained base teacher's weights in place of the trained ones (same architecture and labels).
    shutil.copy2(run / "base" / "teacher" / "model.safetensors", run / "teacher" / "model.safetensors")
    result = verify(run)
    assert result.returncode == 1, result.stderr[-4000:]
    failed = failing_rows(result.stdout)
    assert {f"features/{split}.safetensors: fingerprint" for split in ("train", "validation", "test")} <= set(failed)
    assert "checks differ: " in result.stdout and "features/test.safetensors: fingerprint" in result.stdout


@pytest.mark.slow
def test_an_edited_results_file_is_caught(tiny_run, tmp_path):
    run, _ = copy_run(tiny_run, tmp_path)
    for where in ("evaluate", "final"):  # both copies, consistently: only recomputing can tell
        path = run / where / "results.json"
        results = json.loads(path.read_text())
        results["branches"]["fused"]["accuracy"] = min(1.0, results["branches"]["fused"]["accuracy"] + 0.1) \
            if results["branches"]["fused"]["accuracy"] < 0.95 else 0.5
        path.write_text(json.dumps(results, indent=2))
    result = verify(run)
    assert result.returncode == 1
    failed = failing_rows(result.stdout)
    assert "results.json fused accuracy (caches)" in failed
    assert "results.json fused accuracy (final/ on the test images)" in failed
    assert "results.json vlm accuracy (caches)" not in failed  # only what was edited is named


@pytest.mark.slow
def test_an_unmarked_or_edited_validation_table_is_caught(tiny_run, tmp_path):
    """The gate is fitted on the validation split: results.json must mark the fused validation numbers in-sample
    (a run written before the mark, or with it removed, fails naming it), and its validation table is recomputed."""
    run, _ = copy_run(tiny_run, tmp_path)
    for where in ("evaluate", "final"):
        path = run / where / "results.json"
        results = json.loads(path.read_text())
        del results["validation_in_sample"]
        results["validation"]["head"]["macro_f1"] = results["validation"]["head"]["macro_f1"] / 2
        path.write_text(json.dumps(results, indent=2))
    result = verify(run)
    assert result.returncode == 1
    failed = failing_rows(result.stdout)
    assert "results.json validation_in_sample (gate/stage_done.json fit_on)" in failed
    assert "rerun `python -m train evaluate --force`, then `python -m train export`" in result.stdout
    assert "results.json head macro_f1 (caches, validation split)" in failed
    assert "results.json fused accuracy (caches, validation split)" not in failed


@pytest.mark.slow
def test_a_replaced_gate_is_caught(tiny_run, tmp_path):
    run, _ = copy_run(tiny_run, tmp_path)
    torch.manual_seed(123)
    save_file(new_gate("concat_linear", len(LABELS)).state_dict(), run / "gate" / "gate.safetensors")
    result = verify(run)
    assert result.returncode == 1
    assert "final/: gate is gate/gate.safetensors" in failing_rows(result.stdout)


@pytest.mark.slow
def test_a_stale_cache_is_caught(tiny_run, tmp_path):
    """The teacher rerun alone (a single-stage command with a new setting) leaves the caches built from the old one."""
    run, recipe = copy_run(tiny_run, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rerun = subprocess.run([sys.executable, "-m", "train", "teacher", "--config", str(recipe), "--set",
                            "teacher.learning_rate=0.01"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    result = verify(run)
    assert result.returncode == 1
    failed = failing_rows(result.stdout)
    assert "features/validation.safetensors: fingerprint" in failed
    assert "features: read sft, teacher (provenance)" in failed
    assert "teacher/: validation accuracy (teacher/stage_done.json)" not in failed  # the new teacher's own is right


def test_what_is_not_a_finished_run_is_refused_with_status_2(tmp_path):
    result = verify(tmp_path)
    assert result.returncode == 2 and "verify: error:" in result.stderr and "Traceback" not in result.stderr
    both = verify(tmp_path, "--model", tmp_path, "--data", "imagefolder")
    assert both.returncode == 2 and "not both" in both.stderr


@pytest.mark.slow
def test_a_published_models_numbers_are_checked_against_the_model(tiny_run, colour_folder, tmp_path):
    final = tiny_run[0] / "final"
    data = ("--data", "imagefolder", "--root", colour_folder)
    result = verify("--model", final, *data)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| results.json fused accuracy (final on --data imagefolder) |" in result.stdout
    edited = tmp_path / "edited"
    shutil.copytree(final, edited)
    results = json.loads((edited / "results.json").read_text())
    results["branches"]["head"]["macro_f1"] = results["branches"]["head"]["macro_f1"] / 2 + 0.01
    (edited / "results.json").write_text(json.dumps(results))
    caught = verify("--model", edited, *data)
    assert caught.returncode == 1
    assert failing_rows(caught.stdout) == ["results.json head macro_f1 (edited on --data imagefolder)"]


@pytest.mark.slow
def test_a_model_cards_model_index_is_checked(tiny_run, colour_folder, tmp_path):
    from huggingface_hub import ModelCard

    pushed = tmp_path / "pushed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    dry_run = subprocess.run([sys.executable, "-m", "train", "push", "--run-dir", str(tiny_run[0]), "--variant",
                              "custom", "--repo-id", "me/emovlm-kd-colours", "--dry-run", str(pushed)],
                             capture_output=True, text=True, env=env)
    assert dry_run.returncode == 0, dry_run.stderr[-4000:]
    data = ("--data", "imagefolder", "--root", colour_folder)
    result = verify("--model", pushed, *data)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| README.md model-index fused accuracy |" in result.stdout
    card = ModelCard.load(pushed / "README.md")
    (accuracy,) = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    accuracy.metric_value = round(accuracy.metric_value - 0.25, 4)
    card.save(pushed / "README.md")
    caught = verify("--model", pushed, *data)
    assert caught.returncode == 1
    assert failing_rows(caught.stdout) == ["README.md model-index fused accuracy"]


def test_check_tolerances():
    import torch

    from train.commands.verify import Check
    from train.stages.trainer_utils import accuracy

    # As the stages' metric computes it (double precision): 3/5 is 0.6, not float32's 0.6000000238.
    assert accuracy(torch.eye(5)[[0, 1, 2, 0, 0]], torch.tensor([0, 1, 2, 3, 4])) == 0.6

    assert Check("a", 0.5, 0.5, 0.0).agrees and not Check("a", 0.5, 0.5 + 1e-9, 0.0).agrees
    assert Check("a", 0.5, 0.52, 0.05).agrees and not Check("a", None, 0.5, 1.0).agrees
    assert Check("h", "abc", "abc").agrees and not Check("h", "abc", "abd").agrees
