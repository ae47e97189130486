"""Ablations on a finished run's cached features: one finite row per variant with the parameters its config implies."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import copy_finished_run
from safetensors.torch import load_file

from modeling_emovlm_kd import GATE_TYPES, EmoVLMKDDistillationHead
from modeling_emovlm_kd.fusion import new_gate
from train.__main__ import main as cli
from train.commands.ablate import (
    PAPER_DEPTHS,
    ablate,
    depth_min_width,
    head_parameter_count,
    reference_name,
    scaled_hidden_dims,
)
from train.infra.run import count_parameters

FAST = {"seeds": 2, "epochs": 1, "selection": "last"}


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    return copy_finished_run(tiny_run[0], tmp_path_factory.mktemp("ablate") / "run")


def test_paper_widths_scale_with_the_feature_width():
    assert [scaled_hidden_dims(d, 3584) for d in PAPER_DEPTHS] == [list(d) for d in PAPER_DEPTHS]
    assert [scaled_hidden_dims(d, 64) for d in PAPER_DEPTHS][-1] == [18, 9, 5, 4, 4]
    assert scaled_hidden_dims([1024, 512, 64], 64, depth_min_width(10)) == [18, 10, 10]
    assert depth_min_width(3) == 4


def test_parameter_formula_matches_the_head_module():
    for dims in ([], [18], [18, 9, 5]):
        head = EmoVLMKDDistillationHead(64, dims, 3, "gelu", 0.1)
        assert head_parameter_count(64, dims, 3) == count_parameters(head)


def test_reference_lines_are_named_from_the_branch_table():
    assert [reference_name(b, "qwen3_vl") for b in ("vlm", "teacher", "head", "fused")] == [
        "Qwen3-VL alone", "ViT teacher", "run's distilled head", "run's fused model"]


def load_table(run_dir: Path, what: str) -> dict:
    return json.loads((run_dir / "ablations" / f"{what}.json").read_text())


def assert_finite_rows(table: dict, names: int, seeds: int = 2) -> None:
    assert len(table["variants"]) == names
    for row in table["variants"]:
        assert len(row["runs"]) == seeds
        for summary in row["summary"].values():
            assert math.isfinite(summary["mean"]) and math.isfinite(summary["std"]) and summary["n"] == seeds


@pytest.mark.slow
def test_depth_ablation_has_a_row_per_depth_with_the_implied_parameters(run_copy):
    paths = ablate(run_copy, "depth", **FAST)
    table = load_table(run_copy, "depth")
    assert_finite_rows(table, len(PAPER_DEPTHS))
    dims = [row["settings"]["hidden_dims"] for row in table["variants"]]
    assert dims == [[18], [18, 9], [18, 9, 5], [18, 9, 5, 4], [18, 9, 5, 4, 4]]  # D=64, 3 classes
    for row in table["variants"]:
        assert row["parameters"] == head_parameter_count(64, row["settings"]["hidden_dims"], 3)
        assert set(row["summary"]) == {"head_accuracy", "head_macro_f1", "fused_accuracy", "fused_macro_f1"}
        assert all(0 <= run["head_accuracy"] <= 1 for run in row["runs"])
    # A depth is a recipe override run by the pipeline's stages 2, 3 and evaluate in a child run.
    child = run_copy / "ablations" / "depth" / "hidden-18-9" / f"seed-{table['seeds'][1]}"
    results = json.loads((child / "evaluate" / "results.json").read_text())
    assert results["recipe"]["model"]["head_hidden_dims"] == [18, 9]
    assert results["recipe"]["distill"]["seed"] == results["recipe"]["gate"]["seed"] == table["seeds"][1]
    assert table["variants"][1]["runs"][1]["fused_accuracy"] == results["branches"]["fused"]["accuracy"]
    markdown = paths["md"].read_text()
    assert markdown.count("| [18") == 5 and " ± " in markdown
    assert "Reference (test accuracy of the run itself): Qwen2-VL alone " in markdown
    assert paths["png"].stat().st_size > 10_000


@pytest.mark.slow
def test_gate_ablation_covers_every_gate_and_resumes_from_its_cache(run_copy):
    ablate(run_copy, "gate", **FAST)
    table = load_table(run_copy, "gate")
    assert_finite_rows(table, len(GATE_TYPES))
    assert [row["settings"]["gate_type"] for row in table["variants"]] == list(GATE_TYPES)
    for row in table["variants"]:
        assert row["parameters"] == count_parameters(new_gate(row["settings"]["gate_type"], 3))
    assert table["variants"][0]["parameters"] == 2 * 3 * 3 + 3  # concat_linear: Linear(2C, C)
    # Each (variant, seed) is a child run of the pipeline's own stages on the parent's caches, stage 2 linked.
    children = sorted((run_copy / "ablations" / "gate").glob("*/seed-*"))
    assert len(children) == 2 * len(GATE_TYPES)
    for child in children:
        assert (child / "features").is_symlink() and (child / "distill").is_symlink()
        assert (child / "gate" / "stage_done.json").exists() and (child / "evaluate" / "results.json").exists()
    # A variant's seeds start its gate from different initial weights (the seed seeds the stage, init included).
    moe = [load_file(child / "gate" / "gate.safetensors") for child in children if child.parent.name == "moe"]
    assert len(moe) == 2 and any(not torch.equal(moe[0][k], moe[1][k]) for k in moe[0])
    markers = {child: (child / "gate" / "stage_done.json").read_text() for child in children}
    ablate(run_copy, "gate", **FAST)  # every (variant, seed) is finished and up to date: nothing trains
    assert {child: (child / "gate" / "stage_done.json").read_text() for child in children} == markers
    assert load_table(run_copy, "gate")["variants"] == table["variants"]


@pytest.mark.slow
def test_alpha_sweep_from_the_command_line(run_copy, capsys):
    cli(["ablate", "--run", str(run_copy), "--what", "alpha", "--alphas", "0", "1", "--seeds", "2", "--epochs", "1",
         "--selection", "best"])
    table = load_table(run_copy, "alpha")
    assert_finite_rows(table, 2)
    assert [row["settings"]["alpha"] for row in table["variants"]] == [0.0, 1.0]
    for row in table["variants"]:
        assert row["parameters"] == head_parameter_count(64, [32], 3)  # the run's head: hidden [32]
        assert all(run["kl_to_teacher"] >= 0 for run in row["runs"])
    out = capsys.readouterr().out
    assert "| α=0 |" in out and "alpha.png" in out


@pytest.mark.slow
def test_gate_data_ablation_compares_the_papers_rows_with_validation(run_copy, capsys):
    # The run's own gate (the default, gate.fit_on: validation) records both of its accuracies; the tiny run's
    # validation split has 4 images per class, so 4 folds.
    own = json.loads((run_copy / "gate" / "stage_done.json").read_text())
    assert own["fit_on"] == "validation" and own["folds"] == 4 and own["fitted_rows"] == 12
    assert own["held_out_accuracy"] == own["cross_validated_accuracy"]
    assert own["fitted_rows_accuracy"] == own["best_validation_accuracy"]
    cli(["ablate", "--run", str(run_copy), "--what", "gate-data", "--seeds", "2", "--epochs", "1"])
    table = load_table(run_copy, "gate-data")
    assert_finite_rows(table, 2)
    assert [row["name"] for row in table["variants"]] == ["train (the paper)", "validation (run's)"]
    for row in table["variants"]:
        fit_on = row["settings"]["fit_on"]
        assert set(row["summary"]) == {"fused_accuracy", "fused_macro_f1", "held_out_accuracy", "weight_decay"}
        assert row["parameters"] == count_parameters(new_gate("concat_linear", 3))
        for scores in row["runs"]:
            # Each (rows, seed) is a child run of the pipeline's gate and evaluate stages, its head linked.
            child = run_copy / "ablations" / "gate-data" / f"fit-on-{fit_on}" / f"seed-{scores['seed']}"
            assert (child / "distill").is_symlink()
            marker = json.loads((child / "gate" / "stage_done.json").read_text())
            results = json.loads((child / "evaluate" / "results.json").read_text())
            assert marker["fit_on"] == results["recipe"]["gate"]["fit_on"] == fit_on
            assert marker["fitted_rows"] == {"train": 36, "validation": 12}[fit_on]
            assert scores["fused_accuracy"] == results["branches"]["fused"]["accuracy"]
            held_out = {"train": "best_validation_accuracy", "validation": "cross_validated_accuracy"}[fit_on]
            assert scores["held_out_accuracy"] == marker[held_out]
            assert scores["weight_decay"] == marker["weight_decay"] == 1e-4  # the run's recipe: the default
    out = capsys.readouterr().out
    assert "| train (the paper) | 0.0001 |" in out and "gate-data.png" in out
