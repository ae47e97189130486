"""Smoke run of `bench/serve.py` on the tiny checkpoint: it starts the server, measures both concurrency levels in
one run, prints the table and writes complete JSON. No timing is asserted: a benchmark is not a test."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_serve_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    output = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--tiny", "--threads", "1", "--requests", "8",
                             "--concurrency", "1", "4", "--output", str(output)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| clients | images/s |" in result.stdout
    report = json.loads(output.read_text())
    assert report["benchmark"] == "serve" and report["config"]["shape"] == "tiny"
    assert report["environment"]["command"].startswith("python -m bench.serve --tiny")
    assert [row["concurrency"] for row in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["answered"] == 8 and row["failed"] == 0, row
        assert sum(int(size) * n for size, n in row["batch_sizes"].items()) == 8  # every image in some batch
        assert row["images_per_s"] > 0
    assert report["results"][0]["batch_sizes"] == {"1": 8}  # one client at a time: nothing to batch
    assert "c4_over_c1" in report["ratios"]
