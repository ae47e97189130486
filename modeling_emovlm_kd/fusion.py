# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""The fusion of EmoVLM-KD, computed here and nowhere else: the distillation head, the gate registry, the gate's
inputs and `EmoVLMKDFusion`, the module (head + gate + the gate's inputs) that the model's forward, the training
stages, evaluation, ablations, the bench and the app all call.

One initialisation for every head and gate, wherever it is built (`init_fusion_weights`, which the model's
`_init_weights` also calls): weights from a normal of the VLM's `initializer_range` (0.02), biases zero.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_emovlm_kd import check_gate_signals

DEFAULT_INITIALIZER_RANGE = 0.02


class EmoVLMKDDistillationHead(nn.Module):
    """`Linear(D, h1) -> act -> ... -> Linear(h_n, C)`: the student distilled from the ViT teacher."""

    def __init__(self, in_features: int, hidden_dims: list[int], num_labels: int, activation: str, dropout: float):
        super().__init__()
        layers = []
        for i, width in enumerate(hidden_dims):
            layers += [nn.Dropout(dropout) if i else nn.Identity(), nn.Linear(in_features, width), ACT2FN[activation]]
            in_features = width
        layers += [nn.Dropout(dropout) if hidden_dims else nn.Identity(), nn.Linear(in_features, num_labels)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


# Gates fuse the VLM's signal `v` (one-hot label or label probabilities) with the head's signal `h` (its
# probabilities, or its logits with `gate_head_signal="logits"`), both `(batch, C)`, into class logits `(batch, C)`.
# The five are the paper's Table 4 as the authors' released code defines them (`train_gate.py`). `branch_weights`
# says how much each branch drove the decision, from the gate's own computation, as `(batch, 2)` rows [vlm, head]
# summing to 1.


def _shares(vlm_part: torch.Tensor, head_part: torch.Tensor) -> torch.Tensor:
    """`(batch, 2)` shares of the L1 sizes of two `(batch, C)` logit contributions; an even split where both are 0."""
    parts = torch.stack([vlm_part.abs().sum(-1), head_part.abs().sum(-1)], dim=-1)
    total = parts.sum(-1, keepdim=True)
    return torch.where(total > 0, parts / total.clamp_min(torch.finfo(parts.dtype).tiny), torch.full_like(parts, 0.5))


def _linear_share(weight: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Relative size of the logit contributions `W_v v` and `W_h h` of a linear layer over `cat(v, h)`."""
    num_labels = v.shape[-1]
    return _shares(v @ weight[:, :num_labels].T, h @ weight[:, num_labels:].T)


class ConcatLinearGate(nn.Module):
    """The paper's gate: `Linear(2C, C)` over `cat(v, h)`."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__()
        self.proj = nn.Linear(2 * num_labels, num_labels)

    def forward(self, v, h):
        return self.proj(torch.cat([v, h], dim=-1))

    def branch_weights(self, v, h):
        return _linear_share(self.proj.weight, v, h)


class MoEGate(nn.Module):
    """Mixture of experts: `num_experts` (3, as released) experts `Linear(2C, C)` over `cat(v, h)`, summed with the
    weights of a softmax router `Linear(2C, num_experts)`."""

    def __init__(self, num_labels: int, num_experts: int = 3, **kwargs):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(2 * num_labels, num_labels) for _ in range(num_experts))
        self.router = nn.Linear(2 * num_labels, num_experts)

    def forward(self, v, h):
        x = torch.cat([v, h], dim=-1)
        weights = self.router(x).softmax(-1)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # (batch, experts, C)
        return (weights.unsqueeze(-1) * outputs).sum(1)

    def branch_weights(self, v, h):
        # The router-weighted mixture of the experts' weights is, per image, one linear layer over `cat(v, h)`.
        weights = self.router(torch.cat([v, h], dim=-1)).softmax(-1)
        stacked = torch.stack([expert.weight for expert in self.experts])  # (experts, C, 2C)
        effective = torch.einsum("be,eco->bco", weights, stacked)
        num_labels = v.shape[-1]
        return _shares(torch.einsum("bco,bo->bc", effective[..., :num_labels], v),
                       torch.einsum("bco,bo->bc", effective[..., num_labels:], h))


class BilinearGate(nn.Module):
    """Bilinear pooling then a linear layer: `Linear(C, C)(Bilinear(C, C, C)(v, h))`, both with biases."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__()
        self.bilinear = nn.Bilinear(num_labels, num_labels, num_labels)
        self.proj = nn.Linear(num_labels, num_labels)

    def forward(self, v, h):
        return self.proj(self.bilinear(v, h))

    def branch_weights(self, v, h):
        # Every term needs both branches, so there is no additive split: each branch's share is its Shapley value
        # (the average change of the logits when it is revealed, with the other hidden or shown), against
        # inputs that carry no class information (each row's mean in every class: 1/C for probabilities).
        v0 = v.mean(-1, keepdim=True).expand_as(v)
        h0 = h.mean(-1, keepdim=True).expand_as(h)
        both, neither = self(v, h), self(v0, h0)
        vlm_only, head_only = self(v, h0), self(v0, h)
        return _shares((vlm_only - neither) + (both - head_only), (head_only - neither) + (both - vlm_only))


class _TermsThenLinear(nn.Module):
    """Gates whose last layer is `proj = Linear(C, C)` over the sum of one term per branch (`_terms`)."""

    def forward(self, v, h):
        vlm_term, head_term = self._terms(v, h)
        return self.proj(vlm_term + head_term)

    def branch_weights(self, v, h):
        # The final layer is linear: split its logits into the two summed terms' contributions.
        vlm_term, head_term = self._terms(v, h)
        return _shares(vlm_term @ self.proj.weight.T, head_term @ self.proj.weight.T)


class DynamicWeightingGate(_TermsThenLinear):
    """Per-image softmax weights `w = softmax(Linear(2C, 2)(cat(v, h)))`, then `Linear(C, C)(w1 v + w2 h)`."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__()
        self.weigher = nn.Linear(2 * num_labels, 2)
        self.proj = nn.Linear(num_labels, num_labels)

    def _terms(self, v, h):
        w = self.weigher(torch.cat([v, h], dim=-1)).softmax(-1)
        return w[:, :1] * v, w[:, 1:] * h


class CrossGatingGate(_TermsThenLinear):
    """Each branch gated by a sigmoid of the other, summed, then a linear layer:
    `Linear(C, C)(sigmoid(Linear(C, C)(h)) * v + sigmoid(Linear(C, C)(v)) * h)`."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__()
        self.gate_from_head = nn.Linear(num_labels, num_labels)
        self.gate_from_vlm = nn.Linear(num_labels, num_labels)
        self.proj = nn.Linear(num_labels, num_labels)

    def _terms(self, v, h):
        return v * torch.sigmoid(self.gate_from_head(h)), h * torch.sigmoid(self.gate_from_vlm(v))


# The gate registry: a name (the config's `gate_type`) -> its class, `cls(num_labels, num_experts=...)`. A new gate
# is one class above plus one entry here and its name in the configuration's `GATE_TYPES` (a test checks they agree).
GATES = {
    "concat_linear": ConcatLinearGate,
    "moe": MoEGate,
    "bilinear": BilinearGate,
    "dynamic_weighting": DynamicWeightingGate,
    "cross_gating": CrossGatingGate,
}


def gate_inputs(vlm_logits: torch.Tensor, head_logits: torch.Tensor, vlm_signal: str, *, head_signal: str = "probs"):
    """The gate's two inputs, both `(batch, C)` float32: the VLM's one-hot label (the paper) or its label
    probabilities (`vlm_signal="probs"`), and the head's probabilities (the paper, `head_signal="probs"`) or its raw
    logits (`head_signal="logits"`, what the authors' released code feeds the gate)."""
    check_gate_signals(vlm_signal, head_signal)
    if vlm_signal == "probs":
        vlm = vlm_logits.float().softmax(-1)
    else:
        vlm = F.one_hot(vlm_logits.argmax(-1), vlm_logits.shape[-1]).float()
    head = head_logits.float().softmax(-1) if head_signal == "probs" else head_logits.float()
    return vlm, head


# ---- building and initialising -------------------------------------------------------------------------------


@torch.no_grad()
def init_fusion_weights(module: nn.Module, std: float = DEFAULT_INITIALIZER_RANGE) -> None:
    """The one initialisation of the head's and the gates' layers (the model's `_init_weights` calls it too):
    `Linear`/`Bilinear` weights from `normal(0, std)`, biases zero. Other modules are left as they are."""
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        module.weight.normal_(mean=0.0, std=std)
        if module.bias is not None:
            module.bias.zero_()


def initializer_range(config) -> float:
    """The standard deviation of `init_fusion_weights` for a config: its VLM's `initializer_range` (0.02)."""
    return getattr(config.vlm_config.get_text_config(), "initializer_range", DEFAULT_INITIALIZER_RANGE)


def new_head(in_features: int, hidden_dims, num_labels: int, activation: str = "gelu", dropout: float = 0.1, *,
             std: float = DEFAULT_INITIALIZER_RANGE, initialise: bool = True) -> EmoVLMKDDistillationHead:
    """A distillation head, initialised by `init_fusion_weights` (seed the global RNG first for a fixed draw)."""
    head = EmoVLMKDDistillationHead(in_features, [int(d) for d in hidden_dims], num_labels, activation, dropout)
    if initialise:
        head.apply(lambda module: init_fusion_weights(module, std))
    return head


def new_gate(gate_type: str, num_labels: int, num_experts: int = 3, *, std: float = DEFAULT_INITIALIZER_RANGE,
             initialise: bool = True) -> nn.Module:
    """A gate of the registry `GATES`, initialised by `init_fusion_weights`."""
    if gate_type not in GATES:
        raise ValueError(f"gate_type must be one of {tuple(GATES)}, got {gate_type!r}.")
    gate = GATES[gate_type](num_labels, num_experts=num_experts)
    if initialise:
        gate.apply(lambda module: init_fusion_weights(module, std))
    return gate


def head_from_config(config, *, initialise: bool = True, **overrides) -> EmoVLMKDDistillationHead:
    """The head a config describes (`overrides`: `hidden_dims`, `activation`, `dropout`, e.g. for ablations)."""
    options = {"hidden_dims": config.head_hidden_dims, "activation": config.head_activation,
               "dropout": config.head_dropout, **overrides}
    return new_head(config.feature_dim, options["hidden_dims"], config.num_labels, options["activation"],
                    options["dropout"], std=initializer_range(config), initialise=initialise)


def gate_from_config(config, *, initialise: bool = True, gate_type: str | None = None) -> nn.Module:
    """The gate a config describes (`gate_type` overrides the config's, e.g. for the gate ablation)."""
    return new_gate(gate_type or config.gate_type, config.num_labels, config.gate_num_experts,
                    std=initializer_range(config), initialise=initialise)


# ---- the fusion ----------------------------------------------------------------------------------------------


@dataclass
class EmoVLMKDFusionOutput(ModelOutput):
    r"""
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Fused class scores of the gate.
    head_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Logits of the distillation head (given, or computed from `visual_features`).
    branch_weights (`torch.FloatTensor` of shape `(batch_size, 2)`, *optional*):
        How much each branch drove the decision, rows [vlm, head] summing to 1, from the gate's own
        `branch_weights` on the inputs it fused (no gradient flows through them).
    """

    logits: torch.FloatTensor | None = None
    head_logits: torch.FloatTensor | None = None
    branch_weights: torch.FloatTensor | None = None


class EmoVLMKDFusion(nn.Module):
    """The distillation head, the gate and the gate's inputs: `(vlm_logits, visual_features | head_logits) ->
    fused logits`. Every consumer of the fusion calls this module; the model's forward does too (on its own head
    and gate, so that checkpoints keep their `distillation_head.*` / `gate.*` names).

    `distillation_head` may be None where the head's logits are given (stage 3 trains the gate on cached ones)."""

    def __init__(self, distillation_head: nn.Module | None, gate: nn.Module, vlm_signal: str = "one_hot",
                 head_signal: str = "probs"):
        super().__init__()
        check_gate_signals(vlm_signal, head_signal)
        self.distillation_head = distillation_head
        self.gate = gate
        self.vlm_signal = vlm_signal
        self.head_signal = head_signal

    @classmethod
    def from_config(cls, config, *, head: bool = True, initialise: bool = True) -> "EmoVLMKDFusion":
        """A new head (unless `head=False`) and gate as `config` describes them, with the config's gate inputs."""
        return cls(head_from_config(config, initialise=initialise) if head else None,
                   gate_from_config(config, initialise=initialise), config.gate_vlm_signal, config.gate_head_signal)

    @property
    def gate_dtype(self) -> torch.dtype:
        return next(self.gate.parameters()).dtype

    def head_logits(self, visual_features: torch.Tensor) -> torch.Tensor:
        """The head's logits for pooled visual features `(batch, D)`, in the head's dtype."""
        if self.distillation_head is None:
            raise ValueError("This fusion has no distillation head: pass `head_logits` instead of `visual_features`.")
        return self.distillation_head(visual_features.to(self.distillation_head.mlp[-1].weight.dtype))

    def gate_inputs(self, vlm_logits: torch.Tensor, head_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's two `(batch, C)` inputs (see `gate_inputs`), in the gate's dtype."""
        dtype = self.gate_dtype
        vlm, head = gate_inputs(vlm_logits, head_logits, self.vlm_signal, head_signal=self.head_signal)
        return vlm.to(dtype), head.to(dtype)

    def forward(self, vlm_logits: torch.Tensor, visual_features: torch.Tensor | None = None,
                head_logits: torch.Tensor | None = None, output_branch_weights: bool = True) -> EmoVLMKDFusionOutput:
        r"""
        vlm_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The VLM's label scores.
        visual_features (`torch.FloatTensor` of shape `(batch_size, D)`, *optional*):
            Pooled visual features, the head's input; not needed when `head_logits` is given.
        head_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            The head's logits, when already computed (cached).
        output_branch_weights (`bool`, defaults to `True`):
            Also return the branches' shares of the decision (training loops skip them).
        """
        if head_logits is None:
            if visual_features is None:
                raise ValueError("Pass `visual_features` (the head's input) or the head's `head_logits`.")
            head_logits = self.head_logits(visual_features)
        if vlm_logits.shape != head_logits.shape:
            raise ValueError(f"vlm_logits {tuple(vlm_logits.shape)} and head_logits {tuple(head_logits.shape)} "
                             "must have the same shape (batch, num_labels).")
        vlm, head = self.gate_inputs(vlm_logits, head_logits)
        logits = self.gate(vlm, head)
        weights = None
        if output_branch_weights:
            with torch.no_grad():
                weights = self.gate.branch_weights(vlm, head)
        return EmoVLMKDFusionOutput(logits=logits, head_logits=head_logits, branch_weights=weights)


__all__ = [
    "GATES",
    "ConcatLinearGate",
    "MoEGate",
    "BilinearGate",
    "DynamicWeightingGate",
    "CrossGatingGate",
    "EmoVLMKDDistillationHead",
    "EmoVLMKDFusion",
    "EmoVLMKDFusionOutput",
    "gate_from_config",
    "gate_inputs",
    "head_from_config",
    "init_fusion_weights",
    "initializer_range",
    "new_gate",
    "new_head",
]
