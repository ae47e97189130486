"""The run report: complementarity that adds up, real numbers from the run, and every linked figure present."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SECRET_API_KEY, copy_finished_run

from train.__main__ import main as cli
from train.commands.ablate import ablate
from train.commands.report import (
    OUTCOMES,
    BranchOutputs,
    branch_outputs,
    complementarity,
    pair_summary,
    pick_disagreements,
    write_report,
)
from train.infra.evaluation import branch_name, format_table, markdown_table, vlm_name
from train.infra.run import open_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    return copy_finished_run(tiny_run[0], tmp_path_factory.mktemp("report") / "run")


def outputs_from(labels, **predictions) -> BranchOutputs:
    labels = torch.tensor(labels)
    logits = {b: torch.nn.functional.one_hot(torch.tensor(p), 3).float() for b, p in predictions.items()}
    return BranchOutputs(logits, labels)


def test_complementarity_counts_each_image_once():
    counts = complementarity(torch.tensor([1, 1, 0, 0, 1]).bool(), torch.tensor([1, 0, 1, 0, 0]).bool())
    assert counts == dict(zip(OUTCOMES, (1, 2, 1, 1)))


def test_disagreements_are_balanced_between_the_branches():
    labels = [0] * 10
    outputs = outputs_from(labels, vlm=[0, 0, 0, 1, 1, 1, 2, 0, 0, 0], head=[1, 2, 1, 0, 0, 0, 1, 0, 0, 0],
                           fused=labels)
    picked = pick_disagreements(outputs, 4)
    assert sorted(picked) == [(0, "only VLM right"), (2, "only VLM right"), (3, "only head right"),
                              (5, "only head right")]
    # Both groups are too small for 7 images: a row where both are wrong fills the grid.
    assert [g for _, g in pick_disagreements(outputs, 7)].count("both wrong") == 1


def test_branch_names_are_one_table_and_the_vlm_is_named_by_the_runs_backbone():
    assert [branch_name(b) for b in ("vlm", "head", "teacher", "fused")] == [
        "VLM alone", "Distilled head", "ViT teacher", "EmoVLM-KD (fused)"]
    assert [vlm_name(t) for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")] == ["Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL"]
    assert branch_name("vlm", "qwen2_5_vl") == "Qwen2.5-VL alone" and branch_name("vlm", "qwen3_vl", short=True) == \
        "Qwen3-VL"
    assert branch_name("head", "qwen3_vl", short=True) == "distilled head"
    results = {"branches": {"vlm": {"accuracy": 1.0, "macro_f1": 0.5}}}
    assert "| Qwen3-VL alone | 1.0000 | 0.5000 |" in format_table(results, "qwen3_vl")


def test_one_markdown_table_writer():
    assert markdown_table(["branch", "accuracy"], [("head", "0.5000"), ("gate", 3)], align="lr") == (
        "| branch | accuracy |\n|---|---:|\n| head | 0.5000 |\n| gate | 3 |")
    assert markdown_table(["a", "b", "c"], []).splitlines()[1] == "|---|---|---|"


def test_figures_are_drawn_without_pyplot_or_a_global_backend(tmp_path):
    """Figures are `matplotlib.figure.Figure` objects saved by `save_figure`: no module selects a backend or
    imports pyplot, so plotting never depends on a display or on global state."""
    for path in (ROOT / "train").rglob("*.py"):
        text = path.read_text()
        assert "matplotlib.use(" not in text and "matplotlib.pyplot" not in text, path
        assert "from matplotlib import pyplot" not in text, path
    code = ("import sys; from train.infra.evaluation import plot_confusion_matrices; import train.commands.report; "
            f"plot_confusion_matrices({{'labels': ['a', 'b'], 'branches': {{'vlm': {{'accuracy': 0.5, "
            f"'confusion_matrix': [[1, 1], [0, 2]]}}}}}}, {str(tmp_path / 'cm.png')!r}, 'qwen2_5_vl'); "
            "print('matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False" and (tmp_path / "cm.png").stat().st_size > 1000


def linked_files(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.mark.slow
def test_complementarity_adds_up_and_agrees_with_the_branch_accuracies(run_copy):
    results = json.loads((run_copy / "evaluate" / "results.json").read_text())
    outputs = branch_outputs(open_run(run_copy))
    n = results["num_examples"]
    for vision in ("teacher", "head"):
        counts = pair_summary(outputs, vision)["counts"]
        assert sum(counts.values()) == n == len(outputs.labels)
        vlm_right = counts["both right"] + counts["only VLM right"]
        vision_right = counts["both right"] + counts["only vision right"]
        assert vlm_right == round(results["branches"]["vlm"]["accuracy"] * n)
        assert vision_right == round(results["branches"][vision]["accuracy"] * n)


@pytest.mark.slow
def test_report_links_only_files_it_wrote_and_shows_the_runs_numbers(run_copy, capsys):
    ablate(run_copy, "gate", seeds=1, epochs=1, selection="last")  # so the report embeds an ablation too
    cli(["report", "--run", str(run_copy), "--examples", "6"])
    path = run_copy / "report" / "report.md"
    assert f"Report: {path}" in capsys.readouterr().out
    markdown = path.read_text()
    links = linked_files(markdown)
    assert {"complementarity.png", "per_class_accuracy.png", "confusion_matrices.png",
            "ablation_gate.png"} <= set(links)
    for link in links:
        assert not Path(link).is_absolute() and (path.parent / link).stat().st_size > 5_000, link
    results = json.loads((run_copy / "evaluate" / "results.json").read_text())
    for branch, metrics in results["branches"].items():
        assert f"{metrics['accuracy']:.4f}" in markdown, branch
    assert f"| {results['parameters']['head']:,} |" in markdown
    assert "differs from" not in markdown  # recomputed numbers equal the evaluate stage's
    # The gate is fitted on the validation split (the default): the fused validation accuracy is in-sample, and
    # results.json, the report and the card say so with stage 3's cross-validated figure.
    gate = json.loads((run_copy / "gate" / "stage_done.json").read_text())
    assert gate["fit_on"] == "validation"
    assert results["validation_in_sample"] == {"fused": {"fit_on": "validation", "folds": gate["folds"],
                                                         "cross_validated_accuracy": gate["cross_validated_accuracy"]}}
    assert (f"| {results['validation']['fused']['accuracy']:.4f} (in-sample; cross-validated "
            f"{gate['cross_validated_accuracy']:.4f}) |") in markdown
    assert f"| {results['validation']['head']['accuracy']:.4f} |" in markdown  # the head's is not marked
    assert "| VLM (Qwen2-VL, tuned) |" in markdown and "| Qwen2-VL vs ViT teacher |" in markdown  # the run's backbone
    for label in results["labels"]:
        assert f"| {label} |" in markdown  # per-class table with class names
    assert "Not run yet: `python -m train ablate" in markdown  # depth and alpha were not run here
    assert "earlier state of this run" not in markdown
    # The run's recipe holds an API key and absolute data and run paths: the report, meant to be shared, has none.
    recipe = (run_copy / "recipe.yaml").read_text()
    assert SECRET_API_KEY in recipe
    for text in (SECRET_API_KEY, str(run_copy), str(run_copy.parent)):
        assert text not in markdown, text
    assert "/" + "tmp" not in markdown


@pytest.mark.slow
def test_report_flags_an_ablation_of_an_earlier_run_state(run_copy, tmp_path):
    if not (run_copy / "ablations" / "gate.json").exists():
        ablate(run_copy, "gate", seeds=1, epochs=1, selection="last")
    table_path = run_copy / "ablations" / "gate.json"
    table = json.loads(table_path.read_text())
    table_path.write_text(json.dumps({**table, "run_fingerprint": "an-older-run"}))
    try:
        markdown = write_report(run_copy, tmp_path / "stale", examples=0).read_text()
    finally:
        table_path.write_text(json.dumps(table))
    assert "earlier state of this run" in markdown


@pytest.mark.slow
def test_report_without_example_images_still_writes_every_section(run_copy, tmp_path):
    path = write_report(run_copy, tmp_path / "elsewhere", examples=0)
    markdown = path.read_text()
    assert "disagreements.png" not in markdown and "## Per-class accuracy" in markdown
    assert all((path.parent / link).exists() for link in linked_files(markdown))
