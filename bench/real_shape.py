"""A full-depth dry run of the whole training path on CPU: Qwen2-VL-2B's architecture, random weights, real tokenizer.

    python -m bench.real_shape --threads 2     # full depth: 28 text layers, 32 vision blocks, vocabulary 151,936
    python -m bench.real_shape --tiny          # the same phases on the test suite's tiny model (seconds)

It runs the project's own `Pipeline` (`bench/pipeline_run.py`, the code path `bench.gpu_check` runs on a GPU),
stage by stage as `python -m train pipeline` does, and prints the time and the peak resident memory of every phase,
measured by the pipeline's `on_stage` hook:

1. `build_base`: a random Qwen2-VL-2B (Qwen/Qwen2-VL-2B-Instruct's config.json, see `bench.common`) built from its
   config in bf16, saved as an ordinary checkpoint with the real Qwen2-VL tokenizer (`train/infra/qwen_tokenizer.py`,
   offline) and the image processor bounded at `--max-pixels` (1024 x 1024 as in the 7B recipes: the authors cap the
   longer side at 1024 px); a random ViT-B/16-384 teacher; generated images in an image folder (`--images` per
   split; the training images of `--train-image-size`, small, for stage 1's steps; validation and test of
   `--image-size`, at the bound). The conversation answers come from `CannedAnswers`, a stand-in for the answer
   model (generating them with a random 2B would be slow and meaningless), through the project's answer cache.
   Nothing is downloaded.
2. `instructions`, then stage 1 (`train/stages/sft.py`) in its three parts, split by a `TrainerCallback`:
   `sft_load_4bit` (the 4-bit NF4 + double-quant load, LoRA on q/k/v, the instruction data), `sft_steps`
   (`--sft-steps` QLoRA steps, batch 1, activation checkpointing) and `sft_merge` (adapter, merged model).
3. `teacher` (`--teacher-steps` steps), `features` (the merged model assembled with the same resolution bound:
   pooled visual features and label scores of every split, and the teacher's logits), `distill`, `gate`,
   `evaluate`, `export` (the VLM in the recipe's `model.dtype`, the trained head and gate, sharded safetensors).
4. `reload_4bit`: the exported folder through the front door `load_pipeline(..., load_in_4bit=True)`, as a user
   loads it; `classify`: that pipeline on the test images.

Peak RSS per phase is the kernel's high-water mark (`VmHWM`), reset before each phase (`/proc/self/clear_refs`);
where that reset is not allowed it is the process's peak so far, and the JSON says so (`peak_is_per_phase`).

Compute dtype: on CPUs without native bf16 (AVX512-BF16/AMX) a bf16 matrix product is tens of times slower than a
float32 one (0.8 vs 52 GFLOP/s measured on an AVX2 machine), so with `--compute-dtype auto` stage 1, the teacher
and the 4-bit reload compute in float32 there, and `--model-dtype auto` (the recipe's `model.dtype`: the VLM of the
feature caches and of the export) is float32 there too; with bf16 kernels (or `--tiny`) it is bfloat16, the 7B
recipes' value. With random weights no accuracy means anything: this is a dry run of shapes, memory and time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import (
    add_common_arguments,
    cpu_supports_bf16,
    device_name,
    environment,
    make_shape,
    markdown_table,
    setup,
    write_json,
)
from bench.pipeline_run import PIPELINE_NEEDS, SPLITS, Phases, RunSettings, run_pipeline_phases
from modeling_emovlm_kd import resolve_label_set
from train.infra.files import write_json_atomic

# The 7B recipes' bound (train/recipes/qwen2-vl-7b/*.yaml): 1024 x 1024 pixels.
FULL_MAX_PIXELS = 1024 * 1024
# Stage 1's parts (the Trainer's) under the names of this benchmark's table.
SFT_PARTS = {"before_train": "sft_load_4bit", "train": "sft_steps", "after_train": "sft_merge"}


def table_rows(phases: Phases) -> list[dict]:
    """One row per phase (`build` as `build_base`, stage 1 as its three parts), in this benchmark's keys."""
    rows = []
    for name, phase in phases.rows.items():
        parts = phase.get("parts") if name == "sft" else None
        for part, measured in (parts.items() if parts else [(None, phase)]):
            row = {"phase": SFT_PARTS.get(part, part) if part else ("build_base" if name == "build" else name),
                   "status": phase["status"]}
            if phase.get("error"):
                row["error"] = phase["error"]
            if "seconds" in measured:
                row.update(seconds=round(measured["seconds"], 2), cpu_seconds=round(measured["cpu_seconds"], 2),
                           peak_rss_gib=round(measured["peak_memory_gib"], 3),
                           peak_is_per_phase=measured["memory_kind"] == "peak RSS")
            if part is None or part == "after_train":
                row.update(rss_before_gib=round(phase.get("memory_before_gib", 0), 3),
                           rss_after_gib=round(phase.get("memory_after_gib", 0), 3))
            rows.append(row)
    return rows


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(x) for x in text.lower().split("x"))
    return width, height


# ---- driver ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "real_shape.json")
    parser.add_argument("--labels", default="mikels8")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help=f"Resolution bound of every stage (default {FULL_MAX_PIXELS}: 1024^2, tiny: its own).")
    parser.add_argument("--images", type=int, nargs=3, default=[8, 1, 1], metavar=("TRAIN", "VAL", "TEST"),
                        help="Generated images per split (the training split needs one per label).")
    parser.add_argument("--train-image-size", default=None,
                        help="WxH of the training images, stage 1's (default 224x224; tiny 80x60).")
    parser.add_argument("--image-size", default=None,
                        help="WxH of the validation and test images (default 1024x768: longer side at the 1024 px "
                             "bound; tiny 150x100).")
    parser.add_argument("--sft-steps", type=int, default=3, help="QLoRA steps of stage 1 (batch size 1).")
    parser.add_argument("--teacher-steps", type=int, default=1)
    parser.add_argument("--teacher-batch-size", type=int, default=2)
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--gate-epochs", type=int, default=3)
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="Dtype stage 1, the teacher and the 4-bit reload compute in (auto: bf16 only on CPUs "
                             "with native bf16).")
    parser.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="The recipe's model.dtype, the VLM's dtype in the feature caches and the export (auto: "
                             "bfloat16 with native bf16 or --tiny, else float32).")
    parser.add_argument("--max-shard-size", default="2GB", help="Export shard size (model.export_max_shard_size).")
    parser.add_argument("--work-dir", default=None, help="Where checkpoints go (default: a temporary folder, "
                                                         "removed at the end).")
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cpu"):
        parser.error("bench.real_shape runs on CPU (--device cpu).")
    if torch.cuda.is_available():
        parser.error("bench.real_shape measures the CPU path and the pipeline would use the GPU: hide it "
                     "(CUDA_VISIBLE_DEVICES=) or run bench.gpu_check.")
    return args


def compute_dtype_of(choice: str) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    shape = make_shape("tiny", max_pixels=args.max_pixels) if args.tiny else make_shape(
        "mid", text_layers=28, vision_depth=32, teacher_layers=12, max_pixels=args.max_pixels or FULL_MAX_PIXELS)
    labels = resolve_label_set(args.labels)
    dtype = compute_dtype_of(args.compute_dtype)
    model_dtype = args.model_dtype
    if model_dtype == "auto":
        model_dtype = "bfloat16" if args.tiny or dtype == torch.bfloat16 else "float32"
    train_size = parse_size(args.train_image_size) if args.train_image_size else ((80, 60) if args.tiny else (224, 224))
    size = parse_size(args.image_size) if args.image_size else ((150, 100) if args.tiny else (1024, 768))
    settings = RunSettings(shape=shape, labels=args.labels, counts=dict(zip(SPLITS, args.images)),
                           sizes={"train": train_size, "validation": size, "test": size},
                           bf16=dtype == torch.bfloat16, model_dtype=model_dtype, sft_steps=args.sft_steps,
                           teacher_steps=args.teacher_steps, teacher_batch_size=args.teacher_batch_size,
                           feature_batch_size=1, distill_epochs=args.distill_epochs, gate_epochs=args.gate_epochs,
                           max_shard_size=args.max_shard_size, seed=args.seed)
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="real_shape-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    payload: dict = {}

    def report(complete: bool = False) -> None:
        """Write the result so far (after every phase, so an interrupted run still records what it measured)."""
        rows = table_rows(phases)
        columns = [("phase", "phase"), ("status", "status"), ("seconds", "seconds"), ("cpu_seconds", "CPU seconds"),
                   ("peak_rss_gib", "peak RSS (GiB)"), ("rss_after_gib", "RSS after (GiB)"), ("error", "error")]
        table = markdown_table(rows, columns)
        measured = [row for row in rows if "seconds" in row]
        peak = max((row["peak_rss_gib"] for row in measured), default=0.0)
        total = sum(row["seconds"] for row in measured)
        payload.clear()
        payload.update({
            "benchmark": "real_shape",
            "complete": complete,
            "config": {"shape": shape.name, "text": shape.text, "vision": shape.vision, "teacher": shape.teacher,
                       "labels": labels, "min_pixels": shape.min_pixels, "max_pixels": shape.max_pixels,
                       "compute_dtype": str(dtype).removeprefix("torch."), "model_dtype": model_dtype,
                       "export_dtype": model_dtype, "device": device_name(torch.device("cpu")),
                       "torch_threads": torch.get_num_threads()},
            "settings": {"images": settings.counts, "image_sizes": {k: list(v) for k, v in settings.sizes.items()},
                         "sft_steps": args.sft_steps, "teacher_steps": args.teacher_steps,
                         "teacher_batch_size": args.teacher_batch_size, "distill_epochs": args.distill_epochs,
                         "gate_epochs": args.gate_epochs, "max_shard_size": args.max_shard_size, "seed": args.seed},
            "phases": rows,
            "trainers": phases.timer.observer.records,
            "results": results,
            "failed": [name for name, row in phases.rows.items() if row["status"] != "pass"],
            "summary": {"peak_rss_gib": peak, "total_seconds": round(total, 1),
                        "total_cpu_seconds": round(sum(row["cpu_seconds"] for row in measured), 1)},
            "ratios": {"export_bytes_over_merged_bytes": results["export"]["bytes"] / results["sft"]["merged_bytes"]}
            if "export" in results and "sft" in results else {},
            "table_markdown": table,
        })
        if complete:
            print(table)
            print(f"\nTotal {total:.0f} s; peak RSS {peak:.2f} GiB ({device_name(torch.device('cpu'))}, "
                  f"{torch.get_num_threads()} threads).")
            write_json(args.output, payload)
        else:
            write_json_atomic({"environment": environment(), **payload}, args.output, default=str)

    phases = Phases(torch.device("cpu"), PIPELINE_NEEDS, on_phase=report, prefix="real_shape")
    try:
        run_pipeline_phases(phases, work, settings, results, dtype)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report(complete=True)
    if payload["failed"]:
        raise SystemExit(f"bench.real_shape: phase(s) {', '.join(payload['failed'])} did not pass (see the table).")
    return payload


if __name__ == "__main__":
    main()
