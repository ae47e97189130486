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

Without gradients (inference, the feature caches, stage 1's label accuracy) the MLPs of the vision tower and the
language model also run their activation in place: `down(act(gate(x)) * up(x))` computes `act` into `gate(x)`'s
output and multiplies `up(x)` into it, and quick-GELU `x * sigmoid(1.702 x)` writes `sigmoid` into the one buffer
`1.702 x` allocates. The operations and their order are the stock modules' (results are bit-identical, tested in
float32 and bfloat16); what goes is two of three fresh activation-sized tensors per MLP, each of which costs a pass
over new memory (page faults on CPU: at batch 8 on 2B widths, hundreds of MiB per forward). Only the MLP classes
listed in `_GATED_MLPS` / `_PLAIN_MLPS` (read from transformers 5.x's Qwen2-VL, Qwen2.5-VL and Qwen3-VL modules) with
an activation listed in `_INPLACE_ACTIVATIONS` are patched; with gradients enabled they run stock.

The vision tower's rotary embedding (`apply_rotary_pos_emb_vision` of the same three modules, which casts `q` and
`k` to float32 and computes `q * cos + rotate_half(q) * sin`) runs as the same float32 products and sums without
`rotate_half`'s negated copy and concatenation (bit-identical, about half the time). It is a module-level function
that the attention looks up at call time, so it is swapped in that module while a fast-path call runs (counted, so
nested and concurrent calls restore it once); a stock model running meanwhile gets the same numbers.
"""

from __future__ import annotations

import contextlib
import sys
import threading
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


# ---- MLPs with their activation in place (no gradients) ---------------------------------------------------------

_QWEN2_VL = "transformers.models.qwen2_vl.modeling_qwen2_vl"
_QWEN2_5_VL = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
_QWEN3_VL = "transformers.models.qwen3_vl.modeling_qwen3_vl"
# `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, by (module, class name).
_GATED_MLPS = {(_QWEN2_VL, "Qwen2MLP"), (_QWEN2_5_VL, "Qwen2MLP"), (_QWEN2_5_VL, "Qwen2_5_VLMLP"),
               (_QWEN3_VL, "Qwen3VLTextMLP")}
# `fc2(act(fc1(x)))`: the names of (fc1, act, fc2).
_PLAIN_MLPS = {(_QWEN2_VL, "VisionMlp"): ("fc1", "act", "fc2"),
               (_QWEN3_VL, "Qwen3VLVisionMLP"): ("linear_fc1", "act_fn", "linear_fc2")}


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """`x * sigmoid(1.702 x)` (transformers' `QuickGELUActivation`, same operations) in one new buffer, not three."""
    out = x * 1.702
    return out.sigmoid_().mul_(x)


# Activations computed in place of their input, by (module, class name). Quick-GELU needs its input twice, so it
# writes into one new buffer (its stock form allocates three).
_INPLACE_ACTIVATIONS = {("transformers.activations", "SiLUActivation"): _silu_,
                        ("torch.nn.modules.activation", "SiLU"): _silu_,
                        ("transformers.activations", "QuickGELUActivation"): _quick_gelu}


def _key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__qualname__


def _hooked(module: nn.Module) -> bool:
    """Whether something observes `module`'s calls (a hook could keep the output that would be overwritten)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _inplace_activation(act: nn.Module, producer: nn.Module):
    """The in-place form of `act`, applied to `producer`'s output, or None where the stock module must run."""
    if act is None or _hooked(act) or _hooked(producer):
        return None
    if getattr(act, "inplace", False):  # nn.SiLU(inplace=True) already is
        return None
    return _INPLACE_ACTIVATIONS.get(_key(act))


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    act = _inplace_activation(self.act_fn, self.gate_proj) if not torch.is_grad_enabled() else None
    if act is None:
        return type(self).forward(self, x)
    hidden = act(self.gate_proj(x))
    return self.down_proj(hidden.mul_(self.up_proj(x)))


def _plain_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc1, act, fc2 = (getattr(self, name) for name in _PLAIN_MLPS[_key(self)])
    act = _inplace_activation(act, fc1) if not torch.is_grad_enabled() else None
    if act is None:
        return type(self).forward(self, x)
    return fc2(act(fc1(x)))


def _blocks(vlm: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The vision tower's blocks and the language model's decoder layers."""
    inner = getattr(vlm, "model", vlm)
    visual = _vision_tower(vlm)
    language_model = getattr(inner, "language_model", None)
    found = []
    for container in (getattr(visual, "blocks", None), getattr(language_model, "layers", None)):
        found.append(list(container) if isinstance(container, nn.ModuleList) else [])
    return found[0], found[1]


def _compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


def mlps(vlm: nn.Module) -> list[tuple[nn.Module, types.FunctionType]]:
    """The vision blocks' and language-model layers' MLPs that the fast path runs with in-place activations, each
    with the forward it gets. Blocks compiled with `compile_layers` are left to the compiler."""
    found = []
    for block in (block for blocks in _blocks(vlm) for block in blocks if not _compiled(block)):
        mlp = getattr(block, "mlp", None)
        key = _key(mlp) if mlp is not None else None
        if key in _GATED_MLPS:
            found.append((mlp, _gated_mlp_forward))
        elif key in _PLAIN_MLPS:
            found.append((mlp, _plain_mlp_forward))
    return found


# ---- the vision tower's rotary embedding -------------------------------------------------------------------------

_ROTARY_MODULES = (_QWEN2_VL, _QWEN2_5_VL, _QWEN3_VL)
_rotary_lock = threading.Lock()
_rotary_users: dict[str, int] = {}


def rotary_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' `apply_rotary_pos_emb_vision`: `(x * cos + rotate_half(x) * sin)` in float32, cast back to `x`'s
    dtype, with `rotate_half(x) = cat(-x2, x1)` written out per half (`x1*c1 - x2*s1`, `x2*c2 + x1*s2`: the same
    float32 roundings)."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    half = q.shape[-1] // 2

    def rotate(x):
        dtype, x = x.dtype, x.float()
        out = x * cos
        out[..., :half] -= x[..., half:] * sin[..., :half]
        out[..., half:] += x[..., :half] * sin[..., half:]
        return out.to(dtype)

    return rotate(q), rotate(k)


_rotary_replacements: dict[str, types.FunctionType] = {}


def _rotary_replacing(name: str, stock: types.FunctionType) -> types.FunctionType:
    """The function put in module `name` in place of its `apply_rotary_pos_emb_vision` (one per module, so that a
    compiler's guards on it hold from call to call)."""
    if name not in _rotary_replacements or _rotary_replacements[name].stock is not stock:
        def apply_rotary_pos_emb_vision(q, k, cos, sin):
            # With gradients the stock function runs (autograd would record the in-place halves; training gains
            # nothing from them).
            return stock(q, k, cos, sin) if torch.is_grad_enabled() else rotary_vision(q, k, cos, sin)

        apply_rotary_pos_emb_vision.stock = stock
        _rotary_replacements[name] = apply_rotary_pos_emb_vision
    return _rotary_replacements[name]


@contextlib.contextmanager
def _vision_rotary(vlm: nn.Module):
    """Within the block, the vision tower's transformers module computes its rotary embedding with `rotary_vision`
    (unless its blocks are compiled: the compiler fuses the stock operations itself)."""
    visual = _vision_tower(vlm)
    name = type(visual).__module__ if visual is not None else None
    module = sys.modules.get(name) if name in _ROTARY_MODULES else None
    if module is not None and any(_compiled(block) for block in _blocks(vlm)[0]):
        module = None
    with _rotary_lock:
        function = getattr(module, "apply_rotary_pos_emb_vision", None)
        ours = hasattr(function, "stock")
        if function is None or not (ours or getattr(function, "__module__", None) == name):
            module = None  # not the stock function of a known module (someone else replaced it): leave it
        elif not ours:
            module.apply_rotary_pos_emb_vision = _rotary_replacing(name, function)
        if module is not None:
            _rotary_users[name] = _rotary_users.get(name, 0) + 1
    try:
        yield
    finally:
        if module is not None:
            with _rotary_lock:
                _rotary_users[name] -= 1
                if not _rotary_users[name]:
                    module.apply_rotary_pos_emb_vision = module.apply_rotary_pos_emb_vision.stock


@contextlib.contextmanager
def applied(vlm: nn.Module):
    """Within the block, the vision tower of `vlm` computes its patch embedding as a matrix product, and its MLPs run
    their activations in place when no gradients are recorded."""
    patched = []
    if not _enabled:
        yield
        return
    targets = [(conv, _patch_product_forward) for conv in patch_convolutions(vlm)] + mlps(vlm)
    for module, forward in targets:
        if "forward" not in module.__dict__:  # not already overridden (nested calls, or by someone else)
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        with _vision_rotary(vlm):
            yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def compile_layers(vlm: nn.Module, **compile_kwargs) -> int:
    """Compile each vision block and language-model layer of `vlm` in place (`nn.Module.compile(**compile_kwargs)`,
    e.g. `dynamic=False`, `options={"freezing": True}`); returns how many. An option for inference on a fixed
    batch shape: the first call of each new shape compiles (tens of seconds on a CPU), and the in-place MLP and
    rotary replacements above step aside for compiled blocks (the compiler fuses the stock operations). With
    inductor's `freezing` the weights are folded into the compiled code as constants, prepacked for the CPU's
    matrix kernels: later changes to the weights are not seen, and the packed copies take memory beside them.

    Every block runs the same `forward` code, so dynamo counts each block's compilation (with freezing, where each
    block's weights are part of its code, one per block and shape) against that code's recompile limit (8 by
    default): the limits are raised to 8 compilations per block."""
    import torch._dynamo

    vision, text = _blocks(vlm)
    blocks = vision + text
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(blocks)))
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


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


__all__ = ["applied", "stock", "is_enabled", "patch_convolutions", "conv_is_patch_product", "mlps",
           "rotary_vision", "compile_layers"]
