"""Evaluation: accuracy, macro-F1, per-class accuracy and confusion matrices of the VLM alone, the head alone, the
teacher and the fused model, written as `results.json` (read by model cards and the README) and a PNG.

    python -m train evaluate --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

import functools
from pathlib import Path

import evaluate
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

METRIC_PATH = str(Path(__file__).resolve().parents[1] / "metrics" / "emotion_classification.py")
BRANCHES = {"vlm": "VLM alone", "head": "Distilled head", "teacher": "ViT teacher", "fused": "EmoVLM-KD (fused)"}


@functools.cache
def _metric():
    """The metric module, loaded once per process (`evaluate.load` builds a module from the script each time)."""
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


def plot_confusion_matrices(results: dict, path: str | Path) -> Path:
    """The branches' confusion matrices side by side, rows normalised, with class names and counts."""
    names = results["labels"]
    branches = list(results["branches"])
    size = max(3.2, 0.45 * len(names) + 1.8)
    fig, axes = plt.subplots(1, len(branches), figsize=(size * len(branches), size + 0.6), squeeze=False)
    for ax, branch in zip(axes[0], branches):
        matrix = np.array(results["branches"][branch]["confusion_matrix"])
        normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if normalised[i, j] > 0.5 else "black")
        accuracy = results["branches"][branch]["accuracy"]
        ax.set_title(f"{BRANCHES.get(branch, branch)}\naccuracy {accuracy:.3f}", fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(results: dict) -> str:
    """A Markdown table of accuracy and macro-F1 per branch."""
    lines = ["| model | accuracy | macro-F1 |", "|---|---:|---:|"]
    for branch, metrics in results["branches"].items():
        lines.append(f"| {BRANCHES.get(branch, branch)} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} |")
    return "\n".join(lines)


__all__ = ["classification_metrics", "evaluate_branches", "format_table", "plot_confusion_matrices"]
