"""End-to-end: every stage on a tiny image folder, reruns that skip finished stages, and kill/resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from transformers import pipeline

LABELS = ["red", "green", "blue"]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}
SIZES = {"train": 12, "validation": 4, "test": 6}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in SIZES.items():
        for label in LABELS:
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(COLOURS[label]) + rng.integers(-60, 61, (28, 28, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / label / f"{i}.png")
    return root


def write_recipe(path: Path, image_folder: Path, output_dir: Path, sft_epochs=2, distill_epochs=3) -> Path:
    recipe = {
        "output_dir": str(output_dir),
        "seed": 7,
        "labels": LABELS,
        "data": {"kind": "imagefolder", "root": str(image_folder)},
        "base_models": {"tiny": True},
        "model": {"head_hidden_dims": [32], "gate_vlm_signal": "probs", "feature_batch_size": 16},
        "sft": {"use_peft": False, "gradient_checkpointing": False, "instruction_kinds": ["categorical"],
                "learning_rate": 2e-3, "num_train_epochs": sft_epochs, "per_device_train_batch_size": 6,
                "disable_tqdm": True},
        "teacher": {"learning_rate": 2e-3, "num_train_epochs": 2, "per_device_train_batch_size": 12,
                    "disable_tqdm": True},
        "distill": {"num_train_epochs": distill_epochs, "per_device_train_batch_size": 4, "disable_tqdm": True},
        "gate": {"learning_rate": 1e-2, "num_train_epochs": 3, "per_device_train_batch_size": 4, "disable_tqdm": True},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_pipeline(recipe: Path, *extra, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "train", "pipeline", "--config", str(recipe), *extra]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def final_metrics(output_dir: Path) -> dict:
    results = json.loads((output_dir / "evaluate" / "results.json").read_text())
    return {branch: (m["accuracy"], m["macro_f1"]) for branch, m in results["branches"].items()}


@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    recipe = write_recipe(root / "recipe.yaml", image_folder, root / "out")
    result = run_pipeline(recipe)
    return root / "out", recipe, result.stdout


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_exports_a_hub_ready_folder(finished_run):
    output_dir, _, stdout = finished_run
    for stage in ("base", "sft", "teacher", "features", "distill", "gate", "evaluate", "export"):
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
def test_rerun_skips_finished_stages(finished_run):
    output_dir, recipe, _ = finished_run
    before = final_metrics(output_dir)
    stamps = {p: p.stat().st_mtime_ns for p in output_dir.glob("*/stage_done.json")}
    started = time.time()
    run_pipeline(recipe)
    assert time.time() - started < 60
    assert {p: p.stat().st_mtime_ns for p in output_dir.glob("*/stage_done.json")} == stamps
    assert final_metrics(output_dir) == before


def kill_when(process, path_glob: str, root: Path, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(root.glob(path_glob)):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            pytest.fail(f"the pipeline ended before {path_glob} appeared")
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"{path_glob} never appeared")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_killed_stage_resumes_to_the_same_final_metrics(image_folder, tmp_path, stage):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    # Long enough stages that the kill lands after the first checkpoint and before the stage ends.
    epochs = {"sft_epochs": 4, "distill_epochs": 40}
    run_pipeline(write_recipe(tmp_path / "reference.yaml", image_folder, reference_dir, **epochs))
    recipe = write_recipe(tmp_path / "killed.yaml", image_folder, killed_dir, **epochs)
    process = run_pipeline(recipe, wait=False)
    kill_when(process, f"{stage}/checkpoint-*/trainer_state.json", killed_dir)
    assert not (killed_dir / stage / "stage_done.json").exists(), "the kill came too late to test resuming"
    run_pipeline(recipe)
    assert final_metrics(killed_dir) == final_metrics(reference_dir)
