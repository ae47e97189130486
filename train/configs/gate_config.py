"""Stage 3's arguments (`train/stages/gate.py` fits the gate by full-batch L-BFGS)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from train.configs.trainer_args import CachedFeatureArguments

# Which split's branch outputs the gate is fitted on. `train` is the paper's setting; `validation` the default.
FIT_ON = ("train", "validation")
# No 0: without a penalty a gate on separable rows has no optimum (its weights grow without bound and L-BFGS runs to its
# step budget: on the demo's validation split 3 s, against 0.2 s for 1e-4), and there cross-validation ranked it last.
WEIGHT_DECAY_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class GateConfig(CachedFeatureArguments):
    """Arguments of stage 3: full-batch L-BFGS on CE + `weight_decay / 2 * |theta|^2`, to convergence, on the rows
    `fit_on` names, with `weight_decay` a number or chosen on held-out rows (`auto`).

    `per_device_train_batch_size` and the learning-rate schedule do not apply: every step sees every row it fits,
    and L-BFGS picks its step lengths by line search."""

    fit_on: str = field(default="validation", metadata={
        "help": "The split whose VLM scores and head logits the gate is fitted on. 'validation' (the default): "
                "outputs on images neither branch was trained on, like the ones the gate sees at test time; the "
                "stage also records a `folds`-fold cross-validated accuracy on them. 'train': the paper's setting, "
                "the training split's outputs, where stages 1 and 2 have already fitted both branches. A validation "
                "split too small to cross-validate is not fitted on: the stage warns, fits on train and records it."})
    weight_decay: float | str = field(default=1e-4, metadata={
        "help": "L2 penalty weight_decay/2*|theta|^2 on every gate parameter, in the objective (the authors' Adam "
                "weight_decay=1e-4 is this penalty), or 'auto': the value of weight_decay_grid with the best accuracy "
                "(then log-likelihood) on rows the gate is not fitted on: the validation split when fit_on is "
                "train, `folds`-fold cross-validation on it when fit_on is validation. The marker records the "
                "value used."})
    weight_decay_grid: list[float] = field(default_factory=lambda: list(WEIGHT_DECAY_GRID), metadata={
        "help": "The values weight_decay 'auto' chooses from, tried in this order (an exact tie keeps the first)."})
    folds: int = field(default=5, metadata={
        "help": "Stratified, seeded (by `seed`) folds of the validation split for the cross-validated accuracy "
                "and weight_decay 'auto' when fit_on is validation (fewer when its largest class has fewer rows)."})
    learning_rate: float = field(default=1.0, metadata={
        "help": "L-BFGS's initial step length (1: the quasi-Newton step; a strong-Wolfe line search adapts it)."})
    num_train_epochs: float = field(default=100.0, metadata={
        "help": "At most this many L-BFGS calls (one per epoch); training stops earlier when L-BFGS converges."})
    lbfgs_max_iter: int = field(default=20, metadata={"help": "L-BFGS iterations per training step."})
    lbfgs_history_size: int = field(default=100, metadata={"help": "L-BFGS curvature pairs kept."})
    lbfgs_tolerance_grad: float = field(default=1e-7, metadata={
        "help": "Converged when the objective's largest gradient component is at most this."})
    lbfgs_tolerance_change: float = field(default=1e-9, metadata={
        "help": "Converged when an iteration changes the objective or the parameters by less than this."})
    eval_strategy: str = field(default="no", metadata={
        "help": "The final gate is evaluated on validation at the end in any case; 'epoch' also logs every step."})
    load_best_model_at_end: bool = field(default=False, metadata={
        "help": "Keep the final gate, where L-BFGS converged (True: the L-BFGS iterate best on validation)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Not used: L-BFGS's lr is constant."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Not used: L-BFGS steps are line searched."})
    logging_steps: float = field(default=1, metadata={"help": "Log the objective every N L-BFGS calls."})

    def __post_init__(self):
        super().__post_init__()
        if self.lbfgs_max_iter < 1:
            raise ValueError(f"lbfgs_max_iter must be at least 1, got {self.lbfgs_max_iter}.")
        if self.fit_on not in FIT_ON:
            raise ValueError(f"fit_on must be one of {', '.join(FIT_ON)}, got {self.fit_on!r}.")
        self.weight_decay = _weight_decay(self.weight_decay)
        if not self.weight_decay_grid or not all(_is_penalty(value) for value in self.weight_decay_grid):
            raise ValueError(f"weight_decay_grid must hold numbers >= 0, got {self.weight_decay_grid}.")
        self.weight_decay_grid = [float(value) for value in self.weight_decay_grid]
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}.")


def _is_penalty(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _weight_decay(value: float | str) -> float | str:
    """A penalty >= 0 or 'auto'. A recipe's `1e-4` arrives as a string (YAML 1.1 reads it so): it is a number."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not _is_penalty(number):
        raise ValueError(f"weight_decay must be a number >= 0 or 'auto', got {value!r}.")
    return number


__all__ = ["FIT_ON", "WEIGHT_DECAY_GRID", "GateConfig"]
