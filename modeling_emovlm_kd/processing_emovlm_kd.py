# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD processing: robust image input, the three instruction formats, and the classification prompt."""

import ast
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

CONVERSATION_PROMPT = "Describe the key elements of this image that shape the feeling it conveys."
REASONING_PROMPT = (
    "Describe the process of inferring the emotion this image evokes: which elements you notice, "
    "what they suggest, and how they lead to the emotion."
)


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, animated) as an 8-bit RGB image; alpha over white."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """Open a path, PIL image or numpy array as RGB; errors name the offending file.

    With `max_pixels`, a large JPEG is decoded at a reduced scale (still at least `max_pixels`), so memory stays
    bounded by what the model will see; PIL's decompression-bomb guard stays in force.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image file not found: {path}")
        try:
            with Image.open(path) as opened:
                if max_pixels and opened.width * opened.height > 4 * max_pixels:
                    scale = (max_pixels / (opened.width * opened.height)) ** 0.5
                    opened.draft("RGB", (max(1, int(opened.width * scale)), max(1, int(opened.height * scale))))
                opened.load()
                return to_rgb(opened)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"Cannot read image file {path}: {err}") from err
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        array = _to_uint8(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels-first
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"Cannot interpret an array of shape {image.shape} as an image.")
        return to_rgb(Image.fromarray(array))
    raise TypeError(f"Expected an image path, a PIL image or a numpy array, got {type(image).__name__}.")


class EmoVLMKDImageProcessor(Qwen2VLImageProcessorPil):
    """Qwen2-VL's image processor that also takes paths, any PIL mode and 8/16-bit arrays."""

    def preprocess(self, images, **kwargs):
        return super().preprocess(self.load_images(images), **kwargs)

    def load_images(self, images):
        """Paths, PIL images or arrays (nested lists kept) as RGB PIL images, decoded no larger than needed."""
        # Batched chat templates pass one list of images per sample: keep the nesting, load the leaves.
        if isinstance(images, (list, tuple)):
            return [self.load_images(image) for image in images]
        return load_image(images, max_pixels=getattr(self.size, "longest_edge", None))


class EmoVLMKDProcessor(Qwen2VLProcessor):
    r"""
    Qwen2-VL image processor and tokenizer, plus the label set, the categorical prompt and the answer format.

    Builds the three instruction formats of EmoVLM-KD as chat messages (categorical, conversation, reasoning),
    parses categorical answers, and writes the classification prompt's token ids into a model config.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        labels=None,
        categorical_prompt=None,
        answer_prefix="{'emotion': '",
        answer_suffix="'}",
        **kwargs,
    ):
        self.labels = list(labels) if labels is not None else None
        self.categorical_prompt = categorical_prompt
        self.answer_prefix = answer_prefix
        self.answer_suffix = answer_suffix
        # No video processor: this model classifies images, and Qwen2-VL's video processor needs torchvision.
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, image_processor, tokenizer, config, chat_template=None):
        """A processor speaking the prompt and label set of an `EmoVLMKDConfig`."""
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template or getattr(tokenizer, "chat_template", None),
            labels=config.labels,
            categorical_prompt=config.categorical_prompt,
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
        """User: image + "describe the key elements"; assistant: a free-form description."""
        return self._messages(image, CONVERSATION_PROMPT, answer)

    def reasoning_messages(self, image=None, answer: str | None = None):
        """User: image + "describe the process of inferring the emotion"; assistant: the reasoning."""
        return self._messages(image, REASONING_PROMPT, answer)

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
        shared = 0
        while all(len(ids) > shared + 1 and ids[shared] == full[0][shared] for ids in full):
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
        """Write the label set, prompt and prompt token ids into an `EmoVLMKDConfig` (in place)."""
        config.id2label = dict(enumerate(self.labels))
        config.label2id = {label: i for i, label in enumerate(self.labels)}
        config.categorical_prompt = self.categorical_prompt
        config.answer_prefix = self.answer_prefix
        config.answer_suffix = self.answer_suffix
        config.prompt_token_ids = self.prompt_token_ids()
        return config


__all__ = ["EmoVLMKDImageProcessor", "EmoVLMKDProcessor", "load_image", "to_rgb"]
