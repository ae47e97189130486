"""Stage 3: fit the gate that fuses the VLM's label with the head's output; everything else is frozen.

The VLM's label scores and the frozen head's logits are computed once (from the feature cache), so gate training
never runs the VLM: the authors' code re-ran sampled generation for every image in every epoch.

Which rows (`gate.fit_on`). The gate learns how far to trust each branch, so it must see outputs like the ones it
will fuse at test time: branch outputs on images the branches were not trained on.
- `validation` (the default): the validation split's outputs. Stage 1 never trained on validation images and the
  head (stage 2's final head) never did either; validation only chose the head's epoch (`load_best_model_at_end`,
  one choice among its epochs) and, in a recipe that sets `sft.eval_strategy`, scored stage 1's checkpoints. A
  validation split too small to cross-validate (no class with two rows; three with `weight_decay: auto`) cannot
  show what the gate would do on unseen images: the stage then fits on train, warns, and its marker records
  `fit_on: train` with `fit_on_requested: validation`.
- `train`: the paper's setting, the training split's outputs of both branches (with a number as `weight_decay`,
  this stage's behaviour before the option, bit for bit). Stage 1 (5 epochs in the 7B recipes) and stage 2 have fitted exactly these images, so both
  branches are right more often on them than on unseen images and the gate learns reliabilities that do not hold
  at test time: on a held-out binary set with 100 training images (VLM 0.52 / 0.42 on train / test, head 0.93 /
  0.82) the gate fitted on train ended at 0.78 on test, below the head alone.
- Not offered: out-of-fold training rows. The head's out-of-fold logits would be cheap (K heads on K-1 folds of the
  cached features), but the VLM's training-split scores come from a VLM fine-tuned on those very images, and
  out-of-fold ones would need K stage-1 fine-tunings, K times the run's most expensive stage. An out-of-fold head
  next to an in-sample VLM is the bias this option removes, on one branch instead of two.

What the marker records (`stage_done.json`): `fit_on`; `weight_decay`, the value used; `fitted_rows_accuracy`, the
saved gate's accuracy on the rows it was fitted on; `best_validation_accuracy`, its accuracy on validation (what
`python -m train verify` recomputes; in-sample when `fit_on` is validation); with `fit_on: validation`,
`cross_validated_accuracy` over `folds` stratified folds seeded by the stage's seed (every validation row predicted
by a gate fitted without it, with the same weight decay rule, `auto` included: nested); `held_out_accuracy`, the
accuracy on rows the gate was not fitted on (the cross-validated one, or validation's when `fit_on` is train). The
test split is never read here.

Weight decay. `gate.weight_decay` is a number or `auto`: each value of `gate.weight_decay_grid` is fitted and the one
with the best accuracy (then log-likelihood, then grid order) on rows the fit did not see is used: on validation
when fitting on train, by `folds`-fold cross-validation when fitting on validation; the marker keeps every value's
scores (`weight_decay_selection`). With `auto` on train, validation chose the value, so `held_out_accuracy` is
then a little optimistic; the test split tells.

How. The gate is tiny (136 parameters for the paper's 8-class concat-linear gate) and its inputs are cached, so the
stage minimises its whole objective, mean cross-entropy on all the rows it fits plus the L2 penalty
`weight_decay / 2 * |theta|^2`, by full-batch L-BFGS until L-BFGS converges. The result does not depend on the
size of the data set: a step budget of mini-batch AdamW tuned for 100k images leaves the gate far from its
optimum on 100 (on such a set the fused model came out below the distilled head alone). Concat-linear is then the
unique optimum of a strictly convex problem; the other gates reach a local one. The authors' Adam had
`weight_decay=1e-4`, which is this penalty, hence the default.

The saved gate is fitted in a `transformers.Trainer` (`GateTrainer`): one training step is one L-BFGS call of up
to `lbfgs_max_iter` iterations over all rows, one step per epoch, `num_train_epochs` bounds the steps, and training
stops when L-BFGS has converged. Every epoch is checkpointed (with the L-BFGS state) so a killed stage resumes with
`resume_from_checkpoint` to the same gate. The fits that choose the weight decay and cross-validate (`lbfgs_fit`)
are the same L-BFGS calls on the same objective without a `Trainer` (nothing of theirs is kept); each starts from
the stage's seeded initial gate, and every process computes them alike. The final gate is evaluated on validation
once, at the end, so `trainer.state.best_metric` is the returned gate's validation accuracy; nothing is selected
among iterates. If the fused model is more than one example below the better single branch on rows the gate was
not fitted on (validation, or its cross-validated predictions), the stage logs a warning.

    python -m train gate --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import StratifiedKFold
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed
from transformers.utils import ModelOutput

from modeling_emovlm_kd import EmoVLMKDFusion
from modeling_emovlm_kd.fusion import gate_from_config
from train.configs.gate_config import GateConfig
from train.stages.trainer_utils import FeatureDataset, StrictCheckpointLoading, accuracy, accuracy_metrics

logger = logging.getLogger(__name__)

KEYS = ("vlm_logits", "head_logits", "labels")


class GateStudent(EmoVLMKDFusion):
    """A gate as a `Trainer` model: the model package's fusion without a head (its logits are cached), cached VLM
    scores and head logits -> fused logits (+ CE loss). Its tensors are the gate's, `gate.*`."""

    def __init__(self, gate: nn.Module, vlm_signal: str, head_signal: str = "probs"):
        super().__init__(None, gate, vlm_signal, head_signal)

    def forward(self, vlm_logits, head_logits, labels=None, **kwargs) -> ModelOutput:
        logits = super().forward(vlm_logits, head_logits=head_logits, output_branch_weights=False).logits
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)


class FullBatch(torch.utils.data.Dataset):
    """The whole training set as one example, so that each training step (on every process) sees all of it; the
    collated batch has a leading dimension of 1, which `GateTrainer.training_step` drops."""

    def __init__(self, rows: dict[str, torch.Tensor]):
        FeatureDataset(**rows)  # checks that the tensors agree on the number of rows
        self.rows = rows

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows


class _ClosureLBFGS(torch.optim.LBFGS):
    """`torch.optim.LBFGS` stepped by `GateTrainer.training_step` with its closure; `Trainer`'s own closure-less
    `optimizer.step()` that follows is a no-op."""

    def step(self, closure=None):
        return None if closure is None else super().step(closure)


def lbfgs_options(args: GateConfig) -> dict:
    """`torch.optim.LBFGS`'s options from the stage's arguments (the evaluation cap set out of reach)."""
    return {"lr": args.learning_rate, "max_iter": args.lbfgs_max_iter, "max_eval": args.lbfgs_max_iter * 30,
            "history_size": args.lbfgs_history_size, "tolerance_grad": args.lbfgs_tolerance_grad,
            "tolerance_change": args.lbfgs_tolerance_change, "line_search_fn": "strong_wolfe"}


def penalised_objective(model: nn.Module, inputs: dict[str, torch.Tensor], weight_decay: float) -> torch.Tensor:
    """Stage 3's objective: mean cross-entropy on `inputs` + `weight_decay / 2 * |theta|^2`."""
    penalty = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad)
    return model(**inputs).loss + weight_decay / 2 * penalty


def lbfgs_call(lbfgs: torch.optim.LBFGS, objective: Callable[[], torch.Tensor], max_iter: int) -> bool:
    """One L-BFGS call (up to `max_iter` iterations) on `objective`; True when L-BFGS has converged."""

    def closure():
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()  # under DDP every process holds all rows: the averaged gradient is the full one
        return loss

    state = lbfgs.state[lbfgs.param_groups[0]["params"][0]]
    iterations, evaluations = state.get("n_iter", 0), state.get("func_evals", 0)
    lbfgs.step(closure)
    iterations, evaluations = state["n_iter"] - iterations, state["func_evals"] - evaluations
    # L-BFGS returns early only when one of its tolerances is met (or its evaluation cap, set out of reach).
    return iterations < max_iter and evaluations < lbfgs.param_groups[0]["max_eval"]


class _EvaluateAtTheEnd(TrainerCallback):
    """Evaluate on validation when training ends (converged or out of steps), whatever `eval_strategy` says."""

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


class GateTrainer(StrictCheckpointLoading, Trainer):
    """`Trainer` whose step is a full-batch L-BFGS call on the regularised objective (see the module docstring). Its
    checkpoints hold the gate as `gate.*` and load strictly (`StrictCheckpointLoading`, `submodule_tensors`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_EvaluateAtTheEnd())
        self.converged = False

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            parameters = [p for p in (model or self.model).parameters() if p.requires_grad]
            self.optimizer = _ClosureLBFGS(parameters, **lbfgs_options(self.args))
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lambda _: 1.0)
        return self.lr_scheduler

    def objective(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return penalised_objective(model, inputs, self.args.weight_decay)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = {key: value[0] for key, value in self._prepare_inputs(inputs).items()}  # the one full batch
        lbfgs = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        if lbfgs_call(lbfgs, lambda: self.objective(model, inputs), self.args.lbfgs_max_iter):
            self.converged = True
            self.control.should_training_stop = True
        with torch.no_grad():
            return self.objective(model, inputs).detach()


# ---- fits without a Trainer: choosing the weight decay, cross-validating ---------------------------------------


def lbfgs_fit(gate: nn.Module, rows: dict[str, torch.Tensor], vlm_signal: str, head_signal: str, args: GateConfig,
              weight_decay: float) -> nn.Module:
    """A copy of `gate` fitted on `rows` as `GateTrainer` fits it (the same objective, L-BFGS calls, step bound and
    convergence test), in this process and without a `Trainer`: nothing to checkpoint, log or track."""
    model = GateStudent(copy.deepcopy(gate), vlm_signal, head_signal).train()
    inputs = {key: rows[key] for key in KEYS}
    lbfgs = torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad], **lbfgs_options(args))
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs)
    for _ in range(steps):
        if lbfgs_call(lbfgs, lambda: penalised_objective(model, inputs, weight_decay), args.lbfgs_max_iter):
            break
    return model.gate.eval()


def fused_logits(gate: nn.Module, rows: dict[str, torch.Tensor], vlm_signal: str, head_signal: str) -> torch.Tensor:
    """The gate's fused logits on cached rows, on the CPU."""
    device = next(gate.parameters()).device
    with torch.no_grad():
        return EmoVLMKDFusion(None, gate, vlm_signal, head_signal)(
            rows["vlm_logits"].to(device), head_logits=rows["head_logits"].to(device),
            output_branch_weights=False).logits.cpu()


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Accuracy and mean log-likelihood of the right label (None where not finite)."""
    log_likelihood = -float(F.cross_entropy(logits.double(), labels))
    return {"accuracy": accuracy(logits, labels), "log_likelihood": log_likelihood if math.isfinite(log_likelihood)
            else None}


def _rows(rows: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: rows[key][index] for key in KEYS}


def fold_count(labels: torch.Tensor, folds: int) -> int:
    """The folds `labels` can be split into, stratified: `folds`, or fewer where the largest class has fewer rows
    (scikit-learn's `StratifiedKFold` needs one class with a row in every fold)."""
    return min(folds, int(labels.bincount().max()))


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """The row indices of each of `fold_count(labels, folds)` stratified folds, shuffled by `seed`."""
    count = fold_count(labels, folds)
    if count < 2:
        raise ValueError(f"{len(labels)} rows with at most one row per class cannot be cross-validated.")
    splitter = StratifiedKFold(n_splits=count, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer rows than folds is in fewer folds: expected on small splits
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [torch.as_tensor(held, dtype=torch.long)
                for _, held in splitter.split(np.zeros(len(labels)), labels.numpy())]


def cross_validated_logits(gate: nn.Module, rows: dict[str, torch.Tensor], vlm_signal: str, head_signal: str,
                           args: GateConfig, weight_decay: float | str, folds: int, seed: int) -> torch.Tensor:
    """Every row's fused logits from a gate fitted (`lbfgs_fit`, from `gate`) on the other folds. `weight_decay`
    `auto` is chosen within each fit's own rows, by cross-validation on them (nested)."""
    labels = rows["labels"]
    logits = torch.empty(len(labels), rows["vlm_logits"].shape[-1])
    for held in stratified_folds(labels, folds, seed):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[held] = False
        fit_rows = _rows(rows, keep)
        value = weight_decay
        if value == "auto":
            value, _ = choose_weight_decay(gate, fit_rows, None, vlm_signal, head_signal, args, folds, seed)
        logits[held] = fused_logits(lbfgs_fit(gate, fit_rows, vlm_signal, head_signal, args, value),
                                    _rows(rows, held), vlm_signal, head_signal)
    return logits


def choose_weight_decay(gate: nn.Module, rows: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor] | None,
                        vlm_signal: str, head_signal: str, args: GateConfig, folds: int,
                        seed: int) -> tuple[float, list[dict]]:
    """The value of `args.weight_decay_grid` whose gate fitted on `rows` scores best on `held_out` (or, when None,
    by `folds`-fold cross-validation on `rows`): the highest accuracy, then log-likelihood, then the first in the
    grid. Returns it and every value's scores."""
    scores = []
    for weight_decay in args.weight_decay_grid:
        if held_out is None:
            logits = cross_validated_logits(gate, rows, vlm_signal, head_signal, args, weight_decay, folds, seed)
            labels = rows["labels"]
        else:
            fitted = lbfgs_fit(gate, rows, vlm_signal, head_signal, args, weight_decay)
            logits, labels = fused_logits(fitted, held_out, vlm_signal, head_signal), held_out["labels"]
        scores.append({"weight_decay": weight_decay, **_scores(logits, labels)})
    best = max(scores, key=lambda score: (score["accuracy"], -math.inf if score["log_likelihood"] is None
                                          else score["log_likelihood"]))
    return best["weight_decay"], scores


# ---- stage 3 -------------------------------------------------------------------------------------------------


def _report_against_branches(predictions: torch.Tensor, rows: dict[str, torch.Tensor], where: str) -> None:
    """Warn when the fused accuracy on rows the gate was not fitted on is more than one example below the better
    single branch's."""
    labels = rows["labels"]
    correct = {"VLM": int((rows["vlm_logits"].argmax(-1) == labels).sum()),
               "head": int((rows["head_logits"].argmax(-1) == labels).sum())}
    branch = max(correct, key=correct.get)
    fused_correct, total = int((predictions == labels).sum()), len(labels)
    if fused_correct < correct[branch] - 1:
        logger.warning(
            "Stage 3: the fused gate is below the better single branch %s: %d/%d right (%.4f), the %s alone "
            "%d/%d (%.4f). The gate fits its rows (at a minimum of its objective); it does not carry over: more "
            "rows, a larger weight_decay (or weight_decay: auto) or the single branch may serve better.",
            where, fused_correct, total, fused_correct / total, branch, correct[branch], total,
            correct[branch] / total,
        )


def train_gate(
    gate: nn.Module,
    vlm_signal: str,
    train: dict[str, torch.Tensor],
    validation: dict[str, torch.Tensor],
    args: GateConfig,
    resume_from_checkpoint: str | bool | None = None,
    head_signal: str = "probs",
    warn_below_branches: bool = True,
) -> tuple[nn.Module, Trainer]:
    """Fit `gate` on the cached `vlm_logits`, `head_logits` and `labels` of `train` (whichever rows are passed) with
    `args.weight_decay` (a number) by full-batch L-BFGS to a minimum of its objective (the optimum for concat_linear,
    a local one for the other gates); returns the gate and the trainer, whose `state.best_metric` is the gate's
    accuracy on `validation`. `fit_gate` is the stage's own."""
    trainer = GateTrainer(
        model=GateStudent(gate, vlm_signal, head_signal),
        args=args,
        train_dataset=FullBatch({k: train[k] for k in KEYS}),
        eval_dataset=FeatureDataset(**{k: validation[k] for k in KEYS}),
        compute_metrics=accuracy_metrics,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if not trainer.converged and trainer.state.global_step >= trainer.state.max_steps:
        logger.warning("Stage 3: L-BFGS did not converge within %d steps of %d iterations; raise num_train_epochs.",
                       trainer.state.max_steps, args.lbfgs_max_iter)
    gate = trainer.model.gate
    if warn_below_branches:
        predictions = fused_logits(gate, validation, vlm_signal, head_signal).argmax(-1)
        _report_against_branches(predictions, validation, "on validation")
    return gate, trainer


def _validation_folds(labels: torch.Tensor, args: GateConfig) -> int | None:
    """The folds of the validation split (`args.folds`, or fewer, with a warning, where its classes are small), or
    None, with a warning, where it cannot be cross-validated with the recipe's weight decay rule: no class with two
    rows (three with `auto`, whose choice is cross-validated inside each fold's training part)."""
    largest, needed = int(labels.bincount().max()), 3 if args.weight_decay == "auto" else 2
    if largest < needed:
        logger.warning(
            "Stage 3: gate.fit_on is validation, but the validation split (%d rows, at most %d per class) is too small "
            "to cross-validate the gate%s: the gate is fitted on train (the paper's setting) instead, and the marker "
            "says so. Add validation images, or set gate.fit_on: train to say it in the recipe.",
            len(labels), largest, " with weight_decay auto" if needed == 3 else "")
        return None
    folds = fold_count(labels, args.folds)
    if folds < args.folds:
        logger.warning("Stage 3: gate.folds=%d, but the validation split's largest class has %d rows: %d folds.",
                       args.folds, largest, folds)
    return folds


def fit_gate(
    gate: nn.Module,
    vlm_signal: str,
    train: dict[str, torch.Tensor],
    validation: dict[str, torch.Tensor],
    args: GateConfig,
    resume_from_checkpoint: str | bool | None = None,
    head_signal: str = "probs",
) -> tuple[nn.Module, Trainer, dict]:
    """Stage 3 as the recipe's `gate` section says (see the module docstring): `gate` fitted on the rows
    `args.fit_on` names, with `args.weight_decay` or the value `auto` chooses on held-out rows. Returns the gate,
    its trainer and what the stage's marker records."""
    folds = _validation_folds(validation["labels"], args) if args.fit_on == "validation" else args.folds
    on_validation = folds is not None and args.fit_on == "validation"
    rows = validation if on_validation else train
    record: dict = {"fit_on": "validation" if on_validation else "train", "fitted_rows": len(rows["labels"])}
    if record["fit_on"] != args.fit_on:
        record["fit_on_requested"] = args.fit_on  # too few validation rows to cross-validate (warned above)
    weight_decay = args.weight_decay
    if weight_decay == "auto":
        weight_decay, scores = choose_weight_decay(gate, rows, None if on_validation else validation, vlm_signal,
                                                   head_signal, args, folds, args.seed)
        record["weight_decay_selection"] = {
            "on": f"{folds}-fold cross-validation on validation" if on_validation else "validation", "scores": scores}
        logger.info("Stage 3: weight_decay %g, chosen from %s on %s.", weight_decay, args.weight_decay_grid,
                    record["weight_decay_selection"]["on"])
    record["weight_decay"] = weight_decay
    if on_validation:
        logits = cross_validated_logits(gate, validation, vlm_signal, head_signal, args, args.weight_decay, folds,
                                        args.seed)
        record.update(folds=folds, cross_validated_accuracy=accuracy(logits, validation["labels"]))
        _report_against_branches(logits.argmax(-1), validation, f"on validation ({folds}-fold cross-validated)")
    if weight_decay != args.weight_decay:
        args = copy.copy(args)  # the number `auto` chose, for the trainer's objective
        args.weight_decay = weight_decay
    gate, trainer = train_gate(gate, vlm_signal, rows, validation, args, resume_from_checkpoint, head_signal,
                               warn_below_branches=not on_validation)
    record["fitted_rows_accuracy"] = accuracy(fused_logits(gate, rows, vlm_signal, head_signal), rows["labels"])
    record["best_validation_accuracy"] = trainer.state.best_metric
    record["held_out_accuracy"] = record["cross_validated_accuracy"] if on_validation else trainer.state.best_metric
    return gate, trainer, record


def run(context) -> dict:
    run = context.read()
    config = run.fused_config
    # The stage's seed (`gate.seed`, the run's unless the recipe sets it) seeds the gate's initial weights and the
    # cross-validation folds too: the seed spread and the ablations vary it per child run.
    args = context.stage_args("gate")
    set_seed(args.seed)
    gate, _, record = fit_gate(gate_from_config(config), config.gate_vlm_signal, run.gate_inputs("train"),
                               run.gate_inputs("validation"), args, resume_from_checkpoint=context.resume("gate"),
                               head_signal=config.gate_head_signal)
    if context.state.is_main_process:
        save_file(gate.state_dict(), context.stage_dir("gate") / "gate.safetensors")
    return record


__all__ = [
    "GateStudent",
    "GateTrainer",
    "choose_weight_decay",
    "cross_validated_logits",
    "fit_gate",
    "lbfgs_fit",
    "run",
    "stratified_folds",
    "train_gate",
]
