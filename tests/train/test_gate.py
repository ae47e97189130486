import pytest
import torch

from modeling_emovlm_kd import GATE_TYPES
from train.gate import GateConfig, build_gate, train_gate


def gate_split(n, classes=4, seed=0):
    """A VLM that is right 70% of the time and a head that is right where the VLM is wrong, half the time."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    vlm_right = torch.rand(n, generator=generator) < 0.7
    vlm_pred = torch.where(vlm_right, labels, (labels + 1) % classes)
    head_logits = torch.nn.functional.one_hot(labels, classes).float() * 2 + torch.randn(n, classes, generator=generator)
    vlm_logits = torch.nn.functional.one_hot(vlm_pred, classes).float() * 3
    return {"vlm_logits": vlm_logits, "head_logits": head_logits, "labels": labels}


@pytest.mark.parametrize("gate_type,signal", [(g, "probs") for g in GATE_TYPES] + [("concat_linear", "one_hot")])
def test_every_gate_variant_trains_and_beats_the_vlm(tmp_path, gate_type, signal):
    gate = build_gate(gate_type, 4, seed=0)
    before = {k: v.clone() for k, v in gate.state_dict().items()}
    args = GateConfig(output_dir=str(tmp_path), learning_rate=2e-2, num_train_epochs=15, per_device_train_batch_size=32,
                      disable_tqdm=True, save_strategy="no", eval_strategy="no", load_best_model_at_end=False)
    train, test = gate_split(512), gate_split(256, seed=1)
    gate, _ = train_gate(gate, signal, train, test, args)
    assert any(not torch.equal(before[k], v) for k, v in gate.state_dict().items())
    from modeling_emovlm_kd.modeling_emovlm_kd import gate_inputs

    with torch.no_grad():
        fused = gate(*gate_inputs(test["vlm_logits"], test["head_logits"], signal)).argmax(-1)
    vlm_accuracy = (test["vlm_logits"].argmax(-1) == test["labels"]).float().mean()
    assert (fused == test["labels"]).float().mean() > vlm_accuracy
