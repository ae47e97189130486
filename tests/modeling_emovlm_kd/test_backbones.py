"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL backbones, chosen by the wrapped config's `model_type` alone
(`modeling_emovlm_kd/backbones.py`): the model tests of the Qwen2-VL files, run on a tiny model of each family."""

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from conftest import random_images
from peft import LoraConfig, get_peft_model
from test_modeling_emovlm_kd import LOAD_SCRIPT, count, naive_label_scores
from transformers import AutoModelForImageClassification, AutoModelForImageTextToText, pipeline

from modeling_emovlm_kd import GATE_TYPES, LABEL_SETS, EmoVLMKDConfig, EmoVLMKDForImageClassification
from modeling_emovlm_kd.backbones import BACKBONES, get_backbone
from modeling_emovlm_kd.fast_path import patch_convolutions
from modeling_emovlm_kd.fusion import gate_inputs
from train.infra.assemble import assemble, quantization_config, save_hub_folder
from train.infra.recipe import load_recipe
from train.infra.tiny import build_tiny_image_processor, build_tiny_vlm

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
RECIPES = Path(__file__).parents[2] / "train" / "recipes"

# https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json (the fields that shape the model).
QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

# https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json (the fields that shape the model).
QWEN3_VL_8B = {
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_position_embeddings": 262144,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "vocab_size": 151936,
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "intermediate_size": 4304,
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def family_vlm(family, request, tmp_path_factory):
    """A tiny random VLM of the family (Qwen2-VL: the shared `tiny_base` one)."""
    if family == "qwen2_vl":
        return request.getfixturevalue("tiny_base")["vlm"]
    return build_tiny_vlm(tmp_path_factory.mktemp(family) / "vlm", LABEL_SETS["mikels8"], model_type=family)


@pytest.fixture(scope="session")
def family_checkpoint(family, family_vlm, request, tmp_path_factory):
    """A saved EmoVLM-KD folder on the family's tiny VLM (Qwen2-VL: the shared `tiny_checkpoint`)."""
    if family == "qwen2_vl":
        return request.getfixturevalue("tiny_checkpoint")
    torch.manual_seed(0)
    model, processor = assemble(family_vlm, "mikels8", head_hidden_dims=[64])
    return save_hub_folder(model, processor, tmp_path_factory.mktemp(f"ckpt-{family}") / "emovlm-kd-tiny")


@pytest.fixture(scope="session")
def family_model(family_checkpoint):
    from modeling_emovlm_kd import EmoVLMKDProcessor

    model = EmoVLMKDForImageClassification.from_pretrained(family_checkpoint).eval()
    return model, EmoVLMKDProcessor.from_pretrained(family_checkpoint)


# ---- the seam ------------------------------------------------------------------------------------------


def test_the_registry_holds_the_three_families_and_names_them_when_refusing_another():
    assert list(BACKBONES) == FAMILIES
    for model_type in FAMILIES:
        config = EmoVLMKDConfig.from_label_set("mikels8", vlm_config={"model_type": model_type})
        assert config.vlm_config.model_type == model_type and config.backbone is BACKBONES[model_type]
        assert EmoVLMKDConfig.from_dict(config.to_dict()).vlm_config.model_type == model_type
    assert EmoVLMKDConfig.from_label_set("mikels8").vlm_config.model_type == "qwen2_vl"  # the paper's, by default
    with pytest.raises(ValueError, match=r"'llava'.*qwen2_vl.*qwen2_5_vl.*qwen3_vl.*backbones\.py"):
        EmoVLMKDConfig.from_label_set("mikels8", vlm_config={"model_type": "llava"})


def test_the_tiny_factory_builds_each_family_with_its_image_processor(family, family_vlm):
    model = AutoModelForImageTextToText.from_pretrained(family_vlm)
    assert model.config.model_type == family
    processor = build_tiny_image_processor(family)
    assert processor.patch_size == model.config.vision_config.patch_size == (16 if family == "qwen3_vl" else 14)
    inputs = processor(random_images(2), return_tensors="pt")
    merged = get_backbone(family).num_image_tokens(model.config, inputs["image_grid_thw"])
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    assert [len(tokens) for tokens in features.pooler_output] == merged
    # The fast path finds the patch embedding where the seam says it is.
    conv = model.model.get_submodule(get_backbone(family).patch_embedding)
    assert patch_convolutions(model) == [conv]


def test_assemble_refuses_an_image_processor_cutting_other_patches(family_vlm, tmp_path):
    folder = tmp_path / "vlm"
    subprocess.run(["cp", "-r", str(family_vlm), str(folder)], check=True)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["patch_size"] = 16 if settings["patch_size"] == 14 else 14
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json has patch_size .*vision_config\.patch_size"):
        assemble(folder, "mikels8", head_hidden_dims=[32])


# ---- the model on each family ----------------------------------------------------------------------------


@torch.no_grad()
def test_label_scores_equal_the_full_sequence_log_likelihood(family_model):
    model, processor = family_model
    images = random_images(3, seed=5)
    out = model(**processor.image_processor(images, return_tensors="pt"))
    for i, image in enumerate(images):
        torch.testing.assert_close(out.vlm_logits[i], naive_label_scores(model, processor, image), atol=1e-4, rtol=0)


def test_fresh_process_loads_remote_code_offline_with_identical_logits(family_checkpoint, family_model, tmp_path):
    model, processor = family_model
    paths = []
    for i, image in enumerate(random_images(2, seed=7)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    with torch.no_grad():
        expected = model(**processor.image_processor(paths, return_tensors="pt")).logits
    copy = tmp_path / "copied"
    subprocess.run(["cp", "-r", str(family_checkpoint), str(copy)], check=True)
    assert (copy / "backbones.py").exists()  # the seam travels with the remote code
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", LOAD_SCRIPT, str(copy), *paths],
                            capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-6, rtol=0)


def test_pipeline_classifies_with_the_config_labels(family_checkpoint, family_model):
    model, processor = family_model
    pipe = pipeline("image-classification", model=str(family_checkpoint), trust_remote_code=True)
    images = random_images(3, seed=11)
    predictions = pipe(images, top_k=8)
    with torch.no_grad():
        probs = model(**processor.image_processor(images, return_tensors="pt")).logits.softmax(-1)
    for prediction, row in zip(predictions, probs):
        assert {p["label"] for p in prediction} == set(model.config.labels)
        for p in prediction:
            assert p["score"] == pytest.approx(row[model.config.label2id[p["label"]]].item(), abs=1e-5)


def test_4bit_load_quantizes_the_language_model_only(family, family_checkpoint):
    quant = quantization_config(True, torch.float32, model_type=family)
    model = AutoModelForImageClassification.from_pretrained(
        family_checkpoint, quantization_config=quant, device_map="cpu", trust_remote_code=True
    ).eval()
    language_model = model.vlm.model.language_model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in language_model.modules())
    kept = [model.vlm.lm_head, model.distillation_head, model.gate, model.vlm.model.visual.merger]
    if family == "qwen3_vl":
        kept.append(model.vlm.model.visual.deepstack_merger_list)
    for module in kept:
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    processor = build_tiny_image_processor(family)
    with torch.no_grad():
        out = model(**processor(random_images(2), return_tensors="pt"))
    assert out.logits.shape == (2, 8) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_every_gate_trains_one_step_and_everything_else_stays_frozen(family_vlm, gate_type):
    torch.manual_seed(0)
    model, processor = assemble(family_vlm, "mikels8", head_hidden_dims=[32], gate_type=gate_type)
    model.requires_grad_(False)
    model.gate.requires_grad_(True)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**processor.image_processor(random_images(4), return_tensors="pt"), labels=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("gate.") for n in changed)
    weights = model.gate.branch_weights(*gate_inputs(out.vlm_logits, out.head_logits, model.config.gate_vlm_signal))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))


def test_lora_from_the_seam_adapts_the_language_model_only(family, family_vlm):
    # `down_proj` also names the MLP of Qwen2.5-VL's vision blocks: the seam keeps LoRA out of the vision tower.
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    model = AutoModelForImageTextToText.from_pretrained(family_vlm)
    layers = model.config.get_text_config().num_hidden_layers
    peft_model = get_peft_model(model, LoraConfig(r=4, **get_backbone(family).lora_kwargs(targets)))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and
               isinstance(module.lora_A, torch.nn.ModuleDict) and module.lora_A]
    assert len(adapted) == layers * len(targets)
    assert all(".language_model.layers." in name for name in adapted)


def test_sft_runs_qlora_for_the_family(family, family_vlm, tmp_path):
    import datasets
    from safetensors.torch import load_file

    from train.stages.sft import SFTStageConfig, train_sft

    labels = ["amusement", "awe", "fear", "sadness"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=labels)})
    train = datasets.Dataset.from_dict({"image": random_images(4, seed=2), "label": [0, 1, 2, 3]}, features=features)
    args = SFTStageConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                          save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
                          model_name_or_path=str(family_vlm), use_peft=True, load_in_4bit=True,
                          instruction_kinds=["categorical"], learning_rate=1e-2)
    merged = train_sft(datasets.DatasetDict({"train": train}), labels, args)
    lora = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert lora and all("language_model" in key for key in lora)
    assert json.loads((merged / "config.json").read_text())["model_type"] == family


# ---- the 7B/8B models: recipes and head sizes ----------------------------------------------------------------


@pytest.mark.parametrize("vlm_config,width,head_params,vlm_params", [
    (QWEN2_5_VL_7B, 3584, 3_679_240, 8.29e9),
    (QWEN3_VL_8B, 4096, 4_203_528, 8.77e9),
])
def test_published_configs_give_the_head_its_width(vlm_config, width, head_params, vlm_params):
    config = EmoVLMKDConfig.from_label_set("mikels8", vlm_config=vlm_config)
    with torch.device("meta"):
        model = EmoVLMKDForImageClassification(config)
    assert config.feature_dim == width == model.distillation_head.mlp[1].in_features
    assert count(model.distillation_head) == head_params
    assert count(model.gate) == 136
    # The published models' sizes ("8.29B" and "8.77B" params on their Hub pages), on the meta device.
    assert count(model.vlm) == pytest.approx(vlm_params, rel=0.005)


@pytest.mark.parametrize("folder,base_model", [("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct"),
                                               ("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct")])
def test_recipes_for_the_new_backbones_mirror_the_qwen2_vl_ones(folder, base_model):
    paper = sorted(p.name for p in (RECIPES / "qwen2-vl-7b").glob("*.yaml"))
    assert sorted(p.name for p in (RECIPES / folder).glob("*.yaml")) == paper
    for name in paper:
        ours = yaml.safe_load((RECIPES / folder / name).read_text())
        theirs = yaml.safe_load((RECIPES / "qwen2-vl-7b" / name).read_text())
        assert ours["base_models"]["vlm"] == base_model
        # Same data, hyperparameters and stages: only the base model and the run folder differ.
        assert ours["output_dir"] == theirs["output_dir"].replace("qwen2-vl-7b", folder)
        ours["base_models"]["vlm"], ours["output_dir"] = theirs["base_models"]["vlm"], theirs["output_dir"]
        assert ours == theirs
        # The 7B/8B recipes ask for bf16, which this CPU test machine refuses: validate them as they would run.
        load_recipe(RECIPES / folder / name, ["sft.bf16=false", "teacher.bf16=false"])
