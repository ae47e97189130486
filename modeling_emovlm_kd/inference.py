# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""The engine of the inference front door (`pipeline_emovlm_kd.py`), shipped with every checkpoint.

- `prepare`: one input (a path, image bytes, a PIL image, an array, or an http(s)/data URL) decoded by the
  checkpoint's image processor (bounded memory, `max_image_pixels`), as a batch of one; an input that cannot be
  read (unreadable, not an image, too large, a shape the model refuses) becomes an error naming it, not an exception.
- `classify`: one forward pass for the batch's readable images; a batch the model refuses is retried one image at
  a time, so only the image at fault gets an error. Outputs per image: the fused `logits`, the VLM's label
  log-likelihoods `vlm_logits`, `head_logits` and `branch_weights`, float32 on the CPU.
- `answer`: one image's outputs in the image-classification task format (see `pipeline_emovlm_kd.py`).
"""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image

logger = logging.getLogger(__name__)

# What reading one image may raise: decoding errors, the processor's refusals (size, aspect ratio), bad input types.
IMAGE_ERRORS = (ValueError, TypeError, OSError, SyntaxError, MemoryError, Image.DecompressionBombError)
# What a batch the model cannot take raises; the batch is then classified one image at a time.
BATCH_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)
OUTPUTS = ("logits", "vlm_logits", "head_logits", "branch_weights")


def _message(error: BaseException, image) -> str:
    """An error as one line naming the input when it is a file path (the processor's messages usually do)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(image, (str, os.PathLike)) and os.fspath(image) not in text:
        text = f"{os.fspath(image)}: {text}"
    return text


def _patch_width(image_processor) -> int:
    """Values per flattened patch of the processor's `pixel_values` (channels x temporal x patch x patch)."""
    return 3 * image_processor.temporal_patch_size * image_processor.patch_size**2


def failed(image_processor, error: str) -> dict:
    """A prepared input that could not be read: no patches, and its error."""
    return {"pixel_values": torch.zeros(0, _patch_width(image_processor)),
            "image_grid_thw": torch.zeros(0, 3, dtype=torch.long), "error": error}


def prepare(image_processor, image, timeout: float | None = None) -> dict:
    """`{"pixel_values": (patches, D), "image_grid_thw": (1, 3), "error": None}` for one input, or `failed(...)`.

    Paths and bytes are decoded by the checkpoint's processor (the header is checked against `max_image_pixels`
    before decoding; large JPEGs decode at reduced scale); http(s) and `data:` URLs are fetched or decoded by
    transformers' `load_image`, as the stock pipeline does.
    """
    try:
        if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
            from transformers.image_utils import load_image

            image = load_image(image, timeout=timeout)
        if isinstance(image, (bytearray, memoryview)):
            image = bytes(image)
        inputs = image_processor(images=os.fspath(image) if isinstance(image, os.PathLike) else image,
                                 return_tensors="pt")
    except IMAGE_ERRORS as error:
        return failed(image_processor, _message(error, image))
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"], "error": None}


def split(batch: dict) -> list[dict]:
    """The readable images of a batch (prepared inputs collated by the pipeline: patches and grids concatenated,
    one error per input), one `{"pixel_values", "image_grid_thw"}` each, in order."""
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    return [{"pixel_values": patches, "image_grid_thw": grid[None]}
            for patches, grid in zip(batch["pixel_values"].split(sizes), batch["image_grid_thw"])]


def errors_of(batch: dict) -> list[str | None]:
    """One error (None: readable) per input of a batch, or of a single prepared input."""
    return list(batch["error"]) if isinstance(batch["error"], (list, tuple)) else [batch["error"]]


def forward(model, inputs: dict) -> dict:
    """The model's outputs for readable images, one forward pass, as float32 CPU tensors `(images, ...)`."""
    device = model.get_input_embeddings().weight.device
    out = model(pixel_values=inputs["pixel_values"].to(device), image_grid_thw=inputs["image_grid_thw"].to(device))
    return {name: getattr(out, name).detach().float().cpu() for name in OUTPUTS}


def classify(model, batch: dict) -> dict:
    """Outputs for every input of a batch: `(inputs, ...)` tensors (zero rows where an input failed) and `error`.

    The readable images go through one forward pass; if the model refuses the batch, each image is retried alone
    and only the one at fault gets an error.
    """
    errors = errors_of(batch)
    good = [i for i, error in enumerate(errors) if error is None]
    num_labels = model.config.num_labels
    outputs = {name: torch.zeros(len(errors), 2 if name == "branch_weights" else num_labels) for name in OUTPUTS}
    outputs["error"] = errors
    if not good:
        return outputs
    try:
        rows = forward(model, batch)
        for name in OUTPUTS:
            outputs[name][good] = rows[name]
    except BATCH_ERRORS as error:
        logger.warning("A batch of %d images failed (%s: %s); classifying them one at a time.", len(good),
                       type(error).__name__, error)
        for i, single in zip(good, split(batch)):
            try:
                row = forward(model, single)
            except BATCH_ERRORS as alone:
                errors[i] = f"cannot classify this image: {_message(alone, None)}"
                continue
            for name in OUTPUTS:
                outputs[name][i] = row[name][0]
    return outputs


def answer(outputs: dict, id2label: dict, top_k: int, scores: torch.Tensor | None = None) -> list[dict]:
    """One image's outputs (`(1, ...)` rows, or one row) in the task format: `top_k` elements `{label, score,
    vlm_score, head_score, vlm_log_likelihood}` by fused score, the first also carrying `vlm`, `head` and
    `branch_weights` (and `explanation*` when present); or `[{label: None, score: None, error}]`.

    `scores` are the fused scores to rank by (default: the softmax of the fused logits)."""
    error = outputs.get("error")
    error = error[0] if isinstance(error, (list, tuple)) else error
    if error is not None:
        return [{"label": None, "score": None, "error": error}]
    row = {name: outputs[name].reshape(-1, outputs[name].shape[-1])[0].float() for name in OUTPUTS}
    fused = (row["logits"].softmax(-1) if scores is None else scores.reshape(-1)).tolist()
    vlm, head = row["vlm_logits"].softmax(-1), row["head_logits"].softmax(-1)
    order = sorted(range(len(fused)), key=lambda i: fused[i], reverse=True)[: min(top_k, len(fused))]
    elements = [{"label": id2label[i], "score": fused[i], "vlm_score": float(vlm[i]), "head_score": float(head[i]),
                 "vlm_log_likelihood": float(row["vlm_logits"][i])} for i in order]
    weights = row["branch_weights"].tolist()
    elements[0].update({
        "vlm": {"label": id2label[int(vlm.argmax())], "score": float(vlm.max())},
        "head": {"label": id2label[int(head.argmax())], "score": float(head.max())},
        "branch_weights": {"vlm": weights[0], "head": weights[1]},
    })
    for key in ("explanation", "explanation_tokens", "explanation_truncated"):
        if key in outputs:
            value = outputs[key]
            elements[0][key] = value[0] if isinstance(value, (list, tuple)) else value
    return elements


__all__ = ["BATCH_ERRORS", "IMAGE_ERRORS", "OUTPUTS", "answer", "classify", "errors_of", "failed",
           "forward", "prepare", "split"]
