"""Stage 3: train the gate that fuses the VLM's label with the head's output; everything else is frozen.

The VLM's label scores and the frozen head's logits are computed once (from the feature cache), so gate training
never runs the VLM: the authors' code re-ran sampled generation for every image in every epoch.

The gate is tiny (136 parameters for the paper's 8-class concat-linear gate) and its inputs are cached, so the stage
minimises its whole objective, mean cross-entropy on all training rows plus the L2 penalty
`weight_decay / 2 * |theta|^2`, by full-batch L-BFGS until L-BFGS converges. The result does not depend on the
size of the data set: a step budget of mini-batch AdamW tuned for 100k images leaves the gate far from its
optimum on 100 (on such a set the fused model came out below the distilled head alone). Concat-linear is then the
unique optimum of a strictly convex problem; the other gates reach a local one. The authors' Adam had
`weight_decay=1e-4`, which is this penalty, hence the default.

It still runs in a `transformers.Trainer` (`GateTrainer`): one training step is one L-BFGS call of up to
`lbfgs_max_iter` iterations over the whole training set, one step per epoch, `num_train_epochs` bounds the steps,
and training stops when L-BFGS has converged. Every epoch is checkpointed (with the L-BFGS state) so a killed stage
resumes with `resume_from_checkpoint` to the same gate. The final gate is evaluated on validation once, at the end,
so `trainer.state.best_metric` is the returned gate's validation accuracy; nothing is selected among iterates. If
that accuracy is more than one example below the better single branch's, the stage logs a warning.

    python -m train gate --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed
from transformers.utils import ModelOutput

from modeling_emovlm_kd import EmoVLMKDFusion
from modeling_emovlm_kd.fusion import gate_from_config
from train.configs.gate_config import GateConfig
from train.stages.trainer_utils import FeatureDataset, StrictCheckpointLoading, accuracy_metrics

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
            args = self.args
            parameters = [p for p in (model or self.model).parameters() if p.requires_grad]
            self.optimizer = _ClosureLBFGS(
                parameters, lr=args.learning_rate, max_iter=args.lbfgs_max_iter,
                max_eval=args.lbfgs_max_iter * 30, history_size=args.lbfgs_history_size,
                tolerance_grad=args.lbfgs_tolerance_grad, tolerance_change=args.lbfgs_tolerance_change,
                line_search_fn="strong_wolfe",
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lambda _: 1.0)
        return self.lr_scheduler

    def objective(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        penalty = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad)
        return model(**inputs).loss + self.args.weight_decay / 2 * penalty

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = {key: value[0] for key, value in self._prepare_inputs(inputs).items()}  # the one full batch
        lbfgs = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

        def closure():
            lbfgs.zero_grad()
            loss = self.objective(model, inputs)
            loss.backward()  # under DDP every process holds all rows: the averaged gradient is the full one
            return loss

        state = lbfgs.state[lbfgs.param_groups[0]["params"][0]]
        iterations, evaluations = state.get("n_iter", 0), state.get("func_evals", 0)
        lbfgs.step(closure)
        iterations, evaluations = state["n_iter"] - iterations, state["func_evals"] - evaluations
        # L-BFGS returns early only when one of its tolerances is met (or its evaluation cap, set out of reach).
        if iterations < self.args.lbfgs_max_iter and evaluations < lbfgs.param_groups[0]["max_eval"]:
            self.converged = True
            self.control.should_training_stop = True
        with torch.no_grad():
            return self.objective(model, inputs).detach()


def _report_against_branches(gate: nn.Module, validation: dict[str, torch.Tensor], vlm_signal: str,
                             head_signal: str) -> None:
    """Warn when the fused validation accuracy is more than one example below the better single branch's."""
    labels = validation["labels"]
    device = next(gate.parameters()).device
    with torch.no_grad():
        fused = EmoVLMKDFusion(None, gate, vlm_signal, head_signal)(
            validation["vlm_logits"].to(device), head_logits=validation["head_logits"].to(device),
            output_branch_weights=False).logits.argmax(-1).cpu()
    correct = {"VLM": int((validation["vlm_logits"].argmax(-1) == labels).sum()),
               "head": int((validation["head_logits"].argmax(-1) == labels).sum())}
    branch = max(correct, key=correct.get)
    fused_correct, total = int((fused == labels).sum()), len(labels)
    if fused_correct < correct[branch] - 1:
        logger.warning(
            "Stage 3: the fused gate is below the better single branch on validation: %d/%d right (%.4f), the %s alone "
            "%d/%d (%.4f). The gate fits its training rows (at a minimum of its objective); it does not carry "
            "over to validation: more training rows, a larger weight_decay or the single branch may serve better.",
            fused_correct, total, fused_correct / total, branch, correct[branch], total, correct[branch] / total,
        )


def train_gate(
    gate: nn.Module,
    vlm_signal: str,
    train: dict[str, torch.Tensor],
    validation: dict[str, torch.Tensor],
    args: GateConfig,
    resume_from_checkpoint: str | bool | None = None,
    head_signal: str = "probs",
) -> tuple[nn.Module, Trainer]:
    """Fit `gate` on cached `vlm_logits`, `head_logits` and `labels` by full-batch L-BFGS to a minimum of its objective
    (the optimum for concat_linear, a local one for the other gates); returns the gate and the trainer, whose `state.best_metric` is the gate's validation accuracy."""
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
    _report_against_branches(gate, validation, vlm_signal, head_signal)
    return gate, trainer


def run(context) -> dict:
    run = context.read()
    config = run.fused_config
    # The stage's seed (`gate.seed`, the run's unless the recipe sets it) seeds the gate's initial weights too: the
    # seed spread and the ablations vary it per child run.
    args = context.stage_args("gate")
    set_seed(args.seed)
    gate, trainer = train_gate(gate_from_config(config), config.gate_vlm_signal, run.gate_inputs("train"),
                               run.gate_inputs("validation"), args, resume_from_checkpoint=context.resume("gate"),
                               head_signal=config.gate_head_signal)
    if context.state.is_main_process:
        save_file(gate.state_dict(), context.stage_dir("gate") / "gate.safetensors")
    return {"best_validation_accuracy": trainer.state.best_metric}


__all__ = ["GateStudent", "GateTrainer", "run", "train_gate"]
