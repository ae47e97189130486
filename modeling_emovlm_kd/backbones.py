# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""The one place that knows how the supported vision-language backbones differ.

EmoVLM-KD wraps a Qwen VLM: Qwen2-VL (the paper's), Qwen2.5-VL or Qwen3-VL. Which one is read from the wrapped
config's `model_type` alone (the recipe's base model decides it); everything that differs between them is a field
of its `Backbone` entry here, and the rest of the project asks this registry instead of naming a family. Adding a
fourth family is one more entry (and its tests).

What the three share in transformers 5.23 (and so needs no field): the image processor (`Qwen2VLImageProcessorPil`,
which the model package subclasses, with different defaults per family), `get_image_features(pixel_values,
image_grid_thw)` whose `pooler_output` holds each image's merged tokens, and the language model taking those
encoder outputs back through `mm_encoder_outputs` (Qwen3-VL's carry its deepstack features, which the language
model adds at the visual positions of its first layers: passing the whole output keeps label scores equal to the
full-sequence log-likelihood).

Nothing here imports torch or transformers models: the configuration imports this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Image normalisation of the Qwen2-VL / Qwen2.5-VL processors (OpenAI CLIP's) and of Qwen3-VL's (0.5 everywhere).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Backbone:
    r"""How one VLM family is wired.

    Attributes:
        model_type: The wrapped config's `model_type` (`qwen2_vl`, ...): the registry key.
        name: The family's name, for messages and docs.
        image_processor_defaults: Keyword arguments of the family's image processor that differ from Qwen2-VL's
            (its published `preprocessor_config.json`): patch size and normalisation. A checkpoint's own file wins.
        full_precision_modules: Patterns of the modules kept out of 4-bit quantisation (`llm_int8_skip_modules`):
            the label scores come from `lm_head`, and the visual mergers map the vision tower into the LLM's space.
            transformers 5 matches a pattern from the start of a module's name (as a regular expression, up to a
            `.`) or as its suffix, so a bare `"merger"` would match no Linear (`model.visual.merger.mlp.0`):
            patterns of nested modules say `(?:.*\.)?`.
        lora_exclude_modules: Regular expression (peft's `exclude_modules`) of the modules LoRA never adapts: the
            vision tower, whose attention is a fused `qkv`, so LoRA on `q_proj`/`k_proj`/`v_proj` is the LLM's only.
        patch_embedding: Dotted path, under the VLM's inner model, of the vision tower's patch embedding.
        no_split_modules: Blocks `device_map="auto"` must keep on one device.
    """

    model_type: str
    name: str
    image_processor_defaults: dict = field(default_factory=dict)
    full_precision_modules: tuple[str, ...] = ("lm_head", r"(?:.*\.)?merger")
    lora_exclude_modules: str = r"(?:.*\.)?visual(?:\..*)?"
    patch_embedding: str = "visual.patch_embed.proj"
    no_split_modules: tuple[str, ...] = ()

    def num_image_tokens(self, vlm_config, image_grid_thw) -> list[int]:
        """Merged visual tokens each image's `(t, h, w)` patch grid gives in the language model's sequence."""
        merge = vlm_config.vision_config.spatial_merge_size
        return (image_grid_thw.prod(-1) // merge**2).tolist()

    def rope_index(self, vlm, input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
        """`(3, batch, length)` M-RoPE positions of prompts holding images (the model's own `get_rope_index`)."""
        position_ids, _ = vlm.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return position_ids

    def lora_kwargs(self, target_modules) -> dict:
        """peft `LoraConfig` arguments adapting `target_modules` (names such as `q_proj`) in the LLM only."""
        return {"target_modules": list(target_modules), "exclude_modules": self.lora_exclude_modules}

    def skip_modules(self, extra=()) -> list[str]:
        """`llm_int8_skip_modules` for a 4-bit load: `extra` (e.g. the EmoVLM-KD head and gate) and this family's."""
        return [*extra, *(m for m in self.full_precision_modules if m not in extra)]


BACKBONES: dict[str, Backbone] = {
    backbone.model_type: backbone
    for backbone in (
        Backbone(
            model_type="qwen2_vl", name="Qwen2-VL",
            image_processor_defaults={"patch_size": 14, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
            no_split_modules=("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"),
        ),
        Backbone(
            model_type="qwen2_5_vl", name="Qwen2.5-VL",
            image_processor_defaults={"patch_size": 14, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
            no_split_modules=("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
        ),
        Backbone(
            # Qwen3-VL: 16-pixel patches, so 32x32 pixels per merged token; deepstack mergers next to the merger.
            model_type="qwen3_vl", name="Qwen3-VL",
            image_processor_defaults={"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
            full_precision_modules=("lm_head", r"(?:.*\.)?merger", r"(?:.*\.)?deepstack_merger_list"),
            no_split_modules=("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"),
        ),
    )
}
DEFAULT_MODEL_TYPE = "qwen2_vl"


def get_backbone(config_or_type) -> Backbone:
    """The entry for a VLM config (or its `model_type`); a `ValueError` naming the supported types otherwise."""
    model_type = config_or_type if isinstance(config_or_type, str) or config_or_type is None else getattr(
        config_or_type, "model_type", None)
    if isinstance(config_or_type, dict):
        model_type = config_or_type.get("model_type")
    if model_type not in BACKBONES:
        raise ValueError(
            f"Unsupported VLM backbone model_type {model_type!r}: EmoVLM-KD supports "
            + ", ".join(f"{b.model_type} ({b.name})" for b in BACKBONES.values())
            + ". Add an entry to modeling_emovlm_kd/backbones.py for another family."
        )
    return BACKBONES[model_type]


__all__ = ["BACKBONES", "Backbone", "DEFAULT_MODEL_TYPE", "get_backbone"]
