# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face Inference Endpoints custom handler of an EmoVLM-KD repository (`handler.py` at its top level).

An endpoint imports `EndpointHandler` from this file, builds it once with the repository's local folder and calls it
with each request's deserialised body:

    {"inputs": IMAGE, "parameters": {"top_k": 3}}

IMAGE is raw bytes (a request sent as `Content-Type: image/...`), base64 text, a `data:image/...;base64,` URI or a
PIL image, or a list of these (at most `max_images`: the constructor's argument, else `EMOVLM_MAX_IMAGES`, default
16). Strings are image data only: the handler never opens a path on the endpoint's disk (a path, a missing path and
`/etc/passwd` get the same answer) and never downloads a URL.

The answer is the image-classification task format, what `InferenceClient.image_classification` parses: for one
image, its `top_k` labels best first (default 5; `null`: every label)

    [{"label": "amusement", "score": 0.91, "vlm_score": 0.88, "head_score": 0.52, "vlm_log_likelihood": -0.13,
      "vlm": {"label": "amusement", "score": 0.88}, "head": {"label": "awe", "score": 0.6},
      "branch_weights": {"vlm": 0.73, "head": 0.27}},
     {"label": "awe", "score": 0.05, "vlm_score": 0.02, "head_score": 0.3, "vlm_log_likelihood": -4.1}, ...]

`score` is the fused (gate's) probability; every element also has the VLM's and the head's probability of its
label, and the first element each branch's own label and how much each drove the decision. For a list, one such
answer per image, in order; an image of a list that cannot be read answers `[{"label": null, "score": null,
"error": "inputs[i]: ..."}]` and the others are classified. A single bad image, a bad parameter or too many images
fail the request with a `ValueError` naming the input or the parameter.

Parameters: `top_k`; `function_to_apply` (`softmax`, `sigmoid`, `none`: applied to the fused logits for `score`);
`explain` (true: also the VLM's reasoning answer for each image, `explanation` on its first element: one generation
per image, much slower than classifying) with `max_new_tokens` (at most the endpoint's cap: the constructor's
argument, else `EMOVLM_MAX_NEW_TOKENS`, default 128; that cap is also the default).

The model loads with the repository's own code (`trust_remote_code=True`): its `loading_emovlm_kd.load_pipeline`
builds its `pipeline("image-classification")`, the same front door `train predict` and the app use; on a GPU it
runs in bfloat16 where supported (`EMOVLM_DTYPE=float32|bfloat16|float16` overrides). Only `transformers` and `PIL`
are imported here, and importing this file only defines the class. Images are decoded by the checkpoint's image
processor, which refuses images over its `max_image_pixels` before decoding, so memory stays bounded for any input.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

from PIL import Image
from transformers.dynamic_module_utils import get_class_from_dynamic_module

PARAMETERS = ("top_k", "function_to_apply", "explain", "max_new_tokens")
FUNCTIONS = ("softmax", "sigmoid", "none")  # function_to_apply, as the task's `ImageClassificationOutputTransform`
DEFAULT_TOP_K = 5
DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_NEW_TOKENS = 128
NOT_IMAGE_DATA = ("is not base64-encoded image data: send the image's bytes, base64 or a data:image/...;base64 URI "
                  "(this endpoint never opens a path or downloads a URL)")


class EndpointHandler:
    """`EndpointHandler(path)(data)`: EmoVLM-KD's fused labels with scores, with each branch's, per image."""

    def __init__(self, path: str = ".", device: str | None = None, max_images: int | None = None,
                 max_new_tokens: int | None = None, **loading):
        """`loading`: further options of the checkpoint's `load_pipeline` (`revision`, `dtype`, `device_map`,
        `load_in_4bit`) for servers that build the handler themselves (`emovlm-kd serve`); an endpoint passes none,
        and `dtype` is then `EMOVLM_DTYPE` or auto."""
        self.max_images = _limit("max_images", max_images, "EMOVLM_MAX_IMAGES", DEFAULT_MAX_IMAGES)
        self.max_new_tokens = _limit("max_new_tokens", max_new_tokens, "EMOVLM_MAX_NEW_TOKENS",
                                     DEFAULT_MAX_NEW_TOKENS)
        # The repository's own loading code (its remote code, as `pipeline()` loads its pipeline class).
        load_pipeline = get_class_from_dynamic_module("loading_emovlm_kd.load_pipeline", path,
                                                      revision=loading.get("revision"))
        loading.setdefault("dtype", os.environ.get("EMOVLM_DTYPE", "").lower() or "auto")
        self.classifier = load_pipeline(path, device=device, **loading)
        self.model = self.classifier.model
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def __call__(self, data: dict[str, Any]) -> list:
        request = self.read(data)
        if request.images:
            request.fill(self.classifier(list(request.images.values()), batch_size=len(request.images),
                                         **request.options))
        return request.answer()

    def read(self, data: dict[str, Any]) -> Request:
        """A request body checked and decoded, before classification: its pipeline options, its images by position
        and an error entry for each input that is not image data. `ValueError` naming the input or parameter at
        fault for a malformed request (`TooManyImages` over `max_images`). Servers that batch requests together
        (`emovlm-kd serve`) classify `Request.images` themselves and call `fill` and `answer`."""
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('Send {"inputs": <image bytes, base64 text or data URI>, "parameters": {"top_k": k}}.')
        options = self.options(data.get("parameters") or {})
        inputs = data["inputs"]
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("inputs is an empty list: send at least one image.")
        if len(items) > self.max_images:
            raise TooManyImages(f"inputs holds {len(items)} images; this endpoint takes at most {self.max_images} "
                                "per request (EMOVLM_MAX_IMAGES): send several requests.")
        request = Request(single, ["inputs"] if single else [f"inputs[{i}]" for i in range(len(items))], options)
        for i, (item, name) in enumerate(zip(items, request.names)):
            try:
                request.images[i] = self.image(item, name)
            except ValueError as error:
                request.answers[i] = [{"label": None, "score": None, "error": str(error)}]
        return request

    def options(self, parameters: dict) -> dict:
        """The pipeline's options for a request's `parameters`, or a `ValueError` naming the one at fault."""
        if not isinstance(parameters, dict):
            raise ValueError(f"parameters must be an object, not {type(parameters).__name__}.")
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"parameters.{unknown[0]} is not a parameter of this endpoint; use {', '.join(PARAMETERS)}.")
        top_k = parameters.get("top_k", DEFAULT_TOP_K)
        if top_k is None:
            top_k = len(self.labels)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"parameters.top_k must be a whole number of at least 1 (or null), got {top_k!r}.")
        options = {"top_k": top_k}
        function = parameters.get("function_to_apply")
        if function is not None:
            if not isinstance(function, str) or function.lower() not in FUNCTIONS:
                raise ValueError(f"parameters.function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}.")
            options["function_to_apply"] = function.lower()
        explain = parameters.get("explain", False)
        if not isinstance(explain, bool):
            raise ValueError(f"parameters.explain must be true or false, got {explain!r}.")
        if explain:
            tokens = parameters.get("max_new_tokens")
            tokens = self.max_new_tokens if tokens is None else tokens
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= self.max_new_tokens:
                raise ValueError(f"parameters.max_new_tokens must be a whole number from 1 to {self.max_new_tokens} "
                                 f"(this endpoint's cap, EMOVLM_MAX_NEW_TOKENS), got {tokens!r}.")
            options.update(explain=True, max_new_tokens=tokens)
        return options

    @staticmethod
    def image(item, name: str = "inputs") -> Image.Image | bytes:
        """A PIL image as it is; bytes, base64 text and data URIs as the bytes they hold; anything else fails with a
        `ValueError` naming the input `name` (never saying whether a string names a file)."""
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, str):
            text = item.strip()
            if "://" in text[:16]:
                raise ValueError(f"{name} is a URL; this endpoint does not download: send the image's bytes or base64.")
            if text.startswith("data:"):
                header, _, text = text.partition(",")
                if not header.endswith(";base64"):
                    raise ValueError(f"{name} is a data URI without ;base64 encoding.")
            try:
                data = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{name} {NOT_IMAGE_DATA}") from None
        else:
            raise ValueError(f"{name} must be image bytes, base64 text, a data URI or a PIL image, not "
                             f"{type(item).__name__}.")
        if not data:
            raise ValueError(f"{name} is empty (0 bytes), not an image.")
        return data


class TooManyImages(ValueError):
    """A request holds more images than the endpoint takes (`max_images`)."""


class Request:
    """One request between `EndpointHandler.read` and its answer: `images` (position -> image data) to classify,
    `options` for the pipeline, and the answers so far (error entries of inputs that are not image data)."""

    def __init__(self, single: bool, names: list[str], options: dict):
        self.single, self.names, self.options = single, names, options
        self.images: dict[int, Image.Image | bytes] = {}
        self.answers: list = [None] * len(names)

    def fill(self, classified: list) -> None:
        """Take the pipeline's answers for `images`, in their order; an error entry gets the input's name."""
        for i, answer in zip(self.images, classified):
            if answer[0].get("error") is not None:
                answer = [{**answer[0], "error": f"{self.names[i]}: {answer[0]['error']}"}]
            self.answers[i] = answer

    def answer(self) -> list:
        """The response body: one image's answer, or one answer per image of a list; a single image that could not
        be classified raises its error as a `ValueError`."""
        if self.single:
            if self.answers[0][0].get("error") is not None:
                raise ValueError(self.answers[0][0]["error"])
            return self.answers[0]
        return self.answers


def _limit(name: str, value: int | None, variable: str, default: int) -> int:
    """A positive cap: the constructor's `value`, else the environment `variable`, else `default`."""
    value = value if value is not None else os.environ.get(variable) or default
    try:
        value = int(value)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"{name} ({variable}) must be a whole number of at least 1.")
    return value
