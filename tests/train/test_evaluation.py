import json

import pytest
import torch

from train.infra.evaluation import evaluate_branches, format_table, plot_confusion_matrices
from train.infra.files import write_json_atomic


def test_metrics_per_branch_and_figure(tmp_path):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    right = torch.nn.functional.one_hot(labels, 3).float()
    wrong_on_class_2 = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 0, 1]), 3).float()
    results = evaluate_branches({"vlm": right, "head": wrong_on_class_2}, labels, ["a", "b", "c"])
    assert results["branches"]["vlm"]["accuracy"] == 1.0
    head = results["branches"]["head"]
    assert head["accuracy"] == pytest.approx(4 / 6)
    assert head["per_class_accuracy"] == [1.0, 1.0, 0.0]
    assert head["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [1, 1, 0]]
    # macro-F1: class a: p=2/3 r=1 -> 0.8; b: 0.8; c: 0
    assert head["macro_f1"] == pytest.approx((0.8 + 0.8 + 0.0) / 3)
    path = plot_confusion_matrices(results, tmp_path / "cm.png")
    assert path.stat().st_size > 1000
    write_json_atomic(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| VLM alone | 1.0000 |" in format_table(results)


def test_mismatched_logits_are_rejected():
    with pytest.raises(ValueError, match="vlm"):
        evaluate_branches({"vlm": torch.zeros(3, 4)}, torch.zeros(3, dtype=torch.long), ["a", "b", "c"])
