"""`bench.gpu_check`: its CPU smoke run (`--tiny`) goes through every phase of the real pipeline, and a failing phase
is recorded with its error while the phases that do not depend on it still run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_passes_every_phase_and_writes_one_json(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    process = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny", "--output", str(output),
                              "--work-dir", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(output.read_text())
    phases = {row["phase"]: row for row in result["phases"]}
    assert list(phases) == list(gpu_check.NEEDS)
    assert all(row["status"] == "pass" for row in phases.values()), [
        (row["phase"], row.get("error")) for row in phases.values() if row["status"] != "pass"]
    assert result["failed"] == [] and "| sft | pass |" in process.stdout
    # Stage 1 ran QLoRA through the pipeline: 4-bit layers, the requested steps, counted tokens per second.
    sft = next(t for t in result["trainers"] if t["stage"] == "sft")
    assert sft["linear4bit"] > 0 and sft["global_step"] == 6
    assert "tokens/s" in phases["sft"]["throughput"] and phases["sft"]["fraction_of_measured_peak"] > 0
    # Tokens per second are the Trainer's own: the input tokens it counted over its train_runtime (a callback
    # observed them and timed every step; Trainer.train is not wrapped).
    assert len(sft["step_seconds"]) == 6 and sft["tokens_seen"][-1] == sft["num_input_tokens_seen"] > 0
    rate = sft["num_input_tokens_seen"] / sft["metrics"]["train_runtime"]
    assert phases["sft"]["throughput"].startswith(f"{rate:,.1f} tokens/s")
    # Each stage phase is the stage's body as the pipeline's on_stage hook measured it, inside the whole call.
    for stage in ("instructions", "sft", "teacher", "features", "distill", "gate", "evaluate", "export"):
        assert 0 <= phases[stage]["seconds"] <= phases[stage]["phase_seconds"], stage
    # Stage 1's parts (the 4-bit load, the steps, the merge) add up to the stage.
    parts = phases["sft"]["parts"]
    assert list(parts) == ["before_train", "train", "after_train"] and parts["train"]["seconds"] > 0
    assert sum(p["seconds"] for p in parts.values()) == pytest.approx(phases["sft"]["seconds"], rel=1e-9)
    assert max(p["peak_memory_gib"] for p in parts.values()) == phases["sft"]["peak_memory_gib"]
    assert phases["sft"]["estimated_seconds"] > 0 and phases["features"]["estimated_memory_gib"] > 0
    # Stage 1's throughput knobs: each case on against all off, or the one-line reason it cannot run here.
    from bench.sft_throughput import KNOBS

    knobs = {row["case"]: row for row in result["results"]["sft_knobs"]["rows"]}
    assert set(knobs) == {"baseline", *KNOBS}
    assert knobs["baseline"]["status"] == "ok" and knobs["baseline"]["vs_baseline"] == 1
    assert all(row["tokens_per_s"] > 0 if row["status"] == "ok" else row["reason"] for row in knobs.values())
    assert knobs["flash_attention"]["status"] == "refused" and "| sft_knobs: baseline | pass |" in process.stdout
    assert result["results"]["sft_knobs"]["estimated_seconds_per_case"] > 0  # from stage 1's own run
    assert result["results"]["reload_4bit"]["linear4bit_modules"] > 0
    assert result["results"]["reload_4bit"]["lm_head_is_4bit"] is False
    assert len(result["results"]["classify"]["top1"]) == 8
    assert [row["batch_size"] for row in result["results"]["inference"]["fused"]] == [1, 2]
    assert {"torch", "transformers", "bitsandbytes", "peft", "trl"} <= set(result["versions"])
    # The run's folders are the pipeline's own: stage markers and the exported Hub folder.
    run = tmp_path / "work" / "run"
    assert all((run / stage / "stage_done.json").exists() for stage in ("sft", "features", "gate", "export"))
    assert list((run / "final").glob("*.safetensors"))


def test_a_failing_phase_skips_only_what_needs_it():
    phases = gpu_check.Phases(torch.device("cpu"), time_limit=3600)
    phases.run("build", lambda: None)
    phases.run("instructions", lambda: None)

    def broken():
        raise RuntimeError("CUDA out of memory (simulated)")

    assert phases.run("sft", broken) is None
    assert phases.run("teacher", lambda: "ran") == "ran"  # needs only build
    phases.run("features", lambda: pytest.fail("features needs sft"))
    phases.run("inference", lambda: None)  # needs nothing
    rows = phases.rows
    assert rows["sft"]["status"] == "fail" and rows["sft"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "broken" in rows["sft"]["traceback"]
    assert rows["teacher"]["status"] == "pass" and rows["inference"]["status"] == "pass"
    assert rows["features"] == {"phase": "features", "status": "skipped", "error": "needs sft"}


def test_no_phase_starts_after_the_time_limit():
    phases = gpu_check.Phases(torch.device("cpu"), time_limit=0)
    phases.run("matmul_peak", lambda: pytest.fail("started after the limit"))
    assert phases.rows["matmul_peak"]["status"] == "skipped"
    assert phases.rows["matmul_peak"]["error"].startswith("time limit")


def test_without_a_gpu_only_the_tiny_run_is_offered(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    assert "--tiny" in capsys.readouterr().err


def test_the_knobs_that_fit_the_time_left_run_and_the_rest_are_reported():
    knobs = ["eager_attention", "group_by_length", "workers"]
    assert gpu_check.fit_knobs(knobs, None, 10) == (knobs, [])  # no estimate: all of them
    assert gpu_check.fit_knobs(knobs, 30.0, 1000) == (knobs, [])
    # 95 s at 30 s per case: the all-off baseline and two knobs.
    assert gpu_check.fit_knobs(knobs, 30.0, 95) == (["eager_attention", "group_by_length"], ["workers"])
    assert gpu_check.fit_knobs(knobs, 30.0, 5) == (["eager_attention"], ["group_by_length", "workers"])
