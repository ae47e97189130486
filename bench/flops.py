"""FLOPs of each benchmarked path, counted from the configuration; the peak matrix-product rate; op profiles.

Counted (2 FLOPs per multiply-add; biases, norms, activations, softmax and rotary embeddings are not counted):

- patch embedding: `patches x (C * T * P^2) x E` (the Conv3d is that product);
- vision block, per image of `n` patches: the `qkv`, `proj`, `fc1`, `fc2` Linears over `n` rows, and the attention
  products `QK^T` and `AV`, `2 x n^2 x E` multiply-adds;
- merger: `fc1` (`4E -> 4E`) and `fc2` (`4E -> D`) over `n / 4` rows;
- language-model layer over the `L` positions of each row of the batch (prompt, image tokens, label continuations;
  padding included, it is computed): `q, k, v, o` and the MLP's `gate, up, down` Linears, and the attention products
  over the dense `L x L` score matrix SDPA computes under the tree mask (`2 x L^2 x hidden` multiply-adds);
- `lm_head` on the label-scoring rows only (the rows `score_labels` keeps: the last prompt position plus every
  continuation token but the last of each label), `rows x hidden x vocab`;
- the distillation head and gate Linears.

The official-style path: prefill of the chat prompt (the same Linears and attention over its `S` positions),
`max_new_tokens - 1` decode steps (one row per step through every Linear, attention against the `S + k` cached
positions), `lm_head` on one row per generated token, the vision tower in the prefill, the second vision pass
(fp32 copy) and head, the ViT teacher (patch embedding, `qkv/o/MLP` over 577 tokens, attention) and the gate.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy
import torch


def _linear(rows: int, n_in: int, n_out: int) -> int:
    return 2 * rows * n_in * n_out


def vision_flops(vision_config, grid_thw: list[tuple[int, int, int]], text_hidden: int) -> dict[str, int]:
    """Vision tower over images of patch grids `grid_thw` (t, h, w each)."""
    v = vision_config
    e = v.embed_dim
    mlp = int(e * v.mlp_ratio)
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size**2
    merge = v.spatial_merge_size**2
    n = [t * h * w for t, h, w in grid_thw]
    total = sum(n)
    per_block_linear = _linear(total, e, 3 * e) + _linear(total, e, e) + _linear(total, e, mlp) + _linear(total, mlp, e)
    # Attention runs per image (block-diagonal over cu_seqlens).
    per_block_attention = sum(4 * k * k * e for k in n)
    merged = total // merge
    return {
        "patch_embed": _linear(total, patch_in, e),
        "vision_linear": v.depth * per_block_linear,
        "vision_attention": v.depth * per_block_attention,
        "merger": _linear(merged, e * merge, e * merge) + _linear(merged, e * merge, text_hidden),
    }


def _text_layer_linear(text_config, rows: int) -> int:
    t = text_config
    h, head_dim = t.hidden_size, t.hidden_size // t.num_attention_heads
    kv = t.num_key_value_heads * head_dim
    return (_linear(rows, h, h) * 2 + _linear(rows, h, kv) * 2
            + _linear(rows, h, t.intermediate_size) * 2 + _linear(rows, t.intermediate_size, h))


def head_gate_flops(config, images: int) -> int:
    dims = [config.feature_dim, *config.head_hidden_dims, config.num_labels]
    head = sum(_linear(images, a, b) for a, b in zip(dims, dims[1:]))
    return head + _linear(images, 2 * config.num_labels, config.num_labels)


def fused_flops(model, image_grid_thw: torch.Tensor, with_head: bool = True) -> dict[str, int]:
    """The fused forward (or, `with_head=False`, the VLM's label scoring alone) on images of `image_grid_thw`."""
    config = model.config
    vlm_config = config.vlm_config
    text = vlm_config.get_text_config()
    grid = [tuple(int(x) for x in row) for row in image_grid_thw.tolist()]
    input_ids, _, _, _ = model._classification_inputs(image_grid_thw.to(model.device))
    batch, length = input_ids.shape
    continuations = config.prompt_token_ids["label_continuations"]
    lm_rows = 1 + sum(len(c) - 1 for c in continuations)
    parts = vision_flops(vlm_config.vision_config, grid, text.hidden_size)
    parts["text_linear"] = text.num_hidden_layers * _text_layer_linear(text, batch * length)
    parts["text_attention"] = text.num_hidden_layers * batch * 4 * length * length * text.hidden_size
    parts["lm_head_scoring_rows"] = _linear(batch * lm_rows, text.hidden_size, text.vocab_size)
    if with_head:
        parts["head_and_gate"] = head_gate_flops(config, batch)
    parts["total"] = sum(parts.values())
    return parts


def vit_flops(vit_config, images: int) -> int:
    c = vit_config
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    rows = images * tokens
    per_layer = (_linear(rows, c.hidden_size, 3 * c.hidden_size) + _linear(rows, c.hidden_size, c.hidden_size)
                 + _linear(rows, c.hidden_size, c.intermediate_size) + _linear(rows, c.intermediate_size, c.hidden_size)
                 + images * 4 * tokens * tokens * c.hidden_size)
    patch = _linear(images * (tokens - 1), c.num_channels * c.patch_size**2, c.hidden_size)
    return patch + c.num_hidden_layers * per_layer + _linear(images, c.hidden_size, c.num_labels)


def official_flops(model, teacher, image_grid_thw: torch.Tensor, prompt_tokens: int, new_tokens: int
                   ) -> dict[str, int]:
    """The official-style path: generation from a chat prompt of `prompt_tokens` positions (padded batch), the
    second vision pass and head, the teacher, the gate."""
    config = model.config
    vlm_config = config.vlm_config
    text = vlm_config.get_text_config()
    grid = [tuple(int(x) for x in row) for row in image_grid_thw.tolist()]
    batch = len(grid)
    vision = vision_flops(vlm_config.vision_config, grid, text.hidden_size)
    vision_total = sum(vision.values())
    layers, h = text.num_hidden_layers, text.hidden_size
    steps = max(new_tokens - 1, 0)
    prefill = layers * (_text_layer_linear(text, batch * prompt_tokens)
                        + batch * 4 * prompt_tokens * prompt_tokens * h)
    decode = layers * (steps * _text_layer_linear(text, batch)
                       + batch * sum(4 * (prompt_tokens + k) * h for k in range(1, steps + 1)))
    parts = {
        "generation_vision_tower": vision_total,
        "generation_prefill": prefill,
        "generation_decode": decode,
        "generation_lm_head": _linear(batch * new_tokens, h, text.vocab_size),
        "second_vision_pass": vision_total,
        "head_and_gate": head_gate_flops(config, batch),
        "teacher": vit_flops(teacher.config, batch),
    }
    parts["total"] = sum(parts.values())
    return parts


# ---- the peak ------------------------------------------------------------------------------------------------


class MatmulPeak:
    """A case that runs `repeats` square `size x size` products in the benchmark's dtype on its device: the rate the
    machine reaches on large matrix products, measured in the same run (interleaved with the other cases)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int | None = None, target_s: float = 0.2):
        self.size = size or (8192 if device.type == "cuda" else 2048)
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(self.size, self.size, generator=generator).to(device, dtype)
        self.b = torch.randn(self.size, self.size, generator=generator).to(device, dtype)
        self.out = torch.empty_like(self.a)
        self.device = device
        self.repeats = 1
        self.target_s = target_s

    def calibrate(self, synchronize: Callable) -> None:
        """Enough products per call that one call takes about `target_s` (first call warms the kernels up)."""
        self()
        synchronize(self.device)
        start = time.perf_counter()
        self()
        synchronize(self.device)
        self.repeats = max(1, math.ceil(self.target_s / max(time.perf_counter() - start, 1e-6)))

    @property
    def flops(self) -> int:
        return self.repeats * 2 * self.size**3

    def __call__(self):
        with torch.inference_mode():
            for _ in range(self.repeats):
                torch.mm(self.a, self.b, out=self.out)
        return self.out


def rates(flops: int, seconds: list[float], peak_flops: int, peak_seconds: list[float],
          cpu_seconds: list[float] | None = None, peak_cpu_seconds: list[float] | None = None) -> dict:
    """GFLOP/s (median) and fraction of the peak: the ratio of the medians, and per interleaved repetition (the case
    and the peak of the same repetition, so drift of a shared machine cancels). Given CPU seconds of the case and the
    peak (`interleaved_timings(cpu_times=...)`), the same fraction in CPU time, per repetition: median and quartiles
    (`fraction_of_peak_cpu`; meaningful with one thread)."""
    gflops = flops / statistics.median(seconds) / 1e9
    peak = peak_flops / statistics.median(peak_seconds) / 1e9
    per_rep = [(flops / s) / (peak_flops / p) for s, p in zip(seconds, peak_seconds)]
    out = {"gflop": flops / 1e9, "gflop_per_s": gflops, "peak_gflop_per_s": peak, "fraction_of_peak": gflops / peak,
           "fraction_of_peak_per_rep": {"median": statistics.median(per_rep), "min": min(per_rep),
                                        "max": max(per_rep)}}
    if cpu_seconds and peak_cpu_seconds and len(cpu_seconds) == len(peak_cpu_seconds):
        per_rep_cpu = [(flops / max(s, 1e-9)) / (peak_flops / max(p, 1e-9))
                       for s, p in zip(cpu_seconds, peak_cpu_seconds)]
        out["fraction_of_peak_cpu"] = quartiles(per_rep_cpu)
        out["gflop_per_cpu_s"] = flops / statistics.median(cpu_seconds) / 1e9
    return out


def quartiles(values: list[float]) -> dict:
    """Median, first and third quartile (numpy's linear interpolation), min, max and the IQR relative to the median."""
    ordered = sorted(values)
    q1, median, q3 = (float(x) for x in numpy.percentile(ordered, [25, 50, 75]))
    return {"median": median, "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1],
            "rel_iqr": (q3 - q1) / median if median else 0.0, "n": len(ordered)}


# ---- profiles ------------------------------------------------------------------------------------------------

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm")
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::cudnn_convolution",
            "aten::slow_conv3d_forward", "aten::_slow_conv2d_forward")


def op_profile(fn: Callable, device: torch.device, top: int = 12) -> dict:
    """One untimed call of `fn` under torch.profiler: the `top` ops by self time (device time on GPU) and the share
    of the time in matrix products, convolutions, attention kernels and everything else."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, key, 0) or 0, e.count) for e in events]
    total = sum(t for _, t, _ in rows) or 1
    rows.sort(key=lambda r: -r[1])
    groups = {"matmul": 0, "convolution": 0, "attention": 0, "other": 0}
    for name, t, _ in rows:
        if name in MATMUL_OPS or "gemm" in name.lower():
            groups["matmul"] += t
        elif name in CONV_OPS or "conv" in name.lower():
            groups["convolution"] += t
        elif "attention" in name.lower() or "flash" in name.lower():
            groups["attention"] += t
        else:
            groups["other"] += t
    return {
        "time_kind": "self device time" if device.type == "cuda" else "self CPU time",
        "total_ms": total / 1000,
        "shares": {k: v / total for k, v in groups.items()},
        "top_ops": [{"op": name, "calls": calls, "self_ms": t / 1000, "share": t / total}
                    for name, t, calls in rows[:top]],
    }
