import json
import os
import textwrap

import pytest
import torch
from conftest import random_images
from transformers import AutoModelForImageClassification, BitsAndBytesConfig, pipeline

from modeling_emovlm_kd import (
    EmoVLMKDConfig,
    EmoVLMKDForImageClassification,
    EmoVLMKDImageProcessor,
    EmoVLMKDProcessor,
)
from modeling_emovlm_kd.fusion import gate_inputs
from train.infra.assemble import FULL_PRECISION_MODULES, assemble

# Qwen/Qwen2-VL-7B-Instruct's config.json, written out so no download is needed.
QWEN2_VL_7B = {
    "model_type": "qwen2_vl",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("label_set,head_params", [("mikels8", 3_679_240), ("ekman6", 3_677_190)])
def test_7b_head_and_gate_sizes_match_the_paper(label_set, head_params):
    config = EmoVLMKDConfig.from_label_set(label_set, vlm_config=QWEN2_VL_7B)
    with torch.device("meta"):
        model = EmoVLMKDForImageClassification(config)
    assert config.feature_dim == 3584
    assert model.distillation_head.mlp[1].in_features == 3584
    assert count(model.distillation_head) == head_params
    num_labels = config.num_labels
    assert count(model.gate) == 2 * num_labels * num_labels + num_labels  # 136 for 8 classes
    if num_labels == 8:
        assert count(model.gate) == 136
    assert count(model.vlm) > 8_000_000_000  # the real 7B (8.3B with the vision tower), on the meta device


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoint):
    model = EmoVLMKDForImageClassification.from_pretrained(tiny_checkpoint).eval()
    return model, EmoVLMKDProcessor.from_pretrained(tiny_checkpoint)


def naive_label_scores(model, processor, image):
    """Score each label with its own full forward pass: the slow reference for the one-pass scorer."""
    scores = []
    ids = model.config.prompt_token_ids["label_continuations"]
    for label, cont in zip(model.config.labels, ids):
        text = processor.classification_prompt() + label + model.config.answer_suffix
        enc = processor(text=[text], images=[image], return_tensors="pt")
        logits = model.vlm(**enc).logits[0]
        n = len(cont)
        assert enc["input_ids"][0, -n:].tolist() == cont
        scores.append(logits[-n - 1 : -1].log_softmax(-1).gather(-1, enc["input_ids"][0, -n:, None]).sum())
    return torch.stack(scores)


@torch.no_grad()
def test_one_pass_scores_equal_per_label_forward_passes(model_and_processor):
    model, processor = model_and_processor
    images = random_images(3)
    out = model(**processor.image_processor(images, return_tensors="pt"))
    for i, image in enumerate(images):
        torch.testing.assert_close(out.vlm_logits[i], naive_label_scores(model, processor, image), atol=1e-4, rtol=0)


@torch.no_grad()
def test_labels_sharing_leading_tokens_are_scored_on_their_own_path(tiny_base):
    # Qwen's pre-tokenizer splits these at the hyphen and spaces, so the first three start with the same token.
    labels = ["awe", "awe-struck", "awe and fear", "fear"]
    model, processor = assemble(tiny_base["vlm"], labels, head_hidden_dims=[32])
    model.eval()
    conts = model.config.prompt_token_ids["label_continuations"]
    assert conts[0][0] == conts[1][0] == conts[2][0], "test needs labels whose first tokens coincide"
    assert len(conts[1]) > 2
    image = random_images(1, seed=3)[0]
    out = model(**processor.image_processor([image], return_tensors="pt"))
    torch.testing.assert_close(out.vlm_logits[0], naive_label_scores(model, processor, image), atol=1e-4, rtol=0)


@torch.no_grad()
def test_vision_tower_runs_once_per_forward(model_and_processor):
    model, processor = model_and_processor
    calls = []
    handle = model.vlm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        model(**processor.image_processor(random_images(4), return_tensors="pt"))
    finally:
        handle.remove()
    assert len(calls) == 1


@torch.no_grad()
def test_forward_outputs_and_loss(model_and_processor):
    model, processor = model_and_processor
    inputs = processor.image_processor(random_images(3), return_tensors="pt")
    out = model(**inputs)
    assert out.loss is None
    assert out.logits.shape == out.vlm_logits.shape == out.head_logits.shape == (3, 8)
    assert out.visual_features.shape == (3, model.config.feature_dim)
    labels = torch.tensor([0, 3, 7])
    with_loss = model(**inputs, labels=labels)
    torch.testing.assert_close(with_loss.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    # Cached features and VLM scores give the same fused output without running the VLM.
    cached = model(visual_features=out.visual_features, vlm_logits=out.vlm_logits)
    torch.testing.assert_close(cached.logits, out.logits)


def test_missing_prompt_ids_and_mismatched_class_count_are_explained(tiny_checkpoint):
    config = EmoVLMKDConfig.from_pretrained(tiny_checkpoint)
    images = EmoVLMKDImageProcessor.from_pretrained(tiny_checkpoint)(random_images(1), return_tensors="pt")
    config.prompt_token_ids = None
    with pytest.raises(ValueError, match="prepare_config"):
        EmoVLMKDForImageClassification(config)(**images)
    config = EmoVLMKDConfig.from_pretrained(tiny_checkpoint)
    config.id2label = {i: f"c{i}" for i in range(6)}
    with pytest.raises(ValueError, match="6"):
        EmoVLMKDForImageClassification(config)(**images)


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from PIL import Image
    from transformers import AutoModelForImageClassification, AutoImageProcessor
    path, images = sys.argv[1], sys.argv[2:]
    model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**processor([Image.open(p) for p in images], return_tensors="pt")).logits
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist()}))
    """
)


# The fresh-process remote-code load is tested for every backbone in test_backbones.py.


def test_checkpoint_is_safetensors_with_auto_map(tiny_checkpoint):
    files = set(os.listdir(tiny_checkpoint))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"configuration_emovlm_kd.py", "modeling_emovlm_kd.py", "processing_emovlm_kd.py"} <= files
    auto_map = json.loads((tiny_checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {
        "AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoImageProcessor", "AutoProcessor"
    }


def test_pipeline_batches_equal_single_images_and_use_id2label(tiny_checkpoint):
    pipe = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True)
    images = random_images(5, seed=11)
    batched = pipe(images, batch_size=4, top_k=8)
    single = [pipe(image, top_k=8) for image in images]
    names = set(pipe.model.config.id2label.values())
    for b, s in zip(batched, single):
        assert [x["label"] for x in b] == [x["label"] for x in s]
        assert all(x["label"] in names for x in b)
        for x, y in zip(b, s):
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)
        assert sum(x["score"] for x in b) == pytest.approx(1.0, abs=1e-5)


def test_tiny_model_loads_in_4bit_nf4_on_cpu_and_runs(tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=FULL_PRECISION_MODULES,
    )
    model = AutoModelForImageClassification.from_pretrained(
        tiny_checkpoint, quantization_config=quant, device_map="cpu", trust_remote_code=True
    ).eval()
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    assert not isinstance(model.gate.proj, bnb.nn.Linear4bit)
    processor = EmoVLMKDImageProcessor.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        out = model(**processor(random_images(2), return_tensors="pt"))
    assert out.logits.shape == (2, 8) and torch.isfinite(out.logits).all()


# Every gate training alone is tested for every backbone in test_backbones.py.


@pytest.mark.parametrize("head_signal", ["probs", "logits"])
def test_fuse_feeds_the_gate_the_configured_head_signal(tiny_base, head_signal):
    model, _ = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[32], gate_head_signal=head_signal)
    vlm_logits, head_logits = torch.randn(3, 8), 5 * torch.randn(3, 8)
    with torch.no_grad():
        expected = model.gate(*gate_inputs(vlm_logits, head_logits, model.config.gate_vlm_signal,
                                           head_signal=head_signal))
        torch.testing.assert_close(model.fuse(vlm_logits, head_logits), expected)
        other = "logits" if head_signal == "probs" else "probs"
        assert not torch.allclose(model.fuse(vlm_logits, head_logits),
                                  model.gate(*gate_inputs(vlm_logits, head_logits, model.config.gate_vlm_signal,
                                                          head_signal=other)))
