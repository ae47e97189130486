"""Offline tiny base models: a Qwen2-VL (or Qwen2.5-VL, Qwen3-VL) and a ViT teacher built from configs, saved as
ordinary checkpoints.

Nothing here reaches the Hub. The tiny models have random weights and the real architectures' code paths, so the
whole project (all three stages, 4-bit loading, remote code, pipelines) runs on a laptop CPU in minutes. Each
backbone family of `modeling_emovlm_kd/backbones.py` has a tiny config here (`TINY_VLM_CONFIGS`).

    python -m train tiny --output-dir runs/tiny-base --labels mikels8 [--backbone qwen3_vl]
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    Qwen2_5_VLConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen3VLConfig,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from modeling_emovlm_kd import LABEL_SETS, EmoVLMKDImageProcessor
from modeling_emovlm_kd.backbones import DEFAULT_MODEL_TYPE, get_backbone
from modeling_emovlm_kd.configuration_emovlm_kd import (
    DEFAULT_CONVERSATION_PROMPT,
    DEFAULT_REASONING_PROMPT,
    default_categorical_prompt,
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Enough ordinary English for descriptions and reasoning answers to tokenize into real subwords.
_CORPUS = """system You are a helpful assistant. user assistant
The image shows a person, a face, a crowd, a landscape, a sky, the sea, a street, an animal, a building, flowers.
Bright colours, dark shadows, warm light, cold tones, soft textures and sharp edges shape the mood of the scene.
The people smile, laugh, cry, shout, frown or look away; their posture is relaxed, tense, open or closed.
Because of these elements the viewer may feel calm, happy, uneasy, surprised, angry, sad or afraid.
First I notice the main subject, then the setting and the colours, and finally how they combine into a feeling.
shirt trouser pullover dress coat sandal sneaker bag ankle boot top clothing shoe garment fabric sleeve collar
0 1 2 3 4 5 6 7 8 9 10 100
"""

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)
TINY_VISION = dict(depth=2, embed_dim=64, hidden_size=64, hidden_act="quick_gelu", mlp_ratio=2, num_heads=4,
                   in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# Small images keep the tiny model fast: at most 8x8 patches, i.e. 16 merged visual tokens per image.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112
# Qwen2.5-VL's vision tower: Qwen2-VL's widths, with a SwiGLU MLP, window attention and an `out_hidden_size`. Every
# Linear input stays a multiple of 64 (bitsandbytes 4-bit on CPU).
TINY_VISION_QWEN2_5 = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], out_hidden_size=64, hidden_act="silu")
# Qwen3-VL: 16-pixel patches, learned position embeddings (a square grid), and deepstack features from block 0.
TINY_TEXT_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                        "mrope_interleaved": True})
TINY_VISION_QWEN3 = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, patch_size=16,
                         spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                         deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")
# Per family: the config class and its tiny text and vision configs. One entry per `backbones.BACKBONES` key.
TINY_VLM_CONFIGS = {
    "qwen2_vl": (Qwen2VLConfig, TINY_TEXT, TINY_VISION),
    "qwen2_5_vl": (Qwen2_5_VLConfig, TINY_TEXT, TINY_VISION_QWEN2_5),
    "qwen3_vl": (Qwen3VLConfig, TINY_TEXT_QWEN3, TINY_VISION_QWEN3),
}


# Each family's chat template, as TRL ships it (TRL knows their training variants for `assistant_only_loss`).
CHAT_TEMPLATES = {"qwen2_vl": "qwen2_5_vl.jinja", "qwen2_5_vl": "qwen2_5_vl.jinja", "qwen3_vl": "qwen3_vl.jinja"}


def chat_template(model_type: str = DEFAULT_MODEL_TYPE) -> str:
    return resources.files("trl").joinpath("chat_templates", CHAT_TEMPLATES[model_type]).read_text()


def qwen2_vl_chat_template() -> str:
    """Qwen2-VL's chat template (byte-identical to Qwen2.5-VL's), as TRL ships it."""
    return chat_template("qwen2_vl")


def build_tiny_tokenizer(labels: list[str], vocab_size: int = 640,
                         model_type: str = DEFAULT_MODEL_TYPE) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on the prompts and labels, with Qwen's special tokens."""
    all_labels = sorted({label for labels_ in LABEL_SETS.values() for label in labels_} | set(labels))
    corpus = [
        _CORPUS,
        default_categorical_prompt(labels),
        DEFAULT_CONVERSATION_PROMPT,
        DEFAULT_REASONING_PROMPT,
        *[f"{{'emotion': '{label}'}}" for label in all_labels],
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = chat_template(model_type)
    tokenizer.model_max_length = 2048
    return tokenizer


def build_tiny_image_processor(model_type: str = DEFAULT_MODEL_TYPE) -> EmoVLMKDImageProcessor:
    """The family's image processor (its patch size and normalisation), bounded to 2x2 .. 4x4 merged tokens' worth
    of pixels per side: 56..112 pixels for 14-pixel patches (Qwen2-VL's existing bounds), 64..128 for 16."""
    defaults = get_backbone(model_type).image_processor_defaults
    tile = defaults["patch_size"] * 2  # one merged token covers 2x2 patches in every family
    return EmoVLMKDImageProcessor(min_pixels=(2 * tile) ** 2, max_pixels=(4 * tile) ** 2, **defaults)


def tiny_vlm_config(tokenizer, model_type: str = DEFAULT_MODEL_TYPE):
    """The tiny config of a backbone family, its special-token ids and vocabulary taken from `tokenizer`."""
    get_backbone(model_type)
    config_class, text, vision = TINY_VLM_CONFIGS[model_type]
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up, as Qwen does, so embeddings stay 64-aligned
    text = dict(text, vocab_size=vocab_size, bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config_class(text_config=text, vision_config=dict(vision), tie_word_embeddings=False, **ids)


def tiny_qwen2_vl_config(tokenizer) -> Qwen2VLConfig:
    return tiny_vlm_config(tokenizer, "qwen2_vl")


def build_tiny_vlm(output_dir: str | Path, labels: list[str], seed: int = 0,
                   model_type: str = DEFAULT_MODEL_TYPE) -> Path:
    """Save a random tiny VLM of a backbone family (Qwen2-VL by default) with its tokenizer (Qwen chat template)
    and image processor."""
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(labels, model_type=model_type)
    model = AutoModelForImageTextToText.from_config(tiny_vlm_config(tokenizer, model_type))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    build_tiny_image_processor(model_type).save_pretrained(output_dir)
    return output_dir


def build_tiny_vit(output_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Save a random tiny ViT image classifier (the teacher) with its image processor."""
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=56, patch_size=7, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    ViTForImageClassification(config).save_pretrained(output_dir)
    ViTImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(output_dir)
    return output_dir


def build_tiny_base_models(output_dir: str | Path, labels: list[str], seed: int = 0,
                           model_type: str = DEFAULT_MODEL_TYPE) -> dict[str, Path]:
    """Both tiny base models under `output_dir/{vlm,teacher}`; returns their paths."""
    output_dir = Path(output_dir)
    return {
        "vlm": build_tiny_vlm(output_dir / "vlm", labels, seed, model_type),
        "teacher": build_tiny_vit(output_dir / "teacher", labels, seed),
    }
