"""A full-depth dry run of the whole training path on CPU: Qwen2-VL-2B's architecture, random weights, real tokenizer.

    python -m bench.real_shape --threads 2     # full depth: 28 text layers, 32 vision blocks, vocabulary 151,936
    python -m bench.real_shape --tiny          # the same phases on the test suite's tiny model (seconds)

It goes through the project's own stage code, in the pipeline's order, and prints the time and the peak resident
memory of every phase:

1. `build_base`: a random Qwen2-VL-2B (Qwen/Qwen2-VL-2B-Instruct's config.json, see `bench.common`) built from its
   config in bf16, saved as an ordinary checkpoint with the real Qwen2-VL tokenizer (`train/infra/qwen_tokenizer.py`,
   offline) and the image processor bounded at `--max-pixels` (1024 x 1024 as in the 7B recipes: the authors cap the
   longer side at 1024 px). Nothing is downloaded.
2. stage 1 (`train/stages/sft.py`): `sft_load_4bit` (`build_sft_trainer`: 4-bit NF4 + double quant, LoRA on q/k/v),
   `sft_steps` (`--sft-steps` QLoRA steps on categorical + conversation rows of `--sft-images` generated images)
   and `sft_merge` (`save_merged`: adapter, merged model). These are `train_sft`'s steps, called one by one so each
   is measured. The conversation answers come from `CannedAnswers`, a stand-in for the answer model (generating them
   with a random 2B would be slow and meaningless); they go through the project's answer cache as real ones do.
3. `features` (`train/infra/assemble.py` + `train/stages/features.py`): the merged model assembled with the same resolution
   bound, pooled visual features and label scores of `--feature-images` images of `--feature-image-size` (train,
   validation, test), and the logits of a random ViT-B/16-384 teacher, stored through `train.stages.features.cached`.
4. `distill` (`train/stages/distill.py`) and `gate` (`train/stages/gate.py`): the head and the gate trained on those caches.
5. `export`: the export of `Pipeline.run_export`: `assemble(..., dtype=bfloat16)`, the trained head and gate, and
   `save_hub_folder` (sharded safetensors, remote code, processor).
6. `reload_4bit`: `pipeline("image-classification")` on the exported folder as a user loads it, with a plain 4-bit
   `BitsAndBytesConfig`; `classify`: that pipeline on the test images.

Peak RSS per phase is the kernel's high-water mark (`VmHWM`), reset before each phase (`/proc/self/clear_refs`);
where that reset is not allowed it is the process's peak so far (`resource.getrusage`), and the JSON says so.

Compute dtype: on CPUs without native bf16 (AVX512-BF16/AMX) a bf16 matrix product is tens of times slower than a
float32 one (0.8 vs 52 GFLOP/s measured on the development machine), so with `--compute-dtype auto` stage 1 computes
in float32 (as `SFTStageConfig` chooses on CPU), the feature caches are computed with the VLM in float32 and the
4-bit reload computes in float32. The export is bf16 in any case. This is a dry run of shapes, memory and time:
with random weights no accuracy means anything.
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    BitsAndBytesConfig,
    Qwen2VLForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
    pipeline,
)
from transformers.initialization import no_init_weights
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from bench.common import (
    add_common_arguments,
    cpu_supports_bf16,
    default_dtype,
    device_name,
    environment,
    log,
    make_shape,
    markdown_table,
    qwen2_vl_config,
    random_images,
    random_init_,
    setup,
    write_json,
)
from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDDistillationHead, EmoVLMKDImageProcessor, resolve_label_set
from modeling_emovlm_kd.fusion import gate_from_config
from train.configs.gate_config import GateConfig
from train.infra.assemble import assemble, load_processor, save_hub_folder
from train.infra.files import write_json_atomic
from train.infra.qwen_tokenizer import build_qwen2_vl_tokenizer
from train.infra.run import count_parameters, head_logits
from train.infra.tiny import build_tiny_tokenizer
from train.stages.distill import DistillationConfig, train_distillation
from train.stages.features import (
    cached,
    compute_teacher_logits,
    compute_vlm_features,
    data_fingerprint,
    model_fingerprint,
)
from train.stages.gate import train_gate
from train.stages.instructions import build_instruction_dataset
from train.stages.sft import SFTStageConfig, build_sft_trainer, save_merged

SPLITS = ("train", "validation", "test")
# The 7B recipes' bound (train/recipes/qwen2-vl-7b/*.yaml): 1024 x 1024 pixels.
FULL_MAX_PIXELS = 1024 * 1024
GIB = 1024**3


class CannedAnswers:
    """Stand-in for the answer model (`train.stages.instructions.AnswerGenerator`): a fixed, label-free description per
    image, so stage 1's conversation rows have realistic answers without running a generator."""

    name = "canned"

    def generate(self, image, kind: str, label: str) -> str:
        return (f"The image is {image.width}x{image.height} pixels of scattered colours with no clear subject; "
                "bright and dark patches alternate across the frame, and the overall impression is restless.")


# ---- memory and time per phase ---------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Times each phase (wall clock and this process's CPU time: on a shared machine they differ) and records its
    peak RSS; prints one line per phase as it ends and calls `on_phase` (the partial result is written)."""

    def __init__(self, on_phase=None):
        self.rows: list[dict] = []
        self.on_phase = on_phase

    def run(self, name: str, function, *args, **kwargs):
        gc.collect()
        reset = _reset_peak()
        rss_before = _status_kib("VmRSS")
        log(f"[real_shape] {name} ...")
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        result = function(*args, **kwargs)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        peak_kib = _status_kib("VmHWM") if reset else None
        if peak_kib is None:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the process's peak so far
        row = {"phase": name, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
               "peak_rss_gib": round(peak_kib / 1024**2, 3), "rss_before_gib": round((rss_before or 0) / 1024**2, 3),
               "rss_after_gib": round((_status_kib("VmRSS") or 0) / 1024**2, 3), "peak_is_per_phase": reset}
        self.rows.append(row)
        log(f"[real_shape] {name}: {seconds:.1f} s ({cpu:.1f} s CPU), peak RSS {row['peak_rss_gib']:.2f} GiB")
        if self.on_phase is not None:
            self.on_phase()
        return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- the phases ------------------------------------------------------------------------------------------


def build_base(shape, folder: Path, seed: int) -> dict:
    """A random Qwen2-VL of `shape` saved in bf16 with its tokenizer and bounded image processor."""
    tokenizer = (build_tiny_tokenizer(resolve_label_set("mikels8")) if shape.name == "tiny" else
                 build_qwen2_vl_tokenizer(Path(__file__).parent / ".cache" / "qwen2-vl-tokenizer"))
    config = qwen2_vl_config(shape, tokenizer)
    # Allocated once in bf16, torch's per-layer initialisers skipped (minutes for 2.2 B parameters on a small CPU);
    # `random_init_` fills every matrix with N(0, 0.02) values instead.
    with default_dtype(torch.bfloat16), no_init_weights():
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
            "tie_word_embeddings": bool(config.tie_word_embeddings), "checkpoint_bytes": _folder_bytes(folder)}


def image_dataset(images, labels: list[str]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=labels)})
    return datasets.Dataset.from_dict({"image": images, "label": [i % len(labels) for i in range(len(images))]},
                                      features=features)


def teacher_model(shape, labels: list[str], seed: int, dtype: torch.dtype):
    config = ViTConfig(**shape.teacher, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    with default_dtype(dtype), no_init_weights():
        teacher = ViTForImageClassification(config)
    random_init_(teacher, std=config.initializer_range, seed=seed + 1)
    size = shape.teacher["image_size"]
    return teacher.eval(), ViTImageProcessorPil(size={"height": size, "width": size})


def compute_features(merged: Path, labels, splits: dict, work: Path, shape, dtype: torch.dtype, seed: int) -> dict:
    """`Pipeline.run_features`' computation: the assembled merged model and the teacher over every split."""
    model, processor = assemble(merged, labels, dtype=dtype, head_hidden_dims=shape.head_hidden_dims,
                                min_pixels=shape.min_pixels, max_pixels=shape.max_pixels)
    teacher, teacher_processor = teacher_model(shape, labels, seed, dtype)
    vlm_key = model_fingerprint(merged)
    caches, visual_tokens = {}, {}
    for split, dataset in splits.items():
        fingerprint = f"{vlm_key}-random-vit-{data_fingerprint(dataset)}-{model.config.pooling}"

        def build(dataset=dataset):
            vlm = compute_vlm_features(model, processor.image_processor, dataset, batch_size=1)
            teacher_out = compute_teacher_logits(teacher, teacher_processor, dataset, batch_size=4)
            return {**vlm, "teacher_logits": teacher_out["teacher_logits"]}

        caches[split] = cached(work / "features" / f"{split}.safetensors", fingerprint, build)
        grids = processor.image_processor(list(dataset["image"]), return_tensors="pt")["image_grid_thw"]
        merge = model.config.vlm_config.vision_config.spatial_merge_size ** 2
        visual_tokens[split] = [int(g.prod()) // merge for g in grids]
    info = {"vlm_dtype": str(model.vlm.dtype).removeprefix("torch."), "visual_tokens_per_image": visual_tokens,
            "max_visual_tokens_of_bound": processor.image_processor.size["longest_edge"] // (28 * 28),
            "feature_dim": int(caches["train"]["visual_features"].shape[-1]),
            "teacher_parameters": count_parameters(teacher)}
    return {"caches": caches, "info": info}


def train_head(caches: dict, config: EmoVLMKDConfig, work: Path, seed: int, epochs: int):
    torch.manual_seed(seed)
    head = EmoVLMKDDistillationHead(config.feature_dim, config.head_hidden_dims, config.num_labels,
                                    config.head_activation, config.head_dropout)
    args = DistillationConfig(output_dir=str(work / "distill"), num_train_epochs=epochs, seed=seed, use_cpu=True,
                              disable_tqdm=True, logging_steps=1, report_to="none")
    head, trainer = train_distillation(head, caches["train"], caches["validation"], args)
    save_file(head.state_dict(), work / "distill" / "head.safetensors")
    return head.eval(), {"steps": trainer.state.global_step, "best_validation_accuracy": trainer.state.best_metric}


def fit_gate(caches: dict, head, config: EmoVLMKDConfig, work: Path, seed: int, epochs: int):
    def inputs(split):
        features = caches[split]
        return {"vlm_logits": features["vlm_logits"], "labels": features["labels"],
                "head_logits": head_logits(head, features["visual_features"])}

    torch.manual_seed(seed)
    gate = gate_from_config(config)
    args = GateConfig(output_dir=str(work / "gate"), num_train_epochs=epochs, seed=seed, use_cpu=True,
                      disable_tqdm=True, report_to="none")
    gate, trainer = train_gate(gate, config.gate_vlm_signal, inputs("train"), inputs("validation"), args,
                               head_signal=config.gate_head_signal)
    return gate, {"lbfgs_calls": trainer.state.global_step, "validation_accuracy": trainer.state.best_metric,
                  "parameters": count_parameters(gate)}


def export(merged: Path, labels, head, gate, final: Path, shape, max_shard_size: str) -> dict:
    """`Pipeline.run_export`: the VLM in bf16, the trained head and gate (float32), a Hub-ready folder."""
    model, processor = assemble(merged, labels, dtype=torch.bfloat16, head_hidden_dims=shape.head_hidden_dims,
                                min_pixels=shape.min_pixels, max_pixels=shape.max_pixels)
    model.distillation_head.load_state_dict(head.state_dict())
    model.gate.load_state_dict(gate.state_dict())
    save_hub_folder(model, processor, final, max_shard_size=max_shard_size)
    del model
    dtypes: dict[str, int] = {}
    trained: dict[str, str] = {}
    for shard in sorted(final.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():
                dtype = str(handle.get_slice(key).get_dtype())
                dtypes[dtype] = dtypes.get(dtype, 0) + 1
                if key.startswith(("distillation_head.", "gate.")):
                    trained[key] = dtype
    return {"bytes": _folder_bytes(final), "shards": len(list(final.glob("*.safetensors"))),
            "tensors_by_dtype": dtypes, "head_and_gate_dtypes": sorted(set(trained.values()))}


def load_4bit_pipeline(final: Path, compute_dtype: torch.dtype):
    """The exported folder as a user loads it: `pipeline()` with a plain 4-bit `BitsAndBytesConfig`."""
    import bitsandbytes as bnb

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute_dtype)
    classifier = pipeline("image-classification", model=str(final), trust_remote_code=True, dtype=compute_dtype,
                          model_kwargs={"quantization_config": quantization, "device_map": "cpu"})
    model = classifier.model
    linear4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.vlm.modules())
    trained = {str(p.dtype).removeprefix("torch.") for m in (model.distillation_head, model.gate)
               for p in m.parameters()}
    return classifier, {"linear4bit_modules": linear4bit, "head_and_gate_dtypes": sorted(trained),
                        "lm_head_is_4bit": isinstance(model.vlm.lm_head, bnb.nn.Linear4bit)}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _parse_size(text: str) -> tuple[int, int]:
    width, height = (int(x) for x in text.lower().split("x"))
    return width, height


# ---- driver ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "real_shape.json")
    parser.add_argument("--labels", default="mikels8")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help=f"Resolution bound of every stage (default {FULL_MAX_PIXELS}: 1024^2, tiny: its own).")
    parser.add_argument("--sft-images", type=int, default=2, help="Images of stage 1 (categorical + conversation).")
    parser.add_argument("--sft-image-size", default=None, help="WxH of stage 1's images (default 224x224).")
    parser.add_argument("--sft-steps", type=int, default=3, help="QLoRA steps of stage 1 (batch size 1).")
    parser.add_argument("--feature-images", type=int, nargs=3, default=[2, 1, 1], metavar=("TRAIN", "VAL", "TEST"),
                        help="Images per split of the feature caches.")
    parser.add_argument("--feature-image-size", default=None,
                        help="WxH of the cached images (default 1024x768: longer side at the 1024 px bound).")
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--gate-epochs", type=int, default=3)
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="Dtype stage 1, the caches and the 4-bit reload compute in (auto: bf16 only on CPUs "
                             "or GPUs with native bf16).")
    parser.add_argument("--max-shard-size", default="2GB", help="Export shard size (save_hub_folder).")
    parser.add_argument("--work-dir", default=None, help="Where checkpoints go (default: a temporary folder, "
                                                         "removed at the end).")
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cpu"):
        parser.error("bench.real_shape runs on CPU (--device cpu).")
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
    sft_size = _parse_size(args.sft_image_size) if args.sft_image_size else ((80, 60) if args.tiny else (224, 224))
    feature_size = (_parse_size(args.feature_image_size) if args.feature_image_size else
                    ((150, 100) if args.tiny else (1024, 768)))
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="real_shape-"))
    work.mkdir(parents=True, exist_ok=True)
    base, merged_root, final = work / "base", work / "sft", work / "final"
    results: dict = {}
    payload: dict = {}

    def report(complete: bool = False) -> None:
        """Write the result so far (after every phase, so an interrupted run still records what it measured)."""
        columns = [("phase", "phase"), ("seconds", "seconds"), ("cpu_seconds", "CPU seconds"),
                   ("peak_rss_gib", "peak RSS (GiB)"), ("rss_after_gib", "RSS after (GiB)")]
        table = markdown_table(phases.rows, columns)
        peak = max(row["peak_rss_gib"] for row in phases.rows)
        total = sum(row["seconds"] for row in phases.rows)
        payload.clear()
        payload.update({
            "benchmark": "real_shape",
            "complete": complete,
            "config": {"shape": shape.name, "text": shape.text, "vision": shape.vision, "teacher": shape.teacher,
                       "labels": labels, "min_pixels": shape.min_pixels, "max_pixels": shape.max_pixels,
                       "compute_dtype": str(dtype).removeprefix("torch."), "export_dtype": "bfloat16",
                       "device": device_name(torch.device("cpu")), "torch_threads": torch.get_num_threads()},
            "settings": {"sft_images": args.sft_images, "sft_image_size": list(sft_size),
                         "sft_steps": args.sft_steps, "feature_images": dict(zip(SPLITS, args.feature_images)),
                         "feature_image_size": list(feature_size), "distill_epochs": args.distill_epochs,
                         "gate_epochs": args.gate_epochs, "max_shard_size": args.max_shard_size, "seed": args.seed},
            "phases": phases.rows,
            "results": results,
            "summary": {"peak_rss_gib": peak, "total_seconds": round(total, 1),
                        "total_cpu_seconds": round(sum(row["cpu_seconds"] for row in phases.rows), 1)},
            "ratios": {"export_bytes_over_merged_bytes": results["export"]["bytes"] / results["sft"]["merged_bytes"]}
            if "export" in results else {},
            "table_markdown": table,
        })
        if complete:
            print(table)
            print(f"\nTotal {total:.0f} s; peak RSS {peak:.2f} GiB ({device_name(torch.device('cpu'))}, "
                  f"{torch.get_num_threads()} threads).")
            write_json(args.output, payload)
        else:
            write_json_atomic({"environment": environment(), **payload}, args.output, default=str)

    phases = Phases(on_phase=report)
    try:
        results["base"] = phases.run("build_base", build_base, shape, base, args.seed)

        # Stage 1: train_sft's steps, one phase each.
        processor = load_processor(base, labels, min_pixels=shape.min_pixels, max_pixels=shape.max_pixels)
        sft_data = image_dataset(random_images(args.sft_images, sft_size, seed=args.seed), labels)
        instructions = build_instruction_dataset(sft_data, processor, kinds=["categorical", "conversation"],
                                                 generator=CannedAnswers(), cache_path=work / "answers.jsonl",
                                                 show_progress=False)
        sft_args = SFTStageConfig(
            output_dir=str(merged_root), model_name_or_path=str(base), use_peft=True, load_in_4bit=True,
            max_steps=args.sft_steps, per_device_train_batch_size=1, logging_steps=1, save_strategy="no",
            disable_tqdm=True, seed=args.seed, bf16=dtype == torch.bfloat16, use_cpu=True,
            instruction_kinds=["categorical", "conversation"])
        trainer = phases.run("sft_load_4bit", build_sft_trainer, instructions, processor, sft_args)
        import bitsandbytes as bnb

        results["sft"] = {"rows": len(instructions), "kinds": sorted(set(instructions["kind"])),
                          "linear4bit_modules": sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules()),
                          "trainable_parameters": sum(p.numel() for p in trainer.model.parameters()
                                                      if p.requires_grad),
                          "image_size": list(sft_size), "compute_dtype": str(dtype).removeprefix("torch.")}
        output = phases.run("sft_steps", trainer.train)
        results["sft"].update(steps=output.global_step, train_loss=output.training_loss)
        merged = phases.run("sft_merge", save_merged, trainer, processor, sft_args, merged_root)
        results["sft"]["merged_bytes"] = _folder_bytes(merged)
        del trainer
        shutil.rmtree(base)  # the merged model is what every later stage reads

        counts = dict(zip(SPLITS, args.feature_images))
        splits = {split: image_dataset(random_images(n, feature_size, seed=args.seed + 10 + i), labels)
                  for i, (split, n) in enumerate(counts.items())}
        features = phases.run("features", compute_features, merged, labels, splits, work, shape, dtype, args.seed)
        caches = features["caches"]
        results["features"] = {"images": counts, "image_size": list(feature_size), **features["info"]}

        config = EmoVLMKDConfig.from_label_set(labels, vlm_config=Qwen2VLForConditionalGeneration.config_class
                                               .from_pretrained(merged).to_dict(),
                                               head_hidden_dims=shape.head_hidden_dims)
        head, results["distill"] = phases.run("distill", train_head, caches, config, work, args.seed,
                                              args.distill_epochs)
        gate, results["gate"] = phases.run("gate", fit_gate, caches, head, config, work, args.seed, args.gate_epochs)
        results["export"] = phases.run("export", export, merged, labels, head, gate, final, shape,
                                       args.max_shard_size)
        shutil.rmtree(merged_root)

        classifier, results["reload_4bit"] = phases.run("reload_4bit", load_4bit_pipeline, final, dtype)
        test_images = list(splits["test"]["image"])
        predictions = phases.run("classify", classifier, test_images, top_k=len(labels))
        results["classify"] = {"images": len(test_images),
                               "top1": [prediction[0]["label"] for prediction in predictions],
                               "scores_sum": [round(sum(p["score"] for p in prediction), 4)
                                              for prediction in predictions]}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    report(complete=True)
    return payload

if __name__ == "__main__":
    main()
