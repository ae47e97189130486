"""One prepared check of every stage on a CUDA machine: does the real path work there, and how fast is it?

    python -m bench.gpu_check                  # on a GPU: Qwen2-VL-2B at full widths and depth, ~5-8 minutes
    make gpu-check                             # the same
    python -m bench.gpu_check --tiny           # CPU smoke run on the test suite's tiny model (make test runs it)

No network and no weights are needed: everything is random and built here. Phases, in order (a failing phase is
recorded with its error and the phases that do not depend on it still run):

- `matmul_peak`: bf16 8192x8192 products on the GPU, the measured rate every other phase is a fraction of.
- `build` .. `classify`: the project's own `Pipeline` on generated data (`bench/pipeline_run.py`, shared with
  `bench.real_shape`): a random Qwen2-VL at **Qwen2-VL-2B's full widths and depth** (28 text layers, 32 vision
  blocks, vocabulary 151,936, 2.2 B parameters) with the real Qwen2-VL tokenizer, a random ViT-B/16-384 teacher,
  `--images` generated images of `--image-size` (1024x1024: the 7B recipes' bound `max_pixels` = 1024^2) in an
  image folder with its three splits; then one phase per stage, `Pipeline.run(stages=[stage])` as `python -m train
  pipeline` runs them: `instructions` (the conversation answers canned, in the answer cache), `sft` (NF4 4-bit load
  through bitsandbytes, `--sft-steps` QLoRA steps with activation checkpointing, the merge), `teacher`
  (`--teacher-steps` steps), `features` (the caches of every split at the bound), `distill`, `gate`, `evaluate`,
  `export` (the bf16 sharded Hub folder); `reload_4bit`: the export through the front door `load_pipeline(...,
  load_in_4bit=True)` (`pipeline()` with the one 4-bit config), as a user loads it; `classify`: the test images.
- `inference`: `python -m bench.inference --device cuda` at batch 1/8/32 (full depth), in a subprocess.
- `sft_knobs`: stage 1's tokens/s with each throughput recipe value on against all off (`bench.sft_throughput.
  stage1_throughput` on the same full-depth base, 4-bit, activation checkpointing, one short epoch per case: the
  attention implementation, length grouping, DataLoader workers, pinned memory, Liger kernels, padding-free
  batching); a value stage 1 refuses on this machine is reported with its one-line reason.

Per phase: wall time and peak GPU memory (`torch.cuda.max_memory_allocated`, reset before the phase; on CPU the
peak RSS). A stage's figures are its body's, measured by the pipeline's `on_stage` hook; a `TrainerCallback`
splits the Trainer stages into `before_train` (stage 1: the 4-bit load), `train` (the steps) and `after_train`
(stage 1: the merge), and gives stage 1's tokens per second from the Trainer's own count of input tokens
(`include_num_input_tokens_seen`) over its `train_runtime`, and after the first step (`steady`). Beside them: the
counted FLOPs' rate as a fraction of `matmul_peak`, and `bench.estimate`'s figure for the same work (seconds on this
GPU's data-sheet bf16 peak at `--mfu`, memory per its formulas). One table, one JSON
(`bench/results/gpu_check.json`). `--time-limit` (480 s) skips every phase that would start after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench import estimate as est  # noqa: E402
from bench import pipeline_run  # noqa: E402
from bench.common import device_name, make_shape, markdown_table, resolve_dtype, write_json  # noqa: E402
from bench.flops import MatmulPeak  # noqa: E402
from bench.pipeline_run import CANNED_ANSWER, PIPELINE_NEEDS, SPLITS, RunSettings, run_pipeline_phases  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
# Which phases each phase needs (a failed or skipped one skips these).
NEEDS = {"matmul_peak": (), **PIPELINE_NEEDS, "inference": (), "sft_knobs": ("build",)}
# Stage 1's throughput knobs' images (width, height), cycled: sizes up to the 1024^2 bound on the GPU.
KNOB_IMAGE_SIZES = ((448, 448), (896, 672), (1024, 1024), (672, 448))
TINY_KNOB_IMAGE_SIZES = ((56, 56), (112, 112), (112, 56), (84, 84))


class Phases(pipeline_run.Phases):
    """`bench.pipeline_run.Phases` over this check's phases (`NEEDS`)."""

    def __init__(self, device: torch.device, time_limit: float, on_phase=None):
        super().__init__(device, NEEDS, time_limit, on_phase=on_phase, prefix="gpu_check")


# ---- the phases of this check besides the pipeline's ------------------------------------------------------


def measure_peak(device: torch.device, dtype: torch.dtype, size: int) -> dict:
    peak = MatmulPeak(device, dtype, size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    peak.calibrate(sync)
    seconds = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        peak()
        sync(device)
        seconds.append(time.perf_counter() - start)
    rate = peak.flops / float(np.median(seconds))
    return {"size": peak.size, "dtype": str(dtype).removeprefix("torch."), "tflops": rate / 1e12,
            "per_call_s": seconds}


def run_inference(args, device: torch.device, output: Path, timeout: float) -> dict:
    command = [sys.executable, "-m", "bench.inference", "--device", str(device), "--output", str(output),
               "--long-max-new-tokens", "0", "--no-pipeline"]
    if args.tiny:
        command += ["--tiny", "--threads", "1", "--batch-sizes", "1", "2", "--reps", "1", "--no-official",
                    "--no-profile", "--no-fp32-baseline", "--no-stock"]
    else:
        command += ["--text-layers", str(args.inference_text_layers), "--vision-depth",
                    str(args.inference_vision_depth), "--batch-sizes", *map(str, args.inference_batch_sizes),
                    "--reps", "3"]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 30),
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if process.returncode != 0:
        raise RuntimeError(f"bench.inference exited with {process.returncode}: {process.stderr[-1500:]}")
    result = json.loads(output.read_text())
    rows = [{"batch_size": r["batch_size"], "images_per_s": r["images_per_s"],
             "fraction_of_peak": r["fraction_of_peak"], "latency_per_image_ms": r["latency_per_image_ms"]}
            for r in result["results"] if r["method"] == "fused"]
    return {"command": " ".join(command[1:]), "fused": rows, "peak_gflop_per_s": result["peak"]["gflop_per_s"],
            "ratios": {k: v for k, v in result["ratios"].items() if not isinstance(v, dict)}}


def run_knobs(args, device: torch.device, base: Path, bf16: bool, folder: Path, sft: dict | None,
              remaining: float) -> dict:
    """Stage 1's tokens/s with each throughput knob on and all off (`bench.sft_throughput.stage1_throughput`): one
    epoch per case on the full-depth base as stage 1 runs it here (4-bit, LoRA, activation checkpointing), no
    warm-up (the pipeline's stages have warmed the device up) and one repetition; as many knobs as `fit_knobs`
    expects to finish in the `remaining` seconds, judged by stage 1's own run (`sft`: its row and Trainer record)."""
    from bench.sft_throughput import KNOBS, stage1_throughput

    requested = list(KNOBS) if args.knobs is None else list(args.knobs)
    steps = -(-2 * args.knob_images // args.knob_batch_size)
    per_case = None
    if sft is not None:  # the 4-bit load, then each step as long as stage 1's (batch 1) times the batch size
        per_case = (sft["row"]["parts"]["before_train"]["seconds"]
                    + steps * args.knob_batch_size * float(np.median(sft["record"]["step_seconds"])))
    knobs, left_out = fit_knobs(requested, per_case, remaining)
    result = stage1_throughput(base, device, knobs, labels=args.labels, num_images=args.knob_images,
                               image_sizes=TINY_KNOB_IMAGE_SIZES if args.tiny else KNOB_IMAGE_SIZES,
                               batch_size=args.knob_batch_size, reps=1, warmup=0, workdir=folder, load_in_4bit=True,
                               activation_checkpointing=True, bf16=bf16)
    reason = (f"time budget: about {per_case:.0f} s per case estimated from stage 1, {remaining:.0f} s were left"
              if left_out else "")
    result["rows"] += [{"case": name, "status": "skipped", "reason": reason} for name in left_out]
    result["estimated_seconds_per_case"] = per_case
    return result


def fit_knobs(requested: list[str], per_case: float | None, remaining: float) -> tuple[list[str], list[str]]:
    """The knobs (in order) whose cases, with the all-off baseline, are expected to end within `remaining` seconds
    at `per_case` seconds each (unknown: all), and those left out. At least one knob runs."""
    if per_case is None or per_case <= 0:
        return requested, []
    fit = max(1, int(remaining // per_case) - 1)
    return requested[:fit], requested[fit:]


def knob_rows(knobs: dict) -> list[dict]:
    """The knob cases as rows of the check's table: tokens/s and the ratio to all off, or why a case did not run."""
    rows = []
    for case in knobs["rows"]:
        row = {"phase": f"sft_knobs: {case['case']}", "status": "pass" if case["status"] == "ok" else case["status"]}
        if case["status"] == "ok":
            row["throughput"] = f"{case['tokens_per_s']:,.1f} tokens/s ({case['vs_baseline']:.2f}x all off)"
            row["seconds"] = sum(case["seconds"])
        else:
            row["error"] = case["reason"]
        rows.append(row)
    return rows


# ---- counted work and the estimate ----------------------------------------------------------------------------


def work_counts(work: Path, recipe, labels: list[str], image_size) -> dict:
    """Tokens per row and counted FLOPs per unit of work of each phase, from the saved models (`bench.estimate`);
    `recipe` is the run's validated `Recipe`."""
    from transformers import AutoConfig

    from train.infra.assemble import load_processor

    processor = load_processor(work / "base", labels, min_pixels=recipe.model.min_pixels,
                               max_pixels=recipe.model.max_pixels)
    grid = processor.image_processor(Image.new("RGB", tuple(image_size)), return_tensors="pt")["image_grid_thw"][0]
    config = AutoConfig.from_pretrained(work / "base")
    shape = est.model_shape(config)
    n_img = int(grid.prod()) // shape.merge**2
    tokenizer = processor.tokenizer
    prompt, answer = {}, {}
    for kind, text in (("categorical", processor.format_answer(labels[0])), ("conversation", CANNED_ANSWER)):
        messages = getattr(processor, f"{kind}_messages")()
        chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt[kind] = len(chat["input_ids"] if isinstance(chat, dict) else chat) - 1
        answer[kind] = len(tokenizer(text)["input_ids"]) + 2
    ids = processor.prompt_token_ids()
    text = est.TextLengths(prompt, answer, len(ids["before_image"]) + len(ids["after_image"]),
                           [len(c) for c in ids["label_continuations"]])
    vision = est.vision_forward_flops(shape, n_img)
    rows = {}
    for kind in prompt:
        length = prompt[kind] + n_img + answer[kind]
        forward = est.text_forward_flops(shape, length, lm_rows=length, causal=True)
        lora = sum(2 * length * 8 * (lin.n_in + lin.n_out) for lin in shape.linears
                   if lin.role == "text" and lin.name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"))
        rows[kind] = {"tokens": length, "flops": vision + 3 * forward["layers"] + 2 * forward["lm_head"] + 4 * lora}
    score_length = text.scoring_prompt + n_img + sum(text.continuations)
    scoring = est.text_forward_flops(shape, score_length, 1 + sum(c - 1 for c in text.continuations), causal=False)
    teacher = json.loads((work / "teacher" / "config.json").read_text())
    vit_one, vit_params = est.vit_forward_flops(teacher, len(labels))
    return {"shape": shape, "text": text, "visual_tokens": n_img, "rows": rows, "score_length": score_length,
            "fused_flops": vision + scoring["layers"] + scoring["lm_head"], "teacher_flops": vit_one,
            "teacher_parameters": vit_params, "teacher_config": teacher}


def spec_peak(device: torch.device) -> tuple[str | None, float | None]:
    """This GPU's data-sheet bf16 dense peak (`bench.estimate.GPUS`), matched by name."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(est.GPUS, key=len, reverse=True):
        if all(part in name for part in key.upper().replace("-", " ").split()):
            return key, est.GPUS[key][0] * 1e12
    return None, None


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for name in ("bitsandbytes", "peft", "trl", "accelerate", "datasets", "safetensors", "tokenizers"):
        try:
            found[name] = __import__(name).__version__
        except Exception as err:  # a missing library is a finding, not a crash
            found[name] = f"unavailable: {type(err).__name__}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found["gpu"] = {"name": props.name, "memory_gib": props.total_memory / GIB,
                        "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return found


# ---- driver -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model (seconds).")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--labels", default="mikels8")
    parser.add_argument("--images", type=int, nargs=3, default=None, metavar=("TRAIN", "VALIDATION", "TEST"),
                        help="Generated images per split (default 256 16 48; tiny 16 8 8).")
    parser.add_argument("--image-size", default=None, help="WxH of the generated images (default 1024x1024).")
    parser.add_argument("--sft-steps", type=int, default=6, help="QLoRA steps of stage 1 (batch 1).")
    parser.add_argument("--teacher-steps", type=int, default=4)
    parser.add_argument("--teacher-batch-size", type=int, default=None, help="Default 32 (tiny 4).")
    parser.add_argument("--feature-batch-size", type=int, default=None, help="Default 16 (tiny 4).")
    parser.add_argument("--inference-batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--inference-text-layers", type=int, default=28)
    parser.add_argument("--inference-vision-depth", type=int, default=32)
    parser.add_argument("--no-inference", action="store_true", help="Skip the bench.inference phase.")
    parser.add_argument("--knobs", nargs="*", default=None,
                        help="Stage-1 throughput knobs of bench.sft_throughput.KNOBS to compare (default all; none "
                             "given: skip the sft_knobs phase).")
    parser.add_argument("--knob-images", type=int, default=None,
                        help="Images per knob case, two rows each (default 16: 8 batches of 4; tiny 8).")
    parser.add_argument("--knob-batch-size", type=int, default=4)
    parser.add_argument("--mfu", type=float, default=0.3, help="MFU of the estimates shown beside the measurements.")
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="Seconds after which no further phase starts (the GPU is lent for minutes).")
    parser.add_argument("--work-dir", default=None, help="Keep the run here (default: a temporary folder).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("bench.gpu_check needs a CUDA GPU; on a CPU run it with --tiny (the smoke run).")
    args.images = args.images or ([16, 8, 8] if args.tiny else [256, 16, 48])
    size = args.image_size or ("96x72" if args.tiny else "1024x1024")
    args.image_size = tuple(int(x) for x in size.lower().split("x"))
    args.teacher_batch_size = args.teacher_batch_size or (4 if args.tiny else 32)
    args.feature_batch_size = args.feature_batch_size or (4 if args.tiny else 16)
    args.knob_images = args.knob_images or (8 if args.tiny else 16)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        torch.set_num_threads(1)
    from modeling_emovlm_kd import resolve_label_set

    labels = resolve_label_set(args.labels)
    shape = make_shape("tiny") if args.tiny else make_shape("mid", text_layers=28, vision_depth=32,
                                                            teacher_layers=12, max_pixels=1024 * 1024)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    settings = RunSettings(shape=shape, labels=args.labels, counts=dict(zip(SPLITS, args.images)),
                           sizes=dict.fromkeys(SPLITS, args.image_size), bf16=bf16,
                           model_dtype="bfloat16" if bf16 else "float32", sft_steps=args.sft_steps,
                           teacher_steps=args.teacher_steps, teacher_batch_size=args.teacher_batch_size,
                           feature_batch_size=args.feature_batch_size, seed=args.seed,
                           free_disk=False)  # sft_knobs trains the base model again
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    phases = Phases(device, args.time_limit)
    results: dict = {}
    recipe = counted = None
    try:
        results["matmul_peak"] = phases.run("matmul_peak", measure_peak, device, resolve_dtype("auto", device),
                                            512 if args.tiny else 8192)
        recipe = run_pipeline_phases(phases, work, settings, results,
                                     torch.bfloat16 if bf16 else torch.float32)
        if recipe is not None:
            try:  # the counted work of each phase (bench.estimate's formulas on the saved models)
                counted = work_counts(work, recipe, labels, args.image_size)
            except Exception as err:  # the measurements stand without it
                results["work_error"] = f"{type(err).__name__}: {err}"
        if not args.no_inference:
            remaining = args.time_limit - phases.elapsed()
            results["inference"] = phases.run("inference", run_inference, args, device, work / "inference.json",
                                              remaining + 60)
        if args.knobs != []:
            sft = ({"row": phases.rows["sft"], "record": phases.timer.trainer("sft")}
                   if phases.passed("sft") and phases.timer.trainer("sft") else None)
            results["sft_knobs"] = phases.run("sft_knobs", run_knobs, args, device, work / "base", bf16,
                                              work / "knobs", sft, args.time_limit - phases.elapsed())
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    payload = summarize(args, device, phases, results, settings, recipe, counted)
    write_json(args.output, payload)
    return payload


def sft_work(record: dict, rows: dict) -> dict:
    """Stage 1's work from its Trainer record: tokens the Trainer counted over its own `train_runtime`, the rate
    after the first step (`steady`: no warm-up), and the counted FLOPs of its steps (`work_counts` rows)."""
    steps, seconds = record["global_step"], record["metrics"].get("train_runtime")
    tokens = record["num_input_tokens_seen"]
    later_tokens = record["tokens_seen"][-1] - record["tokens_seen"][0] if len(record["tokens_seen"]) > 1 else 0
    later_seconds = sum(record["step_seconds"][1:])
    per_row = sum(r["flops"] for r in rows.values()) / len(rows)
    return {"flops": steps * per_row, "seconds": seconds, "amount": tokens, "unit": "tokens",
            "detail": f"{steps} QLoRA steps (batch 1)",
            "steady": later_tokens / later_seconds if later_seconds > 0 else None}


def summarize(args, device, phases: Phases, results: dict, settings: RunSettings, recipe, counted: dict | None) -> dict:
    peak = (results.get("matmul_peak") or {}).get("tflops")
    spec_name, spec_flops = spec_peak(device)
    estimate_peak = spec_flops or (peak * 1e12 if peak else None)
    records = phases.timer.observer.records
    trainers = {record["stage"]: record for record in records}
    counts = settings.counts
    memory_estimates = {}
    if counted is not None:
        for row in est.memory_estimates(counted["shape"], recipe, counted["text"], counted["visual_tokens"],
                                        counted["score_length"], counted["teacher_parameters"],
                                        counted["teacher_config"], len(counted["text"].continuations)):
            if row["recipe_setting"]:
                memory_estimates[row["stage"]] = row["total_gb"] * 1e9 / GIB
    work_of = {}
    if counted is not None:
        if trainers.get("sft", {}).get("global_step"):
            work_of["sft"] = sft_work(trainers["sft"], counted["rows"])
        teacher = trainers.get("teacher")
        if teacher and teacher.get("global_step"):
            images = teacher["global_step"] * settings.teacher_batch_size
            work_of["teacher"] = {"flops": images * 3 * counted["teacher_flops"],
                                  "seconds": teacher["metrics"].get("train_runtime"), "amount": images,
                                  "unit": "images", "detail": f"{teacher['global_step']} steps"}
        images = sum(counts.values())
        work_of["features"] = {"flops": images * (counted["fused_flops"] + counted["teacher_flops"]),
                               "seconds": None, "amount": images, "unit": "images",
                               "detail": f"{counted['visual_tokens']} visual tokens per image"}
    table_rows = []
    for name in NEEDS:
        row = dict(phases.rows.get(name, {"phase": name, "status": "not run"}))
        done = work_of.get(name)
        if done and row.get("status") == "pass":
            seconds = done["seconds"] or row["seconds"]
            row["work"] = f"{done['amount']:,.0f} {done['unit']} ({done['detail']})"
            row["throughput"] = f"{done['amount'] / seconds:,.1f} {done['unit']}/s"
            if done.get("steady"):
                row["throughput"] += f" (steady {done['steady']:,.1f})"
            row["counted_tflop"] = done["flops"] / 1e12
            row["timed_seconds"] = seconds
            if peak:
                row["fraction_of_measured_peak"] = done["flops"] / seconds / (peak * 1e12)
            if estimate_peak:
                row["estimated_seconds"] = done["flops"] / (estimate_peak * args.mfu)
        if "parts" in row:
            row["parts_text"] = ", ".join(f"{part} {p['seconds']:.1f} s / {p['peak_memory_gib']:.2f} GiB"
                                          for part, p in row["parts"].items())
        if name == "sft" and "stage 1" in memory_estimates:
            row["estimated_memory_gib"] = memory_estimates["stage 1"]
        if name == "features" and "feature caches" in memory_estimates:
            row["estimated_memory_gib"] = memory_estimates["feature caches"]
        if name == "inference" and results.get("inference"):
            row["throughput"] = ", ".join(f"b{r['batch_size']}: {r['images_per_s']:,.1f} images/s"
                                          for r in results["inference"]["fused"])
            row["fraction_of_measured_peak"] = max(r["fraction_of_peak"] for r in results["inference"]["fused"])
        if name == "matmul_peak" and peak:
            row["throughput"] = f"{peak:,.1f} TFLOP/s ({results['matmul_peak']['dtype']})"
        table_rows.append(row)
    columns = [("phase", "phase"), ("status", "status"), ("seconds", "seconds"), ("peak_memory_gib", "peak GiB"),
               ("throughput", "throughput"), ("fraction_of_measured_peak", "of measured peak"),
               ("estimated_seconds", f"estimated s (MFU {args.mfu:g})"), ("estimated_memory_gib", "estimated GiB"),
               ("parts_text", "parts (s / peak GiB)"), ("error", "error")]
    knobs = knob_rows(results["sft_knobs"]) if results.get("sft_knobs") else []
    table = markdown_table(table_rows + knobs, columns)
    title = (f"bench.gpu_check on {device_name(device)}: Qwen2-VL at "
             + ("the tiny test shape" if args.tiny else "Qwen2-VL-2B's full widths and depth (28 + 32 layers)")
             + f", {counts} images of {args.image_size[0]}x{args.image_size[1]}")
    print(f"\n{title}\n\n{table}\n")
    if spec_name:
        print(f"Estimates use the {spec_name} data-sheet peak ({est.GPUS[spec_name][0]} TFLOP/s bf16) at MFU "
              f"{args.mfu}; measured peak {peak:.1f} TFLOP/s.")
    failed = [row["phase"] for row in table_rows if row.get("status") == "fail"]
    return {"benchmark": "gpu_check", "config": {"tiny": args.tiny, "device": device_name(device),
                                                 "model": "tiny" if args.tiny else "Qwen2-VL-2B widths, full depth",
                                                 "images": counts, "image_size": list(args.image_size),
                                                 "sft_steps": args.sft_steps, "mfu_of_estimates": args.mfu,
                                                 "spec_gpu": spec_name},
            "settings": dict(vars(args)), "versions": versions(), "phases": table_rows,
            "trainers": records, "results": results,
            "ratios": {"phases_passed": sum(r.get("status") == "pass" for r in table_rows),
                       "phases_failed": len(failed)},
            "failed": failed, "table_markdown": table}


if __name__ == "__main__":
    main()
