# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD processing: robust image input, the three instruction formats, and the classification prompt."""

import ast
import io
import os
from collections.abc import Callable

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorKwargs,
    Qwen2VLImageProcessorPil,
    smart_resize,
)
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from .configuration_emovlm_kd import DEFAULT_CONVERSATION_PROMPT, DEFAULT_REASONING_PROMPT, default_categorical_prompt

# Images whose decoded size would exceed this many pixels are refused before decoding (a JPEG counts at the
# reduced scale it is decoded at). 150 Mpixel is 450 MB as 8-bit RGB; PIL's own decompression-bomb guard
# (`PIL.Image.MAX_IMAGE_PIXELS`, twice that refuses) stays in force above it.
DEFAULT_MAX_IMAGE_PIXELS = 150_000_000
# Modes that `Image.resize` cannot downscale well (palette indices, 1-bit) or at all (palette + alpha): converted
# to a full-colour mode before shrinking.
_CONVERT_BEFORE_RESIZE = {"1": "L", "P": None, "PA": "RGBA"}
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

TargetSize = Callable[[int, int], tuple[int, int]]


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit integer and float pixel data to 8 bits instead of clipping it."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    array = array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0 and array.min() >= 0.0:
        return np.round(array * 255).astype(np.uint8)
    top = 65535.0 if array.size and array.max() > 255 else 255.0
    return np.round(np.clip(array, 0, top) * (255.0 / top)).astype(np.uint8)


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def _to_rgb(image: Image.Image, owned: bool) -> Image.Image:
    """`to_rgb`; with `owned`, `image` may be changed in place and returned (no copy of an RGB image)."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    if _orientation(image) != 1:
        if owned:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image, owned = ImageOps.exif_transpose(image), True
    if image.mode in _HIGH_BIT_MODES:
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image if owned else image.copy()
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, animated) as an 8-bit RGB image; alpha over white."""
    return _to_rgb(image, owned=False)


def scaled_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, to at most `max_pixels` pixels (unchanged if already smaller)."""
    if height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def _check_pixels(size: tuple[int, int], max_image_pixels: int | None, name: str) -> None:
    width, height = size
    if max_image_pixels and width * height > max_image_pixels:
        raise ValueError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.1f} Mpixel), more than the "
            f"{max_image_pixels / 1e6:.1f} Mpixel this image processor accepts (`max_image_pixels`)."
        )


def _shrink(image: Image.Image, size: tuple[int, int] | None, resample: int) -> Image.Image:
    """`image` resized to `size` (height, width) if that is smaller; the full-size image is released right away.

    The result is a new image (or `image` itself when it is already small enough), EXIF orientation kept.
    """
    if size is None or (size[0] >= image.height and size[1] >= image.width) or image.size == size[::-1]:
        return image
    orientation = _orientation(image)
    if image.mode in _CONVERT_BEFORE_RESIZE:
        target = _CONVERT_BEFORE_RESIZE[image.mode] or ("RGBA" if "transparency" in image.info else "RGB")
        image = image.convert(target)
    # A reduction by 6 or more per side first averages integer blocks (`reduce`), then resamples: as sharp, several
    # times faster for huge images, and identical to a plain `resize` for smaller reductions. (`reduce` has no
    # 16-bit modes.)
    small = image.resize(size[::-1], resample, reducing_gap=None if image.mode.startswith("I;16") else 3.0)
    if orientation != 1 and _orientation(small) != orientation:  # e.g. TIFF tags, which `resize` does not carry
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        small.info["exif"] = exif.tobytes()
    return small


def _open(path, fit: TargetSize | None, max_image_pixels: int | None, resample: int,
          name: str | None = None) -> Image.Image:
    """Decode one file (a path or a binary file object named `name`), at most one full-size copy at a time: header
    check, JPEG draft, decode, shrink."""
    with Image.open(path) as opened:
        if getattr(opened, "is_animated", False):
            opened.seek(0)
        # Orientation swaps height and width, never the pixel count: the target is computed on the stored size.
        size = fit(opened.height, opened.width) if fit else None
        if size is not None and opened.format == "JPEG":
            # JPEG decodes at 1/2, 1/4 or 1/8 scale, still at least the target size.
            opened.draft(opened.mode if opened.mode in ("RGB", "L") else None, size[::-1])
        _check_pixels(opened.size, max_image_pixels, name or f"Image file {path}")
        opened.load()
        return _to_rgb(_shrink(opened, size, resample), owned=True)


def load_image(
    image,
    max_pixels: int | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    target_size: TargetSize | None = None,
    resample: int = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Open a path, image bytes (an encoded file), PIL image or numpy array as RGB; errors name the offending file.

    Memory stays bounded by what the model will see: the size is read from the file's header first (an image
    over `max_image_pixels` is refused before decoding), a large JPEG is decoded at reduced scale, and the decoded
    image is shrunk right away to `target_size(height, width)` (or to `max_pixels` pixels, aspect kept), before
    any mode conversion. PIL's decompression-bomb guard stays in force.
    """
    fit = target_size or ((lambda h, w: scaled_size(h, w, max_pixels)) if max_pixels else None)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image file not found: {path}")
        try:
            return _open(path, fit, max_image_pixels, resample)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"Cannot read image file {path}: {err}") from err
    if isinstance(image, bytes):
        try:
            return _open(io.BytesIO(image), fit, max_image_pixels, resample, name=f"Image data ({len(image)} bytes)")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"Cannot read image data ({len(image)} bytes): {err}") from err
    if isinstance(image, np.ndarray):
        array = _to_uint8(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels-first
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"Cannot interpret an array of shape {image.shape} as an image.")
        image, owned = Image.fromarray(array), True
    elif isinstance(image, Image.Image):
        owned = False
    else:
        raise TypeError(f"Expected an image path, image bytes, a PIL image or a numpy array, got "
                        f"{type(image).__name__}.")
    name = f"An image of {image.width}x{image.height} pixels"
    _check_pixels(image.size, max_image_pixels, name)
    try:
        size = fit(image.height, image.width) if fit else None
    except ValueError as err:
        raise ValueError(f"{name} cannot be used: {err}") from err
    small = _shrink(image, size, resample)
    return _to_rgb(small, owned=owned or small is not image)


class EmoVLMKDImageProcessorKwargs(Qwen2VLImageProcessorKwargs, total=False):
    r"""
    max_image_pixels (`int`, *optional*, defaults to 150,000,000):
        Images whose decoded size would exceed this many pixels are refused before they are decoded.
    """

    max_image_pixels: int


class EmoVLMKDImageProcessor(Qwen2VLImageProcessorPil):
    """Qwen2-VL's image processor that also takes paths, any PIL mode and 8/16-bit arrays, in bounded memory.

    Each image is shrunk to the size the model will see as soon as it is decoded (JPEGs are decoded at reduced
    scale), so one full-size decoded image exists at a time; images over `max_image_pixels` are refused.
    """

    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    valid_kwargs = EmoVLMKDImageProcessorKwargs

    def preprocess(self, images, **kwargs):
        loading = {key: kwargs[key] for key in ("size", "patch_size", "merge_size", "max_image_pixels", "resample",
                                                "do_resize") if kwargs.get(key) is not None}
        if kwargs.get("min_pixels") or kwargs.get("max_pixels"):  # deprecated per-call overrides of `size`
            size = dict(loading.get("size") or {"shortest_edge": self.size.shortest_edge,
                                                "longest_edge": self.size.longest_edge})
            size["shortest_edge"] = kwargs.get("min_pixels") or size["shortest_edge"]
            size["longest_edge"] = kwargs.get("max_pixels") or size["longest_edge"]
            loading["size"] = size
        return super().preprocess(self.load_images(images, **loading), **kwargs)

    def target_size(self, height: int, width: int, size=None, patch_size=None, merge_size=None) -> tuple[int, int]:
        """The (height, width) `preprocess` resizes an image of this size to (Qwen2-VL's `smart_resize`)."""
        size = size if size is not None else self.size
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        factor = (patch_size or self.patch_size) * (merge_size or self.merge_size)
        return smart_resize(height, width, factor=factor, min_pixels=get("shortest_edge"),
                            max_pixels=get("longest_edge"))

    def load_images(self, images, size=None, patch_size=None, merge_size=None, max_image_pixels=None,
                    resample=None, do_resize=None):
        """Paths, PIL images or arrays (nested lists kept) as RGB PIL images, decoded no larger than needed.

        The keyword arguments override the processor's settings as they do for `preprocess`.
        """
        # Batched chat templates pass one list of images per sample: keep the nesting, load the leaves.
        if isinstance(images, (list, tuple)):
            return [self.load_images(image, size, patch_size, merge_size, max_image_pixels, resample, do_resize)
                    for image in images]
        do_resize = self.do_resize if do_resize is None else do_resize
        fit = (lambda h, w: self.target_size(h, w, size, patch_size, merge_size)) if do_resize else None
        return load_image(
            images,
            max_image_pixels=max_image_pixels if max_image_pixels is not None else self.max_image_pixels,
            target_size=fit,
            resample=resample if resample is not None else self.resample,
        )


class EmoVLMKDProcessor(Qwen2VLProcessor):
    r"""
    Qwen2-VL image processor and tokenizer, plus the label set, the three instructions and the answer format.

    Builds the three instruction formats of EmoVLM-KD as chat messages (categorical, conversation, reasoning),
    parses categorical answers, and writes the classification prompt's token ids into a model config. The prompts
    come from an `EmoVLMKDConfig` (`from_config`); left unset, each is the config's default (the paper's wording).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        labels=None,
        categorical_prompt=None,
        conversation_prompt=None,
        reasoning_prompt=None,
        answer_prefix="{'emotion': '",
        answer_suffix="'}",
        **kwargs,
    ):
        self.labels = list(labels) if labels is not None else None
        if categorical_prompt is None and self.labels:
            categorical_prompt = default_categorical_prompt(self.labels)
        self.categorical_prompt = categorical_prompt
        self.conversation_prompt = conversation_prompt if conversation_prompt is not None else DEFAULT_CONVERSATION_PROMPT
        self.reasoning_prompt = reasoning_prompt if reasoning_prompt is not None else DEFAULT_REASONING_PROMPT
        self.answer_prefix = answer_prefix
        self.answer_suffix = answer_suffix
        # No video processor: this model classifies images, and Qwen2-VL's video processor needs torchvision.
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, image_processor, tokenizer, config, chat_template=None):
        """A processor speaking the label set and the three prompts of an `EmoVLMKDConfig`."""
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template or getattr(tokenizer, "chat_template", None),
            labels=config.labels,
            categorical_prompt=config.categorical_prompt,
            conversation_prompt=getattr(config, "conversation_prompt", None),
            reasoning_prompt=getattr(config, "reasoning_prompt", None),
            answer_prefix=config.answer_prefix,
            answer_suffix=config.answer_suffix,
        )

    # ---- instruction formats ---------------------------------------------------------------------------

    def format_answer(self, label: str) -> str:
        if self.labels is not None and label not in self.labels:
            raise ValueError(f"Unknown label {label!r}; the label set is {self.labels}.")
        return f"{self.answer_prefix}{label}{self.answer_suffix}"

    def _messages(self, image, prompt: str, answer: str | None):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def categorical_messages(self, image=None, label: str | None = None):
        """User: image + the prompt listing the classes; assistant (if `label`): `{'emotion': '<label>'}`."""
        answer = self.format_answer(label) if label is not None else None
        return self._messages(image, self.categorical_prompt, answer)

    def conversation_messages(self, image=None, answer: str | None = None):
        """User: image + the conversation prompt ("describe key elements"); assistant: a free-form description."""
        return self._messages(image, self.conversation_prompt, answer)

    def reasoning_messages(self, image=None, answer: str | None = None):
        """User: image + the reasoning prompt ("describe the process of inferring the emotions"); assistant: the
        reasoning."""
        return self._messages(image, self.reasoning_prompt, answer)

    def parse_answer(self, text: str) -> str | None:
        """The label of a categorical answer such as `{'emotion': 'awe'}`, or `None` if it is not a valid one."""
        start, end = text.find("{"), text.find("}")
        if start < 0 or end < start:
            return None
        try:
            value = ast.literal_eval(text[start : end + 1])
        except (ValueError, SyntaxError):
            return None
        label = value.get("emotion") if isinstance(value, dict) else None
        if not isinstance(label, str) or (self.labels is not None and label not in self.labels):
            return None
        return label

    # ---- classification prompt -------------------------------------------------------------------------

    def classification_prompt(self) -> str:
        """The categorical prompt as the chat template renders it, ending with the forced answer prefix."""
        text = self.apply_chat_template(self.categorical_messages(), add_generation_prompt=True, tokenize=False)
        return text + self.answer_prefix

    def prompt_token_ids(self) -> dict:
        """Token ids that let the model score every label in one pass from pixels alone.

        The shared tokens of `prompt + label + suffix` over all labels form the prompt; the rest of each is that
        label's continuation. Tokenizing whole answers keeps the ids identical to what the model was trained on,
        even where a tokenizer merges across the prefix boundary.
        """
        if not self.labels:
            raise ValueError("The processor has no label set; pass `labels=`.")
        before, after = self.classification_prompt().split(self.image_token)
        before_ids = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        full = [
            self.tokenizer(after + label + self.answer_suffix, add_special_tokens=False)["input_ids"]
            for label in self.labels
        ]
        # The prompt is the tokens all answers share, but never past the text before the label: where every label
        # starts with the same token ("sad", "sadness"), that token is part of each label's score, not the prompt's.
        # (A tokenizer that merges across the prefix boundary still gets the merged token in the continuations.)
        prompt_ids = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        limit = next((i for i, (a, b) in enumerate(zip(prompt_ids, full[0])) if a != b),
                     min(len(prompt_ids), len(full[0])))
        shared = 0
        while shared < limit and all(len(ids) > shared + 1 and ids[shared] == full[0][shared] for ids in full):
            shared += 1
        continuations = [ids[shared:] for ids in full]
        for i, a in enumerate(continuations):
            for j, b in enumerate(continuations):
                if i != j and b[: len(a)] == a:
                    raise ValueError(
                        f"Labels {self.labels[i]!r} and {self.labels[j]!r} tokenize ambiguously after the prompt."
                    )
        return {
            "before_image": before_ids,
            "after_image": full[0][:shared],
            "label_continuations": continuations,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
        }

    def prepare_config(self, config):
        """Write the label set, the three prompts and the prompt token ids into an `EmoVLMKDConfig` (in place)."""
        config.id2label = dict(enumerate(self.labels))
        config.label2id = {label: i for i, label in enumerate(self.labels)}
        config.categorical_prompt = self.categorical_prompt
        config.conversation_prompt = self.conversation_prompt
        config.reasoning_prompt = self.reasoning_prompt
        config.answer_prefix = self.answer_prefix
        config.answer_suffix = self.answer_suffix
        config.prompt_token_ids = self.prompt_token_ids()
        return config


__all__ = ["EmoVLMKDImageProcessor", "EmoVLMKDProcessor", "load_image", "to_rgb"]
