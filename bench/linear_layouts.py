"""How fast the fused forward's matrix products run in the weight layout the model stores, against the same products
with the weight stored transposed, beside the 2048x2048 peak of the same run.

`nn.Linear` keeps its weight as (out, in) and computes `x @ weight.T`. On some CPUs (oneDNN with AMX in bf16, for
example) a product runs faster when its right-hand side is contiguous as (in, out); this measures, for the mid
model's shapes at batch 8 (224x224 images: 1,320 text rows, 2,048 vision rows; the label-scoring `lm_head` slice as
`weight[slice] @ hidden.T`), what each layout reaches, so a layout change can be judged before it is made. No model is
built: random tensors of the shapes below.

    python -m bench.linear_layouts --threads 1 --dtype bf16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import (
    add_common_arguments,
    interleaved_timings,
    log,
    make_shape,
    resolve_device,
    resolve_dtype,
    setup,
    summarize,
    synchronize,
    write_json,
)
from bench.flops import MatmulPeak

# (name, rows, in features, out features): the mid model's products at batch 8, from `bench.profile_fused`.
SHAPES = [
    ("text mlp gate/up", 1320, 1536, 8960),
    ("text mlp down", 1320, 8960, 1536),
    ("text attention q/o", 1320, 1536, 1536),
    ("vision qkv", 2048, 1280, 3840),
    ("vision mlp fc1", 2048, 1280, 5120),
    ("vision mlp fc2", 2048, 5120, 1280),
    ("lm_head slice (vocabulary rows x scoring rows)", 7680, 1536, 136),
]


def cases(rows: int, k: int, n: int, dtype, device, generator) -> dict:
    x = torch.randn(rows, k, dtype=dtype, device=device, generator=generator)
    weight = (torch.randn(n, k, dtype=dtype, device=device, generator=generator) * 0.02)
    transposed = weight.t().contiguous()  # (in, out)
    return {"stored (out, in): F.linear": lambda: F.linear(x, weight),
            "transposed (in, out): x @ w": lambda: x @ transposed}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "linear_layouts.json")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--peak-size", type=int, default=2048)
    args = parser.parse_args(argv)
    setup(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    make_shape("mid")  # the shapes above are the mid model's (fails loudly if that shape is renamed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    shapes = SHAPES[:2] if args.tiny else SHAPES
    reps = 2 if args.tiny else args.reps
    peak_size = 256 if args.tiny else args.peak_size
    peak_case = MatmulPeak(device, dtype, peak_size)  # bench.inference's peak: repeated products into one output
    peak_case.calibrate(synchronize)
    all_cases, flops = {"peak": peak_case}, {"peak": peak_case.flops}
    for name, rows, k, n in shapes:
        for layout, call in cases(rows, k, n, dtype, device, generator).items():
            all_cases[f"{name} | {layout}"] = call
            flops[f"{name} | {layout}"] = 2 * rows * k * n
    log(f"Timing {len(all_cases)} products x {reps} interleaved repetitions ({dtype}, {device}) ...")
    cpu_times: dict = {}
    wall = interleaved_timings(all_cases, reps=reps, warmup=2, device=device, cpu_times=cpu_times)
    use = cpu_times if device.type == "cpu" else wall  # CPU time on a CPU (see interleaved_timings), else wall
    peak = flops["peak"] / summarize(use["peak"])["median_s"] / 1e9
    results = []
    lines = ["| product | rows x in -> out | layout | ms (median) | GFLOP/s | of peak |", "|---|---|---|---:|---:|---:|"]
    for name, rows, k, n in shapes:
        for layout in ("stored (out, in): F.linear", "transposed (in, out): x @ w"):
            key = f"{name} | {layout}"
            stats = summarize(use[key])
            rate = flops[key] / stats["median_s"] / 1e9
            results.append({"product": name, "rows": rows, "in": k, "out": n, "layout": layout, "seconds": stats,
                            "gflop_per_s": rate, "fraction_of_peak": rate / peak})
            lines.append(f"| {name} | {rows} x {k} -> {n} | {layout} | {stats['median_s'] * 1e3:.1f} | {rate:.0f} | "
                         f"{rate / peak:.2f} |")
    table = "\n".join(lines)
    print(f"\nPeak: {peak:.0f} GFLOP/s ({peak_size}x{peak_size} products, {peak_case.repeats} per call, "
          f"{str(dtype).removeprefix('torch.')}, "
          f"{'CPU time' if device.type == 'cpu' else 'wall clock'}, median of {reps})\n\n{table}")
    write_json(args.output, {"benchmark": "linear_layouts", "dtype": dtype, "device": device,
                             "peak_gflop_per_s": peak, "results": results, "table_markdown": table})


if __name__ == "__main__":
    main()
