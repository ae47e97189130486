"""The seed spread: stages 2-3 retrained through the pipeline's own stages in child runs sharing the caches."""

import json
import shutil
import statistics

import pytest

from train.commands.spread import format_spread, seed_spread
from train.infra.recipe import load_recipe


def test_spread_table_names_the_runs_backbone():
    table = {"seeds": [7, 8], "vlm_type": "qwen2_5_vl", "summary": {
        "vlm": {"accuracy": {"mean": 0.5, "std": 0.0}, "macro_f1": {"mean": 0.4, "std": 0.0}},
        "fused": {"accuracy": {"mean": 0.75, "std": 0.25}, "macro_f1": {"mean": 0.7, "std": 0.1}}}}
    single = {"branches": {"vlm": {"accuracy": 0.5}, "fused": {"accuracy": 1.0}}}
    assert format_spread(table, single).splitlines() == [
        "| branch | this run (seed 7) | accuracy over seeds 7, 8 | macro-F1 over seeds |",
        "|---|---|---|---|",
        "| Qwen2.5-VL alone | 0.5000 | 0.5000 ± 0.0000 (fixed: not seeded here) | 0.4000 ± 0.0000 |",
        "| EmoVLM-KD (fused) | 1.0000 | 0.7500 ± 0.2500 | 0.7000 ± 0.1000 |"]


@pytest.mark.slow
def test_spread_retrains_stages_2_and_3_per_seed_on_the_shared_caches(tiny_run, tmp_path):
    source, recipe_path, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = load_recipe(recipe_path, output_dir=str(run))
    table = seed_spread(recipe, seeds=2)
    seed = recipe.seed
    child = run / "seeds" / f"seed-{seed + 1}"
    for stage in ("base", "instructions", "sft", "teacher", "features"):
        assert (child / stage).is_symlink() and (child / stage / "stage_done.json").exists(), stage
    assert not (child / "export").exists()  # only stages 2-3 and the evaluation run per seed
    child_results = json.loads((child / "evaluate" / "results.json").read_text())
    parent_results = json.loads((run / "evaluate" / "results.json").read_text())
    assert child_results["recipe"]["distill"]["seed"] == child_results["recipe"]["gate"]["seed"] == seed + 1
    assert table["seeds"] == [seed, seed + 1] and table["vlm_type"] == "qwen2_vl"
    for branch in ("vlm", "head", "teacher", "fused"):
        values = [parent_results["branches"][branch]["accuracy"], child_results["branches"][branch]["accuracy"]]
        assert table["per_seed"][seed + 1][branch]["accuracy"] == values[1]
        assert table["summary"][branch]["accuracy"]["mean"] == pytest.approx(statistics.fmean(values))
        assert table["summary"][branch]["accuracy"]["std"] == pytest.approx(statistics.stdev(values))
    for branch in ("vlm", "teacher"):  # not seeded by stages 2-3
        assert table["summary"][branch]["accuracy"]["std"] == 0
    heads = [json.loads((d / "distill" / "stage_done.json").read_text())["provenance"] for d in (run, child)]
    assert heads[0] != heads[1]
    markdown = format_spread(table, parent_results)
    assert f"| EmoVLM-KD (fused) | {parent_results['branches']['fused']['accuracy']:.4f} |" in markdown
    # Again: the child's stages are up to date and nothing retrains.
    marker = (child / "distill" / "stage_done.json").read_text()
    assert seed_spread(recipe, seeds=2)["summary"] == table["summary"]
    assert (child / "distill" / "stage_done.json").read_text() == marker
