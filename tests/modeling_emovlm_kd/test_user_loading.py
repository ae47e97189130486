"""An exported model loads as users load it: bf16, `device_map="auto"`, and a plain 4-bit `BitsAndBytesConfig`, each
through `from_pretrained` and `pipeline`; the head and the gate stay in float32 (`_keep_in_fp32_modules_strict`)."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import random_images
from transformers import AutoModelForImageClassification, BitsAndBytesConfig, pipeline


def _labels(classifier, images):
    return [p[0]["label"] for p in classifier(images, top_k=1)]


@pytest.fixture(scope="module")
def images():
    return random_images(12, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, images):
    return _labels(pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True), images)


def _trained_modules_are_float32(model):
    for module in (model.distillation_head, model.gate):
        for name, parameter in module.named_parameters():
            assert parameter.dtype == torch.float32, name
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())


def test_bf16_keeps_head_and_gate_in_float32(tiny_checkpoint, images, reference):
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True,
                                                            dtype=torch.bfloat16)
    assert model.vlm.get_input_embeddings().weight.dtype == torch.bfloat16
    _trained_modules_are_float32(model)
    classifier = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True,
                          dtype=torch.bfloat16)
    _trained_modules_are_float32(classifier.model)
    labels = _labels(classifier, images)
    assert sum(a == b for a, b in zip(labels, reference)) >= len(images) - 2


def test_device_map_auto_loads_and_classifies(tiny_checkpoint, images, reference):
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True,
                                                            device_map="auto")
    assert model.vlm.get_input_embeddings().weight.device.type in ("cpu", "cuda")
    classifier = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True,
                          device_map="auto")
    assert _labels(classifier, images) == reference


def test_a_plain_4bit_config_quantizes_the_vlm_only(tiny_checkpoint, images, reference):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True,
                                                            quantization_config=config, device_map="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.vlm.model.language_model.modules())
    _trained_modules_are_float32(model)
    assert not isinstance(model.vlm.lm_head, bnb.nn.Linear4bit)  # label scores come from full-precision logits
    classifier = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True,
                          model_kwargs={"quantization_config": config, "device_map": "cpu"})
    labels = _labels(classifier, images)
    assert sum(a == b for a, b in zip(labels, reference)) >= len(images) // 2
