"""Reading a finished run (`train/infra/run.py`): one fusion for the gate stage, evaluation and the exported model, each
artefact loaded once, and no analysis module opening a run through another."""

import ast
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from transformers import AutoModelForImageClassification

import train
from modeling_emovlm_kd import EmoVLMKDForImageClassification
from modeling_emovlm_kd.fusion import head_from_config
from train.infra.evaluation import evaluate_branches
from train.infra.run import Run, open_run
from train.stages.distill import initial_head
from train.stages.gate import GateStudent
from train.stages.pipeline import Pipeline

TRAIN = Path(train.__file__).parent


@pytest.mark.slow
def test_gate_stage_evaluation_and_model_give_identical_fused_logits(tiny_run):
    """The acceptance test of issue 14: the same cached inputs, three consumers, one fusion."""
    output_dir = tiny_run[0]
    run = open_run(output_dir)
    logits, labels = run.branch_logits("test")  # stage `evaluate`'s computation
    features = run.features("test")
    config = run.fused_config
    stage3 = GateStudent(run.trained_gate, config.gate_vlm_signal, config.gate_head_signal).eval()
    model = AutoModelForImageClassification.from_pretrained(output_dir / "final").eval()
    with torch.no_grad():
        gate_stage = stage3(vlm_logits=features["vlm_logits"], head_logits=logits["head"]).logits
        exported = model(visual_features=features["visual_features"], vlm_logits=features["vlm_logits"])
    torch.testing.assert_close(exported.head_logits, logits["head"], rtol=0, atol=0)
    torch.testing.assert_close(gate_stage, logits["fused"], rtol=0, atol=0)
    torch.testing.assert_close(exported.logits, logits["fused"], rtol=0, atol=0)
    # ... and they are the numbers the run reported.
    fused = evaluate_branches(logits, labels, run.labels)["branches"]["fused"]["accuracy"]
    assert fused == run.results()["branches"]["fused"]["accuracy"]
    torch.testing.assert_close(exported.branch_weights, run.fusion(features["vlm_logits"],
                                                                     head_logits=logits["head"]).branch_weights)


@pytest.mark.slow
def test_one_evaluation_loads_every_artefact_once(tiny_run, monkeypatch):
    loads, configs = [], []
    load_file, from_pretrained = safetensors.torch.load_file, transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, *a, **k: loads.append(Path(path).name)
                        or load_file(path, *a, **k))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda path, *a, **k: configs.append(Path(path).name) or from_pretrained(path, *a, **k))
    run = open_run(tiny_run[0])
    for split in ("validation", "test"):
        run.branch_logits(split)
    run.branch_logits("test")
    run.parameter_counts()
    assert sorted(loads) == ["gate.safetensors", "head.safetensors", "test.safetensors", "validation.safetensors"]
    assert configs.count("merged") == 1  # the stage-1 config, read once (the teacher's is read for its count)


@pytest.mark.slow
def test_stage_two_starts_from_the_models_initialisation(tiny_run):
    """Stage 2's head goes through the model's `_init_weights` (normal(initializer_range), zero biases)."""
    run = open_run(tiny_run[0])
    head = initial_head(run.fused_config, run.seed)
    model = EmoVLMKDForImageClassification(run.fused_config)
    torch.manual_seed(run.seed)
    expected = head_from_config(run.fused_config, initialise=False)
    expected.apply(model._init_weights)
    for (name, value), reference in zip(head.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(value, reference, rtol=0, atol=0, msg=name)


def test_a_run_names_the_stage_it_lacks(tmp_path):
    from train.infra.recipe import validate_recipe

    recipe = {"output_dir": str(tmp_path), "labels": "binary", "data": {"kind": "imagefolder", "root": str(tmp_path)},
              "base_models": {"tiny": True}}
    run = Run(validate_recipe(recipe))
    with pytest.raises(FileNotFoundError, match=r"Stage 'features' has not finished in .*python -m train features"):
        run.features("test")
    with pytest.raises(FileNotFoundError, match=r"results.json not found: .* is not a finished run"):
        open_run(tmp_path)


def _imported(module: str) -> set[str]:
    """The train modules `module` (a command) imports, by their last name."""
    tree = ast.parse((TRAIN / "commands" / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("train"):
            if node.module.count(".") == 2:
                names.add(node.module.rsplit(".", 1)[1])
            else:
                names |= {alias.name for alias in node.names}
    return names


def test_no_analysis_module_opens_a_run_through_another():
    assert not _imported("report") & {"ablate", "pipeline", "spread", "publish"}
    assert not _imported("publish") & {"ablate", "pipeline", "spread", "report"}
    assert "run" in _imported("report") and "run" in _imported("ablate")
    # The pipeline orchestrates: reading what the stages wrote is `Run`'s.
    for method in ("features", "trained_head", "gate_inputs", "fused_logits", "branch_logits", "parameter_counts",
                   "results", "fused_config"):
        assert not hasattr(Pipeline, method), method
        assert hasattr(Run, method), method
