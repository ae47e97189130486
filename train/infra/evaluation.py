"""Evaluation: accuracy, macro-F1, per-class accuracy and confusion matrices of the VLM alone, the head alone, the
teacher and the fused model, written as `results.json` (read by model cards and the README) and a PNG; and what
every table and figure of a run shares: the branches' display names, the Markdown table writer, figure saving.

    python -m train evaluate --config recipes/tiny/demo.yaml

Light to import (torch, `evaluate`, matplotlib and the model package load when a function needs them), so that
`python -m train push` can name the branches without loading the training stack.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

METRIC_PATH = str(Path(__file__).resolve().parents[1] / "metrics" / "emotion_classification.py")


class BranchName(NamedTuple):
    """How a branch of results.json is shown: `title` in a table row or a plot, `short` inside a sentence. `{vlm}`
    stands for the VLM's family (`backbones.py`: Qwen2-VL, Qwen2.5-VL, ...) where the run's backbone is known."""

    title: str
    short: str


# The one table of the branches' display names: results tables, confusion matrices, the report, the model card,
# the seed spread and the ablations all read it (through `branch_name`).
BRANCHES = {
    "vlm": BranchName("{vlm} alone", "{vlm}"),
    "head": BranchName("Distilled head", "distilled head"),
    "teacher": BranchName("ViT teacher", "ViT teacher"),
    "fused": BranchName("EmoVLM-KD (fused)", "fused model"),
}


def vlm_name(model_type: str | None = None) -> str:
    """The VLM family's display name for a wrapped config's `model_type` (`qwen2_vl` -> "Qwen2-VL"), "VLM" when
    unknown."""
    if model_type is None:
        return "VLM"
    from modeling_emovlm_kd.backbones import get_backbone

    return get_backbone(model_type).name


def branch_name(branch: str, model_type: str | None = None, short: bool = False) -> str:
    """A branch's display name (`BRANCHES`); the VLM's names its family when the run's `model_type` is given."""
    name = BRANCHES.get(branch, BranchName(branch, branch))
    return (name.short if short else name.title).format(vlm=vlm_name(model_type))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
    """A Markdown table: `align` has one letter per column, `l` (default) or `r` (numbers); cells as `str` gives."""
    align = align.ljust(len(header), "l")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Figure, path: str | Path, tight: bool = True, **savefig) -> Path:
    """Write a figure as a PNG (110 dpi), creating its folder. Figures are `matplotlib.figure.Figure` objects made
    directly, never through pyplot: no GUI backend is involved and nothing global needs closing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, **savefig)
    return path


@functools.cache
def _metric():
    """The metric module, loaded once per process (`evaluate.load` builds a module from the script each time)."""
    import evaluate

    return evaluate.load(METRIC_PATH)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    return _metric().compute(
        predictions=logits.argmax(-1).tolist(), references=labels.tolist(), num_labels=num_labels
    )


def evaluate_branches(logits: dict[str, torch.Tensor], labels: torch.Tensor, label_names: list[str]) -> dict:
    """Metrics per branch (`vlm`, `head`, `teacher`, `fused`: logits `(N, C)`) on one split."""
    results = {"labels": label_names, "num_examples": int(len(labels)), "branches": {}}
    for branch, branch_logits in logits.items():
        if branch_logits.shape != (len(labels), len(label_names)):
            raise ValueError(f"{branch} logits have shape {tuple(branch_logits.shape)}, expected "
                             f"{(len(labels), len(label_names))}.")
        results["branches"][branch] = classification_metrics(branch_logits, labels, len(label_names))
    return results


def validation_in_sample(gate_marker: dict | None) -> dict:
    """Which branches' validation numbers are in-sample: with `gate.fit_on: validation` stage 3 fits the gate on the
    validation split, so the fused model's accuracy there is the fit's own (optimistic); its cross-validated accuracy
    on those rows (stage 3's marker) is the fair figure. The paper's setting (`fit_on: train`) marks nothing."""
    marker = gate_marker or {}
    if marker.get("fit_on") != "validation":
        return {}
    return {"fused": {"fit_on": "validation", "cross_validated_accuracy": marker.get("cross_validated_accuracy"),
                      "folds": marker.get("folds")}}


def plot_confusion_matrices(results: dict, path: str | Path, model_type: str | None = None) -> Path:
    """The branches' confusion matrices side by side, rows normalised, with class names and counts."""
    import numpy as np
    from matplotlib.figure import Figure

    names = results["labels"]
    branches = list(results["branches"])
    size = max(3.2, 0.45 * len(names) + 1.8)
    fig = Figure(figsize=(size * len(branches), size + 0.6))
    axes = fig.subplots(1, len(branches), squeeze=False)
    for ax, branch in zip(axes[0], branches):
        matrix = np.array(results["branches"][branch]["confusion_matrix"])
        normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if normalised[i, j] > 0.5 else "black")
        accuracy = results["branches"][branch]["accuracy"]
        ax.set_title(f"{branch_name(branch, model_type)}\naccuracy {accuracy:.3f}", fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return save_figure(fig, path)


def format_table(results: dict, model_type: str | None = None) -> str:
    """A Markdown table of accuracy and macro-F1 per branch."""
    return markdown_table(["model", "accuracy", "macro-F1"], [
        (branch_name(branch, model_type), f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}")
        for branch, m in results["branches"].items()], align="lrr")


__all__ = ["BRANCHES", "BranchName", "branch_name", "classification_metrics", "evaluate_branches", "format_table",
           "markdown_table", "plot_confusion_matrices", "save_figure", "validation_in_sample", "vlm_name"]
