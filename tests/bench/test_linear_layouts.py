"""`bench.linear_layouts` runs (smoke, two shapes) and writes, for each product, both weight layouts with a rate and a
fraction of the peak measured in the same run. No timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_linear_layouts_smoke(tmp_path):
    output = tmp_path / "linear_layouts.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.linear_layouts", "--tiny", "--threads", "1", "--dtype",
                             "fp32", "--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(output.read_text())
    assert data["benchmark"] == "linear_layouts" and data["peak_gflop_per_s"] > 0
    layouts = {(row["product"], row["layout"]) for row in data["results"]}
    assert layouts == {(product, layout) for product in ("text mlp gate/up", "text mlp down")
                       for layout in ("stored (out, in): F.linear", "transposed (in, out): x @ w")}
    for row in data["results"]:
        assert math.isfinite(row["gflop_per_s"]) and row["gflop_per_s"] > 0 and row["fraction_of_peak"] > 0
    assert "| text mlp gate/up | 1320 x 1536 -> 8960 |" in result.stdout
