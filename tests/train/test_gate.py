import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling_emovlm_kd import GATE_TYPES
from modeling_emovlm_kd.fusion import gate_inputs, new_gate
from train.configs.gate_config import GateConfig
from train.stages.gate import train_gate


def build_gate(gate_type, num_labels, seed=0):
    """A new gate of the model package's registry, seeded (as the pipeline's stage seeds it)."""
    torch.manual_seed(seed)
    return new_gate(gate_type, num_labels)


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
    with torch.no_grad():
        fused = gate(*gate_inputs(test["vlm_logits"], test["head_logits"], signal)).argmax(-1)
    vlm_accuracy = (test["vlm_logits"].argmax(-1) == test["labels"]).float().mean()
    assert (fused == test["labels"]).float().mean() > vlm_accuracy


# ---- stage 3 reaches its objective's optimum, whatever the data set's size ----------------------------------------


def binary_split(n, seed, vlm_right=0.8, head_right=0.9):
    """Cached rows of a binary task: a one-hot VLM right `vlm_right` of the time and a head whose logits are right
    about `head_right` of the time, independently."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    vlm_pred = torch.where(torch.rand(n, generator=generator) < vlm_right, labels, 1 - labels)
    head_pred = torch.where(torch.rand(n, generator=generator) < head_right, labels, 1 - labels)
    confidence = 0.5 + 2 * torch.rand(n, generator=generator)
    head_logits = torch.nn.functional.one_hot(head_pred, 2).float() * confidence[:, None]
    vlm_logits = torch.nn.functional.one_hot(vlm_pred, 2).float() * 5 - 5
    return {"vlm_logits": vlm_logits, "head_logits": head_logits + 0.1 * torch.randn(n, 2, generator=generator),
            "labels": labels}


def objective(gate, rows, weight_decay, vlm_signal="one_hot"):
    """Mean cross-entropy of the gate on the rows plus the L2 penalty weight_decay/2 * |theta|^2, in float64."""
    v, h = gate_inputs(rows["vlm_logits"], rows["head_logits"], vlm_signal)
    gate = copy.deepcopy(gate).double()
    with torch.no_grad():
        penalty = sum((p ** 2).sum() for p in gate.parameters())
        return (F.cross_entropy(gate(v.double(), h.double()), rows["labels"]) + weight_decay / 2 * penalty).item()


def reference_fit(rows, weight_decay, num_labels=2):
    """The concat-linear gate fitted by full-batch L-BFGS in float64 until it stops improving."""
    torch.manual_seed(0)
    gate = torch.nn.Linear(2 * num_labels, num_labels).double()
    v, h = gate_inputs(rows["vlm_logits"], rows["head_logits"], "one_hot")
    x, labels = torch.cat([v, h], -1).double(), rows["labels"]
    optimizer = torch.optim.LBFGS(gate.parameters(), max_iter=10_000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(gate(x), labels) + weight_decay / 2 * sum((p ** 2).sum() for p in gate.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    reference = build_gate("concat_linear", num_labels)
    reference.proj.load_state_dict({k: t.float() for k, t in gate.state_dict().items()})
    return reference


def stage_args(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path), "disable_tqdm": True, "save_strategy": "no", **overrides}
    return GateConfig(**values)


def correct(gate, rows, vlm_signal="one_hot"):
    with torch.no_grad():
        fused = gate(*gate_inputs(rows["vlm_logits"], rows["head_logits"], vlm_signal)).argmax(-1)
    return int((fused == rows["labels"]).sum())


@pytest.mark.parametrize("weight_decay", [1e-4, 1e-2])
def test_the_gate_reaches_the_full_batch_optimum_and_is_as_good_as_the_better_branch(tmp_path, caplog, weight_decay):
    train, validation = binary_split(300, seed=0), binary_split(100, seed=1)
    args = stage_args(tmp_path, weight_decay=weight_decay)
    with caplog.at_level(logging.WARNING, logger="train.stages.gate"):
        gate, trainer = train_gate(build_gate("concat_linear", 2), "one_hot", train, validation, args)
    optimum = objective(reference_fit(train, weight_decay), train, weight_decay)
    assert objective(gate, train, weight_decay) <= optimum * 1.01
    vlm = int((validation["vlm_logits"].argmax(-1) == validation["labels"]).sum())
    head = int((validation["head_logits"].argmax(-1) == validation["labels"]).sum())
    assert correct(gate, validation) >= max(vlm, head) - 1
    assert trainer.state.best_metric == pytest.approx(correct(gate, validation) / 100)
    assert not [r for r in caplog.records if "single branch" in r.getMessage()]


def test_a_gate_below_the_better_branch_on_validation_is_reported(tmp_path, caplog):
    # Trained where the VLM is always right and the head is a coin, validated where it is the other way round:
    # the gate learns to follow the VLM, and on validation the head alone is far better.
    train = binary_split(200, seed=0, vlm_right=1.0, head_right=0.5)
    validation = binary_split(100, seed=1, vlm_right=0.5, head_right=1.0)
    with caplog.at_level(logging.WARNING, logger="train.stages.gate"):
        gate, _ = train_gate(build_gate("concat_linear", 2), "one_hot", train, validation, stage_args(tmp_path))
    head = int((validation["head_logits"].argmax(-1) == validation["labels"]).sum())
    assert correct(gate, validation) < head - 1
    [record] = [r for r in caplog.records if "single branch" in r.getMessage()]
    assert record.levelno == logging.WARNING and "head" in record.getMessage()


def test_an_interrupted_gate_stage_resumes_to_the_same_gate(tmp_path):
    train, validation = gate_split(256), gate_split(128, seed=1)
    common = {"save_strategy": "epoch", "lbfgs_max_iter": 3, "weight_decay": 1e-3}
    whole, _ = train_gate(build_gate("moe", 4), "probs", train, validation,
                          stage_args(tmp_path / "whole", num_train_epochs=30, **common))
    train_gate(build_gate("moe", 4), "probs", train, validation,
               stage_args(tmp_path / "cut", num_train_epochs=2, **common))
    resumed, trainer = train_gate(build_gate("moe", 4), "probs", train, validation,
                                  stage_args(tmp_path / "cut", num_train_epochs=30, **common),
                                  resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert trainer.state.global_step > 2
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_the_head_signal_reaches_the_gate(tmp_path):
    train, validation = gate_split(128), gate_split(64, seed=1)
    args = stage_args(tmp_path, num_train_epochs=1, lbfgs_max_iter=1)
    gates = {}
    for signal in ("probs", "logits"):
        gates[signal], _ = train_gate(build_gate("concat_linear", 4), "one_hot", train, validation, args,
                                      head_signal=signal)
    assert not torch.equal(gates["probs"].proj.weight, gates["logits"].proj.weight)


TWO_PROCESS_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_gate import build_gate, gate_split
from train.configs.gate_config import GateConfig
from train.stages.gate import train_gate
train, validation = gate_split(257), gate_split(101, seed=1)
args = GateConfig(output_dir=sys.argv[1], disable_tqdm=True, save_strategy="no", logging_strategy="no", use_cpu=True)
gate, trainer = train_gate(build_gate("moe", 4), "probs", train, validation, args)
if trainer.args.process_index == 0:
    torch.save({{"gate": gate.state_dict(), "accuracy": trainer.state.best_metric}}, sys.argv[1] + "/result.pt")
"""


@pytest.mark.slow
def test_two_processes_fit_the_same_gate_as_one(tmp_path):
    """Under torchrun every rank sees every training row: the line search agrees across ranks, and the gate is
    the one-process gate."""
    script = tmp_path / "fit.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(root), env.get("PYTHONPATH")]))
    results = {}
    for name, launcher in [("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])]:
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([sys.executable, *launcher, str(script), str(out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = torch.load(out / "result.pt")
    assert results["two"]["accuracy"] == results["one"]["accuracy"]
    for key, value in results["one"]["gate"].items():
        torch.testing.assert_close(results["two"]["gate"][key], value)
