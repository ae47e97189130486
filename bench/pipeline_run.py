"""The project's own `Pipeline` on a generated data set with a given random base model, every stage timed through the
pipeline's `on_stage` hook: the one code path of `bench.gpu_check` (on a GPU) and `bench.real_shape` (full depth on
a CPU). Nothing of a stage is copied here; the stages run as `python -m train pipeline` runs them.

Phases (`PIPELINE_NEEDS`; a failed or skipped phase skips the phases that need it, with the reason):

- `build`: a random Qwen2-VL of a `bench.common.Shape` saved as an ordinary checkpoint (bf16) with its tokenizer
  (the real Qwen2-VL one, `train/infra/qwen_tokenizer.py`, offline; the tiny shape: the test suite's) and image
  processor bounded at the shape's `max_pixels`; a random ViT teacher of the shape; generated images in an image
  folder with three splits; the recipe over them (`make_recipe`) and its `Pipeline`. The conversation answers are
  canned (`CannedAnswers`: no answer model is reachable offline) and put in the run's answer cache, where stage
  `instructions` (generator `none`) and stage 1 read them as they read real ones. Stage `base` has nothing to build
  (the recipe names the base models) and runs here.
- one phase per stage, `instructions` .. `export`: `Pipeline.run(stages=[stage])`. The hook (`StageTimer`) times
  the stage's body: wall and CPU seconds, peak memory (CUDA: `max_memory_allocated`; CPU: the peak RSS), memory
  after. A `TrainerCallback` (`TrainerObserver`) on the Trainer stages that name it in `report_to` splits a stage
  into `before_train` (model load, data, Trainer), `train` (the steps) and `after_train` (saving; stage 1: the
  merge), with their peaks, and records the Trainer's own metrics (`train_runtime`, `num_input_tokens_seen`: stage
  1 counts its tokens, `include_num_input_tokens_seen`), the time of every step and the 4-bit layers it trains.
- `reload_4bit`: the export loaded through the front door (`load_pipeline(..., load_in_4bit=True)`: `pipeline()`
  with the one 4-bit config), as a user loads it; `classify`: that pipeline on the test images.

Peak memory of nested measurements (a stage inside its phase, a Trainer's parts inside a stage) is exact: every
reset of the peak counter first folds the reading into every open measurement (`Meter`).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration, TrainerCallback, ViTConfig, ViTForImageClassification
from transformers.initialization import no_init_weights
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from bench.common import Shape, default_dtype, log, qwen2_vl_config, random_init_
from modeling_emovlm_kd import EmoVLMKDImageProcessor, resolve_label_set

SPLITS = ("train", "validation", "test")
GIB = 1024**3
# Which phases each phase needs (a failed or skipped one skips these).
PIPELINE_NEEDS = {
    "build": (), "instructions": ("build",), "sft": ("instructions",), "teacher": ("build",),
    "features": ("sft", "teacher"), "distill": ("features",), "gate": ("distill",), "evaluate": ("gate",),
    "export": ("evaluate",), "reload_4bit": ("export",), "classify": ("reload_4bit",),
}
STAGE_PHASES = ("instructions", "sft", "teacher", "features", "distill", "gate", "evaluate", "export")
# Weights no later phase reads, removed after the phase (`RunSettings.free_disk`): the base VLM after stage 1 (the
# later stages read the merged model), the merged model after the export.
FREED_AFTER = {"sft": lambda work: work / "base", "export": lambda work: work / "run" / "sft" / "merged"}
# The `report_to` name under which `TrainerObserver` is attached to a stage's Trainer (`observing`).
OBSERVER = "bench_observer"
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


# ---- measuring ---------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (`VmHWM`) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (a benchmark run as a subprocess)."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), _cpu_seconds()


class Meter:
    """Wall and CPU seconds and peak memory of nested measurements (`begin` ... `end`), with parts (`split`).

    CUDA: `torch.cuda.max_memory_allocated` (synchronized); CPU: the peak RSS (`VmHWM`, reset through
    `/proc/self/clear_refs`; where that is refused, the process's peak so far, and `memory_kind` says so). Each
    reset first folds the current reading into every open measurement and part, so each peak is the largest
    reading taken while it was open."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.frames: list[dict] = []
        self.per_phase = True

    @property
    def memory_kind(self) -> str:
        if self.cuda:
            return "cuda.max_memory_allocated"
        return "peak RSS" if self.per_phase else "peak RSS of the process so far (VmHWM reset refused)"

    def _read(self) -> tuple[float, float]:
        """(peak since the last reset, memory now), GiB."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) / GIB,
                    torch.cuda.memory_allocated(self.device) / GIB)
        peak = _status_kib("VmHWM") if self.per_phase else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return peak / 1024**2, (_status_kib("VmRSS") or 0) / 1024**2

    def _fold(self) -> float:
        peak, now = self._read()
        for frame in self.frames:
            frame["peak"] = max(frame["peak"], peak)
            frame["part_peak"] = max(frame["part_peak"], peak)
        return now

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.per_phase = _reset_rss_peak() and self.per_phase

    def begin(self, name: str) -> dict:
        if self.frames:
            self._fold()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        now = self._read()[1]
        self._reset()
        stamp = _stamp()
        frame = {"name": name, "start": stamp, "part_start": stamp, "peak": 0.0, "part_peak": 0.0,
                 "memory_before": now, "parts": {}}
        self.frames.append(frame)
        return frame

    def split(self, ended: str) -> None:
        """Close the innermost measurement's current part as `ended`; the next part starts now (the parts of a
        measurement add up to it exactly)."""
        if not self.frames:
            return
        frame = self.frames[-1]
        self._fold()
        stamp = _stamp()
        frame["parts"][ended] = self._row(frame["part_start"], stamp, frame["part_peak"])
        frame["part_start"], frame["part_peak"] = stamp, 0.0
        self._reset()

    def end(self, frame: dict, last_part: str | None = None) -> dict:
        """The measurement's row; its last part is `last_part` when it was split."""
        now = self._fold()
        stamp = _stamp()
        self.frames.remove(frame)
        row = self._row(frame["start"], stamp, frame["peak"])
        if frame["parts"] and last_part:
            frame["parts"][last_part] = self._row(frame["part_start"], stamp, frame["part_peak"])
        row.update(memory_before_gib=frame["memory_before"], memory_after_gib=now)
        if frame["parts"]:
            row["parts"] = frame["parts"]
        return row

    def _row(self, start: tuple[float, float], stop: tuple[float, float], peak: float) -> dict:
        return {"seconds": stop[0] - start[0], "cpu_seconds": stop[1] - start[1], "peak_memory_gib": peak,
                "memory_kind": self.memory_kind}


class TrainerObserver(TrainerCallback):
    """Attached to the Trainer of every stage whose `report_to` names `OBSERVER`: splits the running stage into
    `before_train` / `train` / `after_train` (`Meter.split`) and records, per Trainer, its own final metrics, the
    input tokens it counted, the time of each step and its 4-bit layers."""

    def __init__(self, meter: Meter):
        self.meter = meter
        self.stage: str | None = None
        self.records: list[dict] = []
        self._step_start = 0.0

    def _sync(self) -> None:
        if self.meter.cuda:
            torch.cuda.synchronize(self.meter.device)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.meter.split("before_train")
        self.records.append({
            "stage": self.stage, "rows": len(train_dataloader.dataset) if train_dataloader is not None else None,
            "linear4bit": count_4bit(model) if model is not None else 0,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad) if model else 0,
            "step_seconds": [], "tokens_seen": [], "losses": [], "metrics": {}})

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        record = self.records[-1]
        record["step_seconds"].append(time.perf_counter() - self._step_start)
        record["tokens_seen"].append(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.records or not logs:
            return
        if "loss" in logs:
            self.records[-1]["losses"].append(logs["loss"])
        if "train_runtime" in logs:
            self.records[-1]["metrics"] = dict(logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.meter.split("train")
        self.records[-1].update(global_step=state.global_step, num_input_tokens_seen=state.num_input_tokens_seen)


def count_4bit(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@contextlib.contextmanager
def observing(observer: TrainerObserver):
    """Let `report_to: [OBSERVER]` attach `observer` to a stage's Trainer while the block runs.

    The stages build their Trainers themselves; a recipe attaches callbacks to them only through `report_to`, whose
    names transformers resolves in `INTEGRATION_TO_CALLBACK` (an instance there is added as it is). `OBSERVER` is
    registered there for the block's duration, before the recipe that names it is validated."""
    from transformers.integrations import integration_utils

    registry = integration_utils.INTEGRATION_TO_CALLBACK
    previous = registry.get(OBSERVER)
    registry[OBSERVER] = observer
    try:
        yield observer
    finally:
        if previous is None:
            registry.pop(OBSERVER, None)
        else:
            registry[OBSERVER] = previous


class StageTimer:
    """The pipeline's `on_stage` hook: measures each stage's body (`Meter`), its Trainer's parts included."""

    def __init__(self, meter: Meter):
        self.meter = meter
        self.observer = TrainerObserver(meter)
        self.rows: dict[str, dict] = {}
        self._open: dict[str, dict] = {}

    def __call__(self, stage: str, event: str) -> None:
        if event == "start":
            self.observer.stage = stage
            self._open[stage] = self.meter.begin(stage)
        else:
            self.finish(stage)

    def finish(self, stage: str) -> dict | None:
        """End `stage`'s measurement (also after a failure: what it had used by then)."""
        frame = self._open.pop(stage, None)
        if frame is None:
            return None
        self.rows[stage] = self.meter.end(frame, last_part="after_train")
        self.observer.stage = None
        return self.rows[stage]

    def trainer(self, stage: str) -> dict | None:
        """The last Trainer record of `stage`."""
        return next((r for r in reversed(self.observer.records) if r["stage"] == stage), None)


class Phases:
    """Runs named phases in order: time, peak memory, pass/fail with the error text; a phase whose needs did not
    pass, or that would start after `time_limit` seconds, is skipped with the reason. A stage phase's figures are
    the stage body's, from the pipeline's hook (`stage_phase`); `phase_seconds` keeps the whole call's time."""

    def __init__(self, device: torch.device, needs: dict[str, tuple[str, ...]], time_limit: float = float("inf"),
                 on_phase: Callable[[], None] | None = None, prefix: str = "bench"):
        self.meter = Meter(device)
        self.timer = StageTimer(self.meter)
        self.needs, self.time_limit, self.on_phase, self.prefix = needs, time_limit, on_phase, prefix
        self.start = time.perf_counter()
        self.rows: dict[str, dict] = {}

    @property
    def device(self) -> torch.device:
        return self.meter.device

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def passed(self, name: str) -> bool:
        return self.rows.get(name, {}).get("status") == "pass"

    def run(self, name: str, function, *args, **kwargs):
        missing = [need for need in self.needs[name] if not self.passed(need)]
        elapsed = self.elapsed()
        if missing or elapsed > self.time_limit:
            reason = (f"needs {', '.join(missing)}" if missing
                      else f"time limit: {elapsed:.0f} s of {self.time_limit:.0f} s used")
            self.rows[name] = {"phase": name, "status": "skipped", "error": reason}
            log(f"[{self.prefix}] {name}: skipped ({reason})")
            self._written()
            return None
        log(f"[{self.prefix}] {name} ...")
        frame = self.meter.begin(name)
        row = {"phase": name}
        try:
            result = function(*args, **kwargs)
            row["status"] = "pass"
        except Exception as err:  # a failing phase is recorded; the phases that do not need it still run
            result = None
            row["status"] = "fail"
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
        for stage in list(self.timer._open):  # a stage that raised: what it had used by then
            self.timer.finish(stage)
        row.update(self.meter.end(frame))
        self.rows[name] = row
        log(f"[{self.prefix}] {name}: {row['status']} in {row['seconds']:.1f} s ({row['cpu_seconds']:.1f} s CPU), "
            f"peak {row['peak_memory_gib']:.2f} GiB" + (f" ({row['error']})" if row["status"] == "fail" else ""))
        self._written()
        return result

    def stage_phase(self, pipeline, stage: str):
        """Phase `stage`: `pipeline.run(stages=[stage])`, its figures from the hook's measurement of the body."""
        self.timer.rows.pop(stage, None)
        result = self.run(stage, lambda: pipeline.run(stages=[stage]))
        row, measured = self.rows[stage], self.timer.rows.get(stage)
        if measured is not None:
            row["phase_seconds"] = row["seconds"]
            row.update(measured)
        elif row["status"] == "pass":
            row["note"] = "already finished in this run folder: not rerun, not timed"
        return result

    def _written(self) -> None:
        if self.on_phase is not None:
            self.on_phase()


# ---- what the phases build ---------------------------------------------------------------------------------


def build_base(shape: Shape, folder: Path, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A random Qwen2-VL of `shape` saved in `dtype` (bf16 by default) with its tokenizer and bounded image
    processor."""
    from train.infra.qwen_tokenizer import build_qwen2_vl_tokenizer
    from train.infra.run import count_parameters
    from train.infra.tiny import build_tiny_tokenizer

    tokenizer = (build_tiny_tokenizer(resolve_label_set("mikels8")) if shape.name == "tiny" else
                 build_qwen2_vl_tokenizer(Path(__file__).parent / ".cache" / "qwen2-vl-tokenizer"))
    config = qwen2_vl_config(shape, tokenizer)
    # Allocated once in `dtype`, torch's per-layer initialisers skipped (minutes for 2.2 B parameters on a small
    # CPU); `random_init_` fills every matrix with N(0, 0.02) values instead.
    with default_dtype(dtype), no_init_weights():
        model = Qwen2VLForConditionalGeneration(config)
    random_init_(model, std=config.get_text_config().initializer_range, seed=seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    EmoVLMKDImageProcessor(min_pixels=shape.min_pixels, max_pixels=shape.max_pixels).save_pretrained(folder)
    text = config.get_text_config()
    return {"parameters": count_parameters(model), "text_layers": text.num_hidden_layers,
            "vision_depth": config.vision_config.depth, "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size, "tokenizer_size": len(tokenizer),
            "tie_word_embeddings": bool(config.tie_word_embeddings), "checkpoint_bytes": folder_bytes(folder)}


def teacher_model(shape: Shape, labels: list[str], seed: int, dtype: torch.dtype = torch.float32):
    """A random ViT of the shape's teacher widths, with its image processor."""
    config = ViTConfig(**shape.teacher, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    with default_dtype(dtype), no_init_weights():
        teacher = ViTForImageClassification(config)
    random_init_(teacher, std=config.initializer_range, seed=seed + 1)
    size = shape.teacher["image_size"]
    return teacher.eval(), ViTImageProcessorPil(size={"height": size, "width": size})


def generate_images(root: Path, labels: list[str], counts: dict[str, int], sizes: dict[str, tuple[int, int]],
                    seed: int) -> None:
    """`root/<split>/<label>/<n>.jpg`: smooth random colour fields with some noise (JPEGs of realistic size), the
    labels in turn."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        width, height = sizes[split]
        for i in range(count):
            folder = root / split / labels[i % len(labels)]
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height),
                                                                                               Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


@dataclass
class RunSettings:
    """What `run_pipeline_phases` builds and how the stages are set (the recipe, `make_recipe`)."""

    shape: Shape
    labels: str = "mikels8"
    counts: dict[str, int] = field(default_factory=lambda: {"train": 8, "validation": 1, "test": 1})
    sizes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict.fromkeys(SPLITS, (224, 224)))
    bf16: bool = False  # stage 1 and the teacher compute in bf16
    model_dtype: str = "bfloat16"  # model.dtype: the VLM of the feature caches and of the export
    sft_steps: int = 3
    teacher_steps: int = 1
    teacher_batch_size: int = 2
    feature_batch_size: int = 1
    distill_epochs: int = 2
    gate_epochs: int = 2
    max_shard_size: str = "2GB"
    seed: int = 0
    free_disk: bool = True  # remove the base VLM's weights after stage 1 and the merged model's after the export


def make_recipe(work: Path, settings: RunSettings) -> dict:
    """The recipe of the run: the generated image folder, the built base models, QLoRA stage 1 with activation
    checkpointing at batch 1 (the 7B recipes'), short stages, the Trainer stages of stage 1 and the teacher
    observed (`report_to: [OBSERVER]`), stage 1 counting its input tokens."""
    shape = settings.shape
    # bf16 Trainer steps on a CPU need `use_cpu` (transformers' check); on a GPU the key stays out of the recipe.
    cpu = {} if torch.cuda.is_available() else {"use_cpu": True}
    return {
        "output_dir": str(work / "run"), "seed": settings.seed, "labels": settings.labels,
        "data": {"kind": "imagefolder", "root": str(work / "images")},
        "base_models": {"vlm": str(work / "base"), "teacher": str(work / "teacher")},
        "instructions": {"generator": "none"},
        "model": {"head_hidden_dims": shape.head_hidden_dims, "dtype": settings.model_dtype,
                  "feature_batch_size": settings.feature_batch_size, "min_pixels": shape.min_pixels,
                  "max_pixels": shape.max_pixels, "export_max_shard_size": settings.max_shard_size},
        "sft": {"use_peft": True, "load_in_4bit": True, "lora_r": 8, "lora_alpha": 8,
                "lora_target_modules": ["q_proj", "k_proj", "v_proj"],
                "instruction_kinds": ["categorical", "conversation"], "max_steps": settings.sft_steps,
                "per_device_train_batch_size": 1, "activation_checkpointing": True, "bf16": settings.bf16,
                "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "report_to": [OBSERVER],
                "include_num_input_tokens_seen": "non_padding", **cpu},
        "teacher": {"max_steps": settings.teacher_steps, "per_device_train_batch_size": settings.teacher_batch_size,
                    "bf16": settings.bf16, "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1,
                    "report_to": [OBSERVER], **cpu},
        "distill": {"num_train_epochs": settings.distill_epochs, "report_to": "none"},
        "gate": {"num_train_epochs": settings.gate_epochs, "report_to": "none"},
    }


def build(work: Path, settings: RunSettings, on_stage) -> tuple[object, dict]:
    """Phase `build`: base models, images, recipe and `Pipeline` (hooked), the canned answers, stage `base`."""
    from train.infra.recipe import validate_recipe
    from train.stages.instructions import generate_answers
    from train.stages.pipeline import Pipeline

    labels = resolve_label_set(settings.labels)
    base = build_base(settings.shape, work / "base", settings.seed)
    teacher, teacher_processor = teacher_model(settings.shape, labels, settings.seed)
    teacher.save_pretrained(work / "teacher")
    teacher_processor.save_pretrained(work / "teacher")
    generate_images(work / "images", labels, settings.counts, settings.sizes, settings.seed)
    pipeline = Pipeline(validate_recipe(make_recipe(work, settings), where="bench"), on_stage=on_stage)
    # Stage `base` first: it makes the folder a run, which refuses to start in a folder holding anything else (the
    # answer cache written below lives in the run folder).
    pipeline.run(stages=["base"])
    summary = generate_answers(pipeline.data["train"], CannedAnswers(), pipeline.context.answers_cache,
                               kinds=["conversation"], show_progress=False)
    return pipeline, {"base": base, "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
                      "images": settings.counts, "image_sizes": {s: list(v) for s, v in settings.sizes.items()},
                      "canned_answers": summary.generated + summary.cached}


def reload_4bit(final: Path, device: torch.device, dtype: torch.dtype):
    """The export as a user loads it in 4 bits: the front door `load_pipeline` (`pipeline()`, the one 4-bit config)."""
    import bitsandbytes as bnb

    from modeling_emovlm_kd.loading_emovlm_kd import load_pipeline

    classifier = load_pipeline(final, dtype=dtype, device=str(device), load_in_4bit=True)
    model = classifier.model
    layers = [m for m in model.vlm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        raise RuntimeError("The 4-bit reload has no bitsandbytes Linear4bit layer.")
    trained = {str(p.dtype).removeprefix("torch.") for m in (model.distillation_head, model.gate)
               for p in m.parameters()}
    return classifier, {"linear4bit_modules": len(layers), "weight_device": str(layers[0].weight.device),
                        "quant_type": getattr(layers[0].weight, "quant_type", None),
                        "head_and_gate_dtypes": sorted(trained),
                        "lm_head_is_4bit": isinstance(model.vlm.lm_head, bnb.nn.Linear4bit)}


def classify(classifier, images: list[Path], labels: list[str], batch_size: int = 8) -> dict:
    predictions = classifier([str(p) for p in images], top_k=len(labels), batch_size=batch_size)
    return {"images": len(images), "top1": [p[0]["label"] for p in predictions],
            "scores_sum": [round(sum(item["score"] for item in p), 4) for p in predictions]}


def export_info(final: Path) -> dict:
    """Size, shards and tensor dtypes of the exported Hub folder (the head and the gate apart)."""
    from safetensors import safe_open

    dtypes: dict[str, int] = {}
    trained: set[str] = set()
    shards = sorted(final.glob("*.safetensors"))
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():
                dtype = str(handle.get_slice(key).get_dtype())
                dtypes[dtype] = dtypes.get(dtype, 0) + 1
                if key.startswith(("distillation_head.", "gate.")):
                    trained.add(dtype)
    return {"bytes": folder_bytes(final), "shards": len(shards), "tensors_by_dtype": dtypes,
            "head_and_gate_dtypes": sorted(trained)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def describe_stage(pipeline, stage: str, timer: StageTimer) -> dict:
    """What a finished stage did: its Trainer's record, what its marker says besides provenance, its outputs."""
    from train.infra.provenance import DONE, read_marker

    marker = read_marker(pipeline.stage_dir(stage), DONE) or {}
    info = {k: v for k, v in marker.items()
            if k not in ("stage", "finished", "settings", "settings_hash", "inputs", "provenance")}
    trainer = timer.trainer(stage)
    if trainer is not None:
        info.update(rows=trainer["rows"], steps=trainer.get("global_step"), linear4bit_modules=trainer["linear4bit"],
                    trainable_parameters=trainer["trainable_parameters"],
                    num_input_tokens_seen=trainer.get("num_input_tokens_seen"),
                    train_loss=trainer["metrics"].get("train_loss"),
                    train_runtime=trainer["metrics"].get("train_runtime"))
    if stage == "sft":
        info.update(kinds=list(pipeline.recipe.sft.instruction_kinds),
                    merged_bytes=folder_bytes(pipeline.stage_dir("sft") / "merged"))
    if stage == "features":
        recipe = pipeline.recipe
        image_processor = pipeline.context.processor().image_processor
        by_size: dict[tuple[int, int], int] = {}  # visual tokens of each image size (the bound's resize)

        def visual_tokens(path: Path) -> int:
            size = Image.open(path).size  # the header only
            if size not in by_size:
                grid = image_processor(Image.new("RGB", size), return_tensors="pt")["image_grid_thw"][0]
                by_size[size] = int(grid.prod()) // image_processor.merge_size**2
            return by_size[size]

        root = Path(recipe.data.root)
        tokens = {split: [visual_tokens(p) for p in sorted((root / split).rglob("*.jpg"))] for split in SPLITS}
        cache = pipeline.read().features("train")
        info.update(vlm_dtype=recipe.model.dtype, visual_tokens_per_image=tokens,
                    max_visual_tokens_of_bound=image_processor.size["longest_edge"] // (28 * 28),
                    feature_dim=int(cache["visual_features"].shape[-1]))
    if stage == "export":
        info.update(export_info(pipeline.output_dir / "final"))
    return info


def run_pipeline_phases(phases: Phases, work: Path, settings: RunSettings, results: dict,
                        compute_dtype: torch.dtype):
    """Phases `build` .. `classify` (`PIPELINE_NEEDS`) into `phases`, what each did into `results`; the 4-bit reload
    computes in `compute_dtype`. Returns the run's validated `Recipe` (None if `build` failed)."""
    labels = resolve_label_set(settings.labels)
    with observing(phases.timer.observer):
        built = phases.run("build", build, work, settings, phases.timer)
        pipeline = None
        if built is not None:
            pipeline, results["build"] = built
        for stage in STAGE_PHASES:
            phases.stage_phase(pipeline, stage)
            if phases.passed(stage):
                results[stage] = describe_stage(pipeline, stage, phases.timer)
            if settings.free_disk and phases.passed(stage) and stage in FREED_AFTER:
                for weights in FREED_AFTER[stage](work).glob("*.safetensors"):
                    weights.unlink()
    final = work / "run" / "final"
    loaded = phases.run("reload_4bit", reload_4bit, final, phases.device, compute_dtype)
    classifier = None
    if loaded is not None:
        classifier, results["reload_4bit"] = loaded
    test_images = sorted((work / "images" / "test").rglob("*.jpg"))
    results["classify"] = phases.run("classify", classify, classifier, test_images, labels)
    return pipeline.recipe if pipeline is not None else None


__all__ = ["CANNED_ANSWER", "OBSERVER", "PIPELINE_NEEDS", "STAGE_PHASES", "CannedAnswers", "Meter", "Phases",
           "RunSettings", "StageTimer", "TrainerObserver", "build", "build_base", "classify", "count_4bit",
           "describe_stage", "export_info", "folder_bytes", "generate_images", "make_recipe", "observing",
           "reload_4bit", "run_pipeline_phases", "teacher_model"]
