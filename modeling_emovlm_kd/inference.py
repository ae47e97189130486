# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""Batched, error-tolerant inference on image files: the one path behind `train predict` and the demo app.

Shipped with every checkpoint (the modeling file imports it), so the app, which imports only the checkpoint's remote
code, and `train predict` run the same code: per-file decoding errors (unreadable, too large for the processor's
`max_image_pixels`, not an image), one forward pass per batch, the one-at-a-time retry when a batch fails (so only
the bad image gets an error), and each image's branch outputs: fused, VLM and head logits and the model output's
`branch_weights`.

    batch = prepare_batch(image_processor, paths)   # CPU only: what DataLoader workers run
    results = classify(model, image_processor, batch)  # one ImageResult per path, in order
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# What a batch the processor or the model cannot take raises; the batch is then retried one image at a time.
BATCH_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)


@dataclass
class PreparedBatch:
    """A batch decoded and preprocessed on the CPU: `images[i]` is None where decoding failed with `errors[i]`;
    `inputs` is the processor's output for the decoded images, or `failure` the processor's error."""

    paths: list
    images: list
    errors: list
    inputs: Any = None
    failure: BaseException | None = None


@dataclass
class ImageResult:
    """One file's outcome: its `error`, or the model's float32 CPU outputs for it (`logits` fused by the gate,
    `vlm_logits` the VLM's label log-likelihoods, `head_logits`, `branch_weights` [vlm, head] summing to 1)."""

    path: str
    error: str | None = None
    logits: torch.Tensor | None = None
    vlm_logits: torch.Tensor | None = None
    head_logits: torch.Tensor | None = None
    branch_weights: torch.Tensor | None = None

    def probabilities(self, which: str = "logits") -> torch.Tensor:
        """Softmax of `logits`, `vlm_logits` or `head_logits`."""
        return getattr(self, which).softmax(-1)

    def row(self, id2label: dict, top_k: int) -> dict:
        """The row `train predict` writes: path, error (None when classified), the fused label, its probability
        and the `top_k` labels, and the VLM's and the head's own labels."""
        row = {"path": self.path, "error": self.error}
        if self.error is not None:
            return row
        top = self.probabilities().topk(min(top_k, len(id2label)))
        return {
            **row,
            "label": id2label[int(top.indices[0])],
            "score": round(float(top.values[0]), 6),
            "top_k": [{"label": id2label[int(k)], "score": round(float(v), 6)} for v, k in zip(top.values, top.indices)],
            "vlm_label": id2label[int(self.vlm_logits.argmax())],
            "head_label": id2label[int(self.head_logits.argmax())],
        }


def load_image(image_processor, path: str):
    """(decoded image, None), or (None, the error naming `path`) for a file the processor cannot decode."""
    try:
        return image_processor.load_images(path), None
    except (OSError, ValueError, TypeError) as err:
        return None, f"{type(err).__name__}: {err}"


def prepare_batch(image_processor, paths: Sequence[str]) -> PreparedBatch:
    """Decode and preprocess a batch on the CPU: per-file decoding errors, and the processor's output for the
    decoded images or the error that made the processor refuse the batch."""
    loaded = [load_image(image_processor, path) for path in paths]
    batch = PreparedBatch(list(paths), [image for image, _ in loaded], [error for _, error in loaded])
    good = [image for image in batch.images if image is not None]
    if good:
        try:
            batch.inputs = image_processor(good, return_tensors="pt")
        except BATCH_ERRORS as err:
            batch.failure = err
    return batch


def forward(model, inputs) -> list[dict]:
    """The model's outputs for preprocessed images, one forward pass, split per image (float32, CPU)."""
    out = model(**inputs.to(model.get_input_embeddings().weight.device))
    fields = ("logits", "vlm_logits", "head_logits", "branch_weights")
    outputs = {name: getattr(out, name).detach().float().cpu() for name in fields}
    return [{name: outputs[name][i] for name in fields} for i in range(len(outputs["logits"]))]


@torch.inference_mode()
def classify(model, image_processor, batch: PreparedBatch) -> list[ImageResult]:
    """One `ImageResult` per path of a prepared batch. A batch the processor or the model refuses is retried one
    image at a time, so only the image at fault gets an error (naming its path) and the others are classified."""
    results = [ImageResult(path, error) for path, error in zip(batch.paths, batch.errors)]
    good = [i for i, image in enumerate(batch.images) if image is not None]
    if not good:
        return results
    try:
        if batch.failure is not None:
            raise batch.failure
        outputs = forward(model, batch.inputs)
    except BATCH_ERRORS as err:
        logger.warning("A batch of %d images failed (%s: %s); classifying them one at a time.", len(good),
                       type(err).__name__, err)
        outputs = []
        for i in good:
            try:
                outputs.append(forward(model, image_processor([batch.images[i]], return_tensors="pt"))[0])
            except BATCH_ERRORS as single:
                outputs.append({"error": f"{type(single).__name__}: cannot classify {batch.paths[i]}: {single}"})
    for i, output in zip(good, outputs):
        for name, value in output.items():
            setattr(results[i], name, value)
    return results


def classify_files(model, image_processor, paths: Sequence[str], batch_size: int = 8) -> list[ImageResult]:
    """`prepare_batch` and `classify` over `paths` in batches of `batch_size`: one result per path, in order."""
    results = []
    for start in range(0, len(paths), batch_size):
        results += classify(model, image_processor, prepare_batch(image_processor, paths[start : start + batch_size]))
    return results


__all__ = ["BATCH_ERRORS", "ImageResult", "PreparedBatch", "classify", "classify_files", "forward", "load_image",
           "prepare_batch"]
