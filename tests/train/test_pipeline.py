"""End-to-end: every stage on a tiny image folder, reruns that skip finished stages, and kill/resume."""

import json
import os

import pytest
from conftest import COLOURS, LABELS, SIZES, final_metrics, kill_when, run_pipeline, write_recipe
from PIL import Image
from transformers import pipeline


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_exports_a_hub_ready_folder(tiny_run):
    output_dir, _, stdout = tiny_run
    for stage in ("base", "instructions", "sft", "teacher", "features", "distill", "gate", "evaluate", "export"):
        assert (output_dir / stage / "stage_done.json").exists(), stage
    assert (output_dir / "sft" / "merged" / "model.safetensors").exists()
    results = json.loads((output_dir / "evaluate" / "results.json").read_text())
    assert set(results["branches"]) == {"vlm", "head", "teacher", "fused"}
    assert results["num_examples"] == SIZES["test"] * len(LABELS) and results["labels"] == LABELS
    assert results["parameters"]["gate"] == 2 * 3 * 3 + 3
    assert "| EmoVLM-KD (fused) |" in stdout
    final = output_dir / "final"
    assert {"model.safetensors", "config.json", "modeling_emovlm_kd.py", "results.json",
            "confusion_matrix.png"} <= set(os.listdir(final))
    classifier = pipeline("image-classification", model=str(final), trust_remote_code=True)
    prediction = classifier(Image.new("RGB", (28, 28), COLOURS["green"]), top_k=3)
    assert {p["label"] for p in prediction} == set(LABELS)


@pytest.mark.slow
def test_rerun_skips_finished_stages(tiny_run):
    output_dir, recipe, _ = tiny_run
    before = final_metrics(output_dir)
    stamps = {p: p.stat().st_mtime_ns for p in output_dir.glob("*/stage_done.json")}
    checkpoints = sorted(output_dir.glob("*/checkpoint-*"))
    result = run_pipeline(recipe)
    assert {p: p.stat().st_mtime_ns for p in output_dir.glob("*/stage_done.json")} == stamps
    assert sorted(output_dir.glob("*/checkpoint-*")) == checkpoints
    for stage in ("base", "instructions", "sft", "teacher", "features", "distill", "gate", "evaluate", "export"):
        assert f"Stage {stage} already finished; skipping." in result.stderr
    assert final_metrics(output_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize("stage,mid_save", [("sft", False), ("features", False), ("distill", False),
                                            ("distill", True)])
def test_killed_stage_resumes_to_the_same_final_metrics(tiny_run, colour_folder, tmp_path, stage, mid_save):
    reference_dir, killed_dir = tiny_run[0], tmp_path / "killed"
    recipe = write_recipe(tmp_path / "killed.yaml", colour_folder, killed_dir)
    process = run_pipeline(recipe, wait=False)
    # The cache build is killed as soon as its first file (temporary or renamed) shows up.
    kill_when(process, "features/*safetensors*" if stage == "features" else f"{stage}/checkpoint-*/trainer_state.json",
              killed_dir)
    assert not (killed_dir / stage / "stage_done.json").exists(), "the kill came too late to test resuming"
    if mid_save:
        # Killed while `Trainer` was still writing a checkpoint: its trainer_state.json (written last) is empty.
        newest = max((killed_dir / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        (newest / "trainer_state.json").write_text("")
    run_pipeline(recipe)
    assert final_metrics(killed_dir) == final_metrics(reference_dir)
    assert not list((killed_dir / "features").glob(".*tmp*"))  # no leftovers of a killed cache write


@pytest.mark.slow
def test_forced_rerun_with_new_settings_starts_the_stage_afresh(tiny_run, tmp_path):
    import shutil
    import subprocess
    import sys

    output_dir = tmp_path / "copy"
    shutil.copytree(tiny_run[0], output_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_run[1].read_text().replace(str(tiny_run[0]), str(output_dir)))
    before = (output_dir / "gate" / "gate.safetensors").read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "train", "gate", "--config", str(recipe), "--set",
                    "model.gate_vlm_signal=one_hot", "gate.learning_rate=0.05"], check=True, env=env,
                   capture_output=True)
    assert (output_dir / "gate" / "gate.safetensors").read_bytes() != before
