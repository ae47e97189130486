"""A self-contained report of a finished run: the paper's Table 2 (parameters and accuracy per module), Figure 1
(how often the VLM and the vision branches are right), per-class accuracy, the confusion matrices and Figure 4
(test images where the branches disagree, with each branch's label and the fused label), plus the run's
ablations (Tables 3-4, Figure 3) when `python -m train ablate` has written them.

    python -m train report --run runs/demo

Writes `<run>/report/report.md` with its PNGs next to it (relative links, so the folder can be moved or zipped).
Every number is recomputed from the run's current models on the cached test features (the same computation as
stage `evaluate`), so the report never disagrees with itself; a difference from `evaluate/results.json` (a stage
rerun after evaluation) is pointed out in the report.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from safetensors import safe_open

from train.infra.evaluation import (
    branch_name,
    evaluate_branches,
    markdown_table,
    plot_confusion_matrices,
    save_figure,
    vlm_name,
)
from train.infra.recipe import public_recipe
from train.infra.run import ABLATION_TITLES, ABLATIONS, Run, ablation_files, ablation_fingerprint, open_run

logger = logging.getLogger(__name__)

COLOURS = {"vlm": "tab:blue", "head": "tab:orange", "teacher": "tab:purple", "fused": "tab:green"}
OUTCOMES = ("both right", "only VLM right", "only vision right", "neither right")
OUTCOME_COLOURS = ("#5aa469", "tab:blue", "tab:orange", "#c8c8c8")
# Figure 1 compares the VLM with a conventional vision model (the ViT teacher); the second pair is what the gate
# actually fuses (the VLM and the head distilled from that teacher).
PAIRS = (("vlm", "teacher"), ("vlm", "head"))
OK, WRONG = "\u2713", "\u2717"


# ---- numbers -------------------------------------------------------------------------------------------------


@dataclass
class BranchOutputs:
    """Test-split logits of every branch, in the feature caches' row order (= the data set's test order)."""

    logits: dict[str, torch.Tensor]
    labels: torch.Tensor

    @property
    def predictions(self) -> dict[str, torch.Tensor]:
        return {branch: logits.argmax(-1) for branch, logits in self.logits.items()}

    def correct(self, branch: str) -> torch.Tensor:
        return self.predictions[branch] == self.labels


def branch_outputs(run: Run, split: str = "test") -> BranchOutputs:
    """The four branches' logits on a split, as stage `evaluate` computes them."""
    return BranchOutputs(*run.branch_logits(split))


def complementarity(correct_a: torch.Tensor, correct_b: torch.Tensor) -> dict[str, int]:
    """Figure 1's counts: both right, only `a` right, only `b` right, neither (they add up to the split's size)."""
    a, b = correct_a.bool(), correct_b.bool()
    counts = ((a & b).sum(), (a & ~b).sum(), (~a & b).sum(), (~a & ~b).sum())
    return dict(zip(OUTCOMES, (int(c) for c in counts)))


def pair_summary(outputs: BranchOutputs, vision: str) -> dict:
    """Complementarity of the VLM and one vision branch, and how often the fused model is right where only one is."""
    vlm_ok, vision_ok, fused_ok = outputs.correct("vlm"), outputs.correct(vision), outputs.correct("fused")
    only_vlm, only_vision = vlm_ok & ~vision_ok, ~vlm_ok & vision_ok
    return {"vision": vision, "counts": complementarity(vlm_ok, vision_ok),
            "fused_right_when_only_vlm": int((fused_ok & only_vlm).sum()),
            "fused_right_when_only_vision": int((fused_ok & only_vision).sum())}


def adapter_parameters(run_dir: Path) -> int | None:
    """Parameters of the stage 1 LoRA adapter, read from the safetensors header (no weights loaded)."""
    path = run_dir / "sft" / "adapter" / "adapter_model.safetensors"
    if not path.exists():
        return None
    with safe_open(path, framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def _vlm_trained(run: Run, total: int) -> str:
    """What stage 1 trained of the VLM: all of it, or a LoRA adapter (`use_peft` defaults to LoRA)."""
    if not run.recipe.sft.use_peft:
        return f"{total:,} (stage 1, full fine-tuning)"
    lora = adapter_parameters(run.output_dir)
    return f"{lora:,} (stage 1, LoRA)" if lora is not None else "a LoRA adapter (stage 1; adapter file not found)"


def model_type(run: Run) -> str:
    """The `model_type` of the run's VLM (`qwen2_vl`, ...), which names its family in the report."""
    return run.fused_config.vlm_config.model_type


def module_rows(run: Run, metrics: dict, validation: dict, parameters: dict, in_sample: dict | None = None) -> list[dict]:
    """Table 2: each module's parameters, what trains it, and its accuracy (test and validation; `in_sample`: the
    branches fitted on the validation split, `results.json`'s `validation_in_sample`)."""
    in_sample = in_sample or {}
    vlm_trained = _vlm_trained(run, parameters["vlm"])
    fused_total = parameters["vlm"] + parameters["head"] + parameters["gate"]
    rows = [
        ("vlm", f"VLM ({vlm_name(model_type(run))}, tuned)", parameters["vlm"], vlm_trained),
        ("head", "Distillation head", parameters["head"], f"{parameters['head']:,} (stage 2)"),
        ("teacher", "ViT teacher", parameters["teacher"],
         f"{parameters['teacher']:,} (teacher stage; not part of the fused model)"),
        ("gate", "Gate", parameters["gate"], f"{parameters['gate']:,} (stage 3)"),
        ("fused", "EmoVLM-KD (fused: VLM + head + gate)", fused_total, f"{parameters['gate']:,} (stage 3: the gate only)"),
    ]
    return [{"branch": branch, "module": name, "parameters": count, "trained": trained,
             "accuracy": metrics.get(branch, {}).get("accuracy"), "macro_f1": metrics.get(branch, {}).get("macro_f1"),
             "validation_accuracy": validation.get(branch, {}).get("accuracy"),
             "validation_cross_validated": (in_sample[branch].get("cross_validated_accuracy") if branch in in_sample
                                            else None), "validation_in_sample": branch in in_sample}
            for branch, name, count, trained in rows]


# ---- figures -------------------------------------------------------------------------------------------------


def plot_complementarity(pairs: list[dict], accuracies: dict[str, float], num_examples: int, path: Path,
                         vlm_type: str | None = None) -> Path:
    """Figure 1: one stacked bar per (VLM, vision branch) pair, split into both / only VLM / only vision / neither."""
    fig = Figure(figsize=(10, 1.6 + 1.1 * len(pairs)))
    ax = fig.subplots()
    names = []
    for row, pair in enumerate(pairs):
        left = 0
        for outcome, colour in zip(OUTCOMES, OUTCOME_COLOURS):
            count = pair["counts"][outcome]
            ax.barh(row, count, left=left, color=colour, edgecolor="white")
            share = count / num_examples
            if share >= 0.015:  # wide segments get count and share, narrow ones the count, slivers nothing
                text = f"{count}\n{share:.1%}" if share >= 0.05 else str(count)
                ax.text(left + count / 2, row, text, ha="center", va="center", fontsize=8)
            left += count
        either = 1 - pair["counts"]["neither right"] / num_examples
        names.append(f"{pair_name(pair, vlm_type)}\neither right: {either:.1%}")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in OUTCOME_COLOURS]
    labels = ["both right", "only the VLM right", "only the vision branch right", "neither right"]
    ax.legend(handles, labels, ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    ax.set_yticks(range(len(pairs)), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, num_examples)
    ax.set_xlabel("test images")
    ax.set_title(f"Complementarity (paper Figure 1): who is right on the {num_examples} test images\n"
                 "accuracy: " + ", ".join(f"{branch_name(b, vlm_type, short=True)} {accuracies[b]:.3f}"
                                          for b in ("vlm", "teacher", "head", "fused")), fontsize=10)
    return save_figure(fig, path)


def pair_name(pair: dict, vlm_type: str | None = None) -> str:
    """"Qwen2-VL vs ViT teacher": a (VLM, vision branch) pair of Figure 1."""
    return f"{branch_name('vlm', vlm_type, short=True)} vs {branch_name(pair['vision'], short=True)}"


def plot_per_class_accuracy(metrics: dict, label_names: list[str], support: list[int], path: Path,
                            vlm_type: str | None = None) -> Path:
    """Grouped bars: each class's test accuracy for the four branches, with class names and counts."""
    branches = list(metrics)
    width = 0.8 / len(branches)
    x = np.arange(len(label_names))
    fig = Figure(figsize=(max(9.0, 0.95 * len(label_names) + 4.5), 4.8))
    ax = fig.subplots()
    for i, branch in enumerate(branches):
        values = [metrics[branch]["per_class_accuracy"][j] for j in range(len(label_names))]
        ax.bar(x + (i - (len(branches) - 1) / 2) * width, values, width, color=COLOURS.get(branch),
               label=f"{branch_name(branch, vlm_type)} ({metrics[branch]['accuracy']:.3f})")
    ax.set_xticks(x, [f"{name}\n(n={n})" for name, n in zip(label_names, support)], fontsize=8,
                  rotation=30 if len(label_names) > 8 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy (recall) of the class")
    ax.set_xlabel("true class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              title="branch (overall accuracy)", title_fontsize=8)
    ax.set_title("Per-class accuracy of each branch on the test split", fontsize=10)
    return save_figure(fig, path)


def pick_disagreements(outputs: BranchOutputs, count: int) -> list[tuple[int, str]]:
    """Test rows where the VLM and the head disagree, half where only the VLM is right and half where only the
    head is (the cases the gate must arbitrate), topped up with rows where both are wrong.

    Rows are spread evenly over each group in test order, never chosen by whether the fused model got them right,
    so the grid shows the gate's failures as often as they happen.
    """
    vlm_ok, head_ok = outputs.correct("vlm"), outputs.correct("head")
    disagree = outputs.predictions["vlm"] != outputs.predictions["head"]
    groups = {"only VLM right": (disagree & vlm_ok & ~head_ok).nonzero().flatten().tolist(),
              "only head right": (disagree & ~vlm_ok & head_ok).nonzero().flatten().tolist(),
              "both wrong": (disagree & ~vlm_ok & ~head_ok).nonzero().flatten().tolist()}
    # Half and half; a group with too few rows leaves its share to the other, then to "both wrong".
    sizes = {name: len(rows) for name, rows in groups.items()}
    quota = {"only VLM right": min(count // 2, sizes["only VLM right"])}
    quota["only head right"] = min(count - quota["only VLM right"], sizes["only head right"])
    quota["only VLM right"] = min(count - quota["only head right"], sizes["only VLM right"])
    quota["both wrong"] = min(count - quota["only VLM right"] - quota["only head right"], sizes["both wrong"])
    picked = []
    for name, rows in groups.items():
        if quota[name]:
            positions = np.linspace(0, len(rows) - 1, quota[name]).round().astype(int)
            picked += [(rows[p], name) for p in positions]
    return picked


def _label_line(ax, y: float, text: str, ok: bool | None) -> None:
    colour = "black" if ok is None else ("#1a7f37" if ok else "#c62828")
    mark = "" if ok is None else f" {OK if ok else WRONG}"
    ax.text(0.5, y, text + mark, transform=ax.transAxes, ha="center", va="top", fontsize=8, color=colour,
            fontweight="bold" if ok is None else "normal")


def plot_disagreements(images: list, picked: list[tuple[int, str]], outputs: BranchOutputs,
                       label_names: list[str], path: Path) -> Path:
    """Figure 4: each picked test image with its true label and the VLM's, the head's and the fused label."""
    columns = min(6, len(picked))
    rows = math.ceil(len(picked) / columns)
    fig = Figure(figsize=(2.3 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    predictions = outputs.predictions
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, (row, group) in zip(axes.flat, images, picked):
        ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_title(f"test #{row} · {group}", fontsize=7, color="dimgray")
        truth = int(outputs.labels[row])
        _label_line(ax, -0.03, f"true: {label_names[truth]}", None)
        for i, (branch, name) in enumerate((("vlm", "VLM"), ("head", "head"), ("fused", "fused"))):
            predicted = int(predictions[branch][row])
            _label_line(ax, -0.16 - 0.13 * i, f"{name}: {label_names[predicted]}", predicted == truth)
    fig.suptitle("Where the VLM and the distilled head disagree (paper Figure 4): "
                 f"each branch's label and the fused label ({OK} right, {WRONG} wrong)", fontsize=10)
    fig.subplots_adjust(hspace=0.9)
    return save_figure(fig, path, tight=False, bbox_inches="tight")


def load_test_images(run: Run, rows: Sequence[int], labels: torch.Tensor) -> list:
    """The picked test images from the run's data set; their labels must match the caches' (same row order)."""
    test = run.data["test"]
    if len(test) != len(labels):
        raise ValueError(f"The test split has {len(test)} images but the feature cache {len(labels)} rows.")
    images = []
    for row in rows:
        example = test[int(row)]
        if int(example["label"]) != int(labels[row]):
            raise ValueError(f"Test row {row}: the data set's label differs from the feature cache's; the data "
                             "changed since the features were computed.")
        images.append(example["image"])
    return images


# ---- the Markdown --------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def module_section(rows: list[dict]) -> list[str]:
    table = markdown_table(
        ["module", "parameters", "trained parameters (stage)", "test accuracy", "test macro-F1", "validation accuracy"],
        [(row["module"], f"{row['parameters']:,}", row["trained"], _fmt(row["accuracy"]), _fmt(row["macro_f1"]),
          _validation_cell(row)) for row in rows], align="lrlrrr")
    lines = ["## Modules: parameters and accuracy (paper Table 2)", "", table, ""]
    if any(row["validation_in_sample"] for row in rows):
        lines += ["In-sample: the gate was fitted on the validation split (`gate.fit_on: validation`), so the fused "
                  "model's validation accuracy is its fit's own; the cross-validated figure beside it is the fair one. "
                  "Test accuracies are held out for every module.", ""]
    return lines


def _validation_cell(row: dict) -> str:
    if not row["validation_in_sample"]:
        return _fmt(row["validation_accuracy"])
    cross_validated = row["validation_cross_validated"]
    return (f"{_fmt(row['validation_accuracy'])} (in-sample"
            + (f"; cross-validated {_fmt(cross_validated)})" if cross_validated is not None else ")"))


def complementarity_section(pairs: list[dict], num_examples: int, fused_accuracy: float,
                            vlm_type: str | None = None) -> list[str]:
    rows = []
    for pair in pairs:
        counts = pair["counts"]
        either = num_examples - counts["neither right"]
        rows.append([pair_name(pair, vlm_type), *(counts[o] for o in OUTCOMES),
                     f"{either} ({either / num_examples:.1%})",
                     f"{pair['fused_right_when_only_vlm']} of {counts['only VLM right']}",
                     f"{pair['fused_right_when_only_vision']} of {counts['only vision right']}"])
    table = markdown_table(["pair", "both right", "only VLM right", "only vision right", "neither right", "either right",
                            "fused right where only the VLM is", "fused right where only the vision branch is"],
                           rows, align="lrrrrrrr")
    return ["## Complementarity of the VLM and the vision branches (paper Figure 1)", "",
            "![Complementarity](complementarity.png)", "", table, "",
            f"\"Either right\" is the accuracy of a perfect arbiter; the fused model reaches {fused_accuracy:.1%}.", ""]


def per_class_section(metrics: dict, label_names: list[str], support: list[int],
                      vlm_type: str | None = None) -> list[str]:
    branches = list(metrics)
    table = markdown_table(["class", "test images", *(branch_name(b, vlm_type) for b in branches)],
                           [(name, support[j], *(f"{metrics[b]['per_class_accuracy'][j]:.3f}" for b in branches))
                            for j, name in enumerate(label_names)], align="lr" + "r" * len(branches))
    return ["## Per-class accuracy", "", "![Per-class accuracy](per_class_accuracy.png)", "", table, ""]


def disagreement_section(outputs: BranchOutputs, picked: list, figure: str | None, note: str | None) -> list[str]:
    vlm_ok, head_ok, fused_ok = outputs.correct("vlm"), outputs.correct("head"), outputs.correct("fused")
    disagree = outputs.predictions["vlm"] != outputs.predictions["head"]
    only_vlm, only_head = disagree & vlm_ok & ~head_ok, disagree & ~vlm_ok & head_ok
    lines = ["## Where the branches disagree (paper Figure 4)", "",
             f"The VLM and the head give different labels for {int(disagree.sum())} of {len(disagree)} test images: "
             f"only the VLM is right on {int(only_vlm.sum())} (the fused model follows it on "
             f"{int((only_vlm & fused_ok).sum())}), only the head on {int(only_head.sum())} (followed on "
             f"{int((only_head & fused_ok).sum())}), both are wrong on {int((disagree & ~vlm_ok & ~head_ok).sum())}.",
             ""]
    if figure:
        lines += [f"![Disagreements]({figure})", "",
                  f"{len(picked)} of them, spread evenly over each group in test order (not chosen by outcome).", ""]
    if note:
        lines += [note, ""]
    return lines


def shown_path(path: Path) -> str:
    """A path as a shared document shows it: relative to the working directory when inside it, else its name (an
    absolute path names this machine, not the run)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return Path(path).name


def ablation_section(run: Run, report_dir: Path) -> list[str]:
    """The run's ablation tables and plots, copied next to the report; a pointer to the command where missing."""
    run_dir = run.output_dir
    shown = shown_path(run_dir)
    current = run.fingerprint()
    lines = ["## Ablations (paper Tables 3-4, Figure 3)", ""]
    for what in ABLATIONS:
        files = ablation_files(run_dir, what)
        table, figure = files["md"], files["png"]
        if table.exists() and figure.exists():
            shutil.copy2(figure, report_dir / f"ablation_{what}.png")
            lines += [table.read_text().rstrip(), ""]
            if ablation_fingerprint(run_dir, what) != current:
                lines += [f"> Note: computed on an earlier state of this run (its features, head or model options "
                          f"have changed since); rerun `python -m train ablate --run {shown} --what {what}`.", ""]
            lines += [f"![{ABLATION_TITLES[what]}](ablation_{what}.png)", ""]
        else:
            lines += [f"### {ABLATION_TITLES[what]}", "",
                      f"Not run yet: `python -m train ablate --run {shown} --what {what}`.", ""]
    return lines


def _stale_note(metrics: dict, stored: dict, vlm_type: str | None = None) -> str | None:
    """Name the branches whose recomputed accuracy differs from `evaluate/results.json`."""
    changed = [b for b in metrics if b in stored and abs(metrics[b]["accuracy"] - stored[b]["accuracy"]) > 1e-9]
    if not changed:
        return None
    return ("> Note: the accuracy of " + ", ".join(branch_name(b, vlm_type) for b in changed) + " differs from "
            "`evaluate/results.json` (a stage was rerun after evaluation); this report shows the run's current models.")


# ---- entry points --------------------------------------------------------------------------------------------


def write_report(run_dir: str | Path, output_dir: str | Path | None = None, examples: int = 12) -> Path:
    """Write `report.md` and its figures for a finished run (into `<run>/report/` by default); returns its path."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    report_dir = Path(output_dir) if output_dir else run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    stored = run.results()
    label_names = run.labels
    parameters = stored.get("parameters") or run.parameter_counts()

    outputs = branch_outputs(run, "test")
    test = evaluate_branches(outputs.logits, outputs.labels, label_names)
    validation_outputs = branch_outputs(run, "validation")
    validation = evaluate_branches(validation_outputs.logits, validation_outputs.labels, label_names)["branches"]
    metrics, num_examples = test["branches"], test["num_examples"]
    accuracies = {branch: m["accuracy"] for branch, m in metrics.items()}
    support = torch.bincount(outputs.labels, minlength=len(label_names)).tolist()
    pairs = [pair_summary(outputs, vision) for _, vision in PAIRS]
    vlm_type = model_type(run)

    plot_complementarity(pairs, accuracies, num_examples, report_dir / "complementarity.png", vlm_type)
    plot_per_class_accuracy(metrics, label_names, support, report_dir / "per_class_accuracy.png", vlm_type)
    plot_confusion_matrices(test, report_dir / "confusion_matrices.png", vlm_type)
    figure, note, picked = _disagreement_figure(run, outputs, examples, report_dir)

    recipe = public_recipe(run.recipe.as_set, run_dir)  # a report is shared: no secrets, no local paths
    lines = [f"# EmoVLM-KD report: `{run_dir.name}`", "",
             f"Run folder `{run_dir.name}`; {len(label_names)} classes ({', '.join(label_names)}); test split of "
             f"{num_examples} images, validation split of {len(validation_outputs.labels)}. "
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} from the run's models and feature caches.", ""]
    if note := _stale_note(metrics, stored.get("branches", {}), vlm_type):
        lines += [note, ""]
    lines += module_section(module_rows(run, metrics, validation, parameters, stored.get("validation_in_sample")))
    lines += complementarity_section(pairs, num_examples, accuracies["fused"], vlm_type)
    lines += per_class_section(metrics, label_names, support, vlm_type)
    lines += ["## Confusion matrices", "", "Rows: true class, normalised; numbers: image counts.", "",
              "![Confusion matrices](confusion_matrices.png)", ""]
    lines += disagreement_section(outputs, picked, figure, note)
    lines += ablation_section(run, report_dir)
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _disagreement_figure(run: Run, outputs: BranchOutputs, examples: int,
                         report_dir: Path) -> tuple[str | None, str | None, list]:
    """Figure 4's PNG name (or None, with the reason, when no images can be shown)."""
    picked = pick_disagreements(outputs, examples) if examples > 0 else []
    if not picked:
        return None, "No test image where the VLM and the head disagree." if examples > 0 else None, []
    try:
        images = load_test_images(run, [row for row, _ in picked], outputs.labels)
    except Exception as error:  # noqa: BLE001 — a missing data set must not cost the rest of the report
        logger.warning("No example images in the report: %s", error)
        return None, f"> The example images could not be loaded from the run's data set: {error}", picked
    plot_disagreements(images, picked, outputs, run.labels, report_dir / "disagreements.png")
    return "disagreements.png", None, picked


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--run", required=True, help="A finished run folder (with evaluate/results.json).")
    parser.add_argument("--output-dir", help="Where to write the report (default: <run>/report).")
    parser.add_argument("--examples", type=int, default=12, help="Images in the Figure 4 grid (0: none).")
    return parser


def main(args: argparse.Namespace) -> None:
    """`python -m train report`: write the report and print its path."""
    print(f"Report: {write_report(args.run, args.output_dir, args.examples)}")


__all__ = [
    "BranchOutputs",
    "add_arguments",
    "branch_outputs",
    "complementarity",
    "module_rows",
    "pair_summary",
    "pick_disagreements",
    "plot_complementarity",
    "plot_disagreements",
    "plot_per_class_accuracy",
    "main",
    "write_report",
]
