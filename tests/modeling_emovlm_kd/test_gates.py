"""The five gates of the paper's Table 4, as the authors' released code defines them (`train_gate.py` of
sange1104/EmoVLM-KD), their sizes, their `branch_weights`, and the gate's inputs."""

import pytest
import torch

from modeling_emovlm_kd import GATE_TYPES, GATES
from modeling_emovlm_kd.fusion import gate_inputs

C = 8

# Parameter counts for C = 8, by hand: a Linear(i, o) has i*o + o parameters, a Bilinear(i, i, o) has i*i*o + o.
PARAMETERS = {
    "concat_linear": 16 * 8 + 8,  # Linear(2C, C): 136
    "moe": 3 * (16 * 8 + 8) + (16 * 3 + 3),  # 3 experts Linear(2C, C) + router Linear(2C, 3): 459
    "bilinear": (8 * 8 * 8 + 8) + (8 * 8 + 8),  # Bilinear(C, C, C) + Linear(C, C): 592
    "dynamic_weighting": (16 * 2 + 2) + (8 * 8 + 8),  # Linear(2C, 2) + Linear(C, C): 106
    "cross_gating": 3 * (8 * 8 + 8),  # two gating Linear(C, C) + the fusion Linear(C, C): 216
}


def random_gate(gate_type, seed=0):
    torch.manual_seed(seed)
    gate = GATES[gate_type](C)
    for parameter in gate.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return gate.eval()


def branches(batch=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, C, generator=generator).softmax(-1)
    h = torch.randn(batch, C, generator=generator).softmax(-1)
    return v, h


def test_the_gate_types_are_the_five_of_table_4():
    assert set(GATES) == set(GATE_TYPES) == set(PARAMETERS)


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_each_gate_has_the_authors_parameter_count(gate_type):
    assert sum(p.numel() for p in GATES[gate_type](C).parameters()) == PARAMETERS[gate_type]


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def expected_output(gate_type, gate, v, h):
    """Each gate's formula written out from its parameters."""
    x = torch.cat([v, h], -1)
    if gate_type == "concat_linear":
        return linear(x, gate.proj)
    if gate_type == "moe":
        weights = linear(x, gate.router).softmax(-1)
        return sum(weights[:, e:e + 1] * linear(x, expert) for e, expert in enumerate(gate.experts))
    if gate_type == "bilinear":
        joint = torch.einsum("bi,kij,bj->bk", v, gate.bilinear.weight, h) + gate.bilinear.bias
        return linear(joint, gate.proj)
    if gate_type == "dynamic_weighting":
        w = linear(x, gate.weigher).softmax(-1)
        return linear(w[:, :1] * v + w[:, 1:] * h, gate.proj)
    if gate_type == "cross_gating":
        g1, g2 = torch.sigmoid(linear(h, gate.gate_from_head)), torch.sigmoid(linear(v, gate.gate_from_vlm))
        return linear(g1 * v + g2 * h, gate.proj)
    raise AssertionError(gate_type)


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_each_gate_computes_the_authors_formula(gate_type):
    gate, (v, h) = random_gate(gate_type), branches()
    with torch.no_grad():
        torch.testing.assert_close(gate(v, h), expected_output(gate_type, gate, v, h))


def test_moe_has_three_experts_by_default():
    assert len(GATES["moe"](C).experts) == 3
    assert len(GATES["moe"](C, num_experts=5).experts) == 5


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_branch_weights_are_shares_that_ignore_an_empty_branch(gate_type):
    gate, (v, h) = random_gate(gate_type), branches()
    with torch.no_grad():
        weights = gate.branch_weights(v, h)
        assert weights.shape == (5, 2) and (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(5))
        if gate_type == "bilinear":  # a zero branch zeroes the whole product: see the Shapley test below
            return
        # A branch whose signal is zero contributes nothing to the fused logits, so it drove nothing.
        torch.testing.assert_close(gate.branch_weights(v, torch.zeros_like(h))[:, 1], torch.zeros(5))
        torch.testing.assert_close(gate.branch_weights(torch.zeros_like(v), h)[:, 0], torch.zeros(5))


def shares(a, b):
    parts = torch.stack([a.abs().sum(-1), b.abs().sum(-1)], -1)
    return parts / parts.sum(-1, keepdim=True)


@pytest.mark.parametrize("gate_type", ["dynamic_weighting", "cross_gating"])
def test_summing_gates_split_by_each_terms_contribution_through_the_final_linear(gate_type):
    gate, (v, h) = random_gate(gate_type), branches()
    x = torch.cat([v, h], -1)
    with torch.no_grad():
        if gate_type == "dynamic_weighting":
            w = linear(x, gate.weigher).softmax(-1)
            terms = w[:, :1] * v, w[:, 1:] * h
        else:
            terms = torch.sigmoid(linear(h, gate.gate_from_head)) * v, torch.sigmoid(linear(v, gate.gate_from_vlm)) * h
        expected = shares(terms[0] @ gate.proj.weight.T, terms[1] @ gate.proj.weight.T)
        torch.testing.assert_close(gate.branch_weights(v, h), expected)


def test_bilinear_shares_are_the_two_branches_shapley_values_against_an_uninformative_input():
    gate, (v, h) = random_gate("bilinear"), branches()
    v0, h0 = torch.full_like(v, 1 / C), torch.full_like(h, 1 / C)  # the row means: no class information
    with torch.no_grad():
        f = gate
        phi_v = ((f(v, h0) - f(v0, h0)) + (f(v, h) - f(v0, h))) / 2
        phi_h = ((f(v0, h) - f(v0, h0)) + (f(v, h) - f(v, h0))) / 2
        torch.testing.assert_close(phi_v + phi_h, f(v, h) - f(v0, h0))  # the two values add up to the change
        torch.testing.assert_close(gate.branch_weights(v, h), shares(phi_v, phi_h))
        # A head that says nothing (uniform probabilities) gets no share.
        torch.testing.assert_close(gate.branch_weights(v, h0)[:, 1], torch.zeros(5))


def test_gate_inputs_give_the_head_probabilities_by_default_and_its_logits_on_request():
    vlm_logits = torch.tensor([[0.0, 2.0, 1.0]])
    head_logits = torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.bfloat16)
    v, h = gate_inputs(vlm_logits, head_logits, "one_hot")  # the callers' three positional arguments
    torch.testing.assert_close(v, torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(h, head_logits.float().softmax(-1))
    v, h = gate_inputs(vlm_logits, head_logits, "probs", head_signal="logits")  # the released code's choice
    torch.testing.assert_close(v, vlm_logits.softmax(-1))
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, head_logits.float())
    with pytest.raises(ValueError, match="head_signal"):
        gate_inputs(vlm_logits, head_logits, "probs", head_signal="softmax")
    with pytest.raises(ValueError, match="vlm_signal"):
        gate_inputs(vlm_logits, head_logits, "logits")
