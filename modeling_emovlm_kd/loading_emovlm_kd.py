# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""How an EmoVLM-KD checkpoint is loaded and which files are images: defined once, shipped with every checkpoint.

`train predict`, the app, the Inference Endpoints handler, model assembly and the data loaders all read these, so a
checkpoint loads the same way behind every door. The app and the handler import nothing from the project: they
take `load_pipeline` from the checkpoint's own copy of this file, through transformers' remote-code loader
(`get_class_from_dynamic_module("loading_emovlm_kd.load_pipeline", path)`), as `pipeline()` takes the pipeline class.

    classifier = load_pipeline("runs/demo/final", dtype="bfloat16", load_in_4bit=True)
    classifier(["a.jpg", "b.png"], batch_size=8, top_k=3)   # the front door: `pipeline_emovlm_kd.py`

Only `torch`, `transformers` and the payload's `backbones.py` are imported; importing defines names only.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from transformers import AutoConfig, BitsAndBytesConfig, pipeline

from .backbones import DEFAULT_MODEL_TYPE, get_backbone

# `--dtype` names; "auto" is bfloat16 on a GPU that has it, else float32 (the head and the gate stay float32 always:
# the model class keeps them out of other dtypes and of quantisation).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The modules EmoVLM-KD trains besides the VLM: tiny, kept out of 4-bit quantisation (bitsandbytes' CPU kernels also
# need Linear input sizes that are multiples of 64).
TRAINED_MODULES = ("distillation_head", "gate")

# Files of a folder that are images to classify or train on (by suffix, case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Image formats PIL cannot decode (vector graphics, HEIF): skipped with their own reason, not as non-images.
UNSUPPORTED_IMAGE_SUFFIXES = (".svg", ".svgz", ".heic", ".heif")
# Why a folder entry is not an image to read (`skip_reason`).
SKIP_REASONS = ("broken_symlink", "symlink_loop", "unreadable", "not_a_file", "unsupported_image_format",
                "non_image_file")


def skip_reason(path: str | os.PathLike) -> str | None:
    """Why a folder entry is not an image to read, one of `SKIP_REASONS`, or None when it is one (a symlink to an
    image is one). Sub-folders are `not_a_file`: walkers that recurse skip them without reporting."""
    path = Path(path)
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink_loop"
        return "broken_symlink" if path.is_symlink() else "unreadable"
    if not path.is_file():
        return "not_a_file"
    suffix = path.suffix.lower()
    if suffix in UNSUPPORTED_IMAGE_SUFFIXES:
        return "unsupported_image_format"
    return None if suffix in IMAGE_SUFFIXES else "non_image_file"


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The weights' dtype for a name of `DTYPES` (or a dtype); `auto`/None: bfloat16 on a CUDA `device` (default: the
    first GPU, if any) that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_gpu = str(device).startswith("cuda") if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def quantization_config(compute_dtype: torch.dtype = torch.bfloat16, model_type: str = DEFAULT_MODEL_TYPE,
                        quant_storage: torch.dtype = torch.uint8) -> BitsAndBytesConfig:
    """The one 4-bit configuration: QLoRA's NF4 with double quantisation, computing in `compute_dtype`, with the
    modules EmoVLM-KD trains and the backbone's own (`lm_head`, the visual mergers: `backbones.py`) in full
    precision. `quant_storage` is the packed weights' dtype (FSDP wants the compute dtype)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=get_backbone(model_type).skip_modules(TRAINED_MODULES),
    )


def loading_kwargs(device: str | torch.device | None = None, revision: str | None = None,
                   dtype: str | torch.dtype | None = "auto", device_map: str | dict | None = None,
                   load_in_4bit: bool = False, model_type: str = DEFAULT_MODEL_TYPE) -> dict:
    """`from_pretrained` arguments for a checkpoint as users load it: a pinned `revision`, the weights' dtype
    (`resolve_dtype`), an accelerate `device_map` (e.g. "auto"), or the VLM in 4 bits (`quantization_config` for
    the checkpoint's backbone `model_type`, placed on `device` unless a device map says otherwise)."""
    weights = resolve_dtype(dtype, device)
    kwargs = {"dtype": weights}
    if revision:
        kwargs["revision"] = revision
    if device_map:
        kwargs["device_map"] = device_map
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(weights, model_type)
        kwargs.setdefault("device_map", {"": str(device or ("cuda" if torch.cuda.is_available() else "cpu"))})
    return kwargs


def load_pipeline(model: str | os.PathLike, revision: str | None = None, dtype: str | torch.dtype | None = "auto",
                  device: str | torch.device | None = None, device_map: str | dict | None = None,
                  load_in_4bit: bool = False, **pipeline_kwargs):
    """`pipeline("image-classification", model, trust_remote_code=True)` loaded with `loading_kwargs`: the
    checkpoint's own `EmoVLMKDImageClassificationPipeline`, on `device` (default: the first GPU, else the CPU) unless
    `device_map` or 4-bit weights place it. `pipeline_kwargs` go to `pipeline()` (e.g. `image_processor=`)."""
    model = os.fspath(model)
    model_type = DEFAULT_MODEL_TYPE
    if load_in_4bit:  # the modules kept in full precision are the checkpoint's backbone's
        config = AutoConfig.from_pretrained(model, trust_remote_code=True, revision=revision)
        model_type = get_backbone(config.vlm_config).model_type
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = loading_kwargs(device, revision, dtype, device_map, load_in_4bit, model_type)
    placement = {"device_map": kwargs.pop("device_map")} if "device_map" in kwargs else {"device": device}
    quantization = {"quantization_config": kwargs.pop("quantization_config")} if load_in_4bit else {}
    return pipeline("image-classification", model=model, trust_remote_code=True, model_kwargs=quantization,
                    **kwargs, **placement, **pipeline_kwargs)


__all__ = ["DTYPES", "IMAGE_SUFFIXES", "SKIP_REASONS", "TRAINED_MODULES", "UNSUPPORTED_IMAGE_SUFFIXES", "load_pipeline",
           "loading_kwargs", "quantization_config", "resolve_dtype", "skip_reason"]
