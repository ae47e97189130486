"""Inference throughput and latency: our fused model vs the VLM alone vs the authors' (official-style) path.

    python -m bench.inference                  # mid-size model (Qwen2-VL-2B widths, few layers), batch 1, 4, 8
    python -m bench.inference --tiny           # smoke run

Paths, on the same weights and the same images, in one process, repetitions interleaved:

- `fused`: image processor + one forward of `EmoVLMKDForImageClassification` (one vision pass, labels scored in one
  language-model pass, head, gate), under `torch.inference_mode`.
- `fused_pipeline`: the same through `pipeline("image-classification", batch_size=B)`.
- `fused_fp32`: the fused model in float32, when the benchmark runs in bf16/fp16 (what bf16 buys on this hardware).
- `fused_stock`: the same with the model package's fast path off (`fast_path.stock()`, the unmodified transformers
  modules): what the fast path buys, side by side.
- `fused_compiled` (`--compile inductor|freezing`): a copy of the fused model whose vision blocks and decoder layers
  are compiled (`fast_path.compile_layers`, static shapes; `freezing` also folds and prepacks the weights), side by
  side with `fused`; the first call of each batch size (the compilation) is timed apart (`compile_s`).
- `vlm_only`: the VLM alone scoring the labels (vision tower + one language-model pass), no head, no gate.
- `official_genN`: greedy `generate(max_new_tokens=N)` of the answer from the chat prompt + decode + parse, a
  second vision pass through a separate fp32 copy of the vision tower for the head, a ViT teacher forward, the gate.
  A random model never emits EOS, so exactly N tokens are generated: N=16 covers a trained model's short answer
  (`{'emotion': 'contentment'}` + EOS is about 10 tokens), N=256 is what the authors' code allowed.
- `matmul_peak`: square products (2048, 8192 on GPU) in the benchmark dtype, interleaved with the rest: the peak
  matrix-product rate of this run. Every case reports GFLOP/s (FLOPs counted from the config, `bench/flops.py`) and
  its fraction of that peak; the JSON keeps each case's top ops from one profiled call (torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import warnings

import torch
from transformers import pipeline as hf_pipeline

from bench.common import (
    OfficialStyle,
    add_common_arguments,
    build_models,
    default_image_size,
    fused_predict,
    fused_stock_predict,
    interleaved_timings,
    log,
    make_shape,
    markdown_table,
    random_images,
    setup,
    summarize,
    synchronize,
    vlm_only_predict,
    write_json,
)
from bench.flops import MatmulPeak, fused_flops, official_flops, op_profile, rates


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "inference.json")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--reps", type=int, default=None, help="Timed repetitions per case (default 5, tiny 2).")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Official path, interleaved with the rest.")
    parser.add_argument("--long-max-new-tokens", type=int, default=256,
                        help="Official path with the authors' limit, timed after the rest (0: skip).")
    parser.add_argument("--long-batch-sizes", type=int, nargs="*", default=None,
                        help="Batch sizes for the long generation (default: smallest and largest; given with no "
                             "value: none, the long generation is skipped).")
    parser.add_argument("--long-reps", type=int, default=1, help="Repetitions of the long generation.")
    parser.add_argument("--image-size", type=int, default=None, help="Square image side (default: max_pixels**0.5).")
    parser.add_argument("--max-pixels", type=int, default=None, help="Image processor max_pixels (mid: 224*224).")
    parser.add_argument("--no-pipeline", action="store_true", help="Skip the pipeline() case.")
    parser.add_argument("--no-official", action="store_true", help="Skip the official-style path (all lengths).")
    parser.add_argument("--no-stock", action="store_true", help="Skip the fast-path-off case (fused_stock).")
    parser.add_argument("--no-profile", action="store_true", help="Skip the profiled call per case.")
    parser.add_argument("--peak-size", type=int, default=None, help="Side of the peak matmul (2048, GPU 8192).")
    parser.add_argument("--compile", choices=["off", "inductor", "freezing"], default="off",
                        help="Add `fused_compiled`: vision blocks and decoder layers compiled with inductor (static "
                             "shapes); `freezing` sets torch._inductor.config.freezing (weights folded as constants "
                             "and prepacked; inference only).")
    parser.add_argument("--no-fp32-baseline", action="store_true",
                        help="Skip the float32 copy of the fused model (only built when --dtype is not fp32).")
    return parser.parse_args(argv)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    reps = args.reps or (2 if args.tiny else 5)
    shape = make_shape("tiny" if args.tiny else "mid", args.text_layers, args.vision_depth, max_pixels=args.max_pixels)
    log(f"Building the {shape.name} models ...")
    bm = build_models(shape, dtype=args.dtype, device=args.device, seed=args.seed)
    side = args.image_size or default_image_size(shape)[0]
    batch_sizes = sorted(set(args.batch_sizes))
    images = random_images(max(batch_sizes), (side, side), seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = None if args.no_pipeline else hf_pipeline("image-classification", model=bm.model,
                                                         image_processor=bm.image_processor, device=bm.device)
    official = OfficialStyle(bm, args.max_new_tokens)
    if not args.no_official:
        bm.vision_copy()  # built before timing, as the authors loaded it once
    bm32 = None
    if bm.dtype != torch.float32 and not args.no_fp32_baseline:
        bm32 = dataclasses.replace(bm, model=copy.deepcopy(bm.model).float(), dtype=torch.float32)

    bm_compiled, compile_info = None, {}
    if args.compile != "off":
        bm_compiled, compile_info = compiled_copy(bm, images, batch_sizes, freezing=args.compile == "freezing")

    peak = MatmulPeak(bm.device, bm.dtype, args.peak_size)
    peak.calibrate(synchronize)
    cases, keys = {"matmul_peak": peak}, {"matmul_peak": ("matmul_peak", 0, None)}
    for b in batch_sizes:
        batch = images[:b]
        entries = [("fused", lambda batch=batch: fused_predict(bm, batch))]
        if not args.no_stock:
            entries.append(("fused_stock", lambda batch=batch: fused_stock_predict(bm, batch)))
        if pipe is not None:
            entries.append(("fused_pipeline", lambda batch=batch, b=b: pipe(batch, batch_size=b)))
        if bm32 is not None:
            entries.append(("fused_fp32", lambda batch=batch: fused_predict(bm32, batch)))
        if bm_compiled is not None:
            entries.append(("fused_compiled", lambda batch=batch: fused_predict(bm_compiled, batch)))
        entries.append(("vlm_only", lambda batch=batch: vlm_only_predict(bm, batch)))
        if not args.no_official:
            entries.append((f"official_gen{args.max_new_tokens}", lambda batch=batch: official(batch)))
        for method, fn in entries:
            name = f"{method}@{b}"
            cases[name], keys[name] = fn, (method, b, args.max_new_tokens if method.startswith("official") else None)
    log(f"Timing {len(cases)} cases x {reps} interleaved repetitions (+1 warm-up each) ...")
    cpu_times = {}
    times = interleaved_timings(cases, reps=reps, warmup=1, device=bm.device, log=log, cpu_times=cpu_times)
    calls = {f"official_gen{args.max_new_tokens}@{b}": [c for c in official.calls if c["batch_size"] == b][-reps:]
             for b in batch_sizes}

    if args.long_max_new_tokens == args.max_new_tokens or args.no_official or args.long_batch_sizes == []:
        args.long_max_new_tokens = 0
    if args.long_max_new_tokens and args.long_reps:
        long_official = OfficialStyle(bm, args.long_max_new_tokens)
        long_sizes = args.long_batch_sizes if args.long_batch_sizes is not None else sorted({batch_sizes[0],
                                                                                            batch_sizes[-1]})
        long_cases = {}
        for b in long_sizes:
            name = f"official_gen{args.long_max_new_tokens}@{b}"
            long_cases[name] = lambda b=b: long_official(images[:b])
            keys[name] = (f"official_gen{args.long_max_new_tokens}", b, args.long_max_new_tokens)
        log(f"Timing the official path with max_new_tokens={args.long_max_new_tokens} "
            f"({args.long_reps} repetition(s), no warm-up: the shorter generation warmed the same kernels) ...")
        times.update(interleaved_timings(long_cases, reps=args.long_reps, warmup=0, device=bm.device, log=log))
        calls.update({f"official_gen{args.long_max_new_tokens}@{b}": [c for c in long_official.calls
                                                                      if c["batch_size"] == b] for b in long_sizes})

    grids = {b: bm.image_processor(images[:b], return_tensors="pt")["image_grid_thw"] for b in batch_sizes}
    profiles = {}
    if not args.no_profile:
        log("Profiling one call per case (torch.profiler, untimed) ...")
        profiles = {name: op_profile(fn, bm.device) for name, fn in cases.items()}
    peak_times = times.pop("matmul_peak")
    peak_cpu = cpu_times.pop("matmul_peak")
    peak_row = {"case": "matmul_peak", "method": "matmul_peak", "size": peak.size, "products_per_call": peak.repeats,
                "latency_per_call_s": summarize(peak_times), "cpu_per_call_s": summarize(peak_cpu),
                "gflop_per_s": peak.flops / statistics.median(peak_times) / 1e9,
                "gflop_per_cpu_s": peak.flops / statistics.median(peak_cpu) / 1e9,
                "gflop_per_s_per_rep": [peak.flops / t / 1e9 for t in peak_times]}

    rows = []
    for name, seconds in times.items():
        method, b, new_tokens = keys[name]
        stats = summarize(seconds)
        row = {"case": name, "method": method, "batch_size": b, "max_new_tokens": new_tokens,
               "latency_per_call_s": stats, "latency_per_image_ms": 1000 * stats["median_s"] / b,
               "images_per_s": b / stats["median_s"], "rel_iqr": stats["rel_iqr"]}
        if method.startswith("official"):
            call = calls[name][-1]
            flops = official_flops(bm.model, bm.teacher, grids[b], call["prompt_tokens"], call["generated_tokens"])
        else:
            flops = fused_flops(bm.model, grids[b], with_head=method != "vlm_only")
        row["flops"] = flops
        # The long generation ran after the peak's repetitions: compare its median with the peak's median.
        paired_peak = peak_times if len(seconds) == len(peak_times) else [statistics.median(peak_times)] * len(seconds)
        row.update(rates(flops["total"], seconds, peak.flops, paired_peak, cpu_times.get(name), peak_cpu))
        if name in cpu_times:
            row["cpu_per_call_s"] = summarize(cpu_times[name])
            row["fraction_of_peak_cpu_median"] = row["fraction_of_peak_cpu"]["median"]
        if name in profiles:
            row["profile"] = profiles[name]
        if name in calls:
            row["generated_tokens"] = [c["generated_tokens"] for c in calls[name]]
            row["parsed_answers"] = sum(c["parsed"] for c in calls[name])
            row["parts_median_s"] = {part: statistics.median(c[part] for c in calls[name]) for part in
                                     ("generate_and_parse", "second_vision_pass_and_head", "teacher_forward", "gate")}
        rows.append(row)

    by = {(r["method"], r["batch_size"]): r for r in rows}
    ratios = {}
    largest, smallest = batch_sizes[-1], batch_sizes[0]
    official_names = sorted({r["method"] for r in rows if r["method"].startswith("official")},
                            key=lambda m: int(m.removeprefix("official_gen")))
    for method in official_names:
        for b in batch_sizes:
            if (method, b) in by:
                ratios[f"fused_vs_{method}_images_per_s@{b}"] = ratio(by[("fused", b)]["images_per_s"],
                                                                      by[(method, b)]["images_per_s"])
                ratios[f"fused_vs_{method}_paired_per_rep@{b}"] = paired(times[f"fused@{b}"],
                                                                         times[f"{method}@{b}"], b, b)
        if (method, smallest) in by:
            # The authors ran batch size 1; we batch.
            ratios[f"fused@{largest}_vs_{method}@{smallest}_images_per_s"] = ratio(
                by[("fused", largest)]["images_per_s"], by[(method, smallest)]["images_per_s"])
    ratios[f"fused_batch{largest}_vs_batch{smallest}_throughput"] = ratio(by[("fused", largest)]["images_per_s"],
                                                                          by[("fused", smallest)]["images_per_s"])
    ratios[f"vlm_only_batch{largest}_vs_batch{smallest}_throughput"] = ratio(
        by[("vlm_only", largest)]["images_per_s"], by[("vlm_only", smallest)]["images_per_s"])
    for b in batch_sizes:
        ratios[f"fused_fraction_of_peak@{b}"] = by[("fused", b)]["fraction_of_peak"]
        ratios[f"fused_fraction_of_peak_cpu@{b}"] = by[("fused", b)]["fraction_of_peak_cpu"]
        if ("fused_stock", b) in by:
            ratios[f"fused_stock_latency_over_fused@{b}"] = ratio(by[("fused_stock", b)]["latency_per_image_ms"],
                                                                 by[("fused", b)]["latency_per_image_ms"])
            ratios[f"fused_vs_fused_stock_paired_per_rep@{b}"] = paired(times[f"fused@{b}"],
                                                                        times[f"fused_stock@{b}"], b, b)
        ratios[f"fused_latency_over_vlm_only@{b}"] = ratio(by[("fused", b)]["latency_per_image_ms"],
                                                          by[("vlm_only", b)]["latency_per_image_ms"])
        if ("fused_compiled", b) in by:
            ratios[f"fused_compiled_fraction_of_peak_cpu@{b}"] = by[("fused_compiled", b)]["fraction_of_peak_cpu"]
            ratios[f"fused_compiled_vs_fused_paired_per_rep@{b}"] = paired(times[f"fused_compiled@{b}"],
                                                                           times[f"fused@{b}"], b, b)
        if ("fused_fp32", b) in by:
            ratios[f"fused_fp32_latency_over_fused@{b}"] = ratio(by[("fused_fp32", b)]["latency_per_image_ms"],
                                                                by[("fused", b)]["latency_per_image_ms"])
        if ("fused_pipeline", b) in by:
            ratios[f"fused_pipeline_latency_over_fused@{b}"] = ratio(by[("fused_pipeline", b)]["latency_per_image_ms"],
                                                                    by[("fused", b)]["latency_per_image_ms"])
    for row in rows:
        row["speedup_of_fused"] = ratio(by[("fused", row["batch_size"])]["images_per_s"], row["images_per_s"]) \
            if ("fused", row["batch_size"]) in by else None

    table = markdown_table(
        sorted(rows, key=lambda r: (r["batch_size"], r["method"])),
        [("method", "path"), ("batch_size", "batch"), ("latency_per_image_ms", "ms / image"),
         ("images_per_s", "images / s"), ("rel_iqr", "IQR / median"), ("speedup_of_fused", "fused is x faster"),
         ("gflop_per_s", "GFLOP/s"), ("fraction_of_peak", "of peak"),
         ("fraction_of_peak_cpu_median", "of peak, CPU time")],
    )
    table += (f"\n\nPeak: {peak_row['gflop_per_s']:.4g} GFLOP/s ({peak.size}x{peak.size} products, "
              f"{str(bm.dtype).removeprefix('torch.')}, median of {len(peak_times)} interleaved repetitions, "
              f"{min(peak_row['gflop_per_s_per_rep']):.4g}-{max(peak_row['gflop_per_s_per_rep']):.4g}; "
              f"{peak_row['gflop_per_cpu_s']:.4g} per CPU second). \"of peak, CPU time\": the median over "
              "repetitions of the case's FLOPs per CPU second over the peak's in the same repetition (with one "
              "thread the steadier figure on a shared machine).")
    description = bm.describe()
    print(f"\nInference ({description['shape']}, {description['dtype']}, {description['device']}, "
          f"{side}x{side} images, {reps} interleaved repetitions, median):\n")
    print(table)
    print()
    for key, value in ratios.items():
        print(f"  {key}: {value if isinstance(value, dict) else round(value, 3)}")
    payload = {
        "benchmark": "inference",
        "config": description,
        "settings": {"batch_sizes": batch_sizes, "reps": reps, "warmup": 1, "image_size": [side, side],
                     "max_new_tokens": args.max_new_tokens, "long_max_new_tokens": args.long_max_new_tokens,
                     "long_reps": args.long_reps, "long_batch_sizes": args.long_batch_sizes,
                     "pipeline": pipe is not None, "compile": args.compile},
        "compile": compile_info,
        "results": rows,
        "peak": peak_row,
        "ratios": ratios,
        "table_markdown": table,
    }
    write_json(args.output, payload)
    return payload


def compiled_copy(bm, images, batch_sizes: list[int], freezing: bool):
    """A copy of the benchmark's models whose fused model has its layers compiled, and the compilation's cost: the
    first call per batch size (wall and CPU seconds) and the resident memory it added (packed weights, code)."""
    import time

    import torch._inductor.config as inductor_config

    from modeling_emovlm_kd import fast_path

    # A compile option does not reach inductor's freezing in torch 2.13 (checked): set it for the process; it only
    # changes compiled code, and every compilation here happens in the warm-up calls below.
    inductor_config.freezing = freezing
    model = copy.deepcopy(bm.model)
    layers = fast_path.compile_layers(model.vlm, dynamic=False)
    compiled = dataclasses.replace(bm, model=model)
    info = {"mode": "freezing" if freezing else "inductor", "layers": layers, "compile_s": {}, "compile_cpu_s": {},
            "rss_before_gib": _rss_gib()}
    for b in batch_sizes:
        log(f"Compiling the layers for batch {b} (first call) ...")
        start, cpu = time.perf_counter(), time.process_time()
        fused_predict(compiled, images[:b])
        info["compile_s"][b], info["compile_cpu_s"][b] = time.perf_counter() - start, time.process_time() - cpu
    info["rss_after_gib"] = _rss_gib()
    return compiled, info


def _rss_gib() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 2**20
    except (OSError, StopIteration):
        return None


def paired(fast: list[float], slow: list[float], fast_batch: int, slow_batch: int) -> dict:
    """Throughput ratio per interleaved repetition (fast over slow): median, min and max."""
    values = [(fast_batch / f) / (slow_batch / s) for f, s in zip(fast, slow)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


if __name__ == "__main__":
    main()
