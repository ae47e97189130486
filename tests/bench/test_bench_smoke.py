"""Smoke runs of the benchmark scripts on the tiny model: they run, print a table and write complete JSON.

No timing is asserted here: benchmarks are not tests. The scripts run side by side, each in its own process.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUNS = {
    "inference": ["--reps", "1", "--batch-sizes", "1", "2", "--max-new-tokens", "4", "--long-max-new-tokens", "8"],
    "overhead": ["--reps", "1", "--inner", "5"],
    "training": ["--num-images", "4", "--epochs", "2", "--max-new-tokens", "4"],
    "scaling": ["--reps", "1", "--sides", "56", "112", "--batch-sizes", "1", "2", "--max-new-tokens", "4"],
    "feature_workers": ["--num-images", "4", "--batch-size", "2", "--reps", "1"],
    "real_shape": ["--sft-steps", "2", "--image-size", "300x200"],
    "compare_revisions": ["--revision", "HEAD", "--batch-size", "2", "--reps", "1"],
}


def numbers(value, path=""):
    """Every number in a JSON value, with where it is."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{path}[{i}]")


def test_bench_scripts_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}  # bench.real_shape loads its export's remote code
    processes = {}
    for name, extra in RUNS.items():
        command = [sys.executable, "-m", f"bench.{name}", "--tiny", "--threads", "1",
                   "--output", str(tmp_path / f"{name}.json"), *extra]
        processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
    outputs = {name: process.communicate(timeout=600) for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, f"bench.{name} failed:\n{outputs[name][1][-4000:]}"

    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in RUNS}
    for name, result in results.items():
        assert result["benchmark"] == name
        assert {"environment", "config", "settings", "ratios", "table_markdown"} <= set(result)
        assert result["config"]["shape"] == "tiny"
        assert result["environment"]["command"].startswith(f"python -m bench.{name} --tiny")
        assert "| " in outputs[name][0]  # the table was printed
        found = list(numbers(result))
        assert found
        bad = [(where, value) for where, value in found if not math.isfinite(value)]
        assert not bad, f"bench.{name}: non-finite numbers {bad[:5]}"

    inference = results["inference"]
    cases = {(row["method"], row["batch_size"]) for row in inference["results"]}
    assert {("fused", 1), ("fused", 2), ("fused_pipeline", 2), ("vlm_only", 2), ("official_gen4", 2),
            ("official_gen8", 1), ("official_gen8", 2)} <= cases
    official = [row for row in inference["results"] if row["method"] == "official_gen8"]
    assert all(tokens == 8 for row in official for tokens in row["generated_tokens"])
    assert {"fused_vs_official_gen4_images_per_s@2", "fused_batch2_vs_batch1_throughput",
            "fused_fraction_of_peak@2", "fused_stock_latency_over_fused@2"} <= set(inference["ratios"])
    assert inference["peak"]["gflop_per_s"] > 0
    for row in inference["results"]:  # every case: counted FLOPs, achieved rate, share of the peak, top ops
        assert row["flops"]["total"] > 0 and row["gflop_per_s"] > 0 and row["fraction_of_peak"] > 0
        if not row["method"].startswith("official_gen8"):  # the long generation is not profiled
            assert row["profile"]["top_ops"] and abs(sum(row["profile"]["shares"].values()) - 1) < 1e-6
    assert ("fused_stock", 2) in cases

    overhead = results["overhead"]
    assert overhead["parameters"]["qwen2_vl_7b"]["distillation_head"] == 3_679_240
    assert overhead["parameters"]["qwen2_vl_7b"]["gate"] == 136
    assert "head_and_gate_of_total_params_pct@7b" in overhead["ratios"]
    assert {row["batch_size"] for row in overhead["latency"]} == {1, 8}

    training = results["training"]["results"]
    assert {"cache_build_s", "stage2_cached_epoch_s", "stage3_cached_epoch_s", "stage2_recompute_epoch_s",
            "stage3_recompute_epoch_s", "stage2_official_epoch_s", "stage3_official_epoch_s"} <= set(training)
    assert len(training["stage2_cached_epoch_s"]["all"]) == 2
    assert training["stage3_train_gate"]["lbfgs_calls"] >= 1  # stage 3 timed through train.stages.gate.train_gate
    assert training["stage3_train_gate"]["head_signal"] == results["training"]["config"]["gate_head_signal"]

    scaling = results["scaling"]["results"]
    assert {(row["sweep"], row["method"]) for row in scaling} == {
        ("resolution", "fused"), ("resolution", "official_gen4"), ("batch", "fused")}
    assert all(row["peak_mib"] is None or row["peak_mib"] > 0 for row in scaling)
    assert all(row["gflop_per_s"] > 0 and 0 < row["fraction_of_peak"] and row["profile"]["top_ops"]
               for row in scaling)

    workers = {row["case"]: row for row in results["feature_workers"]["results"]}
    assert set(workers) == {"preprocess_only", "workers0", "workers2"}
    assert workers["workers2"]["cache_equals_workers0"] is True  # same cache with preprocessing in 2 workers
    real = results["real_shape"]
    phases = [row["phase"] for row in real["phases"]]
    # The real pipeline's stages (timed through its on_stage hook), stage 1 split into its Trainer's three parts.
    assert phases == ["build_base", "instructions", "sft_load_4bit", "sft_steps", "sft_merge", "teacher", "features",
                      "distill", "gate", "evaluate", "export", "reload_4bit", "classify"]
    assert all(row["seconds"] >= 0 and row["peak_rss_gib"] > 0 for row in real["phases"])
    assert all(row["status"] == "pass" for row in real["phases"]) and real["failed"] == []
    done = real["results"]
    assert done["sft"]["linear4bit_modules"] > 0 and done["sft"]["steps"] == 2
    assert done["sft"]["kinds"] == ["categorical", "conversation"]
    assert done["sft"]["rows"] == 2 * real["settings"]["images"]["train"]  # every training image, both kinds
    assert done["sft"]["num_input_tokens_seen"] > 0 and done["teacher"]["steps"] == 1
    # 300x200 images are resized under the tiny bound (112^2 pixels: at most 16 visual tokens per image).
    tokens = [n for split in done["features"]["visual_tokens_per_image"].values() for n in split]
    assert tokens and max(tokens) <= done["features"]["max_visual_tokens_of_bound"] == 16
    assert "BF16" in done["export"]["tensors_by_dtype"] and done["export"]["head_and_gate_dtypes"] == ["F32"]
    assert done["reload_4bit"]["linear4bit_modules"] > 0 and done["reload_4bit"]["head_and_gate_dtypes"] == ["float32"]
    compared = results["compare_revisions"]
    assert {row["case"] for row in compared["results"]} == {"old", "new"}
    assert compared["agreement"]["vlm_logits"]["same_argmax"] is True
    assert all(row["fraction_of_peak_cpu"]["median"] > 0 for row in compared["results"])
    labels = set(real["config"]["labels"])
    assert len(done["classify"]["top1"]) == 1 and set(done["classify"]["top1"]) <= labels
