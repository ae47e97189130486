"""A checkpoint whose head or gate does not match its config refuses to load instead of running with random modules."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, pipeline


def _copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def _edit_weights(folder, edit):
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    save_file(edit(tensors), weights, metadata={"format": "pt"})


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _load(folder):
    return AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)


def test_the_intact_checkpoint_loads(tiny_checkpoint, tmp_path):
    model = _load(_copy(tiny_checkpoint, tmp_path))
    assert model.config.gate_type == "concat_linear"


def test_missing_gate_weights_refuse_to_load(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(folder, lambda t: {k: v for k, v in t.items() if not k.startswith("gate.")})
    with pytest.raises(ValueError, match=r"missing keys: gate\.proj\.bias, gate\.proj\.weight"):
        _load(folder)
    with pytest.raises(ValueError, match=r"does not match its config"):
        pipeline("image-classification", model=str(folder), trust_remote_code=True)


def test_missing_head_weights_refuse_to_load(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(folder, lambda t: {k: v for k, v in t.items() if not k.startswith("distillation_head.mlp.4")})
    with pytest.raises(ValueError, match=r"missing keys: distillation_head\.mlp\.4\.bias"):
        _load(folder)


def test_a_changed_gate_type_refuses_to_load(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_config(folder, gate_type="moe")
    with pytest.raises(ValueError, match=r"gate_type='moe'.*missing keys: gate\..*unexpected keys: gate\.proj"):
        _load(folder)


def test_a_head_shape_other_than_the_config_refuses_to_load(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_config(folder, head_hidden_dims=[32])
    with pytest.raises((ValueError, RuntimeError), match=r"distillation_head\.mlp\.1\.weight"):
        _load(folder)
    with pytest.raises((ValueError, RuntimeError), match=r"distillation_head\.mlp\.1\.weight"):
        AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, ignore_mismatched_sizes=True)


# Saved names (transformers writes the Hub layout, `vlm.model.layers.*`) and what the missing tensor is called in
# the loaded model (`vlm.model.language_model.layers.*`).
@pytest.mark.parametrize("dropped, named", [
    ("vlm.lm_head.", r"vlm\.lm_head\.weight"),
    ("vlm.model.embed_tokens.", r"embed_tokens\.weight"),
    ("vlm.model.layers.0.self_attn.q_proj.", r"layers\.0\.self_attn\.q_proj\.bias, \S*layers\.0\.self_attn\.q_proj\.weight"),
])
def test_missing_vlm_weights_refuse_to_load(tiny_checkpoint, tmp_path, dropped, named):
    """A checkpoint missing VLM tensors (the output layer, the embeddings, one projection) would load them at random
    and only print transformers' table: the model would score labels with noise."""
    folder = _copy(tiny_checkpoint, tmp_path)
    keys = list(load_file(folder / "model.safetensors"))
    assert any(k.startswith(dropped) for k in keys), keys  # the checkpoint really holds what the test drops
    _edit_weights(folder, lambda t: {k: v for k, v in t.items() if not k.startswith(dropped)})
    with pytest.raises(ValueError, match=r"missing keys: \S*" + named):
        _load(folder)
    with pytest.raises(ValueError, match=r"does not match its config"):
        pipeline("image-classification", model=str(folder), trust_remote_code=True)
