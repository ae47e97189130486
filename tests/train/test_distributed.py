"""Several processes: the pipeline under `torchrun --nproc_per_node 2` on CPU (gloo), and the launch configs."""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from conftest import final_metrics, write_recipe
from safetensors.torch import load_file

from train.infra.assemble import quantization_config

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "train", "recipes", "accelerate")


def _gate_objective_gradient_norm(run, gate, weight_decay: float) -> float:
    """‖∇f(θ)‖₂ of stage 3's objective f = mean CE on the run's training rows + weight_decay/2·‖θ‖², at the gate θ."""
    from train.stages.gate import GateStudent

    config = run.fused_config
    student = GateStudent(copy.deepcopy(gate).train(), config.gate_vlm_signal, config.gate_head_signal)
    parameters = [p.requires_grad_(True) for p in student.parameters()]
    objective = student(**run.gate_inputs("train")).loss + weight_decay / 2 * sum((p ** 2).sum() for p in parameters)
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(objective, parameters)]).norm())


def _assert_gate_fits_the_optimum_of_one_process(double_dir, recipe, halves, tmp_path):
    """The gate trained under torchrun is the one a single process fits on the same caches and head, within what
    the convergence of L-BFGS leaves open; so are its predictions.

    The concat-linear gate's objective (CE of an affine map of fixed inputs + weight_decay/2·‖θ‖²) is
    `weight_decay`-strongly convex, so a gate θ is within ‖∇f(θ)‖/weight_decay of the optimum θ*: two fits are within
    the sum of those bounds of each other, whatever number of L-BFGS steps each took. A fused logit moves by at most
    ‖Δθ‖·sqrt(‖x‖² + 1) for a gate input x (the VLM's and the head's probabilities, ‖x‖² ≤ 2): with the measured
    ‖Δθ‖, a row's prediction is the same wherever its margin exceeds twice that, and the number of right predictions
    differs by at most the number of other rows."""
    from train.infra.run import open_run

    single_dir = tmp_path / "gate-one-process"
    for stage in ("base", "instructions", "sft", "teacher", "features", "distill", "evaluate"):
        shutil.copytree(double_dir / stage, single_dir / stage, ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.copy2(double_dir / "recipe.yaml", single_dir / "recipe.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "train", "gate", "--config", str(recipe), "--output-dir",
                             str(single_dir), "--force", "--set", *halves], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    two, one = open_run(double_dir), open_run(single_dir)
    assert one.fused_config.gate_type == "concat_linear"  # the strongly convex case the bound is for
    weight_decay = two.recipe.gate.weight_decay  # the stage's typed config, as it ran
    for split in ("train", "validation", "test"):  # the same inputs: the torchrun run's caches and head
        for key, value in one.gate_inputs(split).items():
            assert torch.equal(value, two.gate_inputs(split)[key]), (split, key)
    distance = (_gate_objective_gradient_norm(two, two.trained_gate, weight_decay)
                + _gate_objective_gradient_norm(one, one.trained_gate, weight_decay)) / weight_decay
    theta = {name: torch.cat([p.detach().flatten() for p in run.trained_gate.parameters()])
             for name, run in (("two", two), ("one", one))}
    apart = float((theta["two"] - theta["one"]).norm())
    assert apart <= distance + 1e-5, (apart, distance)
    # The predictions, from the measured parameter difference (float32 evaluation: 1e-5 more).
    logit_bound = apart * 3 ** 0.5 + 1e-5
    for split in ("validation", "test"):
        inputs = two.gate_inputs(split)
        logits = {name: run.fused_logits(inputs) for name, run in (("two", two), ("one", one))}
        top2 = logits["one"].topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2 * logit_bound
        assert torch.equal(logits["two"].argmax(-1)[decided], logits["one"].argmax(-1)[decided]), split
        right = {name: int((value.argmax(-1) == inputs["labels"]).sum()) for name, value in logits.items()}
        assert abs(right["two"] - right["one"]) <= int((~decided).sum()), (split, right)


@pytest.mark.slow
def test_pipeline_under_torchrun_matches_one_process(tiny_run, colour_folder, tmp_path):
    single_dir = tiny_run[0]
    double_dir = tmp_path / "ddp"
    recipe = write_recipe(tmp_path / "ddp.yaml", colour_folder, double_dir)
    # Half the per-device batch on two ranks keeps the global batch of the one-process run.
    halves = ["sft.per_device_train_batch_size=3", "teacher.per_device_train_batch_size=6",
              "distill.per_device_train_batch_size=2", "gate.per_device_train_batch_size=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train", "pipeline", "--config", str(recipe), "--set", *halves]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    # Mini-batch stages: the number of optimizer steps is fixed by the data size and the global batch (epochs x
    # batches), not by the optimizer, so two ranks with half the per-device batch take exactly as many as one
    # process: each rank read a disjoint half of every global batch. (Stage 3 stops when L-BFGS converges, a
    # floating-point decision that differs between runs; its outcome is compared below instead.)
    for stage in ("sft", "teacher", "distill"):
        checkpoints = sorted((double_dir / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        single = sorted((single_dir / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        single_state = json.loads((single[-1] / "trainer_state.json").read_text())
        assert state["global_step"] == single_state["global_step"], stage
    features = load_file(double_dir / "features" / "test.safetensors")
    assert features["labels"].tolist() == load_file(single_dir / "features" / "test.safetensors")["labels"].tolist()
    one, two = final_metrics(single_dir), final_metrics(double_dir)
    for branch in one:
        assert abs(one[branch][0] - two[branch][0]) <= 0.25, (branch, one[branch], two[branch])
    _assert_gate_fits_the_optimum_of_one_process(double_dir, recipe, halves, tmp_path)


@pytest.mark.slow
def test_sharded_feature_cache_equals_the_single_process_cache(tiny_run, tmp_path):
    import shutil

    single_dir = tiny_run[0]
    double_dir = tmp_path / "features-ddp"
    for stage in ("base", "instructions", "sft", "teacher"):  # what the features stage reads, finished
        shutil.copytree(single_dir / stage, double_dir / stage)
    recipe_text = tiny_run[1].read_text().replace(str(single_dir), str(double_dir))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train", "features", "--config", str(recipe)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    for split in ("train", "validation", "test"):
        a = load_file(single_dir / "features" / f"{split}.safetensors")
        b = load_file(double_dir / "features" / f"{split}.safetensors")
        for key in a:
            # Each rank's batches hold other images (float32 kernels sum in another order): 1e-5 of the scale.
            torch.testing.assert_close(a[key], b[key], atol=1e-5 * max(1.0, float(a[key].abs().max())), rtol=0)
    assert not list((double_dir / "features").glob("*.part*"))


@pytest.mark.parametrize("name,kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp_qlora.yaml", "FSDP"),
                                       ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_launch_configs_parse(name, kind):
    config = ClusterConfig.from_yaml_file(os.path.join(RECIPES, name))
    assert config.distributed_type == kind and config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is False
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    assert quantization_config(True, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quantization_config(True, torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(False) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA with CUDA bitsandbytes kernels needs a GPU")
def test_qlora_stage_one_on_gpu(tiny_base, tmp_path):
    import datasets
    from PIL import Image

    from train.stages.sft import SFTStageConfig, train_sft

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict({"image": [Image.new("RGB", (56, 56), c) for c in ("red", "blue")] * 4,
                                       "label": [0, 1] * 4}, features=features)
    args = SFTStageConfig(output_dir=str(tmp_path), model_name_or_path=str(tiny_base["vlm"]), load_in_4bit=True,
                          max_steps=2, per_device_train_batch_size=4, instruction_kinds=["categorical"],
                          save_strategy="no", bf16=True)
    merged = train_sft(datasets.DatasetDict({"train": data}), ["a", "b"], args)
    assert (merged / "model.safetensors").exists()


@pytest.mark.slow
def test_only_the_main_process_generates_answers_under_torchrun(tiny_run, tmp_path):
    import json
    import shutil

    from conftest import LABELS, SIZES
    from test_instructions import FakeChatServer

    output_dir = tmp_path / "answers-ddp"
    shutil.copytree(tiny_run[0] / "base", output_dir / "base")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_run[1].read_text().replace(str(tiny_run[0]), str(output_dir)))
    server = FakeChatServer()
    try:
        env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        # Stage `instructions` (rank 0 generates, rank 1 polls for its marker), then stage 1 reading its answers.
        for stage in ("instructions", "sft"):
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "train", stage, "--config", str(recipe), "--set", "sft.num_train_epochs=1",
                       "sft.instruction_kinds=[categorical,conversation]", "instructions.generator=openai",
                       f"instructions.base_url={server.base_url}", "instructions.model=fake-vlm",
                       "instructions.api_key=sk-test", "instructions.num_workers=4"]
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-4000:]
    finally:
        server.close()
    images = SIZES["train"] * len(LABELS)
    assert server.requests == images  # one request per image, not one per image and rank
    records = [json.loads(line) for line in (output_dir / "answers.jsonl").read_text().splitlines()]
    assert len(records) == len({(r["key"], r["kind"]) for r in records}) == images
    assert (output_dir / "sft" / "merged" / "model.safetensors").exists()


@pytest.mark.slow
def test_stage1_label_accuracy_under_torchrun_counts_every_subset_image_once(colour_folder, tmp_path):
    import json

    import yaml
    from conftest import LABELS

    from train.infra.assemble import assemble
    from train.stages.pipeline import Pipeline

    output_dir = tmp_path / "sft-eval-ddp"
    recipe = write_recipe(tmp_path / "recipe.yaml", colour_folder, output_dir, sft_epochs=1)
    values = yaml.safe_load(recipe.read_text())
    values["instructions"] = {"generator": "none"}
    # 5 images on 2 ranks: shards of 3 and 2, summed into one accuracy.
    values["sft"].update(eval_strategy="epoch", eval_max_images=5, per_device_train_batch_size=3)
    recipe.write_text(yaml.safe_dump(values))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for stage in ("base", "instructions"):
        result = subprocess.run([sys.executable, "-m", "train", stage, "--config", str(recipe)], env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train", "sft", "--config", str(recipe)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    (checkpoint,) = (output_dir / "sft").glob("checkpoint-*")
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    (evaluation,) = [entry for entry in history if "eval_loss" in entry]
    assert evaluation["eval_label_images"] == 5
    pipeline = Pipeline(values)
    subset = pipeline.data["validation"].shuffle(seed=pipeline.seed).select(range(5))
    model, processor = assemble(checkpoint, LABELS)
    inputs = processor.image_processor(list(subset["image"]), return_tensors="pt")
    with torch.no_grad():
        scores = model.score_labels(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]),
                                    inputs["image_grid_thw"])
    expected = float((scores.argmax(-1) == torch.tensor(list(subset["label"]))).float().mean())
    assert evaluation["eval_label_accuracy"] == pytest.approx(expected)
