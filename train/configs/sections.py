"""The recipe's own sections: which data, which base models, who writes the instruction answers, the fused model's
options. Each is a dataclass parsed by `HfArgumentParser`; `python -m train recipe --help` lists their fields."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from modeling_emovlm_kd.configuration_emovlm_kd import (
    DEFAULT_CONVERSATION_PROMPT,
    DEFAULT_REASONING_PROMPT,
    GATE_TYPES,
    POOLING_TYPES,
    PROMPT_KEYS,
    EmoVLMKDConfig,
)

# The models a run starts from unless its recipe names others: the paper's (train/configs/base_models.py).
from train.configs.base_models import DEFAULT_TEACHER, DEFAULT_VLM

# `EmoVLMKDConfig`'s defaults (a dataclass): the model section's options that go into the config default to them.
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EmoVLMKDConfig)}
_CONFIG_FIELDS: list[str] = []  # the fields made by `_config_field`, in order


def _config_field(name: str, help_text: str):
    """A recipe field of the fused model's config, with the config's default."""
    default = _CONFIG_DEFAULTS[name]
    _CONFIG_FIELDS.append(name)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class DataSection:
    """Which loader of `train/infra/data.py` reads the images, and its options (only those of that loader)."""

    kind: str = field(metadata={"help": "emoset, fi, emotion6, flickr, instagram, imagefolder or hub."})
    root: str | None = field(default=None, metadata={"help": "Folder of the data set (relative to the working dir)."})
    split_file: str | None = field(
        default=None, metadata={"help": "JSON of the seeded split; read if it exists, written otherwise. "
                                        "`null` puts it in the run folder (split.json)."})
    label_file: str | None = field(default=None, metadata={"help": "flickr/instagram: the vote file."})
    image_dir: str | None = field(default=None, metadata={"help": "flickr/instagram: image folder under root."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the split (defaults to the loader's, 42)."})
    fractions: list[float] | None = field(default=None, metadata={"help": "Train/validation/test fractions."})
    name_or_path: str | None = field(default=None, metadata={"help": "hub: `datasets.load_dataset` name or path."})
    image_column: str | None = field(default=None, metadata={"help": "hub: the image column."})
    label_column: str | None = field(default=None, metadata={"help": "hub: the label column."})
    load_kwargs: dict | None = field(default=None, metadata={"help": "hub: more `load_dataset` arguments."})


@dataclass
class BaseModelsSection:
    """The models the run starts from."""

    vlm: str = field(default=DEFAULT_VLM, metadata={
        "help": "Base VLM (Hub id or folder): a Qwen2-VL, Qwen2.5-VL or Qwen3-VL; its config.json picks the backbone."})
    teacher: str = field(default=DEFAULT_TEACHER, metadata={"help": "Base image classifier."})
    tiny: bool = field(default=False, metadata={"help": "Build tiny random base models offline (train/infra/tiny.py)."})


@dataclass
class InstructionsSection:
    """Who writes the conversation and reasoning answers of stage 1 (the categorical ones need nobody)."""

    generator: str = field(default="none", metadata={"help": "openai (any OpenAI-compatible endpoint), local "
                                                             "(the base VLM itself) or none."})
    base_url: str | None = field(default=None, metadata={"help": "openai: endpoint (or EMOVLM_OPENAI_BASE_URL)."})
    model: str | None = field(default=None, metadata={"help": "openai: model name (or EMOVLM_OPENAI_MODEL)."})
    api_key: str | None = field(default=None, metadata={"help": "openai: API key (better: OPENAI_API_KEY). Never "
                                                                "stored in results, reports or model cards."})
    timeout: float | None = field(default=None, metadata={"help": "openai: seconds per request."})
    max_retries: int | None = field(default=None, metadata={"help": "openai: retries of a failed request."})
    temperature: float | None = field(default=None, metadata={"help": "openai: sampling temperature."})
    max_tokens: int | None = field(default=None, metadata={"help": "openai: longest answer."})
    max_image_size: int | None = field(default=None, metadata={"help": "openai: longer side of the sent image."})
    num_workers: int | None = field(default=None, metadata={"help": "openai: requests in flight at once "
                                                                   "(default 8)."})
    requests_per_minute: float | None = field(default=None, metadata={"help": "openai: most requests per minute, "
                                                                             "evenly spaced (unset: no limit)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "local: longest answer."})
    batch_size: int | None = field(default=None, metadata={"help": "local: images per batched generate (default 8 "
                                                                  "on a GPU, 1 on CPU)."})

    # The options each generator takes (the others must be left unset).
    OPTIONS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "openai": ("base_url", "model", "api_key", "timeout", "max_retries", "temperature", "max_tokens",
                   "max_image_size", "requests_per_minute", "num_workers"),
        "local": ("max_new_tokens", "batch_size"),
        "none": (),
    }
    DEFAULT_NUM_WORKERS: typing.ClassVar[int] = 8

    def __post_init__(self):
        for name in ("num_workers", "batch_size", "max_retries", "max_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "max_retries" else 1):
                raise ValueError(f"{name} must be at least {0 if name == 'max_retries' else 1}, got {value}.")
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, got {self.requests_per_minute}.")

    def generator_kwargs(self) -> dict[str, Any]:
        """The generator's constructor arguments (`num_workers` is the stage's, not the generator's)."""
        return {name: getattr(self, name) for name in self.OPTIONS[self.generator]
                if name != "num_workers" and getattr(self, name) is not None}

    def workers(self) -> int:
        """Requests in flight at once: a remote endpoint serves many; a local model answers one call at a time."""
        if self.generator != "openai":
            return 1
        return self.num_workers if self.num_workers is not None else self.DEFAULT_NUM_WORKERS


@dataclass
class ModelSection:
    """Options of the fused model (saved in its config) and of how the frozen VLM runs for the feature caches."""

    # The fused model's options: `EmoVLMKDConfig`'s fields, with its defaults.
    head_hidden_dims: list[int] = _config_field("head_hidden_dims", "Head MLP widths.")
    head_activation: str = _config_field("head_activation", "Activation between the head's layers.")
    head_dropout: float = _config_field("head_dropout", "Dropout inside the head.")
    pooling: str = _config_field("pooling", f"Pooling of the merged visual tokens: {' or '.join(POOLING_TYPES)}.")
    gate_type: str = _config_field("gate_type", f"One of {', '.join(GATE_TYPES)}.")
    gate_vlm_signal: str = _config_field("gate_vlm_signal", "What the gate sees of the VLM: one_hot (the paper) or "
                                                            "probs.")
    gate_head_signal: str = _config_field("gate_head_signal", "What the gate sees of the head: probs (the paper) or "
                                                              "logits (the authors' code).")
    gate_num_experts: int = _config_field("gate_num_experts", "Experts of the moe gate.")
    categorical_prompt: str | None = _config_field(
        "categorical_prompt", "Stage 1's categorical instruction, also the prompt the fused model scores labels "
        "after. Unset: the paper's wording for the run's labels (classes listed alphabetically, the first as the "
        "example).")
    conversation_prompt: str | None = _config_field(
        "conversation_prompt", f"Stage 1's conversation instruction. Unset: the paper's {DEFAULT_CONVERSATION_PROMPT!r}")
    reasoning_prompt: str | None = _config_field(
        "reasoning_prompt", f"Stage 1's reasoning instruction. Unset: the paper's {DEFAULT_REASONING_PROMPT!r}")
    load_in_4bit: bool = field(default=False, metadata={"help": "Feature caches: run the VLM in 4-bit NF4."})
    dtype: str = field(default="auto", metadata={"help": "Feature caches: dtype of the VLM (auto, bfloat16, ...)."})
    feature_batch_size: int = field(default=8, metadata={"help": "Feature caches: images per forward."})
    preprocess_workers: int = field(default=0, metadata={
        "help": "Feature caches: DataLoader worker processes that decode and preprocess the next batches while the "
                "model runs (0: in the main process, one batch at a time). Changes speed, never the caches."})
    min_pixels: int | None = field(default=None, metadata={
        "help": "Smallest image area (pixels) every image is resized to (unset: the base model's processor's)."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Largest image area (pixels) every image is resized to, so at most max_pixels/784 visual tokens "
                "per image; applied identically by stage 1, the caches, the export, predict and the app (unset: the "
                "base model's processor's, 12.8 MP for Qwen2-VL: up to 16,384 tokens)."})
    export_max_shard_size: str = field(default="5GB", metadata={
        "help": "Export: largest safetensors shard of final/ (the Hub serves shards with an index)."})

    # The instructions (the model package's `PROMPT_KEYS`): stage 1 trains on them, the caches and export score
    # after the categorical one, and every checkpoint's config stores all three.
    PROMPT_KEYS: typing.ClassVar[tuple[str, ...]] = PROMPT_KEYS
    # The options that go into `EmoVLMKDConfig` (the others only say how the caches are computed): its fields here.
    CONFIG_KEYS: typing.ClassVar[tuple[str, ...]]

    def __post_init__(self):
        if self.feature_batch_size < 1:
            raise ValueError(f"feature_batch_size must be at least 1, got {self.feature_batch_size}.")
        if self.preprocess_workers < 0:
            raise ValueError(f"preprocess_workers must be at least 0, got {self.preprocess_workers}.")

    def config_kwargs(self, explicit: dict) -> dict[str, Any]:
        """The config options the recipe sets (unset ones keep `EmoVLMKDConfig`'s defaults)."""
        return {key: explicit[key] for key in self.CONFIG_KEYS if key in explicit}

    def processor_kwargs(self, explicit: dict) -> dict[str, Any]:
        """The prompts (unset ones are the paper's wording, filled in by `EmoVLMKDConfig`) and the resolution bounds
        the recipe sets: what `train.infra.assemble.load_processor` takes."""
        return {key: explicit[key] for key in (*self.PROMPT_KEYS, "min_pixels", "max_pixels") if key in explicit}


ModelSection.CONFIG_KEYS = tuple(_CONFIG_FIELDS)


__all__ = ["BaseModelsSection", "DataSection", "InstructionsSection", "ModelSection"]
