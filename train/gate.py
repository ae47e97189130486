"""Stage 3: train the gate that fuses the VLM's label with the head's probabilities; everything else is frozen.

The VLM's label scores and the frozen head's probabilities are computed once (from the feature cache), so gate
training never runs the VLM: the authors' code re-ran sampled generation for every image in every epoch.

    python -m train gate --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.utils import ModelOutput

from modeling_emovlm_kd import GATES, EmoVLMKDDistillationHead
from modeling_emovlm_kd.modeling_emovlm_kd import gate_inputs

from .trainer_utils import CachedFeatureArguments, FeatureDataset, accuracy_metrics


@dataclass
class GateConfig(CachedFeatureArguments):
    """Arguments of stage 3 (CE on the fused logits): the shared cached-feature stage arguments."""


class GateStudent(nn.Module):
    """A gate as a `Trainer` model: cached VLM scores and head probabilities -> fused logits (+ CE loss)."""

    def __init__(self, gate: nn.Module, vlm_signal: str):
        super().__init__()
        self.gate = gate
        self.vlm_signal = vlm_signal

    def forward(self, vlm_logits, head_logits, labels=None, **kwargs) -> ModelOutput:
        logits = self.gate(*gate_inputs(vlm_logits, head_logits, self.vlm_signal))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)


@torch.inference_mode()
def head_logits(head: EmoVLMKDDistillationHead, visual_features: torch.Tensor, batch_size: int = 4096):
    """The frozen head's logits for cached features, computed once for all of stage 3."""
    head.eval()
    return torch.cat([head(chunk) for chunk in visual_features.split(batch_size)])


def build_gate(gate_type: str, num_labels: int, num_experts: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    gate = GATES[gate_type](num_labels, num_experts=num_experts)
    for module in gate.modules():
        if isinstance(module, (nn.Linear, nn.Bilinear)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return gate


def train_gate(
    gate: nn.Module,
    vlm_signal: str,
    train: dict[str, torch.Tensor],
    validation: dict[str, torch.Tensor],
    args: GateConfig,
    resume_from_checkpoint: str | bool | None = None,
) -> tuple[nn.Module, Trainer]:
    """Train `gate` on cached `vlm_logits`, `head_logits` and `labels`; returns the best gate on validation."""
    keys = ("vlm_logits", "head_logits", "labels")
    trainer = Trainer(
        model=GateStudent(gate, vlm_signal),
        args=args,
        train_dataset=FeatureDataset(**{k: train[k] for k in keys}),
        eval_dataset=FeatureDataset(**{k: validation[k] for k in keys}),
        compute_metrics=accuracy_metrics,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer.model.gate, trainer


__all__ = ["GateConfig", "GateStudent", "build_gate", "head_logits", "train_gate"]
