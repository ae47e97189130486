# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""Call-time fast path for the vision tower: the patch embedding computed as the matrix product it is.

Qwen2-VL's patch embedding (and Qwen2.5-VL's, Qwen3-VL's with a bias) is an `nn.Conv3d` whose kernel equals its
stride, applied to inputs that are exactly one kernel large: each output is the dot product of one flattened patch
with one flattened filter. CPU convolution kernels run this shape far below the machine's matrix-product rate
(oneDNN in bf16 at about 14 GFLOP/s against about 1.1 TFLOP/s for `mm` on an AVX512-BF16 core: a third of a whole
fused forward at batch 8), so the same products are computed as `F.linear(patches, weight.view(out, -1), bias)`.
The arithmetic is the same (the flattening orders of patch and filter agree); only the kernel's summation order
differs, so results agree to rounding (tested against the stock modules at 1e-5 in float32).

The override is applied for the duration of a call (`applied(vlm)`), not once at construction: a model built on the
meta device or `from_config`, a VLM assigned after construction (`model.vlm = ...from_pretrained(...)`) and a 4-bit
(bitsandbytes) VLM, whose Conv3d stays unquantized, all get it, and nothing is left on the modules afterwards
(copies, `save_pretrained` and the stock `generate()` see the stock modules). Any convolution that does not have
exactly this shape (padding, dilation, groups, another input size, a wrapped or subclassed module) runs stock.
`stock()` turns the fast path off (benchmarks and tests compare against it).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

_enabled = True


def conv_is_patch_product(conv: nn.Module) -> bool:
    """Whether `conv` is a plain `nn.Conv3d`/`nn.Conv2d` whose windows never overlap nor pad (kernel == stride)."""
    if type(conv) not in (nn.Conv3d, nn.Conv2d):
        return False
    if isinstance(conv.padding, str) or any(p != 0 for p in conv.padding):
        return False
    return (tuple(conv.stride) == tuple(conv.kernel_size) and all(d == 1 for d in conv.dilation)
            and conv.groups == 1)


def _patch_product_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`Conv(x)` for inputs of exactly one kernel, as one matrix product; anything else goes to the stock kernel."""
    weight = self.weight
    kernel = tuple(self.kernel_size)
    if (
        x.dim() != len(kernel) + 2
        or tuple(x.shape[1:]) != (self.in_channels, *kernel)
        or x.dtype != weight.dtype
        or x.device != weight.device
    ):
        return type(self).forward(self, x)
    out = F.linear(x.reshape(x.shape[0], -1), weight.reshape(self.out_channels, -1), self.bias)
    return out.view(x.shape[0], self.out_channels, *([1] * len(kernel)))


def _vision_tower(vlm: nn.Module) -> nn.Module | None:
    inner = getattr(vlm, "model", vlm)
    return getattr(inner, "visual", None) or getattr(vlm, "visual", None)


def patch_convolutions(vlm: nn.Module) -> list[nn.Module]:
    """The vision tower's patch-embedding convolutions that the fast path computes as matrix products."""
    visual = _vision_tower(vlm)
    patch_embed = getattr(visual, "patch_embed", None) if visual is not None else None
    conv = getattr(patch_embed, "proj", None)
    return [conv] if conv is not None and conv_is_patch_product(conv) else []


@contextlib.contextmanager
def applied(vlm: nn.Module):
    """Within the block, the vision tower of `vlm` computes its patch embedding as a matrix product."""
    patched = []
    if _enabled:
        for conv in patch_convolutions(vlm):
            if "forward" not in conv.__dict__:  # not already overridden (nested calls, or by someone else)
                conv.forward = types.MethodType(_patch_product_forward, conv)
                patched.append(conv)
    try:
        yield
    finally:
        for conv in patched:
            conv.__dict__.pop("forward", None)


@contextlib.contextmanager
def stock():
    """Within the block, the fast path is off: the model runs the unmodified transformers modules."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def is_enabled() -> bool:
    return _enabled


__all__ = ["applied", "stock", "is_enabled", "patch_convolutions", "conv_is_patch_product"]
