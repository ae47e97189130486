"""The fusion computed in one place (`modeling_emovlm_kd/fusion.py`): the gate registry the configuration reads,
one initialisation for every head and gate, and `branch_weights` in the model's output."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification

import modeling_emovlm_kd.configuration_emovlm_kd as configuration
from modeling_emovlm_kd import GATE_TYPES, EmoVLMKDConfig, EmoVLMKDForImageClassification, EmoVLMKDFusion
from modeling_emovlm_kd.fusion import GATES, gate_from_config, gate_inputs, head_from_config, new_gate
from train.infra.assemble import assemble


class ScaledSumGate(nn.Module):
    """A gate that is not one of the five: `Linear(C, C)(v + h)`."""

    def __init__(self, num_labels, **kwargs):
        super().__init__()
        self.proj = nn.Linear(num_labels, num_labels)

    def forward(self, v, h):
        return self.proj(v + h)

    def branch_weights(self, v, h):
        return torch.full((len(v), 2), 0.5)


@pytest.fixture
def tiny_config(tiny_base):
    vlm_config = AutoConfig.from_pretrained(tiny_base["vlm"]).to_dict()
    return lambda **kwargs: EmoVLMKDConfig.from_label_set("mikels8", vlm_config=vlm_config, head_hidden_dims=[16],
                                                          **kwargs)


def test_gate_types_are_the_registry_names(monkeypatch, tiny_config):
    assert GATE_TYPES == tuple(GATES) == configuration.GATE_TYPES
    monkeypatch.setitem(GATES, "scaled_sum", ScaledSumGate)
    monkeypatch.setattr(configuration, "GATE_TYPES", (*configuration.GATE_TYPES, "scaled_sum"))
    # A registry entry and its name in `GATE_TYPES` are all a new gate takes: the configuration accepts it and the
    # builders make it.
    assert "scaled_sum" in configuration.GATE_TYPES
    config = tiny_config(gate_type="scaled_sum")
    assert isinstance(gate_from_config(config), ScaledSumGate)
    with pytest.raises(ValueError, match="gate_type must be one of .*scaled_sum.*got 'nope'"):
        tiny_config(gate_type="nope")


def test_the_configuration_names_the_gates_without_importing_them():
    """No import circle: the configuration (no torch) names the gates; the registry in `fusion.py` imports it."""
    tree = ast.parse(Path(configuration.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "fusion" not in imported and not any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
                                                for node in tree.body)
    assert "noqa: F822" not in Path(configuration.__file__).read_text()


def test_every_head_and_gate_is_initialised_like_the_model(tiny_config):
    """The head of stage 2 and the gates of stage 3 get the model's `_init_weights`: normal(initializer_range)
    weights and zero biases, the same draws for the same seed."""
    config = tiny_config(gate_type="moe")
    model = EmoVLMKDForImageClassification(config)
    for build, expected_build in ((head_from_config, lambda: head_from_config(config, initialise=False)),
                                  (gate_from_config, lambda: gate_from_config(config, initialise=False))):
        torch.manual_seed(3)
        built = build(config)
        torch.manual_seed(3)
        expected = expected_build()
        expected.apply(model._init_weights)
        for (name, value), (_, reference) in zip(built.state_dict().items(), expected.state_dict().items()):
            torch.testing.assert_close(value, reference, rtol=0, atol=0, msg=name)
            if name.endswith("bias"):
                assert not value.any(), name
    torch.manual_seed(0)
    weight = new_gate("concat_linear", 8, std=0.5).proj.weight
    assert 0.3 < float(weight.detach().std()) < 0.7


@pytest.mark.parametrize("head_signal", ["probs", "logits"])
@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_the_model_output_carries_its_gates_branch_weights(tiny_base, gate_type, head_signal):
    torch.manual_seed(0)
    model, _ = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[32], gate_type=gate_type,
                        gate_vlm_signal="probs", gate_head_signal=head_signal)
    model.eval()
    features, vlm_logits = torch.randn(5, model.config.feature_dim), torch.randn(5, 8)
    with torch.no_grad():
        out = model(visual_features=features, vlm_logits=vlm_logits)
        v, h = gate_inputs(vlm_logits, out.head_logits, "probs", head_signal=head_signal)
        torch.testing.assert_close(out.branch_weights, model.gate.branch_weights(v, h))
        torch.testing.assert_close(out.logits, model.gate(v, h))
    torch.testing.assert_close(out.branch_weights.sum(-1), torch.ones(5))


def test_the_models_fusion_follows_a_replaced_gate_and_holds_no_second_copy(tiny_base):
    model, _ = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[32])
    assert isinstance(model.fusion, EmoVLMKDFusion)
    assert model.fusion.gate is model.gate and model.fusion.distillation_head is model.distillation_head
    assert not any(name.startswith("fusion.") for name in model.state_dict())
    model.gate = GATES["bilinear"](8)
    model.config.gate_head_signal = "logits"
    assert model.fusion.gate is model.gate and model.fusion.head_signal == "logits"


def test_the_fusion_names_what_is_missing_or_mismatched():
    fusion = EmoVLMKDFusion(None, GATES["concat_linear"](8), "probs")
    with pytest.raises(ValueError, match="no distillation head: pass `head_logits`"):
        fusion(torch.randn(2, 8), visual_features=torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"vlm_logits \(2, 8\) and head_logits \(2, 6\)"):
        fusion(torch.randn(2, 8), head_logits=torch.randn(2, 6))
    with pytest.raises(ValueError, match="vlm_signal must be one of"):
        EmoVLMKDFusion(None, GATES["concat_linear"](8), "softmax")


def test_the_hub_folder_ships_the_fusion_and_its_model_reports_branch_weights(tiny_checkpoint):
    """(`test_fresh_process_loads_remote_code_offline_with_identical_logits` runs the folder's own code.)"""
    assert (tiny_checkpoint / "fusion.py").is_file()
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(visual_features=torch.randn(2, model.config.feature_dim), vlm_logits=torch.randn(2, 8))
    torch.testing.assert_close(out.branch_weights.sum(-1), torch.ones(2))
