# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face Inference Endpoints custom handler of an EmoVLM-KD repository (`handler.py` at its top level).

An endpoint imports `EndpointHandler` from this file, builds it once with the repository's local folder and calls it
with each request's deserialised body:

    {"inputs": IMAGE, "parameters": {"top_k": 3}}

IMAGE is raw bytes, a base64 string (optionally a `data:image/...;base64,` URI), a PIL image (what the endpoint's
toolkit hands over for a request sent as `Content-Type: image/...`), the path of a file on the endpoint's own disk,
or a list of these. URLs are refused: the handler never downloads anything. The answer for one image is

    {"fused": [{"label": "amusement", "score": 0.91}, ...],    # the gate's prediction, top_k labels, best first
     "vlm": {"label": "amusement", "score": 0.88},             # the VLM's label (softmax of its label scores)
     "head": {"label": "awe", "score": 0.52}}                  # the distilled head's label

and a list of those, in order, for a list. `top_k` (default 5, at most the number of labels; `null`: all labels)
counts the fused labels returned. Unreadable inputs raise `ValueError` naming `inputs[i]`.

The model loads with `trust_remote_code=True` from the folder, i.e. with this repository's own code; on a GPU it
runs in bfloat16 where supported (`EMOVLM_DTYPE=float32|bfloat16|float16` overrides). Only `torch`, `transformers`
and `PIL` are imported, and importing this file only defines the class. Bytes are written to a temporary file and
decoded by the checkpoint's image processor, which refuses images over its `max_image_pixels` before decoding and
shrinks each image to what the model sees as soon as it is decoded, so memory stays bounded for any input.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

DEFAULT_TOP_K = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EndpointHandler:
    """`EndpointHandler(path)(data)`: EmoVLM-KD's fused labels with scores, and each branch's label."""

    def __init__(self, path: str = ".", device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES.get(os.environ.get("EMOVLM_DTYPE", "").lower())
        if dtype is None and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        kwargs = {"dtype": dtype} if dtype is not None else {}
        self.model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True, **kwargs)
        self.model.to(self.device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def __call__(self, data: dict[str, Any]) -> dict | list[dict]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('Send {"inputs": <image bytes, base64 string or path>, "parameters": {"top_k": k}}.')
        top_k = self.top_k((data.get("parameters") or {}).get("top_k", DEFAULT_TOP_K))
        inputs = data["inputs"]
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("inputs is an empty list: send at least one image.")
        with tempfile.TemporaryDirectory(prefix="emovlm-handler-") as folder:
            images, names = [], {}
            for index, item in enumerate(items):
                image = self.image(item, f"inputs[{index}]" if not single else "inputs")
                if isinstance(image, bytes):
                    path = os.path.join(folder, f"input-{index}")
                    with open(path, "wb") as file:
                        file.write(image)
                    names[path] = f"inputs[{index}]" if not single else "inputs"
                    image = path
                images.append(image)
            try:
                batch = self.image_processor(images, return_tensors="pt")
            except (ValueError, OSError) as error:
                message = str(error)
                for path, name in names.items():  # name the request's input, not a temporary file
                    message = message.replace(path, name)
                raise ValueError(message) from None
        with torch.inference_mode():
            output = self.model(pixel_values=batch["pixel_values"].to(self.device),
                                image_grid_thw=batch["image_grid_thw"].to(self.device))
        fused = output.logits.float().softmax(-1).cpu()
        vlm = output.vlm_logits.float().softmax(-1).cpu()
        head = output.head_logits.float().softmax(-1).cpu()
        answers = [
            {"fused": self.ranked(fused[i], top_k), "vlm": self.ranked(vlm[i], 1)[0],
             "head": self.ranked(head[i], 1)[0]}
            for i in range(len(items))
        ]
        return answers[0] if single else answers

    def top_k(self, value) -> int:
        if value is None:
            return len(self.labels)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"parameters.top_k must be a whole number of at least 1 (or null), got {value!r}.")
        return min(value, len(self.labels))

    def ranked(self, probabilities: torch.Tensor, k: int) -> list[dict]:
        scores, indices = probabilities.topk(k)
        return [{"label": self.labels[i], "score": float(s)} for s, i in zip(scores.tolist(), indices.tolist())]

    @staticmethod
    def image(item, name: str) -> Image.Image | str | bytes:
        """A PIL image or an existing file's path as they are; bytes and base64 text as bytes; anything else fails."""
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, str):
            text = item.strip()
            if "://" in text[:16]:
                raise ValueError(f"{name} is a URL; this endpoint does not download: send the image's bytes or "
                                 "base64 instead.")
            if text.startswith("data:"):
                header, _, text = text.partition(",")
                if not header.endswith(";base64"):
                    raise ValueError(f"{name} is a data URI without ;base64 encoding.")
            elif os.path.isfile(text):
                return text
            try:
                data = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{name} is neither base64-encoded image data nor an existing file.") from None
        else:
            raise ValueError(f"{name} must be image bytes, a base64 string or a file path, not {type(item).__name__}.")
        if not data:
            raise ValueError(f"{name} is empty (0 bytes), not an image.")
        return data
