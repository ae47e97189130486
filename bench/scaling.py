"""Latency and peak memory of the fused model vs image resolution (`max_pixels`) and vs batch size.

    python -m bench.scaling
    python -m bench.scaling --tiny

Resolution sweep at batch 1, square images of side sqrt(max_pixels), with the official-style path (greedy
`generate(max_new_tokens=16)` + second fp32 vision pass + ViT teacher) next to it; batch sweep at the default
resolution. Peak memory is what one call allocates beyond the loaded weights, measured on a separate untimed call.
Every case reports GFLOP/s (FLOPs counted from the config, `bench/flops.py`) and its fraction of the peak matrix-product
rate, measured by a `matmul_peak` case interleaved with the others; the JSON keeps each case's top ops (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import (
    OfficialStyle,
    PeakMemory,
    add_common_arguments,
    build_models,
    default_image_size,
    fused_predict,
    interleaved_timings,
    log,
    make_shape,
    markdown_table,
    random_images,
    setup,
    summarize,
    synchronize,
    write_json,
)
from bench.flops import MatmulPeak, fused_flops, official_flops, op_profile, rates


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "scaling.json")
    parser.add_argument("--sides", type=int, nargs="+", default=None,
                        help="Image sides; max_pixels = side**2 (default 112 224 336 448, tiny 56 84 112).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="Batch sweep (default 1 2 4 8 16, tiny 1 2 4).")
    parser.add_argument("--reps", type=int, default=None, help="Timed repetitions (default 3, tiny 1).")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Official-style path's generation length.")
    parser.add_argument("--no-official", action="store_true", help="Leave the official-style path out.")
    parser.add_argument("--no-profile", action="store_true", help="Skip the profiled call per case.")
    parser.add_argument("--peak-size", type=int, default=None, help="Side of the peak matmul (2048, GPU 8192).")
    return parser.parse_args(argv)


def memory(bm, fn) -> dict:
    with PeakMemory(bm.device) as peak:
        fn()
    return {"peak_mib": None if peak.peak_bytes is None else peak.peak_bytes / 2**20, "method": peak.method}


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    reps = args.reps or (1 if args.tiny else 3)
    sides = args.sides or ([56, 84, 112] if args.tiny else [112, 224, 336, 448])
    batch_sizes = args.batch_sizes or ([1, 2, 4] if args.tiny else [1, 2, 4, 8, 16])
    shape = make_shape("tiny" if args.tiny else "mid", args.text_layers, args.vision_depth,
                       max_pixels=max(sides) ** 2)
    log(f"Building the {shape.name} models ...")
    bm = build_models(shape, dtype=args.dtype, device=args.device, seed=args.seed)
    official = None if args.no_official else OfficialStyle(bm, args.max_new_tokens)
    if official is not None:
        bm.vision_copy()
    merge = bm.model.config.vlm_config.vision_config.spatial_merge_size
    patch = bm.model.config.vlm_config.vision_config.patch_size

    # Resolution sweep (batch 1): each case sets its own max_pixels before running.
    peak = MatmulPeak(bm.device, bm.dtype, args.peak_size)
    peak.calibrate(synchronize)
    cases, meta, inputs_of = {"matmul_peak": peak}, {}, {}
    for side in sides:
        image = random_images(1, (side, side), seed=args.seed)

        def run(fn, side=side, image=image):
            bm.set_max_pixels(side * side)
            return fn(bm, image) if fn is fused_predict else fn(image)

        cases[f"fused@{side}px"] = lambda run=run: run(fused_predict)
        inputs_of[f"fused@{side}px"] = inputs_of[f"official@{side}px"] = (side, image)
        meta[f"fused@{side}px"] = ("resolution", "fused", side, 1)
        if official is not None:
            cases[f"official@{side}px"] = lambda run=run: run(official)
            meta[f"official@{side}px"] = ("resolution", f"official_gen{args.max_new_tokens}", side, 1)
    default_side = default_image_size(make_shape(shape.name))[0]
    images = random_images(max(batch_sizes), (default_side, default_side), seed=args.seed)
    for b in batch_sizes:
        def run_batch(b=b):
            bm.set_max_pixels(default_side * default_side)
            return fused_predict(bm, images[:b])

        cases[f"fused@batch{b}"] = run_batch
        inputs_of[f"fused@batch{b}"] = (default_side, images[:b])
        meta[f"fused@batch{b}"] = ("batch", "fused", default_side, b)
    log(f"Timing {len(cases)} cases x {reps} interleaved repetitions ...")
    times = interleaved_timings(cases, reps=reps, warmup=1, device=bm.device, log=log)
    log("Peak memory (one untimed call per case) ...")
    memories = {name: memory(bm, fn) for name, fn in cases.items() if name != "matmul_peak"}
    profiles = {}
    if not args.no_profile:
        log("Profiling one call per case (torch.profiler, untimed) ...")
        profiles = {name: op_profile(fn, bm.device) for name, fn in cases.items() if name != "matmul_peak"}
    peak_times = times.pop("matmul_peak")
    peak_row = {"size": peak.size, "products_per_call": peak.repeats, "latency_per_call_s": summarize(peak_times),
                "gflop_per_s": peak.flops / statistics.median(peak_times) / 1e9}
    calls_of = {}
    for call in (official.calls if official is not None else []):
        calls_of.setdefault(tuple(map(tuple, call["image_grid_thw"])), call)

    rows = []
    for name, seconds in times.items():
        sweep, method, side, b = meta[name]
        stats = summarize(seconds)
        grid = (side // patch) ** 2  # square images whose side is a multiple of 28 keep their size
        rows.append({
            "case": name, "sweep": sweep, "method": method, "side": side, "max_pixels": side * side, "batch_size": b,
            "visual_tokens_per_image": grid // merge**2, "latency_ms": 1000 * stats["median_s"],
            "latency_per_image_ms": 1000 * stats["median_s"] / b, "images_per_s": b / stats["median_s"],
            "rel_iqr": stats["rel_iqr"], "peak_mib": memories[name]["peak_mib"], "latency": stats,
            "memory_method": memories[name]["method"],
        })
        side_of_case, case_images = inputs_of[name]
        bm.set_max_pixels(side_of_case * side_of_case)
        grid = bm.image_processor(case_images, return_tensors="pt")["image_grid_thw"]
        if method == "fused":
            flops = fused_flops(bm.model, grid)
        else:
            call = calls_of[tuple(map(tuple, grid.tolist()))]
            flops = official_flops(bm.model, bm.teacher, grid, call["prompt_tokens"], call["generated_tokens"])
        rows[-1]["flops"] = flops
        rows[-1].update(rates(flops["total"], seconds, peak.flops, peak_times))
        if name in profiles:
            rows[-1]["profile"] = profiles[name]
    by = {r["case"]: r for r in rows}
    for row in rows:
        if row["sweep"] == "resolution" and row["method"] != "fused":
            row["speedup_of_fused"] = by[f"fused@{row['side']}px"]["images_per_s"] / row["images_per_s"]
    resolution_table = markdown_table(
        [r for r in rows if r["sweep"] == "resolution"],
        [("method", "path"), ("side", "side"), ("max_pixels", "max_pixels"),
         ("visual_tokens_per_image", "visual tokens"), ("latency_ms", "ms / image"), ("peak_mib", "peak MiB"),
         ("speedup_of_fused", "fused is x faster"), ("gflop_per_s", "GFLOP/s"), ("fraction_of_peak", "of peak")],
    )
    batch_table = markdown_table(
        [r for r in rows if r["sweep"] == "batch"],
        [("batch_size", "batch"), ("latency_ms", "ms / batch"), ("latency_per_image_ms", "ms / image"),
         ("images_per_s", "images / s"), ("peak_mib", "peak MiB"), ("gflop_per_s", "GFLOP/s"),
         ("fraction_of_peak", "of peak")],
    )
    batch_table += f"\n\nPeak: {peak_row['gflop_per_s']:.4g} GFLOP/s ({peak.size}x{peak.size} products, interleaved)."
    described = bm.describe()
    described["max_pixels"] = "per case"
    print(f"\nScaling ({described['shape']}, {described['dtype']}, {described['device']}, {reps} interleaved "
          f"repetitions, median; peak memory beyond the weights, {rows[0]['memory_method']}):\n")
    print("Resolution (batch 1):\n")
    print(resolution_table)
    print(f"\nBatch size ({default_side}x{default_side} images):\n")
    print(batch_table)
    first, last = f"fused@batch{batch_sizes[0]}", f"fused@batch{batch_sizes[-1]}"
    payload = {
        "benchmark": "scaling",
        "config": described,
        "settings": {"sides": sides, "batch_sizes": batch_sizes, "reps": reps, "batch_sweep_side": default_side,
                     "max_new_tokens": args.max_new_tokens},
        "results": rows,
        "peak": peak_row,
        "ratios": {f"fused_throughput_batch{batch_sizes[-1]}_over_batch{batch_sizes[0]}":
                   by[last]["images_per_s"] / by[first]["images_per_s"]},
        "table_markdown": resolution_table + "\n\n" + batch_table,
    }
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
