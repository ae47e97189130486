"""Where the fused forward's time goes: one untimed call under `torch.profiler`, and the label-scoring inputs' cost.

Prints the top ops by self time (device time on GPU) of one fused forward on already preprocessed images (after one
warm-up call), grouped and by input shape, and how long `score_labels`' inputs (prompt ids, tree mask, M-RoPE
positions) take to build for that batch versus reusing the memoized ones. Not a timing benchmark: one call each.

    python -m bench.profile_fused --threads 1 --dtype fp32 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import add_common_arguments, build_models, log, make_shape, random_images, setup, write_json
from bench.flops import op_profile


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "profile_fused.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25, help="Ops shown per table.")
    args = parser.parse_args(argv)
    setup(args)
    shape = make_shape("tiny" if args.tiny else "mid", args.text_layers, args.vision_depth)
    log(f"Building the {shape.name} models ...")
    bm = build_models(shape, dtype=args.dtype, device=args.device, seed=args.seed)
    model = bm.model
    inputs = bm.image_processor(random_images(args.batch_size, seed=args.seed), return_tensors="pt").to(bm.device)
    grid = inputs["image_grid_thw"]
    with torch.inference_mode():
        model(**inputs)  # warm-up (and memoizes the label-scoring inputs of this batch)
        built, reused = [], []
        for _ in range(20):
            model._prompt_cache.pop("scoring", None)
            start = time.perf_counter()
            model._scoring_inputs(grid, bm.dtype)
            built.append(time.perf_counter() - start)
            start = time.perf_counter()
            model._scoring_inputs(grid, bm.dtype)
            reused.append(time.perf_counter() - start)
        profile = op_profile(lambda: model(**inputs), bm.device, top=args.rows)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if bm.device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            model(**inputs)
    sort = "self_cuda_time_total" if bm.device.type == "cuda" else "self_cpu_time_total"
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=args.rows, max_name_column_width=50,
                                                               max_shapes_column_width=70)
    print(f"\nFused forward, {shape.name}, {str(bm.dtype).removeprefix('torch.')}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s): {profile['total_ms']:.1f} ms ({profile['time_kind']})")
    print("shares: " + ", ".join(f"{k} {v:.1%}" for k, v in profile["shares"].items()))
    for op in profile["top_ops"]:
        print(f"  {op['share']:6.1%}  {op['calls']:4d} calls  {op['op']}")
    print(f"\nlabel-scoring inputs: built {statistics.median(built) * 1e3:.2f} ms, reused "
          f"{statistics.median(reused) * 1e3:.3f} ms (medians of 20)\n\n{by_shape}")
    write_json(args.output, {"benchmark": "profile_fused", "config": bm.describe(), "settings": vars(args),
                             "profile": profile, "scoring_inputs_built_s": built, "scoring_inputs_reused_s": reused,
                             "table_by_shape": by_shape})


if __name__ == "__main__":
    main()
