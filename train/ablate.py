"""Ablations of a finished run on its cached features: head depth (Table 3), the distillation weight α (Figure 3)
and the gate variants (Table 4) of the paper, each over several seeds, as Markdown + JSON tables and a plot.

No VLM or teacher forward pass runs: every variant trains on `<run>/features/*.safetensors` through the project's
own `train_distillation` / `train_gate` (the `Trainer` code paths of stages 2 and 3), with the run's recipe
hyperparameters unless `--epochs` overrides them, and is scored on the test split.

    python -m train ablate --run runs/demo --what all
    python -m train ablate --run runs/demo --what alpha --epochs 5 --seeds 2 --alphas 0 0.5 1

Writes `<run>/ablations/<what>.{md,json,png}`. Finished (variant, seed) trainings are kept in
`<run>/ablations/cache/<what>.jsonl`, so an interrupted sweep resumes where it stopped (`--fresh` ignores them).

Head depth: the paper's hidden sizes [1024], [1024, 512], ..., [1024, 512, 256, 128, 64] are for Qwen2-VL-7B's
3584-wide visual features. For a model of width `D` every size is scaled by `D / 3584` and rounded, and kept at
least max(`--min-width` (4), number of classes) wide: the paper's narrowest layer (64) is 8x its class count, so a
bottleneck narrower than the classes would test something the paper did not. A 7B run (D=3584) trains exactly the
paper's heads, a 2B run (D=1536) [439], ..., [439, 219, 110, 55, 27]; the tiny VLM (D=64) with 3 classes trains
[18], [18, 9], [18, 9, 5], [18, 9, 5, 4], [18, 9, 5, 4, 4], and with the demo's 10 classes [18], [18, 10],
[18, 10, 10], ... Each depth is scored alone and fused with the run's gate type retrained on it (`--no-fusion`
skips the gate).

Checkpoint selection: like stage 2, each head training keeps the epoch best on validation accuracy
(`--selection best`, checkpoints in a temporary folder that is deleted afterwards); `--selection last` keeps the
final epoch instead and skips the per-epoch evaluation, which is faster. Gates are fitted as stage 3 fits them, to
their objective's optimum by full-batch L-BFGS, so `--selection` does not apply to them.

Means and standard deviations are over seeds (sample standard deviation, 0 for one seed); seeds are the run's
seed, +1, +2, ..., so the variant equal to the run's own configuration reproduces the run's number with its first
seed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import logging
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import set_seed  # noqa: E402

from modeling_emovlm_kd import GATE_TYPES, EmoVLMKDConfig, EmoVLMKDDistillationHead, EmoVLMKDFusion  # noqa: E402
from modeling_emovlm_kd.fusion import gate_from_config, head_from_config  # noqa: E402

from .distill import DistillationConfig, train_distillation  # noqa: E402
from .evaluation import classification_metrics  # noqa: E402
from .files import write_json_atomic  # noqa: E402
from .gate import GateConfig, head_logits, train_gate  # noqa: E402
from .run import ABLATION_TITLES, ABLATIONS, Run, ablation_files, open_run  # noqa: E402
from .trainer_utils import count_parameters  # noqa: E402

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
    """What the ablations need of a run (read through `train/run.py`): its fused config and cached features."""

    pipeline: Run

    @cached_property
    def config(self) -> EmoVLMKDConfig:
        return self.pipeline.fused_config

    @cached_property
    def splits(self) -> dict[str, dict[str, torch.Tensor]]:
        return {split: self.pipeline.features(split) for split in ("train", "validation", "test")}

    @cached_property
    def run_gate_inputs(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each split's VLM scores and the run's trained head's logits (the gate ablation's inputs)."""
        return {split: self.pipeline.gate_inputs(split) for split in ("train", "validation", "test")}

    @property
    def feature_dim(self) -> int:
        return int(self.splits["train"]["visual_features"].shape[-1])

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def fingerprint(self) -> str:
        """The files and model options every ablation reads, so cached trainings of another run state are not
        reused (a rerun stage, or another gate type or VLM signal)."""
        return self.pipeline.fingerprint()

    def test_accuracy(self, logits: torch.Tensor) -> float:
        return float((logits.argmax(-1) == self.splits["test"]["labels"]).float().mean())

    def references(self) -> dict[str, float]:
        """Test accuracies of the run's own branches, drawn as reference lines."""
        test, inputs = self.splits["test"], self.run_gate_inputs["test"]
        return {"VLM alone": self.test_accuracy(test["vlm_logits"]),
                "ViT teacher": self.test_accuracy(test["teacher_logits"]),
                "run's head": self.test_accuracy(inputs["head_logits"]),
                "run's fused model": self.test_accuracy(self.pipeline.fused_logits(inputs))}


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
    """One row of an ablation table: its settings and a function training it with a seed and scoring it."""

    name: str
    settings: dict
    parameters: int
    train_and_score: Callable[[int], dict[str, float]] = field(repr=False)


@dataclass
class Settings:
    """How every variant is trained: epoch override, checkpoint selection, seeds."""

    seeds: list[int]
    epochs: float | None = None
    selection: str = "best"

    def stage_values(self, recipe: dict, stage: str) -> dict:
        """The run's recipe values for a stage with the ablation's overrides (what the cache key records)."""
        values = {**recipe.get(stage, {}), **SELECTION[self.selection]}
        if self.epochs is not None:
            values["num_train_epochs"] = self.epochs
        # Quiet and fast: no progress bars, no logging integrations, no pinned memory on a CPU.
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


def train_head(run: RunData, settings: Settings, hidden_dims: Sequence[int], seed: int,
               **distill_overrides) -> EmoVLMKDDistillationHead:
    """A fresh head (seeded like stage 2's) trained by `train_distillation` on the run's cached features."""
    set_seed(seed)
    head = head_from_config(run.config, hidden_dims=list(hidden_dims))
    values = {**settings.stage_values(run.pipeline.recipe, "distill"), **distill_overrides, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="emovlm-ablate-") as work, _quiet():
        head, _ = train_distillation(head, run.splits["train"], run.splits["validation"],
                                     DistillationConfig(output_dir=work, **values))
    return head.cpu().eval()  # `Trainer` may have moved it to a GPU; the cached features live on the CPU


def train_fusion(run: RunData, settings: Settings, gate_type: str, inputs: dict[str, dict[str, torch.Tensor]],
                 seed: int) -> torch.nn.Module:
    """A fresh gate trained by `train_gate` on cached VLM scores and head logits, as stage 3 trains it: to its
    objective's optimum, with no selection among iterates (so `--selection` does not apply) and no checkpoints."""
    config = run.config
    torch.manual_seed(seed)
    gate = gate_from_config(config, gate_type=gate_type)
    values = {**settings.stage_values(run.pipeline.recipe, "gate"), "seed": seed,
              "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}
    with tempfile.TemporaryDirectory(prefix="emovlm-ablate-") as work, _quiet():
        gate, _ = train_gate(gate, config.gate_vlm_signal, inputs["train"], inputs["validation"],
                             GateConfig(output_dir=work, **values), head_signal=config.gate_head_signal)
    return gate.cpu().eval()


@torch.inference_mode()
def fused_test_logits(run: RunData, gate: torch.nn.Module, test_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    fusion = EmoVLMKDFusion(None, gate, run.config.gate_vlm_signal, run.config.gate_head_signal)
    return fusion(test_inputs["vlm_logits"], head_logits=test_inputs["head_logits"], output_branch_weights=False).logits


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> float:
    """Mean per-image KL(p_teacher ‖ p_head) at the distillation temperature (without the loss's τ² factor)."""
    return float(F.kl_div(F.log_softmax(student_logits.float() / temperature, -1),
                          F.log_softmax(teacher_logits.float() / temperature, -1),
                          log_target=True, reduction="batchmean"))


def _scores(prefix: str, logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    metrics = classification_metrics(logits, labels, num_labels)
    return {f"{prefix}_accuracy": float(metrics["accuracy"]), f"{prefix}_macro_f1": float(metrics["macro_f1"])}


def head_inputs(run: RunData, head: EmoVLMKDDistillationHead) -> dict[str, dict[str, torch.Tensor]]:
    """Gate inputs of every split with a given head's logits (what stage 3 would see with this head)."""
    return {split: {"vlm_logits": data["vlm_logits"], "labels": data["labels"],
                    "head_logits": head_logits(head, data["visual_features"])}
            for split, data in run.splits.items()}


def depth_variants(run: RunData, settings: Settings, min_width: int = MIN_WIDTH,
                   with_fusion: bool = True) -> list[Variant]:
    """Table 3: the paper's five head depths, scaled to the run's feature width; head alone and fused."""
    test, floor = run.splits["test"], depth_min_width(run.num_labels, min_width)

    def variant(paper_dims: list[int]) -> Variant:
        dims = scaled_hidden_dims(paper_dims, run.feature_dim, floor)

        def train_and_score(seed: int) -> dict[str, float]:
            head = train_head(run, settings, dims, seed)
            inputs = head_inputs(run, head)
            scores = _scores("head", inputs["test"]["head_logits"], test["labels"], run.num_labels)
            if with_fusion:
                gate = train_fusion(run, settings, run.config.gate_type, inputs, seed)
                scores |= _scores("fused", fused_test_logits(run, gate, inputs["test"]), test["labels"],
                                  run.num_labels)
            return scores

        layers = len(dims)
        return Variant(f"{layers} hidden layer{'s' if layers > 1 else ''}",
                       {"hidden_dims": dims, "paper_hidden_dims": list(paper_dims)},
                       head_parameter_count(run.feature_dim, dims, run.num_labels), train_and_score)

    return [variant(list(dims)) for dims in PAPER_DEPTHS]


def alpha_variants(run: RunData, settings: Settings, alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[Variant]:
    """Figure 3: the run's head trained with each KL weight α; test accuracy and KL to the teacher."""
    test, dims = run.splits["test"], run.config.head_hidden_dims
    temperature = float(settings.stage_values(run.pipeline.recipe, "distill").get("temperature", 2.0))

    def variant(alpha: float) -> Variant:
        def train_and_score(seed: int) -> dict[str, float]:
            head = train_head(run, settings, dims, seed, alpha=alpha)
            logits = head_logits(head, test["visual_features"])
            return {**_scores("head", logits, test["labels"], run.num_labels),
                    "kl_to_teacher": kl_to_teacher(logits, test["teacher_logits"], temperature),
                    "teacher_agreement": float((logits.argmax(-1) == test["teacher_logits"].argmax(-1))
                                               .float().mean())}

        return Variant(f"α={alpha:g}", {"alpha": alpha, "temperature": temperature, "hidden_dims": list(dims)},
                       head_parameter_count(run.feature_dim, dims, run.num_labels), train_and_score)

    return [variant(float(alpha)) for alpha in alphas]


def gate_variants(run: RunData, settings: Settings) -> list[Variant]:
    """Table 4: every gate type trained on the run's trained head's cached outputs."""
    inputs, test = run.run_gate_inputs, run.run_gate_inputs["test"]

    def variant(gate_type: str) -> Variant:
        def train_and_score(seed: int) -> dict[str, float]:
            gate = train_fusion(run, settings, gate_type, inputs, seed)
            return _scores("fused", fused_test_logits(run, gate, test), test["labels"], run.num_labels)

        gate = gate_from_config(run.config, gate_type=gate_type, initialise=False)
        name = f"{gate_type} (run's)" if gate_type == run.config.gate_type else gate_type
        return Variant(name, {"gate_type": gate_type, "vlm_signal": run.config.gate_vlm_signal,
                              "head_signal": run.config.gate_head_signal, "num_experts": run.config.gate_num_experts},
                       count_parameters(gate), train_and_score)

    return [variant(gate_type) for gate_type in GATE_TYPES]


# ---- running, caching, summarising -------------------------------------------------------------------------


class ResultCache:
    """Finished (variant, seed) scores as JSON lines, so that a long sweep resumes instead of restarting."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.records: dict[str, dict] = {}
        if enabled and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line cut short by a kill
                    entry = json.loads(line)
                    self.records[entry["key"]] = entry["scores"]

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, scores: dict) -> None:
        self.records[key] = scores
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"key": key, "scores": scores}) + "\n")


def cache_key(what: str, variant: Variant, seed: int, training: dict, fingerprint: str) -> str:
    payload = {"what": what, "settings": variant.settings, "seed": seed, "training": training, "run": fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def run_variants(what: str, variants: list[Variant], run: RunData, settings: Settings,
                 cache: ResultCache) -> list[dict]:
    """Train and score every variant with every seed (reusing cached scores); one summary row per variant."""
    recipe = run.pipeline.recipe
    training = {stage: settings.stage_values(recipe, stage) for stage in ("distill", "gate")}
    fingerprint = run.fingerprint()
    rows = []
    for variant in variants:
        runs = []
        for seed in settings.seeds:
            key = cache_key(what, variant, seed, training, fingerprint)
            scores = cache.get(key)
            if scores is None:
                scores = variant.train_and_score(seed)
                cache.put(key, scores)
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
                   "gate": ("vlm_signal", "VLM signal")}


def _cell(summary: dict) -> str:
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}"


def markdown_table(table: dict) -> str:
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
        "| variant | " + heading + " | parameters | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " |",
        "|---|---|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        cells = [_cell(row["summary"][m]) for m in metrics]
        lines.append(f"| {row['name']} | {row['settings'][key]} | {row['parameters']:,} | " + " | ".join(cells) + " |")
    lines += ["", "Reference (test accuracy of the run itself): "
              + ", ".join(f"{name} {value:.4f}" for name, value in table["references"].items()) + ".", ""]
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


def _references(ax, references: dict[str, float], names: Sequence[str]) -> None:
    styles = {"VLM alone": ("tab:gray", "--"), "ViT teacher": ("tab:purple", ":"), "run's head": ("tab:blue", ":"),
              "run's fused model": ("tab:green", "-.")}
    for name in names:
        color, style = styles[name]
        ax.axhline(references[name], color=color, linestyle=style, linewidth=1.2,
                   label=f"{name} ({references[name]:.3f})")


def plot_depth(table: dict, ax) -> None:
    rows = table["variants"]
    x = list(range(1, len(rows) + 1))
    _errorbar(ax, x, rows, "head_accuracy", "distilled head alone", "tab:blue")
    if "fused_accuracy" in rows[0]["summary"]:
        _errorbar(ax, x, rows, "fused_accuracy", "fused (gate retrained)", "tab:green", marker="s")
    _references(ax, table["references"], ("VLM alone", "ViT teacher"))
    ax.set_xticks(x, [f"{len(r['settings']['hidden_dims'])}\n{r['settings']['hidden_dims']}\n{r['parameters']:,} params"
                      for r in rows], fontsize=8)
    ax.set_xlabel("hidden layers of the head (widths, parameters)")
    ax.set_ylabel("test accuracy")


def plot_alpha(table: dict, ax) -> None:
    rows = table["variants"]
    x = [row["settings"]["alpha"] for row in rows]
    _errorbar(ax, x, rows, "head_accuracy", "head accuracy", "tab:blue")
    _references(ax, table["references"], ("ViT teacher",))
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
    _references(ax, table["references"], ("VLM alone", "run's head", "run's fused model"))
    ax.set_xticks(x, [f"{r['name']}\n{r['parameters']:,} params" for r in rows], fontsize=8)
    ax.set_xlabel("gate (trainable parameters)")
    ax.set_ylabel("test accuracy of the fused model")


# Below the axes, so that no legend hides a data point.
LEGEND = {"fontsize": 8, "loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 3, "frameon": False}
PLOTTERS = {"depth": plot_depth, "alpha": plot_alpha, "gate": plot_gate}


def plot_table(table: dict, path: Path) -> Path:
    """The ablation's plot: mean ± std over seeds (dots: single seeds), the run's branches as reference lines."""
    fig, ax = plt.subplots(figsize=(8, 5.6))
    PLOTTERS[table["what"]](table, ax)
    ax.grid(alpha=0.3)
    if table["what"] != "alpha":
        ax.legend(**LEGEND)
    seeds = len(table["seeds"])
    ax.set_title(f"{TITLES[table['what']]} — {Path(table['run']).name}\n"
                 f"{table['split']} split, {table['num_examples']} images, {seeds} seed{'s' if seeds > 1 else ''} "
                 "(mean ± std; dots: single seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- entry points --------------------------------------------------------------------------------------------


def _epochs_note(run: RunData, settings: Settings, what: str) -> str:
    stages = {"depth": ("distill", "gate"), "alpha": ("distill",), "gate": ("gate",)}[what]
    recipe = run.pipeline.recipe
    parts = [f"{stage} {settings.stage_values(recipe, stage).get('num_train_epochs', 'default')} epochs"
             for stage in stages]
    return ", ".join(parts) + (" (--epochs override)" if settings.epochs is not None else " (the run's recipe)")


def ablate(run_dir: str | Path, what: str, seeds: int = 3, epochs: float | None = None,
           alphas: Sequence[float] = DEFAULT_ALPHAS, selection: str = "best", min_width: int = MIN_WIDTH,
           with_fusion: bool = True, fresh: bool = False) -> dict[str, Path]:
    """Run one ablation (`depth`, `alpha` or `gate`) on a finished run; returns the paths of its md/json/png."""
    if what not in WHAT:
        raise ValueError(f"what must be one of {WHAT}, got {what!r}.")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}.")
    run = RunData(open_run(run_dir))
    references = run.references()  # read first: every variant below uses the run's state as it is now
    settings = Settings(seeds=[run.pipeline.seed + i for i in range(seeds)], epochs=epochs, selection=selection)
    variants = {"depth": lambda: depth_variants(run, settings, min_width, with_fusion),
                "alpha": lambda: alpha_variants(run, settings, alphas),
                "gate": lambda: gate_variants(run, settings)}[what]()
    out = run.pipeline.output_dir / "ablations"
    cache = ResultCache(out / "cache" / f"{what}.jsonl", enabled=not fresh)
    with _frozen_heap():
        rows = run_variants(what, variants, run, settings, cache)
    # The run by its folder name: the tables go into reports and cards, where a local path means nothing.
    table = {"what": what, "title": TITLES[what], "run": Path(run_dir).name, "split": "test",
             "num_examples": int(len(run.splits["test"]["labels"])), "labels": run.config.labels,
             "feature_dim": run.feature_dim, "min_width": depth_min_width(run.num_labels, min_width),
             "seeds": settings.seeds,
             "selection": selection, "training": {"epochs_note": _epochs_note(run, settings, what)},
             "references": references, "run_fingerprint": run.fingerprint(), "variants": rows}
    _check_finite(table)
    files = ablation_files(run.pipeline.output_dir, what)
    paths = {"json": write_json_atomic(table, files["json"]), "png": plot_table(table, files["png"])}
    paths["md"] = files["md"]
    paths["md"].write_text(markdown_table(table))
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
    parser.add_argument("--fresh", action="store_true", help="Ignore the cache of finished trainings.")
    return parser


def run(args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """`python -m train ablate`: run the chosen ablations and print each table and its files."""
    written = {}
    for what in WHAT if args.what == "all" else (args.what,):
        paths = ablate(args.run, what, seeds=args.seeds, epochs=args.epochs, alphas=args.alphas,
                       selection=args.selection, min_width=args.min_width, with_fusion=not args.no_fusion,
                       fresh=args.fresh)
        print(paths["md"].read_text())
        print("Written: " + ", ".join(str(p) for p in paths.values()) + "\n")
        written[what] = paths
    return written


__all__ = [
    "DEFAULT_ALPHAS",
    "PAPER_DEPTHS",
    "PAPER_FEATURE_DIM",
    "RunData",
    "Variant",
    "ablate",
    "add_arguments",
    "alpha_variants",
    "depth_min_width",
    "depth_variants",
    "gate_variants",
    "head_parameter_count",
    "kl_to_teacher",
    "markdown_table",
    "open_run",
    "plot_table",
    "run",
    "scaled_hidden_dims",
]
