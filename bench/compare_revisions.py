"""The fused forward of the model package at a git revision vs the working tree's, on the same weights, interleaved.

    python -m bench.compare_revisions --revision 04f3070 --threads 1 --batch-size 8 --reps 9

Builds the benchmark's `mid` model (`bench/common.py`) with the working tree's package, extracts
`modeling_emovlm_kd/` at `--revision` (`git archive`) into a temporary folder under another package name, builds that
revision's `EmoVLMKDForImageClassification` on the meta device and gives it the same modules (VLM, head, gate). Then
per repetition, in rotated order: the peak matrix products (`bench.flops.MatmulPeak`), the old forward, the new
forward (image processor included unless `--preprocessed`). Reported per case: wall and CPU seconds (median,
quartiles), minor page faults per call, the fraction of the peak per repetition in CPU time (the steadier figure on
a shared machine with one thread), and the new/old speed-up per repetition. Also whether both give the same labels
and how far their scores are apart. For changes of the package's own code only (both use the installed transformers).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

from bench.common import add_common_arguments, build_models, log, make_shape, random_images, setup, write_json
from bench.flops import MatmulPeak, fused_flops, quartiles

ROOT = Path(__file__).resolve().parents[1]


def package_at(revision: str, folder: Path) -> object:
    """`modeling_emovlm_kd/` at `revision`, imported as a package of another name."""
    archive = subprocess.run(["git", "archive", revision, "modeling_emovlm_kd"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    name = "modeling_emovlm_kd_at_" + "".join(c if c.isalnum() else "_" for c in revision)
    (folder / "modeling_emovlm_kd").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "compare_revisions.json")
    parser.add_argument("--revision", required=True, help="Git revision of the old model package.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--preprocessed", action="store_true", help="Time the forward alone, not the processor.")
    args = parser.parse_args(argv)
    setup(args)
    shape = make_shape("tiny" if args.tiny else "mid", args.text_layers, args.vision_depth)
    log(f"Building the {shape.name} models ...")
    bm = build_models(shape, dtype=args.dtype, device=args.device, seed=args.seed)
    new = bm.model
    with tempfile.TemporaryDirectory() as tmp:
        old_package = package_at(args.revision, Path(tmp))
        with torch.device("meta"):
            old = old_package.EmoVLMKDForImageClassification(old_package.EmoVLMKDConfig.from_dict(new.config.to_dict()))
    old.vlm, old.distillation_head, old.gate = new.vlm, new.distillation_head, new.gate
    old.config.vlm_config = new.config.vlm_config
    old.eval()
    images = random_images(args.batch_size, seed=args.seed)
    prepared = bm.image_processor(images, return_tensors="pt").to(bm.device)
    flops = fused_flops(new, prepared["image_grid_thw"])["total"]

    def forward(model):
        @torch.inference_mode()
        def call():
            inputs = prepared if args.preprocessed else bm.image_processor(images, return_tensors="pt").to(bm.device)
            return model(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        return call

    with torch.inference_mode():
        a, b = forward(old)(), forward(new)()
    agreement = {name: {"same_argmax": bool(torch.equal(getattr(a, name).argmax(-1), getattr(b, name).argmax(-1))),
                        "max_abs_difference": (getattr(a, name).float() - getattr(b, name).float()).abs().max().item(),
                        "max_abs_old": getattr(a, name).float().abs().max().item()}
                 for name in ("logits", "vlm_logits")}
    peak = MatmulPeak(bm.device, bm.dtype)
    peak.calibrate(lambda device: None)
    cases = {"matmul_peak": peak, "old": forward(old), "new": forward(new)}
    for case in cases.values():  # warm-up
        case()
    wall, cpu, faults = ({name: [] for name in cases} for _ in range(3))
    names = list(cases)
    log(f"Timing {len(cases)} cases x {args.reps} interleaved repetitions ...")
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            gc.collect()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start, cpu_start = time.perf_counter(), time.process_time()
            cases[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    rows = []
    for name in ("old", "new"):
        rows.append({
            "case": name, "revision": args.revision if name == "old" else "working tree",
            "wall_s": quartiles(wall[name]), "cpu_s": quartiles(cpu[name]),
            "minor_page_faults": statistics.median(faults[name]),
            "fraction_of_peak_cpu": quartiles([(flops / t) / (peak.flops / p) for t, p in zip(cpu[name],
                                                                                           cpu["matmul_peak"])]),
            "fraction_of_peak_wall": quartiles([(flops / t) / (peak.flops / p) for t, p in zip(wall[name],
                                                                                            wall["matmul_peak"])]),
        })
    speedup = quartiles([o / n for o, n in zip(cpu["old"], cpu["new"])])
    peak_row = {"size": peak.size, "gflop_per_s": peak.flops / statistics.median(wall["matmul_peak"]) / 1e9,
                "gflop_per_cpu_s": peak.flops / statistics.median(cpu["matmul_peak"]) / 1e9}
    lines = ["| package | CPU ms (median, IQR) | wall ms | page faults | of peak, CPU time (median, IQR) |",
             "|---|---|---|---:|---|"]
    for row in rows:
        c, w, f = row["cpu_s"], row["wall_s"], row["fraction_of_peak_cpu"]
        lines.append(f"| {row['revision']} | {c['median'] * 1e3:.0f} ({c['q1'] * 1e3:.0f}-{c['q3'] * 1e3:.0f}) | "
                     f"{w['median'] * 1e3:.0f} | {row['minor_page_faults']:.0f} | "
                     f"{f['median']:.3f} ({f['q1']:.3f}-{f['q3']:.3f}) |")
    table = "\n".join(lines)
    print(f"\nFused forward, {shape.name}, {str(bm.dtype).removeprefix('torch.')}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s), {args.reps} interleaved repetitions; peak "
          f"{peak_row['gflop_per_cpu_s']:.0f} GFLOP per CPU second ({flops / 1e9:.1f} GFLOP per call):\n\n{table}\n")
    print(f"new vs old, CPU time per repetition: {speedup['median']:.3f}x (IQR {speedup['q1']:.3f}-{speedup['q3']:.3f})")
    print(f"agreement: {agreement}")
    payload = {"benchmark": "compare_revisions", "config": bm.describe(), "settings": vars(args), "results": rows,
               "peak": peak_row, "ratios": {"new_vs_old_cpu_speedup": speedup}, "agreement": agreement,
               "flops_per_call": flops, "table_markdown": table}
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
