"""The seed spread: stages 2-3 retrained through the pipeline's own stages in child runs sharing the caches."""

import json
import shutil
import statistics

import pytest

from train.commands.spread import format_spread, seed_spread
from train.infra.recipe import load_recipe


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
    assert table["seeds"] == [seed, seed + 1]
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
