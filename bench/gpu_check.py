"""One prepared check of every stage on a CUDA machine: does the real path work there, and how fast is it?

    python -m bench.gpu_check                  # on a GPU: Qwen2-VL-2B at full widths and depth, ~5-8 minutes
    make gpu-check                             # the same
    python -m bench.gpu_check --tiny           # CPU smoke run on the test suite's tiny model (make test runs it)

No network and no weights are needed: everything is random and built here. Phases, in order (a failing phase is
recorded with its error and the phases that do not depend on it still run):

- `matmul_peak`: bf16 8192x8192 products on the GPU, the measured rate every other phase is a fraction of.
- `build`: a random Qwen2-VL at **Qwen2-VL-2B's full widths and depth** (28 text layers, 32 vision blocks, vocabulary
  151,936, 2.2 B parameters; `bench.common`/`bench.real_shape.build_base`) with the real Qwen2-VL tokenizer
  (`train/infra/qwen_tokenizer.py`, offline), a random ViT-B/16-384 teacher, and `--images` generated images of
  `--image-size` (1024x1024: the 7B recipes' bound `max_pixels` = 1024^2) in an image folder with its three splits.
- The project's own `Pipeline` (`train/stages/pipeline.py`) on a recipe over those folders, one stage per phase,
  through `Pipeline.run(stages=[...])` exactly as `python -m train pipeline` runs them: `instructions` (the
  conversation answers are canned, label-free descriptions put in the answer cache first: no answer model is
  reachable), `sft` (NF4 4-bit load through bitsandbytes, `--sft-steps` QLoRA steps with gradient checkpointing,
  the merge), `teacher` (`--teacher-steps` steps), `features` (the caches of every split at the bound),
  `distill`, `gate`, `evaluate`, `export` (the bf16 sharded Hub folder).
- `reload_4bit`: `pipeline("image-classification")` on the export with a 4-bit `BitsAndBytesConfig`, as a user
  loads it; `classify`: that pipeline on the test images.
- `inference`: `python -m bench.inference --device cuda` at batch 1/8/32 (full depth), in a subprocess.

Per phase: wall time, peak GPU memory (`torch.cuda.max_memory_allocated`, reset before the phase; on CPU the peak
RSS), the work done (tokens or images per second; the Trainers' own runtimes for stage 1 and the teacher), the
counted FLOPs' rate as a fraction of `matmul_peak`, and beside them the estimate of `bench.estimate` for the same
work (seconds on this GPU's data-sheet bf16 peak at `--mfu`, memory per its formulas). One table, one JSON
(`bench/results/gpu_check.json`). Whether phases fit the time: `--time-limit` (480 s) skips what would start after it.

The Trainers' runtimes are read by wrapping `transformers.Trainer.train` for the duration of this check (the stage
code itself is called, not copied).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench import estimate as est  # noqa: E402
from bench.common import device_name, log, make_shape, markdown_table, resolve_dtype, write_json  # noqa: E402
from bench.flops import MatmulPeak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test")
GIB = 1024**3
# Which phases each phase needs (a failed or skipped one skips these).
NEEDS = {
    "matmul_peak": (), "build": (), "instructions": ("build",), "sft": ("instructions",), "teacher": ("build",),
    "features": ("sft", "teacher"), "distill": ("features",), "gate": ("distill",), "evaluate": ("gate",),
    "export": ("evaluate",), "reload_4bit": ("export",), "classify": ("reload_4bit",), "inference": (),
}
CANNED_ANSWER = (
    "The frame is filled with soft shapes of colour that drift into one another without a clear subject. Warm "
    "patches gather near the middle while cooler tones sink toward the edges, and the light seems to come from "
    "nowhere in particular. Nothing in the picture is sharp: the transitions are slow, the contrast is low and the "
    "texture is even, like fog over a field at dusk. A viewer's eye wanders without finding a place to rest, and the "
    "overall impression is of quiet, unresolved movement, neither threatening nor especially inviting."
)


class CannedAnswers:
    """Stand-in for the answer model: one fixed, label-free description of about 120 tokens per image."""

    name = "canned"

    def generate(self, image, kind: str, label: str) -> str:
        return CANNED_ANSWER


# ---- observation ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def observed_trainers(records: list):
    """Record every `Trainer.train` call's metrics (runtime, steps) while the block runs; the stages are unchanged."""
    from transformers import Trainer

    original = Trainer.train

    def train(self, *args, **kwargs):
        start = time.perf_counter()
        output = original(self, *args, **kwargs)
        records.append({"trainer": type(self).__name__, "seconds": time.perf_counter() - start,
                        "global_step": output.global_step, "metrics": dict(output.metrics),
                        "linear4bit": _count_4bit(self.model)})
        return output

    Trainer.train = train
    try:
        yield records
    finally:
        Trainer.train = original


def _count_4bit(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def _reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (`VmHWM`) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rss_peak_gib() -> float:
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024**2
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class Phases:
    """Runs the phases in order: time, peak memory, pass/fail with the error text, skips after a failure."""

    def __init__(self, device: torch.device, time_limit: float):
        self.device, self.time_limit, self.start = device, time_limit, time.perf_counter()
        self.rows: dict[str, dict] = {}
        self.rss_reset = False

    def run(self, name: str, function, *args, **kwargs):
        missing = [need for need in NEEDS[name] if self.rows.get(need, {}).get("status") != "pass"]
        elapsed = time.perf_counter() - self.start
        if missing or elapsed > self.time_limit:
            reason = (f"needs {', '.join(missing)}" if missing
                      else f"time limit: {elapsed:.0f} s of {self.time_limit:.0f} s used")
            self.rows[name] = {"phase": name, "status": "skipped", "error": reason}
            log(f"[gpu_check] {name}: skipped ({reason})")
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss_reset = _reset_rss_peak()
        log(f"[gpu_check] {name} ...")
        start = time.perf_counter()
        row = {"phase": name}
        try:
            result = function(*args, **kwargs)
            row["status"] = "pass"
        except Exception as err:  # a failing phase is recorded; the independent ones still run
            result = None
            row["status"] = "fail"
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
            row["memory_kind"] = "cuda.max_memory_allocated"
        else:
            row["peak_memory_gib"] = _rss_peak_gib()
            row["memory_kind"] = "peak RSS of the phase" if self.rss_reset else "peak RSS of the process so far"
        row["seconds"] = time.perf_counter() - start
        self.rows[name] = row
        log(f"[gpu_check] {name}: {row['status']} in {row['seconds']:.1f} s"
            + (f" ({row['error']})" if row["status"] == "fail" else ""))
        return result


# ---- the phases -------------------------------------------------------------------------------------------


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


def generate_images(root: Path, labels: list[str], counts: dict[str, int], size: tuple[int, int], seed: int) -> None:
    """`root/<split>/<label>/<n>.jpg`: smooth random colour fields with some noise (JPEGs of realistic size)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in counts.items():
        for i in range(count):
            label = labels[i % len(labels)]
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def build(work: Path, shape, labels: list[str], counts: dict[str, int], image_size, seed: int) -> dict:
    from bench.real_shape import build_base, teacher_model

    base = build_base(shape, work / "base", seed)
    teacher, teacher_processor = teacher_model(shape, labels, seed, torch.float32)
    teacher.save_pretrained(work / "teacher")
    teacher_processor.save_pretrained(work / "teacher")
    generate_images(work / "images", labels, counts, image_size, seed)
    return {"base": base, "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "images": counts, "image_size": list(image_size)}


def make_recipe(work: Path, shape, args, cuda: bool) -> dict:
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return {
        "output_dir": str(work / "run"), "seed": args.seed, "labels": args.labels,
        "data": {"kind": "imagefolder", "root": str(work / "images")},
        "base_models": {"vlm": str(work / "base"), "teacher": str(work / "teacher")},
        "instructions": {"generator": "none"},
        "model": {"head_hidden_dims": shape.head_hidden_dims, "dtype": "bfloat16" if bf16 else "float32",
                  "feature_batch_size": args.feature_batch_size, "min_pixels": shape.min_pixels,
                  "max_pixels": shape.max_pixels, "export_max_shard_size": "2GB"},
        "sft": {"use_peft": True, "load_in_4bit": True, "lora_r": 8, "lora_alpha": 8,
                "lora_target_modules": ["q_proj", "k_proj", "v_proj"],
                "instruction_kinds": ["categorical", "conversation"], "max_steps": args.sft_steps,
                "per_device_train_batch_size": 1, "activation_checkpointing": True, "bf16": bf16,
                "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "report_to": "none"},
        "teacher": {"max_steps": args.teacher_steps, "per_device_train_batch_size": args.teacher_batch_size,
                    "bf16": bf16, "save_strategy": "no", "eval_strategy": "no", "report_to": "none"},
        "distill": {"num_train_epochs": 2, "report_to": "none"},
        "gate": {"num_train_epochs": 2, "report_to": "none"},
    }


def prefill_answers(pipeline) -> dict:
    """The conversation answers stage 1 reads from the answer cache, from `CannedAnswers` (generator `none`)."""
    from train.stages.instructions import generate_answers

    summary = generate_answers(pipeline.data["train"], CannedAnswers(), pipeline.answers_cache,
                               kinds=["conversation"], show_progress=False)
    pipeline.run(stages=["base", "instructions"])
    return {"answers": summary.generated + summary.cached}


def reload_4bit(final: Path, cuda: bool, dtype: torch.dtype):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, pipeline

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    classifier = pipeline("image-classification", model=str(final), trust_remote_code=True, dtype=dtype,
                          model_kwargs={"quantization_config": quantization, "device_map": "cuda:0" if cuda else "cpu"})
    layers = [m for m in classifier.model.vlm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        raise RuntimeError("The 4-bit reload has no bitsandbytes Linear4bit layer.")
    return classifier, {"linear4bit_modules": len(layers), "weight_device": str(layers[0].weight.device),
                        "quant_type": getattr(layers[0].weight, "quant_type", None),
                        "lm_head_is_4bit": isinstance(classifier.model.vlm.lm_head, bnb.nn.Linear4bit)}


def classify(classifier, images: list[Path], labels: list[str]) -> dict:
    predictions = classifier([str(p) for p in images], top_k=len(labels), batch_size=8)
    return {"images": len(images), "top1": [p[0]["label"] for p in predictions]}


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


# ---- counted work and the estimate ----------------------------------------------------------------------------


def work_counts(work: Path, recipe: dict, labels: list[str], image_size) -> dict:
    """Tokens per row and counted FLOPs per unit of work of each phase, from the saved models (`bench.estimate`)."""
    from transformers import AutoConfig

    from train.infra.assemble import load_processor

    processor = load_processor(work / "base", labels, min_pixels=recipe["model"]["min_pixels"],
                               max_pixels=recipe["model"]["max_pixels"])
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
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from modeling_emovlm_kd import resolve_label_set

    cuda = not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        torch.set_num_threads(1)
    labels = resolve_label_set(args.labels)
    shape = make_shape("tiny") if args.tiny else make_shape("mid", text_layers=28, vision_depth=32,
                                                            teacher_layers=12, max_pixels=1024 * 1024)
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    counts = dict(zip(SPLITS, args.images))
    phases = Phases(device, args.time_limit)
    results: dict = {}
    records: list = []
    try:
        peak_dtype = resolve_dtype("auto", device)
        results["matmul_peak"] = phases.run("matmul_peak", measure_peak, device, peak_dtype,
                                            512 if args.tiny else 8192)
        results["build"] = phases.run("build", build, work, shape, labels, counts, args.image_size, args.seed)
        pipeline, recipe, counted = None, make_recipe(work, shape, args, cuda), None
        if phases.rows["build"]["status"] == "pass":
            from train.infra.recipe import validate_recipe
            from train.stages.pipeline import Pipeline

            pipeline = Pipeline(validate_recipe(recipe, where="bench.gpu_check"))
            results["instructions"] = phases.run("instructions", prefill_answers, pipeline)
            try:  # the counted work of each phase (bench.estimate's formulas on the saved models)
                counted = work_counts(work, recipe, labels, args.image_size)
            except Exception as err:  # the measurements stand without it
                results["work_error"] = f"{type(err).__name__}: {err}"
        with observed_trainers(records):
            for stage in ("sft", "teacher", "features", "distill", "gate", "evaluate", "export"):
                phases.run(stage, lambda stage=stage: pipeline.run(stages=[stage]))
        final = work / "run" / "final"
        compute = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        loaded = phases.run("reload_4bit", reload_4bit, final, cuda, compute)
        classifier = None
        if loaded is not None:
            classifier, results["reload_4bit"] = loaded
        test_images = sorted((work / "images" / "test").rglob("*.jpg"))[:8]
        results["classify"] = phases.run("classify", classify, classifier, test_images, labels)
        classifier = loaded = None  # frees the 4-bit model before the inference subprocess
        if not args.no_inference:
            remaining = args.time_limit - (time.perf_counter() - phases.start)
            results["inference"] = phases.run("inference", run_inference, args, device, work / "inference.json",
                                              remaining + 60)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    payload = summarize(args, device, phases, results, records, counts, recipe, counted)
    write_json(args.output, payload)
    return payload


def summarize(args, device, phases: Phases, results: dict, records: list, counts: dict, recipe: dict,
              counted: dict | None) -> dict:
    peak = (results.get("matmul_peak") or {}).get("tflops")
    spec_name, spec_flops = spec_peak(device)
    estimate_peak = spec_flops or (peak * 1e12 if peak else None)
    trainers = {record["trainer"]: record for record in records}
    memory_estimates = {}
    if counted is not None:
        from train.infra.recipe import validate_recipe

        spec = validate_recipe(recipe, where="bench.gpu_check")
        for row in est.memory_estimates(counted["shape"], spec, counted["text"], counted["visual_tokens"],
                                        counted["score_length"], counted["teacher_parameters"],
                                        counted["teacher_config"], len(counted["text"].continuations)):
            if row["recipe_setting"]:
                memory_estimates[row["stage"]] = row["total_gb"] * 1e9 / GIB
    work_of = {}
    if counted is not None:
        rows = counted["rows"]
        sft = trainers.get("EmoVLMSFTTrainer")
        if sft:
            steps = sft["global_step"]
            per_row = sum(r["flops"] for r in rows.values()) / len(rows)
            tokens = steps * sum(r["tokens"] for r in rows.values()) / len(rows)
            work_of["sft"] = {"flops": steps * per_row, "seconds": sft["metrics"].get("train_runtime"),
                              "amount": tokens, "unit": "tokens", "detail": f"{steps} QLoRA steps (batch 1)"}
        teacher = next((r for r in records if r["trainer"] != "EmoVLMSFTTrainer" and r["linear4bit"] == 0
                        and "Distill" not in r["trainer"] and "Gate" not in r["trainer"]), None)
        if teacher:
            images = teacher["global_step"] * args.teacher_batch_size
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
            row["counted_tflop"] = done["flops"] / 1e12
            row["timed_seconds"] = seconds
            if peak:
                row["fraction_of_measured_peak"] = done["flops"] / seconds / (peak * 1e12)
            if estimate_peak:
                row["estimated_seconds"] = done["flops"] / (estimate_peak * args.mfu)
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
               ("error", "error")]
    table = markdown_table(table_rows, columns)
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
            "settings": {k: v for k, v in vars(args).items()}, "versions": versions(), "phases": table_rows,
            "trainers": records, "results": results,
            "ratios": {"phases_passed": sum(r.get("status") == "pass" for r in table_rows),
                       "phases_failed": len(failed)},
            "failed": failed, "table_markdown": table}


if __name__ == "__main__":
    main()
