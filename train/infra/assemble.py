"""Put an EmoVLM-KD model together from a (tuned) Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, and save it as a
Hub-ready folder.

    model, processor = assemble("runs/demo/sft/merged", labels="mikels8")
    save_hub_folder(model, processor, "runs/demo/final")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, BitsAndBytesConfig

import modeling_emovlm_kd
from modeling_emovlm_kd import (
    FRONT_DOOR_FILES,
    EmoVLMKDConfig,
    EmoVLMKDForImageClassification,
    EmoVLMKDImageProcessor,
    EmoVLMKDProcessor,
    register_for_auto_class,
    resolve_label_set,
)
from modeling_emovlm_kd.backbones import DEFAULT_MODEL_TYPE, get_backbone
from modeling_emovlm_kd.configuration_emovlm_kd import PROMPT_KEYS
from modeling_emovlm_kd.loading_emovlm_kd import TRAINED_MODULES
from modeling_emovlm_kd.loading_emovlm_kd import quantization_config as four_bit_config
from train.infra.files import public_json

# Modules that stay in full precision when the VLM is loaded in 4 bits (`loading_emovlm_kd.py`).
FULL_PRECISION_MODULES = get_backbone(DEFAULT_MODEL_TYPE).skip_modules(TRAINED_MODULES)


def quantization_config(load_in_4bit: bool, compute_dtype: torch.dtype = torch.bfloat16,
                        model_type: str = DEFAULT_MODEL_TYPE) -> BitsAndBytesConfig | None:
    """The one 4-bit configuration (`loading_emovlm_kd.quantization_config`), or `None` for a full-precision model;
    `model_type` (the VLM config's) names the backbone whose modules stay in full precision."""
    if not load_in_4bit:
        return None
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    # FSDP shards flat parameters of one dtype: store the 4-bit weights in the compute dtype (peft's recipe).
    return four_bit_config(compute_dtype, model_type, quant_storage=compute_dtype if fsdp else torch.uint8)


def load_processor(
    vlm_path: str | Path,
    labels,
    categorical_prompt: str | None = None,
    conversation_prompt: str | None = None,
    reasoning_prompt: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> EmoVLMKDProcessor:
    """An `EmoVLMKDProcessor` from a Qwen2-VL-family checkpoint's tokenizer and image processor, for a label set.

    The prompts (the recipe's `model.*_prompt`) go through `EmoVLMKDConfig`, so an unset one is the config's default
    (the paper's wording for these labels), the same text that stage 1 trains on and the fused model scores.
    `min_pixels`/`max_pixels` (the recipe's `model.min_pixels`/`model.max_pixels`) bound the resolution each image
    is resized to, and so its number of visual tokens (one per 28x28 pixels after merging); unset, the checkpoint's
    own bounds apply. Stage 1 saves this processor with its merged model, so the caches, the export (and through
    it `predict`, `pipeline()` and the app) resize exactly as stage 1 trained.
    """
    labels = resolve_label_set(labels)
    config = EmoVLMKDConfig.from_label_set(labels, categorical_prompt=categorical_prompt,
                                           conversation_prompt=conversation_prompt, reasoning_prompt=reasoning_prompt)
    tokenizer = AutoTokenizer.from_pretrained(vlm_path)
    image_processor = EmoVLMKDImageProcessor.from_pretrained(vlm_path)
    if min_pixels or max_pixels:
        size = {"shortest_edge": min_pixels or image_processor.size.shortest_edge,
                "longest_edge": max_pixels or image_processor.size.longest_edge}
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels ({size['shortest_edge']}) is larger than max_pixels "
                             f"({size['longest_edge']}).")
        image_processor = EmoVLMKDImageProcessor.from_pretrained(vlm_path, size=size)
    try:
        vlm_config = AutoConfig.from_pretrained(vlm_path)
    except (OSError, ValueError):
        vlm_config = None  # a folder of tokenizer and image processor only: no vision tower to check against
    if vlm_config is not None:
        check_patch_size(image_processor, vlm_config, vlm_path)
    return EmoVLMKDProcessor.from_config(image_processor, tokenizer, config)


def check_patch_size(image_processor, vlm_config, vlm_path) -> None:
    """The image processor must cut the patches the vision tower embeds (14 pixels for Qwen2/2.5-VL, 16 for
    Qwen3-VL): another size would fail deep inside the model, or silently change what it sees."""
    processor_patch, model_patch = image_processor.patch_size, vlm_config.vision_config.patch_size
    if processor_patch != model_patch:
        raise ValueError(
            f"{Path(vlm_path) / 'preprocessor_config.json'} has patch_size {processor_patch}, but the "
            f"{get_backbone(vlm_config).name} vision tower of {Path(vlm_path) / 'config.json'} embeds "
            f"{model_patch}-pixel patches (vision_config.patch_size); use the image processor saved with the model."
        )


def assemble(
    vlm_path: str | Path,
    labels,
    load_in_4bit: bool = False,
    dtype: torch.dtype | str = "auto",
    device_map=None,
    **config_kwargs,
) -> tuple[EmoVLMKDForImageClassification, EmoVLMKDProcessor]:
    """Wrap a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint with freshly initialised distillation head and gate."""
    named = labels if isinstance(labels, str) else None
    processor_kwargs = {key: config_kwargs.pop(key) for key in (*PROMPT_KEYS, "min_pixels", "max_pixels")
                        if key in config_kwargs}
    processor = load_processor(vlm_path, labels, **processor_kwargs)
    vlm_config = AutoConfig.from_pretrained(vlm_path)
    config = EmoVLMKDConfig.from_label_set(named or processor.labels, vlm_config=vlm_config.to_dict(), **config_kwargs)
    processor.prepare_config(config)
    # Build the wrapper on the meta device so no random 7B VLM is ever allocated, then load the real one.
    with torch.device("meta"):
        model = EmoVLMKDForImageClassification(config)
    model.vlm = AutoModelForImageTextToText.from_pretrained(
        vlm_path,
        dtype=dtype,
        device_map=device_map,
        quantization_config=quantization_config(load_in_4bit, model_type=vlm_config.model_type),
    )
    model.config.vlm_config = model.vlm.config
    device = model.vlm.get_input_embeddings().weight.device
    for module in (model.distillation_head, model.gate):
        module.to_empty(device=device)
        module.apply(model._init_weights)
    return model, processor


def _make_world_readable(folder: Path) -> None:
    """`mkdtemp` makes a private (0700) folder; a saved model is meant to be read by anyone: 0755 folders, 0644
    files, as `save_pretrained` into a plain folder gives."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _clean_killed_save(output_dir: Path) -> None:
    """Remove what a save of `output_dir` killed mid-way left: its staging folders `.<name>.<random>`, and the
    previous model moved aside as `.<name>.old` (put back first when `output_dir` itself is gone, so that the last
    complete model stays in place should this save fail too)."""
    backup = output_dir.with_name(f".{output_dir.name}.old")
    if backup.is_dir() and not output_dir.exists():
        os.replace(backup, output_dir)
    for leftover in output_dir.parent.glob(f".{output_dir.name}.*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def save_hub_folder(model: EmoVLMKDForImageClassification, processor: EmoVLMKDProcessor, output_dir,
                    max_shard_size: str | int = "5GB") -> Path:
    """Save weights (safetensors, in shards of at most `max_shard_size` with an index, as the Hub serves them),
    config with `auto_map`, remote-code files and processor, atomically.

    The folder is written next to its destination and renamed into place, so an interrupted save never leaves
    a folder that loads with wrong or partial weights; what a killed save left beside it is removed by the next.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_killed_save(output_dir)
    register_for_auto_class(model.config)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        # transformers records where each config was loaded from; for a run's model that is a local folder
        # (`<run>/sft/merged`), which means nothing elsewhere and must not be published.
        if (public := public_json(staging / "config.json")) is not None:
            (staging / "config.json").write_bytes(public)
        processor.save_pretrained(staging)
        # The pipeline class named by `config.custom_pipelines` is not an Auto class: copy its files by hand.
        for name in FRONT_DOOR_FILES:
            shutil.copy2(Path(modeling_emovlm_kd.__file__).parent / name, staging / name)
        _make_world_readable(staging)
        if output_dir.exists():
            backup = output_dir.with_name(f".{output_dir.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(output_dir, backup)
            os.replace(staging, output_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


__all__ = ["FULL_PRECISION_MODULES", "assemble", "check_patch_size", "load_processor", "quantization_config",
           "save_hub_folder"]
