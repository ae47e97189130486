"""Published configurations of the base models the recipes name, written out so that nothing is downloaded.

The fields that shape each model, from its `config.json` on the Hub (linked per entry). `bench.estimate` builds the
model from these on the meta device (no memory) to count parameters and matrix-product FLOPs; a recipe whose
`base_models.vlm` is a local folder is read from its own `config.json` instead.
"""

from __future__ import annotations

from bench.common import QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION, VIT_B16_384

_SPECIAL_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                   "vision_end_token_id": 151653}

# https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json
QWEN2_VL_7B = {
    "model_type": "qwen2_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, **_SPECIAL_TOKENS,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}

# https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json
QWEN2_VL_2B = {
    "model_type": "qwen2_vl", "text_config": dict(QWEN2_VL_2B_TEXT), "vision_config": dict(QWEN2_VL_2B_VISION),
    "tie_word_embeddings": True, **_SPECIAL_TOKENS,
}

# https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645, **_SPECIAL_TOKENS,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}

# https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json
QWEN3_VL_8B = {
    "model_type": "qwen3_vl", "tie_word_embeddings": False, **_SPECIAL_TOKENS,
    "text_config": {
        "model_type": "qwen3_vl_text", "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
        "max_position_embeddings": 262144, "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "vocab_size": 151936,
    },
    "vision_config": {
        "model_type": "qwen3_vl", "deepstack_visual_indexes": [8, 16, 24], "depth": 27,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3, "intermediate_size": 4304,
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
}

VLMS = {
    "Qwen/Qwen2-VL-7B-Instruct": QWEN2_VL_7B,
    "Qwen/Qwen2-VL-2B-Instruct": QWEN2_VL_2B,
    "Qwen/Qwen2.5-VL-7B-Instruct": QWEN2_5_VL_7B,
    "Qwen/Qwen3-VL-8B-Instruct": QWEN3_VL_8B,
}

# https://huggingface.co/google/vit-base-patch16-384/blob/main/config.json
TEACHERS = {"google/vit-base-patch16-384": dict(VIT_B16_384)}

__all__ = ["VLMS", "TEACHERS", "QWEN2_VL_7B", "QWEN2_VL_2B", "QWEN2_5_VL_7B", "QWEN3_VL_8B"]
