# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD configuration: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL sub-config plus the label set, prompt and fusion
heads."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .backbones import DEFAULT_MODEL_TYPE, Backbone, get_backbone

# Label sets are named and ordered once, here. The order is the class index order of every checkpoint
# trained with them; nothing in this project derives an order from a directory listing.
LABEL_SETS = {
    # Mikels' eight emotions in EmoSet's published order (its info.json: the four positive, then the four negative);
    # FI publishes no class order, and is read in this one.
    "mikels8": ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"],
    # Emotion6: Ekman's six basic emotions, in the data set's ground-truth column order.
    "ekman6": ["anger", "disgust", "fear", "joy", "sadness", "surprise"],
    # Flickr and Instagram sentiment (majority of per-image votes).
    "binary": ["negative", "positive"],
}
DATASET_LABEL_SETS = {
    "emoset": "mikels8",
    "fi": "mikels8",
    "emotion6": "ekman6",
    "flickr": "binary",
    "instagram": "binary",
}

# The names of the gate registry `GATES` in `fusion.py`, in its order (a test checks they agree): written out here so
# that the configuration, which only names a gate, imports no torch module and the registry nothing from here.
GATE_TYPES = ("concat_linear", "moe", "bilinear", "dynamic_weighting", "cross_gating")
GATE_VLM_SIGNALS = ("one_hot", "probs")
GATE_HEAD_SIGNALS = ("probs", "logits")
POOLING_TYPES = ("mean", "max")


def check_gate_signals(vlm_signal: str, head_signal: str) -> None:
    """What the gate may see of each branch: the VLM's one-hot label or probabilities, the head's probabilities or
    logits. The config checks its `gate_*_signal` fields with it; the fusion, built without a config in stage 3,
    too."""
    if vlm_signal not in GATE_VLM_SIGNALS:
        raise ValueError(f"gate_vlm_signal must be one of {GATE_VLM_SIGNALS}, got {vlm_signal!r}.")
    if head_signal not in GATE_HEAD_SIGNALS:
        raise ValueError(f"gate_head_signal must be one of {GATE_HEAD_SIGNALS}, got {head_signal!r}.")

# The paper's three instructions (arXiv 2505.07164, Sec. 3.1), word for word. The authors' released code
# (sange1104/EmoVLM-KD, train_vlm.py) uses the same conversation and reasoning sentences, each followed by a worked
# "Example: ..." answer; its categorical instruction lists the classes as a Python list in directory order. The
# categorical template is filled by `default_categorical_prompt`: `count` classes, listed alphabetically (whatever
# the class index order), and the alphabetically first class as the example answer, written as the paper writes
# it (no space after the colon). The list reads "a, b, and c" (the paper's serial comma); two classes, which the
# paper never lists, read "negative and positive" (no comma: there is nothing to separate). The trained and scored
# answer stays `answer_prefix + label + answer_suffix`, `{'emotion': 'awe'}`.
DEFAULT_CATEGORICAL_PROMPT = (
    "Observe the image and select the emotion category that best matches this image from the following {count} "
    "categories: {labels}. Answer in dictionary form as follows: {example}"
)
DEFAULT_CONVERSATION_PROMPT = "Observe the image and describe key elements of the image."
DEFAULT_REASONING_PROMPT = "Observe the image and describe the process of inferring the emotions conveyed in the image."
# The config (and recipe) fields that hold the instructions.
PROMPT_KEYS = ("categorical_prompt", "conversation_prompt", "reasoning_prompt")


def list_classes(labels: list[str]) -> str:
    """`labels` alphabetically (case-insensitive), as prose: "a, b, and c"; two classes read "a and b"."""
    ordered = sorted(labels, key=lambda label: (label.casefold(), label))
    if len(ordered) <= 2:
        return " and ".join(ordered)
    return f"{', '.join(ordered[:-1])}, and {ordered[-1]}"


def default_categorical_prompt(labels: list[str]) -> str:
    """The paper's categorical instruction for a label set, e.g. for Mikels' eight emotions:

    "Observe the image and select the emotion category that best matches this image from the following 8
    categories: amusement, anger, awe, contentment, disgust, excitement, fear, and sadness. Answer in dictionary form
    as follows: {'emotion':'amusement'}"
    """
    labels = [str(label) for label in labels]
    first = min(labels, key=lambda label: (label.casefold(), label))
    return DEFAULT_CATEGORICAL_PROMPT.format(count=len(labels), labels=list_classes(labels),
                                             example=f"{{'emotion':'{first}'}}")


def resolve_label_set(label_set: str | list[str]) -> list[str]:
    """Return the ordered labels of a named set (`mikels8`, `ekman6`, `binary`, or a data set name) or a list."""
    if isinstance(label_set, str):
        name = DATASET_LABEL_SETS.get(label_set.lower(), label_set.lower())
        if name not in LABEL_SETS:
            known = sorted(LABEL_SETS) + sorted(DATASET_LABEL_SETS)
            raise ValueError(f"Unknown label set {label_set!r}; use one of {known} or pass a list of labels.")
        return list(LABEL_SETS[name])
    labels = [str(label) for label in label_set]
    if len(labels) < 2:
        raise ValueError(f"A label set needs at least two labels, got {labels}.")
    if len(set(labels)) != len(labels):
        raise ValueError(f"Labels must be unique, got {labels}.")
    return labels


@strict(accept_kwargs=True)
class EmoVLMKDConfig(PretrainedConfig):
    r"""
    Configuration of [`EmoVLMKDForImageClassification`]: a Qwen2-VL model whose visual features also feed a
    distillation head, with a gate fusing the VLM's label and the head's probabilities (arXiv 2505.07164).

    Args:
        vlm_config (`dict` or `PretrainedConfig`, *optional*):
            Configuration of the wrapped vision-language model: a `Qwen2VLConfig` (the default), `Qwen2_5_VLConfig`
            or `Qwen3VLConfig` (any `model_type` of `backbones.BACKBONES`; others are refused).
        label_set (`str`, *optional*, defaults to `"custom"`):
            Name of the label set (`mikels8`, `ekman6`, `binary` or `custom`); `id2label` holds the ordered labels.
        categorical_prompt (`str`, *optional*):
            The categorical instruction, with the class list already filled in. Defaults to the paper's wording for
            the labels (`default_categorical_prompt`): the class count, the classes listed alphabetically and the
            first of them as the example answer.
        conversation_prompt (`str`, *optional*):
            The conversation instruction of stage 1. Defaults to the paper's "Observe the image and describe key
            elements of the image."
        reasoning_prompt (`str`, *optional*):
            The reasoning instruction of stage 1. Defaults to the paper's "Observe the image and describe the process
            of inferring the emotions conveyed in the image."
        answer_prefix (`str`, *optional*, defaults to `"{'emotion': '"`):
            Forced start of the assistant's answer; label strings are scored right after it.
        answer_suffix (`str`, *optional*, defaults to `"'}"`):
            End of the answer; scored with each label so that a label that prefixes another is not favoured.
        prompt_token_ids (`dict`, *optional*):
            Token ids of the classification prompt, written by `EmoVLMKDProcessor.prepare_config`:
            `before_image`, `after_image` (ending with the answer prefix) and `label_continuations`.
        head_hidden_dims (`list[int]`, *optional*, defaults to `[1024]`):
            Hidden sizes of the distillation head's MLP.
        head_activation (`str`, *optional*, defaults to `"gelu"`):
            Activation between the head's layers (any key of `transformers.activations.ACT2FN`).
        head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before each of the head's linear layers but the first.
        pooling (`str`, *optional*, defaults to `"mean"`):
            How each image's merged visual tokens are pooled into one vector (`mean` or `max`).
        gate_type (`str`, *optional*, defaults to `"concat_linear"`):
            Fusion of the two branches (paper, Table 4): `concat_linear`, `moe`, `bilinear`, `dynamic_weighting`
            or `cross_gating`.
        gate_vlm_signal (`str`, *optional*, defaults to `"one_hot"`):
            What the gate sees of the VLM: the paper's one-hot of its label, or its label probabilities (`probs`).
        gate_head_signal (`str`, *optional*, defaults to `"probs"`):
            What the gate sees of the head: its probabilities (`probs`, the paper) or its raw logits (`logits`, what
            the authors' released code feeds the gate).
        gate_num_experts (`int`, *optional*, defaults to 3):
            Number of experts of the `moe` gate (3 in the authors' released code).

    Example:

    ```python
    >>> from modeling_emovlm_kd import EmoVLMKDConfig
    >>> config = EmoVLMKDConfig.from_label_set("mikels8")
    >>> config.num_labels, config.id2label[1]
    (8, 'awe')
    ```"""

    model_type = "emovlm_kd"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type=DEFAULT_MODEL_TYPE)}

    vlm_config: dict | PretrainedConfig | None = None
    label_set: str = "custom"
    categorical_prompt: str | None = None
    conversation_prompt: str | None = None
    reasoning_prompt: str | None = None
    answer_prefix: str = "{'emotion': '"
    answer_suffix: str = "'}"
    prompt_token_ids: dict | None = None
    head_hidden_dims: list[int] | tuple[int, ...] = (1024,)
    head_activation: str = "gelu"
    head_dropout: float = 0.1
    pooling: str = "mean"
    gate_type: str = "concat_linear"
    gate_vlm_signal: str = "one_hot"
    gate_head_signal: str = "probs"
    gate_num_experts: int = 3

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        get_backbone(self.vlm_config)  # refuses a VLM family backbones.py does not know, naming the known ones
        self.head_hidden_dims = [int(d) for d in self.head_hidden_dims]
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}.")
        check_gate_signals(self.gate_vlm_signal, self.gate_head_signal)
        if self.gate_num_experts < 1:
            raise ValueError(f"gate_num_experts must be at least 1, got {self.gate_num_experts}.")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {self.pooling!r}.")
        if self.problem_type is None:
            self.problem_type = "single_label_classification"
        if self.categorical_prompt is None:
            self.categorical_prompt = default_categorical_prompt(self.labels)
        if self.conversation_prompt is None:
            self.conversation_prompt = DEFAULT_CONVERSATION_PROMPT
        if self.reasoning_prompt is None:
            self.reasoning_prompt = DEFAULT_REASONING_PROMPT

    @classmethod
    def from_label_set(cls, label_set: str | list[str], **kwargs) -> "EmoVLMKDConfig":
        """Build a config whose `id2label` is the given named set (or list), in its fixed order."""
        labels = resolve_label_set(label_set)
        if isinstance(label_set, str):
            name = DATASET_LABEL_SETS.get(label_set.lower(), label_set.lower())
        else:
            name = "custom"
        return cls(
            label_set=name,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **kwargs,
        )

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    @property
    def backbone(self) -> Backbone:
        """What differs between the supported VLM families, for the wrapped one (`backbones.py`)."""
        return get_backbone(self.vlm_config)

    @property
    def feature_dim(self) -> int:
        """Width of the merged visual tokens, which equals the language model's hidden size."""
        return self.vlm_config.get_text_config().hidden_size


__all__ = ["EmoVLMKDConfig", "LABEL_SETS", "DATASET_LABEL_SETS", "GATE_TYPES", "GATE_VLM_SIGNALS", "GATE_HEAD_SIGNALS",
           "DEFAULT_CATEGORICAL_PROMPT", "DEFAULT_CONVERSATION_PROMPT", "DEFAULT_REASONING_PROMPT", "PROMPT_KEYS",
           "check_gate_signals", "default_categorical_prompt", "list_classes", "resolve_label_set"]
