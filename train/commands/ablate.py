"""Ablations of a finished run on its cached features: head depth (Table 3), the distillation weight α (Figure 3)
and the gate variants (Table 4) of the paper, and the rows the gate is fitted on (`gate-data`: the training split's
outputs, the paper's setting, against the validation split's), each over several seeds, as Markdown + JSON tables
and a plot.

No VLM or teacher forward pass runs. Every (variant, seed) is a recipe override run by the pipeline's own stages
(`distill`, `gate`, `evaluate`, as the variant needs) in a child run `<run>/ablations/<what>/<variant>/seed-<s>/`
that links the parent's earlier stages, feature caches included (as `python -m train spread` does): one training
path, with the run's recipe hyperparameters unless `--epochs` overrides them, scored on the test split.

    python -m train ablate --run runs/demo --what all
    python -m train ablate --run runs/demo --what alpha --epochs 5 --seeds 2 --alphas 0 0.5 1

Writes `<run>/ablations/<what>.{md,json,png}`. A child run's finished stages are skipped when rerun with the same
settings on the same parent (stage provenance), an interrupted one resumes from its checkpoints, so an interrupted
sweep resumes where it stopped; `--fresh` retrains every variant.

Head depth: the paper's hidden sizes [1024], [1024, 512], ..., [1024, 512, 256, 128, 64] are for Qwen2-VL-7B's
3584-wide visual features. For a model of width `D` every size is scaled by `D / 3584` and rounded, and kept at
least max(`--min-width` (4), number of classes) wide: the paper's narrowest layer (64) is 8x its class count, so a
bottleneck narrower than the classes would test something the paper did not. A 7B run (D=3584) trains exactly the
paper's heads, a 2B run (D=1536) [439], ..., [439, 219, 110, 55, 27]; the tiny VLM (D=64) with 3 classes trains
[18], [18, 9], [18, 9, 5], [18, 9, 5, 4], [18, 9, 5, 4, 4], and with the demo's 10 classes [18], [18, 10],
[18, 10, 10], ... Each depth is scored alone and fused with the run's gate type retrained on it (`--no-fusion`
skips the gate).

Checkpoint selection: like stage 2, each head training keeps the epoch best on validation accuracy
(`--selection best`, checkpoints in the child run's `distill/`); `--selection last` keeps the
final epoch instead and skips the per-epoch evaluation, which is faster. Gates are fitted as stage 3 fits them, by
full-batch L-BFGS to a minimum of their objective (the optimum for concat_linear, a local one for the other gates),
so `--selection` does not apply to them.

Gate data: the run's gate type, head and `gate.weight_decay` rule, with `gate.fit_on` train (the paper's) and
validation (see `train/stages/gate.py`); each row shows the fused test accuracy, the gate's own held-out estimate
from its marker (its validation accuracy when fitted on train, its cross-validated accuracy when fitted on
validation) and the weight decay it used. A seed changes the cross-validation folds and the initial gate.

    python -m train ablate --run runs/demo --what gate-data --seeds 3

Means and standard deviations are over seeds (sample standard deviation, 0 for one seed); seeds are the run's
seed, +1, +2, ..., so the variant equal to the run's own configuration reproduces the run's number with its first
seed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from modeling_emovlm_kd import GATE_TYPES, EmoVLMKDConfig
from modeling_emovlm_kd.fusion import gate_from_config
from train import STAGES
from train.infra.evaluation import branch_name, classification_metrics, markdown_table, save_figure
from train.infra.files import write_json_atomic
from train.infra.provenance import read_marker
from train.infra.run import ABLATION_TITLES, ABLATIONS, Run, ablation_files, count_parameters, open_run
from train.stages.pipeline import Pipeline, child_pipeline

logger = logging.getLogger(__name__)

WHAT = ABLATIONS
PAPER_FEATURE_DIM = 3584  # Qwen2-VL-7B's hidden size, for which the paper's head widths were chosen
PAPER_DEPTHS = ([1024], [1024, 512], [1024, 512, 256], [1024, 512, 256, 128], [1024, 512, 256, 128, 64])
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
MIN_WIDTH = 4
METRIC_NAMES = {
    "head_accuracy": "head accuracy",
    "head_macro_f1": "head macro-F1",
    "fused_accuracy": "fused accuracy",
    "fused_macro_f1": "fused macro-F1",
    "kl_to_teacher": "KL(teacher ‖ head)",
    "held_out_accuracy": "gate's held-out estimate",
    "weight_decay": "weight decay used",
    "teacher_agreement": "agreement with teacher",
}
# Trainer settings per selection mode: "best" mirrors stages 2/3 (best epoch on validation), "last" is faster.
SELECTION = {
    "best": {"eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 1,
             "load_best_model_at_end": True, "metric_for_best_model": "accuracy"},
    "last": {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False},
}


# ---- the run -------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """What the ablations need of the parent run (read through `train/infra/run.py`): its fused config and cached features."""

    run: Run

    @cached_property
    def config(self) -> EmoVLMKDConfig:
        return self.run.fused_config

    @cached_property
    def splits(self) -> dict[str, dict[str, torch.Tensor]]:
        return {split: self.run.features(split) for split in ("train", "validation", "test")}

    @cached_property
    def run_gate_inputs(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each split's VLM scores and the run's trained head's logits (the gate ablation's inputs)."""
        return {split: self.run.gate_inputs(split) for split in ("train", "validation", "test")}

    @property
    def feature_dim(self) -> int:
        return int(self.splits["train"]["visual_features"].shape[-1])

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def fingerprint(self) -> str:
        """The files and model options every ablation reads (`Run.fingerprint`), stored in each table so that the
        report can flag a table computed on an earlier state of the run."""
        return self.run.fingerprint()

    def test_accuracy(self, logits: torch.Tensor) -> float:
        return float((logits.argmax(-1) == self.splits["test"]["labels"]).float().mean())

    def references(self) -> dict[str, float]:
        """Test accuracies of the run's own branches (by branch, as in results.json), drawn as reference lines."""
        test, inputs = self.splits["test"], self.run_gate_inputs["test"]
        return {"vlm": self.test_accuracy(test["vlm_logits"]),
                "teacher": self.test_accuracy(test["teacher_logits"]),
                "head": self.test_accuracy(inputs["head_logits"]),
                "fused": self.test_accuracy(self.run.fused_logits(inputs))}


# ---- variants ------------------------------------------------------------------------------------------------


def scaled_hidden_dims(dims: Sequence[int], feature_dim: int, min_width: int = MIN_WIDTH) -> list[int]:
    """The paper's widths (for D=3584) scaled by `feature_dim / 3584`, rounded, at least `min_width` wide."""
    scale = feature_dim / PAPER_FEATURE_DIM
    return [max(min_width, round(width * scale)) for width in dims]


def depth_min_width(num_labels: int, min_width: int = MIN_WIDTH) -> int:
    """The narrowest scaled layer: `min_width`, and never narrower than the number of classes, because the
    paper's narrowest layer (64) is far wider than its 8 classes and a bottleneck below C is not what it tested."""
    return max(min_width, num_labels)


def head_parameter_count(in_features: int, hidden_dims: Sequence[int], num_labels: int) -> int:
    """Weights and biases of the MLP `in -> h1 -> ... -> num_labels` (dropout and activations have none)."""
    sizes = [in_features, *hidden_dims, num_labels]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


@dataclass
class Variant:
    """One row of an ablation table: its settings, the recipe overrides that make it, the pipeline stages that
    train and evaluate it (the others are the parent run's, linked), and how its child run is scored."""

    name: str
    slug: str  # the child runs' folder, `<run>/ablations/<what>/<slug>/seed-<s>`
    settings: dict
    parameters: int
    overrides: dict[str, dict]
    stages: tuple[str, ...]
    score: Callable[[Run], dict[str, float]] = field(repr=False)


@dataclass
class Settings:
    """How every variant is trained: epoch override, checkpoint selection, seeds."""

    seeds: list[int]
    epochs: float | None = None
    selection: str = "best"

    def stage_values(self, recipe: dict, stage: str) -> dict:
        """The run's recipe values for a stage with the ablation's overrides (what a child run trains with)."""
        return {**recipe.get(stage, {}), **self.overrides(stage)}

    def overrides(self, stage: str) -> dict:
        """The ablation's recipe overrides of stage `distill` or `gate` (checkpoint selection applies to the head)."""
        values = dict(SELECTION[self.selection]) if stage == "distill" else {}
        if self.epochs is not None:
            values["num_train_epochs"] = self.epochs
        # Quiet and fast: no progress bars, no logging integrations, no pinned memory on a CPU (report-only values:
        # they change no stage's provenance).
        values.update(disable_tqdm=True, report_to="none", logging_strategy="no",
                      dataloader_pin_memory=torch.cuda.is_available())
        return values


@contextlib.contextmanager
def _frozen_heap():
    """Every `Trainer.train` ends with accelerate's `gc.collect()`, which walks the whole heap (torch, datasets,
    the caches) and costs more than training a small head; frozen objects are skipped, later garbage is not."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _quiet():
    """`Trainer` prints every log dict when tqdm is off; dozens of trainings would bury the results."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> float:
    """Mean per-image KL(p_teacher ‖ p_head) at the distillation temperature (without the loss's τ² factor)."""
    return float(F.kl_div(F.log_softmax(student_logits.float() / temperature, -1),
                          F.log_softmax(teacher_logits.float() / temperature, -1),
                          log_target=True, reduction="batchmean"))


def _scores(prefix: str, logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    metrics = classification_metrics(logits, labels, num_labels)
    return {f"{prefix}_accuracy": float(metrics["accuracy"]), f"{prefix}_macro_f1": float(metrics["macro_f1"])}


def _evaluated(child: Run, branches: Sequence[str]) -> dict[str, float]:
    """Test accuracy and macro-F1 of `branches`, as the child run's own stage `evaluate` measured them."""
    results = child.results()["branches"]
    return {f"{branch}_{metric}": float(results[branch][metric]) for branch in branches
            for metric in ("accuracy", "macro_f1")}


def _head_scores(child: Run) -> dict[str, float]:
    """The child's trained head on the test split (for variants that stop after stage 2)."""
    test = child.features("test")
    return _scores("head", child.head_logits("test"), test["labels"], len(child.labels))


def depth_variants(parent: RunData, settings: Settings, min_width: int = MIN_WIDTH,
                   with_fusion: bool = True) -> list[Variant]:
    """Table 3: the paper's five head depths, scaled to the run's feature width; head alone and fused (the run's
    gate type retrained on each head by stages 3 and `evaluate`)."""
    floor = depth_min_width(parent.num_labels, min_width)

    def variant(paper_dims: list[int]) -> Variant:
        dims = scaled_hidden_dims(paper_dims, parent.feature_dim, floor)
        layers = len(dims)
        return Variant(f"{layers} hidden layer{'s' if layers > 1 else ''}", "hidden-" + "-".join(map(str, dims)),
                       {"hidden_dims": dims, "paper_hidden_dims": list(paper_dims)},
                       head_parameter_count(parent.feature_dim, dims, parent.num_labels),
                       {"model": {"head_hidden_dims": dims}},
                       ("distill", "gate", "evaluate") if with_fusion else ("distill",),
                       (lambda child: _evaluated(child, ("head", "fused"))) if with_fusion else _head_scores)

    return [variant(list(dims)) for dims in PAPER_DEPTHS]


def alpha_variants(parent: RunData, settings: Settings, alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[Variant]:
    """Figure 3: the run's head trained with each KL weight α (stage 2 only); test accuracy and KL to the teacher."""
    dims = parent.config.head_hidden_dims
    temperature = parent.run.recipe.distill.temperature

    def score(child: Run) -> dict[str, float]:
        logits, teacher = child.head_logits("test"), child.features("test")["teacher_logits"]
        return {**_head_scores(child), "kl_to_teacher": kl_to_teacher(logits, teacher, temperature),
                "teacher_agreement": float((logits.argmax(-1) == teacher.argmax(-1)).float().mean())}

    def variant(alpha: float) -> Variant:
        return Variant(f"α={alpha:g}", f"alpha-{alpha:g}",
                       {"alpha": alpha, "temperature": temperature, "hidden_dims": list(dims)},
                       head_parameter_count(parent.feature_dim, dims, parent.num_labels),
                       {"distill": {"alpha": alpha}}, ("distill",), score)

    return [variant(float(alpha)) for alpha in alphas]


def gate_variants(parent: RunData, settings: Settings) -> list[Variant]:
    """Table 4: every gate type trained by stage 3 on the run's own trained head (its stage 2 is linked)."""

    def variant(gate_type: str) -> Variant:
        gate = gate_from_config(parent.config, gate_type=gate_type, initialise=False)
        name = f"{gate_type} (run's)" if gate_type == parent.config.gate_type else gate_type
        return Variant(name, gate_type,
                       {"gate_type": gate_type, "vlm_signal": parent.config.gate_vlm_signal,
                        "head_signal": parent.config.gate_head_signal, "num_experts": parent.config.gate_num_experts},
                       count_parameters(gate), {"model": {"gate_type": gate_type}}, ("gate", "evaluate"),
                       lambda child: _evaluated(child, ("fused",)))

    return [variant(gate_type) for gate_type in GATE_TYPES]


GATE_DATA = {"train": "train (the paper)", "validation": "validation"}


def gate_data_variants(parent: RunData, settings: Settings) -> list[Variant]:
    """Which split's branch outputs stage 3 fits the run's gate on (`gate.fit_on`): the training split's (the
    paper's setting) or the validation split's, with the run's head and its `gate.weight_decay` rule (a number or
    `auto`). Scored on test, next to the gate's own held-out estimate from its marker (validation accuracy when
    fitted on train, cross-validated accuracy when fitted on validation) and the weight decay it used."""
    recipe = parent.run.recipe.gate
    parameters = count_parameters(gate_from_config(parent.config, initialise=False))

    def score(child: Run) -> dict[str, float]:
        marker = read_marker(child.require("gate"))
        return {**_evaluated(child, ("fused",)), "held_out_accuracy": float(marker["held_out_accuracy"]),
                "weight_decay": float(marker["weight_decay"])}

    def variant(fit_on: str) -> Variant:
        name = f"{GATE_DATA[fit_on]} (run's)" if fit_on == recipe.fit_on else GATE_DATA[fit_on]
        return Variant(name, f"fit-on-{fit_on}", {"fit_on": fit_on, "weight_decay": recipe.weight_decay,
                                                   "gate_type": parent.config.gate_type},
                       parameters, {"gate": {"fit_on": fit_on}}, ("gate", "evaluate"), score)

    return [variant(fit_on) for fit_on in GATE_DATA]


# ---- running, summarising --------------------------------------------------------------------------------------


def child_run(parent: RunData, what: str, variant: Variant, seed: int, settings: Settings) -> Pipeline:
    """The variant as a child run of the parent, `<run>/ablations/<what>/<slug>/seed-<seed>`: the recipe with the
    variant's and the ablation's overrides, every stage before the variant's first one linked from the parent."""
    recipe = parent.run.recipe
    overrides = {section: dict(values) for section, values in variant.overrides.items()}
    for stage in ("distill", "gate"):
        if stage in variant.stages:
            overrides[stage] = {**overrides.get(stage, {}), **settings.overrides(stage), "seed": seed}
    shared = STAGES[: STAGES.index(variant.stages[0])]
    folder = parent.run.output_dir / "ablations" / what / variant.slug / f"seed-{seed}"
    return child_pipeline(recipe, folder, overrides, shared, where=f"{recipe.source} ({what} {variant.name}, "
                                                                 f"seed {seed})")


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def run_variants(what: str, variants: list[Variant], parent: RunData, settings: Settings,
                 fresh: bool = False) -> list[dict]:
    """Every variant with every seed as a child run through the pipeline's own stages (a finished, up-to-date child
    is not retrained: `fresh` forces it); one summary row per variant."""
    rows = []
    for variant in variants:
        runs = []
        for seed in settings.seeds:
            child = child_run(parent, what, variant, seed, settings)
            with _quiet():
                child.run(stages=variant.stages, force=fresh)
            scores = variant.score(child.read())
            logger.info("%s %s seed %d: %s", what, variant.name, seed,
                        ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
            runs.append({"seed": seed, **scores})
        metrics = [key for key in runs[0] if key != "seed"]
        rows.append({"name": variant.name, "settings": variant.settings, "parameters": variant.parameters,
                     "runs": runs, "summary": {m: summarise([r[m] for r in runs]) for m in metrics}})
    return rows


# ---- tables and plots ----------------------------------------------------------------------------------------

TITLES = ABLATION_TITLES
# The setting shown next to each variant's name (a gate's name is its setting already).
SETTING_COLUMNS = {"depth": ("hidden_dims", "hidden dims"), "alpha": ("hidden_dims", "hidden dims"),
                   "gate": ("vlm_signal", "VLM signal"), "gate-data": ("weight_decay", "gate.weight_decay")}


def _cell(summary: dict, metric: str = "") -> str:
    form = ".2g" if metric == "weight_decay" else ".4f"  # 1e-4 and 1e-3 would both read 0.0001/0.0010 at .4f
    return f"{summary['mean']:{form}} ± {summary['std']:{form}}"


def reference_name(branch: str, vlm_type: str | None = None) -> str:
    """A reference line's name: the VLM and the teacher as themselves, the run's own head and fused model."""
    if branch in ("head", "fused"):
        return f"run's {branch_name(branch, short=True)}"
    return branch_name(branch, vlm_type)


def ablation_markdown(table: dict) -> str:
    """The ablation as Markdown: one row per variant, `mean ± std` over seeds per metric, reference accuracies."""
    rows = table["variants"]
    metrics = list(rows[0]["summary"])
    key, heading = SETTING_COLUMNS[table["what"]]
    lines = [
        f"### {TITLES[table['what']]}",
        "",
        f"Run `{table['run']}`, {table['split']} split ({table['num_examples']} images); mean ± std over seeds "
        f"{table['seeds']}; {table['training']['epochs_note']}; checkpoint: {table['selection']}.",
        "",
        markdown_table(["variant", heading, "parameters", *(METRIC_NAMES.get(m, m) for m in metrics)],
                       [(row["name"], row["settings"][key], f"{row['parameters']:,}",
                         *(_cell(row["summary"][m], m) for m in metrics)) for row in rows], align="llr" + "r" * len(metrics)),
    ]
    lines += ["", "Reference (test accuracy of the run itself): "
              + ", ".join(f"{reference_name(branch, table['vlm_type'])} {value:.4f}"
                          for branch, value in table["references"].items()) + ".", ""]
    if table["what"] == "depth":
        lines.append(f"Widths: the paper's (for D={PAPER_FEATURE_DIM}) × D/{PAPER_FEATURE_DIM} with "
                     f"D={table['feature_dim']}, rounded, at least max(--min-width, classes) = {table['min_width']}.")
    if table["what"] == "alpha":
        lines.append("KL: mean per-image KL(teacher ‖ head) on the test split at the distillation temperature.")
    return "\n".join(lines) + "\n"


def _errorbar(ax, x, rows: list[dict], metric: str, label: str, color: str, marker: str = "o",
              linestyle: str = "-") -> None:
    means = [row["summary"][metric]["mean"] for row in rows]
    stds = [row["summary"][metric]["std"] for row in rows]
    ax.errorbar(x, means, yerr=stds, label=label, color=color, marker=marker, capsize=4, linewidth=1.8,
                linestyle=linestyle, markersize=7)
    for xi, row in zip(x, rows):  # individual seeds, so the spread behind each mean is visible
        ax.scatter([xi] * len(row["runs"]), [r[metric] for r in row["runs"]], color=color, s=10, alpha=0.35)


def _references(ax, table: dict, branches: Sequence[str]) -> None:
    styles = {"vlm": ("tab:gray", "--"), "teacher": ("tab:purple", ":"), "head": ("tab:blue", ":"),
              "fused": ("tab:green", "-.")}
    for branch in branches:
        color, style = styles[branch]
        value = table["references"][branch]
        ax.axhline(value, color=color, linestyle=style, linewidth=1.2,
                   label=f"{reference_name(branch, table['vlm_type'])} ({value:.3f})")


def plot_depth(table: dict, ax) -> None:
    rows = table["variants"]
    x = list(range(1, len(rows) + 1))
    _errorbar(ax, x, rows, "head_accuracy", "distilled head alone", "tab:blue")
    if "fused_accuracy" in rows[0]["summary"]:
        _errorbar(ax, x, rows, "fused_accuracy", "fused (gate retrained)", "tab:green", marker="s")
    _references(ax, table, ("vlm", "teacher"))
    ax.set_xticks(x, [f"{len(r['settings']['hidden_dims'])}\n{r['settings']['hidden_dims']}\n{r['parameters']:,} params"
                      for r in rows], fontsize=8)
    ax.set_xlabel("hidden layers of the head (widths, parameters)")
    ax.set_ylabel("test accuracy")


def plot_alpha(table: dict, ax) -> None:
    rows = table["variants"]
    x = [row["settings"]["alpha"] for row in rows]
    _errorbar(ax, x, rows, "head_accuracy", "head accuracy", "tab:blue")
    _references(ax, table, ("teacher",))
    ax.set_xlabel("α (weight of the KL term; 1 − α weighs cross-entropy)")
    ax.set_ylabel("test accuracy of the head", color="tab:blue")
    kl_ax = ax.twinx()
    _errorbar(kl_ax, x, rows, "kl_to_teacher", "KL(teacher ‖ head)", "tab:red", marker="s")
    kl_ax.set_ylabel(f"KL(teacher ‖ head) at τ={rows[0]['settings']['temperature']:g}", color="tab:red")
    kl_ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = kl_ax.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, **LEGEND)


def plot_gate(table: dict, ax) -> None:
    rows = table["variants"]
    x = list(range(len(rows)))
    # Categories, not a series: no connecting line.
    _errorbar(ax, x, rows, "fused_accuracy", "fused model, gate retrained", "tab:green", marker="s", linestyle="none")
    _references(ax, table, ("vlm", "head", "fused"))
    ax.set_xticks(x, [f"{r['name']}\n{r['parameters']:,} params" for r in rows], fontsize=8)
    ax.set_xlabel("gate (trainable parameters)")
    ax.set_ylabel("test accuracy of the fused model")


def plot_gate_data(table: dict, ax) -> None:
    rows = table["variants"]
    x = list(range(len(rows)))
    _errorbar(ax, x, rows, "fused_accuracy", "fused model, test", "tab:green", marker="s", linestyle="none")
    _errorbar(ax, x, rows, "held_out_accuracy", "gate's held-out estimate", "tab:orange", marker="^",
              linestyle="none")
    _references(ax, table, ("vlm", "head", "fused"))
    ax.set_xticks(x, [f"fitted on {r['settings']['fit_on']}" for r in rows], fontsize=8)
    ax.set_xlabel("rows the gate is fitted on (gate.fit_on)")
    ax.set_ylabel("accuracy")


# Below the axes, so that no legend hides a data point.
LEGEND = {"fontsize": 8, "loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 3, "frameon": False}
PLOTTERS = {"depth": plot_depth, "alpha": plot_alpha, "gate": plot_gate, "gate-data": plot_gate_data}


def plot_table(table: dict, path: Path) -> Path:
    """The ablation's plot: mean ± std over seeds (dots: single seeds), the run's branches as reference lines."""
    fig = Figure(figsize=(8, 5.6))
    ax = fig.subplots()
    PLOTTERS[table["what"]](table, ax)
    ax.grid(alpha=0.3)
    if table["what"] != "alpha":
        ax.legend(**LEGEND)
    seeds = len(table["seeds"])
    ax.set_title(f"{TITLES[table['what']]} — {Path(table['run']).name}\n"
                 f"{table['split']} split, {table['num_examples']} images, {seeds} seed{'s' if seeds > 1 else ''} "
                 "(mean ± std; dots: single seeds)", fontsize=10)
    return save_figure(fig, path)


# ---- entry points --------------------------------------------------------------------------------------------


def _epochs_note(parent: RunData, settings: Settings, what: str) -> str:
    stages = {"depth": ("distill", "gate"), "alpha": ("distill",), "gate": ("gate",), "gate-data": ("gate",)}[what]
    recipe = parent.run.recipe.as_set
    parts = [f"{stage} {settings.stage_values(recipe, stage).get('num_train_epochs', 'default')} epochs"
             for stage in stages]
    return ", ".join(parts) + (" (--epochs override)" if settings.epochs is not None else " (the run's recipe)")


def ablate(run_dir: str | Path, what: str, seeds: int = 3, epochs: float | None = None,
           alphas: Sequence[float] = DEFAULT_ALPHAS, selection: str = "best", min_width: int = MIN_WIDTH,
           with_fusion: bool = True, fresh: bool = False) -> dict[str, Path]:
    """Run one ablation (`depth`, `alpha`, `gate` or `gate-data`) on a finished run; returns the paths of its
    md/json/png."""
    if what not in WHAT:
        raise ValueError(f"what must be one of {WHAT}, got {what!r}.")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}.")
    parent = RunData(open_run(run_dir))
    references = parent.references()  # read first: every variant below uses the run's state as it is now
    settings = Settings(seeds=[parent.run.seed + i for i in range(seeds)], epochs=epochs, selection=selection)
    variants = {"depth": lambda: depth_variants(parent, settings, min_width, with_fusion),
                "alpha": lambda: alpha_variants(parent, settings, alphas),
                "gate": lambda: gate_variants(parent, settings),
                "gate-data": lambda: gate_data_variants(parent, settings)}[what]()
    with _frozen_heap():
        rows = run_variants(what, variants, parent, settings, fresh=fresh)
    # The run by its folder name: the tables go into reports and cards, where a local path means nothing.
    table = {"what": what, "title": TITLES[what], "run": Path(run_dir).name, "split": "test",
             "num_examples": int(len(parent.splits["test"]["labels"])), "labels": parent.config.labels,
             "vlm_type": parent.config.vlm_config.model_type, "feature_dim": parent.feature_dim, "min_width": depth_min_width(parent.num_labels, min_width),
             "seeds": settings.seeds,
             "selection": selection, "training": {"epochs_note": _epochs_note(parent, settings, what)},
             "references": references, "run_fingerprint": parent.fingerprint(), "variants": rows}
    _check_finite(table)
    files = ablation_files(parent.run.output_dir, what)
    paths = {"json": write_json_atomic(table, files["json"]), "png": plot_table(table, files["png"])}
    paths["md"] = files["md"]
    paths["md"].write_text(ablation_markdown(table))
    return paths


def _check_finite(table: dict) -> None:
    """A diverged training must not hide in a mean: fail loudly instead of writing NaN into a table."""
    for row in table["variants"]:
        for record in row["runs"]:
            bad = [k for k, v in record.items() if k != "seed" and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"{table['what']} {row['name']} seed {record['seed']}: non-finite {bad}.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--run", required=True, help="A finished run folder (with evaluate/results.json).")
    parser.add_argument("--what", choices=(*WHAT, "all"), default="all", help="Which ablation to run.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per variant: the run's seed, +1, +2, ...")
    parser.add_argument("--epochs", type=float, help="Override the recipe's epochs of stages 2 and 3 (for speed).")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="α values to sweep.")
    parser.add_argument("--selection", choices=tuple(SELECTION), default="best",
                        help="Keep the epoch best on validation (like stages 2/3) or the last one (faster).")
    parser.add_argument("--min-width", type=int, default=MIN_WIDTH, help="Narrowest scaled hidden layer.")
    parser.add_argument("--no-fusion", action="store_true", help="Depth: score the head alone, no gate retraining.")
    parser.add_argument("--fresh", action="store_true", help="Retrain every variant, finished child runs included.")
    return parser


def main(args: argparse.Namespace) -> None:
    """`python -m train ablate`: run the chosen ablations and print each table and its files."""
    for what in WHAT if args.what == "all" else (args.what,):
        paths = ablate(args.run, what, seeds=args.seeds, epochs=args.epochs, alphas=args.alphas,
                       selection=args.selection, min_width=args.min_width, with_fusion=not args.no_fusion,
                       fresh=args.fresh)
        print(paths["md"].read_text())
        print("Written: " + ", ".join(str(p) for p in paths.values()) + "\n")


__all__ = [
    "DEFAULT_ALPHAS",
    "PAPER_DEPTHS",
    "PAPER_FEATURE_DIM",
    "RunData",
    "Variant",
    "ablate",
    "ablation_markdown",
    "add_arguments",
    "alpha_variants",
    "child_run",
    "depth_min_width",
    "depth_variants",
    "gate_data_variants",
    "gate_variants",
    "head_parameter_count",
    "kl_to_teacher",
    "main",
    "open_run",
    "plot_table",
    "scaled_hidden_dims",
]
