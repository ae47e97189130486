"""Stage provenance on a finished tiny run: a changed setting reruns exactly its stage and what follows, single-stage
commands never publish weights and results that disagree, and one process at a time works on a run folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_pipeline
from safetensors.torch import load_file

STAGES = ("base", "instructions", "sft", "teacher", "features", "distill", "gate", "evaluate", "export")


def copy_run(tiny_run, tmp_path):
    """A private copy of the finished shared run (checkpoints included) and its recipe pointed at it."""
    source, recipe_path, _ = tiny_run
    target = tmp_path / "run"
    shutil.copytree(source, target)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_path.read_text().replace(str(source), str(target)))
    return target, recipe


def cli(command, recipe, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "train", command, "--config", str(recipe), *extra],
                          capture_output=True, text=True, env=env)


def markers(run):
    return {stage: json.loads((run / stage / "stage_done.json").read_text()) for stage in STAGES}


def results(run, where="evaluate"):
    return json.loads((run / where / "results.json").read_text())


def assert_final_is_the_evaluated_model(run):
    """`final/` holds the trained head and gate, and the results of exactly those weights."""
    assert results(run, "final") == results(run)
    weights = load_file(run / "final" / "model.safetensors")
    for name, tensor in load_file(run / "distill" / "head.safetensors").items():
        assert (weights[f"distillation_head.{name}"] == tensor).all(), name
    for name, tensor in load_file(run / "gate" / "gate.safetensors").items():
        assert (weights[f"gate.{name}"] == tensor).all(), name
    assert markers(run)["evaluate"]["inputs"]["distill"] == markers(run)["distill"]["provenance"]


@pytest.mark.slow
def test_a_changed_setting_reruns_exactly_its_stage_and_those_downstream(tiny_run, tmp_path):
    run, recipe = copy_run(tiny_run, tmp_path)
    before = markers(run)
    head_before = (run / "distill" / "head.safetensors").read_bytes()
    result = run_pipeline(recipe, "--set", "distill.alpha=0.0")
    for stage in ("base", "instructions", "sft", "teacher", "features"):
        assert f"Stage {stage} already finished; skipping." in result.stderr, stage
    assert "Stage distill runs: its settings changed: distill.alpha: (unset) -> 0.0." in result.stderr
    for stage in ("gate", "evaluate", "export"):
        assert f"Stage {stage} runs: its input stage" in result.stderr, stage
    after = markers(run)
    for stage in STAGES:
        assert (after[stage]["provenance"] == before[stage]["provenance"]) == (stage in STAGES[:5]), stage
    assert (run / "distill" / "head.safetensors").read_bytes() != head_before
    assert results(run)["recipe"]["distill"]["alpha"] == 0.0
    assert_final_is_the_evaluated_model(run)
    # The same settings again: nothing reruns.
    again = run_pipeline(recipe, "--set", "distill.alpha=0.0")
    assert all(f"Stage {stage} already finished; skipping." in again.stderr for stage in STAGES)
    assert markers(run) == after
    # Settings that change no result (logging) rerun nothing either.
    quiet = run_pipeline(recipe, "--set", "distill.alpha=0.0", "--set", "distill.logging_steps=3")
    assert "runs:" not in quiet.stderr and markers(run) == after


@pytest.mark.slow
def test_single_stage_commands_rerun_on_change_only_and_refuse_stale_inputs(tiny_run, tmp_path):
    run, recipe = copy_run(tiny_run, tmp_path)
    head = (run / "distill" / "head.safetensors").read_bytes()
    unchanged = cli("distill", recipe)
    assert unchanged.returncode == 0, unchanged.stderr
    assert "Stage distill already finished; skipping." in unchanged.stderr
    assert (run / "distill" / "head.safetensors").read_bytes() == head
    changed = cli("distill", recipe, "--set", "distill.alpha=0.0")
    assert changed.returncode == 0, changed.stderr
    assert (run / "distill" / "head.safetensors").read_bytes() != head
    # Export now would pair the new head with the old gate and the old results: refused, final/ untouched.
    final = (run / "final" / "model.safetensors").read_bytes()
    refused = cli("export", recipe, "--set", "distill.alpha=0.0")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "Stage 'export' reads stage 'gate', which is out of date" in refused.stderr
    assert "its input stage 'distill' was rerun or changed" in refused.stderr
    assert (run / "final" / "model.safetensors").read_bytes() == final
    for stage in ("gate", "evaluate", "export"):
        done = cli(stage, recipe, "--set", "distill.alpha=0.0")
        assert done.returncode == 0, done.stderr
    assert results(run, "final")["recipe"]["distill"]["alpha"] == 0.0
    assert_final_is_the_evaluated_model(run)
    forced = cli("gate", recipe, "--set", "distill.alpha=0.0", "--force")
    assert forced.returncode == 0 and "Stage gate runs: --force." in forced.stderr


@pytest.mark.slow
def test_one_process_per_run_folder_and_a_killed_holder_does_not_block(tiny_run, tmp_path):
    run, recipe = copy_run(tiny_run, tmp_path)
    longer = ("--set", "sft.num_train_epochs=60")  # stage 1 and all after it rerun: long enough to overlap
    first = run_pipeline(recipe, *longer, wait=False)
    pid_file = run / ".lock.pid"
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert pid_file.exists(), "the first pipeline never took the run folder's lock"
    second = cli("pipeline", recipe, *longer)
    still_running = first.poll() is None
    if still_running:
        os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert still_running, "the first pipeline ended before the second started: the lock was not exercised"
    assert second.returncode == 1, second.stderr
    assert f"Run folder {run} is in use" in second.stderr and f"PID {first.pid}" in second.stderr
    assert str(run / ".lock") in second.stderr
    # The kernel released the killed holder's lock: the next run goes ahead and finishes the interrupted work.
    run_pipeline(recipe, *longer)
    assert results(run)["recipe"]["sft"]["num_train_epochs"] == 60
    assert_final_is_the_evaluated_model(run)


@pytest.mark.slow
def test_a_bf16_run_exports_bf16_weights_whose_predictions_are_the_results(tiny_run, colour_folder, tmp_path):
    """The caches and the export share the recipe's dtype, so `final/` itself reproduces `results.json` (the card's
    numbers); the head and the gate stay float32."""
    from transformers import AutoConfig

    from train.commands.predict import Predictor, predict_files, read_rows

    run, recipe = copy_run(tiny_run, tmp_path)
    result = run_pipeline(recipe, "--set", "model.dtype=bfloat16", "--set", "model.export_max_shard_size=100KB")
    assert "Stage features runs: its settings changed: model.dtype: (unset) -> 'bfloat16'." in result.stderr
    final = run / "final"
    assert str(AutoConfig.from_pretrained(final, trust_remote_code=True).dtype).endswith("bfloat16")
    shards = sorted(final.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (final / "model.safetensors.index.json").exists()
    weights = {}
    for shard in shards:
        weights.update(load_file(shard))
    assert {t.dtype for k, t in weights.items() if k.startswith(("distillation_head.", "gate."))} == {torch.float32}
    assert torch.bfloat16 in {t.dtype for k, t in weights.items() if k.startswith("vlm.")}
    test_images = sorted(str(p) for p in (colour_folder / "test").rglob("*.png"))
    output = tmp_path / "final_predictions.jsonl"
    predictor = Predictor(str(final), dtype="bfloat16")
    predict_files(predictor, test_images, output, batch_size=16, show_progress=False)
    labels = results(run)["labels"]
    predicted = {row["path"]: row["label"] for row in read_rows(output)}
    matrix = [[0] * len(labels) for _ in labels]
    for path in test_images:
        matrix[labels.index(os.path.basename(os.path.dirname(path)))][labels.index(predicted[path])] += 1
    fused = results(run)["branches"]["fused"]
    assert matrix == fused["confusion_matrix"]
    correct = sum(matrix[i][i] for i in range(len(labels)))
    assert correct / len(test_images) == fused["accuracy"]
    assert results(run)["computed_with"] == {"dtype": "bfloat16", "load_in_4bit": False}


@pytest.mark.slow
def test_the_resolution_bound_applies_identically_in_every_stage(tiny_run, tmp_path):
    """`model.max_pixels` reaches stage 1's processor, the caches', the export's (and so predict's, pipeline()'s and
    the app's): a 4000x3000 image gets at most the bound's visual tokens everywhere, and the processors agree."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from train.commands.predict import Predictor
    from train.infra.assemble import load_processor

    run, recipe = copy_run(tiny_run, tmp_path)
    bound = 6272  # 2 x 56 x 56: the tiny processor's own bounds are 3136 .. 12544 pixels
    result = run_pipeline(recipe, "--set", f"model.max_pixels={bound}")
    assert "Stage sft runs: its settings changed: model.max_pixels: (unset) -> 6272." in result.stderr
    image = Image.new("RGB", (4000, 3000), (10, 200, 30))
    processors = {
        "stage 1 (saved with the merged model)": AutoImageProcessor.from_pretrained(run / "sft" / "merged",
                                                                                    trust_remote_code=True),
        "feature caches": load_processor(run / "sft" / "merged", results(run)["labels"],
                                         max_pixels=bound).image_processor,
        "export (final/)": AutoImageProcessor.from_pretrained(run / "final", trust_remote_code=True),
        "predict": Predictor(str(run / "final")).image_processor,
    }
    grids = {}
    for name, processor in processors.items():
        assert processor.size.longest_edge == bound, name
        grid = processor(image, return_tensors="pt")["image_grid_thw"][0]
        grids[name] = grid.tolist()
        patches = int(grid.prod())
        assert patches * 14 * 14 <= bound, (name, grid)
    assert len({tuple(g) for g in grids.values()}) == 1, grids
