"""Command-line edge cases of the benchmark scripts (no timing asserted)."""

import torch

from bench import inference
from bench.common import interleaved_timings


def test_interleaved_timings_of_no_cases_is_empty():
    assert interleaved_timings({}, reps=3, warmup=1, device=torch.device("cpu")) == {}


def test_long_batch_sizes_without_a_value_skips_the_long_generation(tmp_path):
    """`--long-batch-sizes` with no value is an empty list: no long generation (it used to divide by zero)."""
    result = inference.main(["--tiny", "--threads", "1", "--reps", "1", "--batch-sizes", "1", "--max-new-tokens", "2",
                             "--long-max-new-tokens", "4", "--long-batch-sizes", "--no-pipeline", "--no-profile",
                             "--no-stock", "--output", str(tmp_path / "inference.json")])
    methods = {row["method"] for row in result["results"]}
    assert "official_gen2" in methods and "official_gen4" not in methods
    assert result["settings"]["long_batch_sizes"] == []
