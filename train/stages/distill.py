"""Stage 2: distil the ViT teacher into the head on the frozen VLM's pooled visual features.

Only the head trains, on cached features and teacher logits (see `train/stages/features.py`), so an epoch costs a few
matrix products instead of a VLM and a ViT forward per image.

    python -m train distill --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, set_seed
from transformers.utils import ModelOutput

from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDDistillationHead
from modeling_emovlm_kd.fusion import head_from_config
from train.configs.distill_config import DistillationConfig
from train.stages.trainer_utils import FeatureDataset, StrictCheckpointLoading, accuracy_metrics, kept_model_metric


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""`α·τ²·KL(p_t^τ ‖ p_s^τ) + (1−α)·CE(y, p_s)`, with its two parts.

    Args:
        student_logits, teacher_logits (`torch.Tensor` of shape `(batch, num_labels)`):
            Logits of the head and of the teacher.
        labels (`torch.LongTensor` of shape `(batch,)`):
            Class indices; `-100` rows are left out of both terms.
        num_items_in_batch (*optional*):
            Labelled rows in the whole (accumulated) batch; when given, terms are summed and divided by it, so that
            gradient accumulation gives the same loss as one large batch.

    Returns:
        `(loss, kl, ce)`: scalars; `kl` already includes the `τ²` factor.
    """
    keep = labels != -100
    student, teacher, labels = student_logits[keep].float(), teacher_logits[keep].float(), labels[keep]
    kl_rows = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    ce_rows = F.cross_entropy(student, labels, reduction="none")
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
    kl = temperature**2 * kl_rows.sum() / denominator
    ce = ce_rows.sum() / denominator
    return alpha * kl + (1 - alpha) * ce, kl, ce


class DistillationStudent(nn.Module):
    """The head as a `Trainer` model: `visual_features -> logits`. Teacher logits ride along in the batch."""

    accepts_loss_kwargs = True  # the loss divides by `num_items_in_batch` itself

    def __init__(self, head: EmoVLMKDDistillationHead):
        super().__init__()
        self.head = head

    def forward(self, visual_features: torch.Tensor, **kwargs) -> ModelOutput:
        return ModelOutput(logits=self.head(visual_features))


class DistillationTrainer(StrictCheckpointLoading, Trainer):
    """`Trainer` whose loss is the EmoVLM-KD distillation loss on cached teacher logits. Its checkpoints hold the
    head as `head.*` and load strictly (`StrictCheckpointLoading`, `submodule_tensors`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts = {"kl": [], "ce": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, teacher_logits = inputs["labels"], inputs["teacher_logits"]
        outputs = model(visual_features=inputs["visual_features"])
        loss, kl, ce = distillation_loss(
            outputs.logits, teacher_logits, labels, self.args.alpha, self.args.temperature, num_items_in_batch
        )
        if model.training:
            self._parts["kl"].append(kl.detach())
            self._parts["ce"].append(ce.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Log the mean of each loss part since the last log, next to the total loss.
        if "loss" in logs and self._parts["kl"]:
            for name, values in self._parts.items():
                logs[f"loss_{name}"] = round(torch.stack(values).mean().item(), 6)
                values.clear()
        super().log(logs, start_time)


def train_distillation(
    head: EmoVLMKDDistillationHead,
    train: dict[str, torch.Tensor],
    validation: dict[str, torch.Tensor],
    args: DistillationConfig,
    resume_from_checkpoint: str | bool | None = None,
) -> tuple[EmoVLMKDDistillationHead, DistillationTrainer]:
    """Train `head` on cached `visual_features`/`teacher_logits`/`labels`; returns the best head on validation."""
    if train["teacher_logits"].shape[-1] != head.mlp[-1].out_features:
        raise ValueError(
            f"The teacher has {train['teacher_logits'].shape[-1]} classes but the head has "
            f"{head.mlp[-1].out_features}; train the teacher on the same label set."
        )
    keys = ("visual_features", "teacher_logits", "labels")
    trainer = DistillationTrainer(
        model=DistillationStudent(head),
        args=args,
        train_dataset=FeatureDataset(**{k: train[k] for k in keys}),
        eval_dataset=FeatureDataset(**{k: validation[k] for k in keys}),
        compute_metrics=accuracy_metrics,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer.model.head, trainer


def initial_head(config: EmoVLMKDConfig, seed: int) -> EmoVLMKDDistillationHead:
    """Stage 2's head before training: the config's, initialised as the model's, seeded by the stage's seed
    (`distill.seed`, the run's seed unless the recipe sets it)."""
    torch.manual_seed(seed)
    return head_from_config(config)


def run(context) -> dict:
    run = context.read()
    args = context.stage_args("distill")
    set_seed(args.seed)
    head, trainer = train_distillation(initial_head(run.fused_config, args.seed), run.features("train"),
                                       run.features("validation"), args,
                                       resume_from_checkpoint=context.resume("distill"))
    if context.state.is_main_process:
        save_file(head.state_dict(), context.stage_dir("distill") / "head.safetensors")
    return {"best_validation_accuracy": kept_model_metric(trainer)}


__all__ = [
    "DistillationStudent",
    "DistillationTrainer",
    "distillation_loss",
    "initial_head",
    "run",
    "train_distillation",
]
