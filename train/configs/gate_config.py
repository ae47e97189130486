"""Stage 3's arguments (`train/stages/gate.py` fits the gate by full-batch L-BFGS)."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.configs.trainer_args import CachedFeatureArguments


@dataclass
class GateConfig(CachedFeatureArguments):
    """Arguments of stage 3: full-batch L-BFGS on CE + `weight_decay / 2 * |theta|^2`, to convergence.

    `per_device_train_batch_size` and the learning-rate schedule do not apply: every step sees every training row,
    and L-BFGS picks its step lengths by line search."""

    learning_rate: float = field(default=1.0, metadata={
        "help": "L-BFGS's initial step length (1: the quasi-Newton step; a strong-Wolfe line search adapts it)."})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "L2 penalty weight_decay/2*|theta|^2 on every gate parameter, in the objective (the authors' Adam "
                "weight_decay=1e-4 is this penalty)."})
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
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must not be negative, got {self.weight_decay}.")


__all__ = ["GateConfig"]
