"""Stage 1's throughput knobs: tokens/s of `SFTTrainer` (through `train.stages.sft.build_sft_trainer`) with each on
and off, measured side by side.

    python -m bench.sft_throughput                    # the mid model (2B widths, 2 + 2 layers), LoRA, on the CPU
    python -m bench.sft_throughput --tiny             # the test suite's tiny model (smoke run)
    python -m bench.sft_throughput --device cuda      # on a GPU, where every knob can run

Every case is the baseline plus one recipe value (`sft.<key>`): the baseline is sdpa attention, the random sampler,
no DataLoader workers, no pinned memory, no Liger kernels. A case runs one epoch of stage 1 (categorical and
reasoning instructions of generated images of several sizes; the reasoning answers vary in length, as generated
ones do), timed from `on_train_begin` to `on_train_end` (data loading and DataLoader worker start-up included), and
counts the batches' tokens without padding (`attention_mask`) and with it. Repetitions are interleaved (repetition r
runs the cases rotated by r) after one untimed epoch per case. A knob stage 1 refuses here (padding-free batching:
TRL refuses it for images; Liger kernels and flash-attention without CUDA and their packages) is reported as refused
with the one-line reason; pinned memory has no effect without an accelerator (stage 1 turns it off there).
Length grouping sorts `Trainer`'s "megabatches" of min(50, rows // (4 x batch)) batches: it changes nothing below
8 batches per epoch, and the default 64 rows in batches of 4 make megabatches of 4 batches (a real data set: 50).

`bench.gpu_check` calls `stage1_throughput(model, device="cuda", ...)` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
from transformers import PrinterCallback, TrainerCallback

from bench import pipeline_run
from bench.common import (
    RESULTS_DIR,
    device_name,
    log,
    make_shape,
    markdown_table,
    random_images,
    resolve_device,
    setup,
    summarize,
    write_json,
)
from modeling_emovlm_kd import resolve_label_set
from train.infra.assemble import load_processor
from train.infra.tiny import build_tiny_base_models
from train.stages.instructions import build_instruction_dataset
from train.stages.sft import SFTStageConfig, build_sft_trainer

# What each case changes over the baseline (its `sft` recipe values), in the order of the table.
KNOBS: dict[str, dict] = {
    "eager_attention": {"attn_implementation": "eager"},
    "flash_attention": {"attn_implementation": "flash_attention_2"},
    "group_by_length": {"train_sampling_strategy": "group_by_length"},
    "workers": {"dataloader_num_workers": 2},
    "pin_memory": {"dataloader_pin_memory": True},
    "liger": {"use_liger_kernel": True},
    "padding_free": {"padding_free": True},
}
BASELINE = {"attn_implementation": "sdpa", "train_sampling_strategy": "random", "dataloader_num_workers": 0,
            "dataloader_pin_memory": False, "use_liger_kernel": False, "padding_free": False}


class VaryingAnswers:
    """Reasoning answers of 5 to 84 words, fixed by the image: generated answers differ in length, which is what
    length grouping works on."""

    WORDS = ("the", "warm", "light", "and", "open", "sky", "suggest", "a", "calm", "mood", "while", "shadows",
             "deepen", "at", "edges")

    def generate(self, image, kind, label):
        count = 5 + (image.width * 31 + image.height * 17) % 80
        return " ".join(self.WORDS[i % len(self.WORDS)] for i in range(count)) + "."


class _EpochClock(TrainerCallback):
    """Seconds from `on_train_begin` to `on_train_end`, the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds = time.perf_counter() - self.start


def _counting(training_step: Callable, counts: dict) -> Callable:
    """`Trainer.training_step` that also counts each batch's tokens, with and without padding."""

    def step(model, inputs, *args, **kwargs):
        counts["tokens"] += int(inputs["attention_mask"].sum())
        counts["padded"] += int(inputs["attention_mask"].numel())
        return training_step(model, inputs, *args, **kwargs)

    return step


def training_rows(model: str | Path, labels, num_images: int, image_sizes: Sequence[tuple[int, int]],
                  workdir: Path, seed: int = 0):
    """The processor and stage 1's instruction rows (categorical + reasoning) for `num_images` generated images."""
    processor = load_processor(model, labels)
    images = [random_images(1, image_sizes[i % len(image_sizes)], seed=seed + i)[0] for i in range(num_images)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(labels))})
    dataset = datasets.Dataset.from_dict({"image": images, "label": [i % len(labels) for i in range(num_images)]},
                                         features=features)
    rows = build_instruction_dataset(dataset, processor, kinds=["categorical", "reasoning"], generator=VaryingAnswers(),
                                     cache_path=workdir / "answers.jsonl", show_progress=False)
    return processor, rows


def run_case(model, processor, rows, options: dict, device: torch.device, output_dir: Path) -> dict:
    """One epoch of stage 1 with `options` over the defaults: seconds, tokens (with and without padding), the
    first step's loss."""
    args = SFTStageConfig(output_dir=str(output_dir), model_name_or_path=str(model), num_train_epochs=1,
                          logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                          use_cpu=device.type == "cpu", **options)
    clock, counts = _EpochClock(device), {"tokens": 0, "padded": 0}
    trainer = build_sft_trainer(rows, processor, args)
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)  # the per-step log lines
    trainer.training_step = _counting(trainer.training_step, counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's deprecation notes (Liger) and the like, once per case
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"seconds": clock.seconds, **counts, "steps": trainer.state.global_step,
              "first_loss": losses[0] if losses else None}
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _refusal(model, options: dict, device: torch.device, output_dir: Path) -> tuple[str, str] | None:
    """(status, reason) for a case that cannot run here, or None."""
    try:
        args = SFTStageConfig(output_dir=str(output_dir), model_name_or_path=str(model), report_to="none",
                              use_cpu=device.type == "cpu", **options)
    except ValueError as err:
        return "refused", str(err)
    if options.get("dataloader_pin_memory") and not args.dataloader_pin_memory:
        return "no effect", "no accelerator: stage 1 leaves pinned memory off (only copies to a GPU use it)"
    return None


def stage1_throughput(model: str | Path, device: str | torch.device = "auto", knobs: Sequence[str] | None = None, *,
                      labels="mikels8", num_images: int = 32,
                      image_sizes: Sequence[tuple[int, int]] = ((112, 112), (224, 224), (224, 112), (168, 168)),
                      batch_size: int = 4, reps: int = 3, warmup: int = 1, workers: int = 2,
                      workdir: str | Path | None = None, **sft_options) -> dict:
    """Stage-1 tokens/s of `model` (a saved Qwen2-VL-family folder with tokenizer and image processor) on `device`
    with each knob of `knobs` (names of `KNOBS`; default all) on, against the baseline, interleaved.

    `sft_options` are further `SFTStageConfig` values for every case (e.g. `load_in_4bit=True`,
    `activation_checkpointing=True`, `bf16=True`); by default LoRA on q/k/v as the paper, no activation
    checkpointing, float32 on a CPU and bf16 on a GPU (as `SFTStageConfig` chooses). Images of `image_sizes`
    (width, height), cycled, are resized within the model's image processor's pixel bounds.

    Returns `{"settings", "rows", "table"}`; a row per case: `status` (ok, refused, no effect), `reason`,
    `tokens_per_s` (median over `reps`, tokens without padding), `vs_baseline`, `padding_fraction`,
    `examples_per_s`, `rel_iqr`, `first_loss`, `seconds` (every repetition)."""
    device = resolve_device(str(device))
    names = list(KNOBS) if knobs is None else list(knobs)
    unknown = [name for name in names if name not in KNOBS]
    if unknown:
        raise ValueError(f"Unknown knob(s) {unknown}; choose from {', '.join(KNOBS)}.")
    labels = resolve_label_set(labels)
    base = {"use_peft": True, "activation_checkpointing": False, "per_device_train_batch_size": batch_size,
            "instruction_kinds": ["categorical", "reasoning"], **BASELINE, **sft_options}
    cases = {"baseline": base} | {name: {**base, **KNOBS[name]} for name in names}
    if "workers" in cases:
        cases["workers"]["dataloader_num_workers"] = workers
    with tempfile.TemporaryDirectory(prefix="emovlm-sft-throughput-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        processor, rows = training_rows(model, labels, num_images, image_sizes, work)
        status = {name: _refusal(model, options, device, work / "check") for name, options in cases.items()}
        runnable = [name for name in cases if status[name] is None]
        runs = {name: [] for name in runnable}
        for _ in range(warmup):
            for name in runnable:
                run_case(model, processor, rows, cases[name], device, work / name)
        for rep in range(reps):
            order = runnable[rep % len(runnable):] + runnable[: rep % len(runnable)]
            for name in order:
                runs[name].append(run_case(model, processor, rows, cases[name], device, work / name))
            log(f"  rep {rep + 1}/{reps}: " + ", ".join(
                f"{name}={runs[name][-1]['tokens'] / runs[name][-1]['seconds']:.0f} tok/s" for name in runnable))
    table_rows = _rows(cases, status, runs, batch_size)
    settings = {"model": str(model), "device": device_name(device), "knobs": names, "num_images": num_images,
                "rows": len(rows), "image_sizes": [list(size) for size in image_sizes], "batch_size": batch_size,
                "reps": reps, "warmup": warmup, "workers": workers, "torch_threads": torch.get_num_threads(),
                "baseline": base}
    return {"settings": settings, "rows": table_rows, "table": markdown_table(table_rows, COLUMNS)}


COLUMNS = [("case", "case"), ("change", "sft value"), ("status", "status"), ("tokens_per_s", "tokens/s"),
           ("vs_baseline", "vs baseline"), ("rel_iqr", "IQR/median"), ("examples_per_s", "examples/s"),
           ("padding_fraction", "padding"), ("first_loss", "loss, step 1"), ("reason", "why not run")]


def _rows(cases, status, runs, batch_size) -> list[dict]:
    def rate(run):
        return run["tokens"] / run["seconds"]

    baseline = statistics.median(rate(run) for run in runs["baseline"]) if runs.get("baseline") else None
    rows = []
    for name, options in cases.items():
        change = ", ".join(f"{key}: {options[key]}" for key in KNOBS.get(name, {})) or "(the baseline)"
        if status[name] is not None:
            rows.append({"case": name, "change": change, "status": status[name][0], "reason": status[name][1]})
            continue
        rates = [rate(run) for run in runs[name]]
        seconds = [run["seconds"] for run in runs[name]]
        stats = summarize([1 / r for r in rates])  # seconds per token: its spread is the timing's
        median = statistics.median(rates)
        first = runs[name][0]
        rows.append({"case": name, "change": change, "status": "ok", "tokens_per_s": median,
                     "vs_baseline": median / baseline if baseline else None, "rel_iqr": stats["rel_iqr"],
                     "examples_per_s": statistics.median(run["steps"] * batch_size / run["seconds"]
                                                         for run in runs[name]),
                     "padding_fraction": 1 - first["tokens"] / first["padded"], "tokens": first["tokens"],
                     "first_loss": first["first_loss"], "seconds": seconds, "reason": ""})
    return rows


# ---- the command line ------------------------------------------------------------------------------------------------


def build_base(shape_name: str, folder: Path, text_layers=None, vision_depth=None, seed: int = 0) -> Path:
    """A random Qwen2-VL of `bench.common`'s shape (`mid`: 2B widths, the real tokenizer) saved with its tokenizer
    and pixel-bounded image processor, or the test suite's tiny one."""
    if shape_name == "tiny":
        return Path(build_tiny_base_models(folder, resolve_label_set("mikels8"), seed=seed)["vlm"])
    # The pipeline benchmark's random base, in float32 (the dtype stage 1 trains in on a CPU).
    pipeline_run.build_base(make_shape(shape_name, text_layers, vision_depth), folder, seed, dtype=torch.float32)
    return folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="The test suite's tiny model (smoke run).")
    parser.add_argument("--output", default=str(RESULTS_DIR / "sft_throughput.json"), help="JSON result path.")
    parser.add_argument("--device", default="auto", help="cpu or cuda (auto: cuda if available).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--text-layers", type=int, default=None, help="Language-model layers (mid default 2).")
    parser.add_argument("--vision-depth", type=int, default=None, help="Vision-tower blocks (mid default 2).")
    parser.add_argument("--knobs", nargs="*", default=None, choices=list(KNOBS), help="Cases (default: all).")
    parser.add_argument("--num-images", type=int, default=None, help="Images (two rows each; default 32, tiny 16).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="Untimed epochs per case first.")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the `workers` case.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    shape = "tiny" if args.tiny else "mid"
    with tempfile.TemporaryDirectory(prefix="emovlm-sft-base-") as tmp:
        log(f"Building the {shape} model ...")
        model = build_base(shape, Path(tmp) / "vlm", args.text_layers, args.vision_depth, args.seed)
        sizes = ((56, 56), (112, 112), (112, 56), (84, 84)) if args.tiny else \
            ((112, 112), (224, 224), (224, 112), (168, 168))
        result = stage1_throughput(model, args.device, args.knobs, num_images=args.num_images or (16 if args.tiny
                                                                                                   else 32),
                                   image_sizes=sizes, batch_size=args.batch_size, reps=args.reps, warmup=args.warmup,
                                   workers=args.workers)
    result["settings"]["model"] = f"{shape} (random weights)"
    print(f"\nStage 1, one epoch per case ({result['settings']['rows']} rows, batch {args.batch_size}, "
          f"{result['settings']['device']}, {torch.get_num_threads()} threads):\n")
    print(result["table"])
    write_json(args.output, {"benchmark": "sft_throughput", **result})
    return result


if __name__ == "__main__":
    main()
