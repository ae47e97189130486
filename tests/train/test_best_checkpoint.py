"""Every `Trainer`-based stage saves the weights of the checkpoint it records as best, tensor for tensor, and loads
checkpoints (best and resumed) through the model's own loading, strictly.

The best epoch is made an early one by a scripted validation metric (the stage's `accuracy_metrics` replaced), so a
stage that kept (part of) its last epoch's weights instead fails here. Transformers 5.x loads the teacher's
checkpoint (legacy ViT key layout) non-strictly into the live model (new layout) and restores only 8 of its 40
tensors; a fully fine-tuned Qwen2-VL only its `lm_head`."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import COLOURS, LABELS, kill_when, run_pipeline, write_recipe
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, AutoModelForImageTextToText, TrainerCallback, set_seed

from modeling_emovlm_kd import EmoVLMKDDistillationHead
from train.stages.trainer_utils import CheckpointLoadError, submodule_tensors


def scripted_accuracy(values):
    """A `compute_metrics` that returns `values` in turn: the validation accuracy of evaluation 1, 2, ..."""
    calls = iter(values)

    def metrics(eval_pred):
        return {"accuracy": next(calls)}

    return metrics


def colour_dataset(n_per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index, label in enumerate(LABELS):
        for _ in range(n_per_class):
            pixels = np.clip(np.array(COLOURS[label]) + rng.integers(-60, 61, (28, 28, 3)), 0, 255)
            images.append(Image.fromarray(pixels.astype(np.uint8)))
            labels.append(index)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def best_checkpoint(trainer, output_dir: Path) -> Path:
    """The checkpoint `Trainer` recorded as best, checked to be an early one (not the last)."""
    best = Path(trainer.state.best_model_checkpoint)
    last = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert best != last, "the best checkpoint is the last one: the test could not tell them apart"
    return best


def assert_same_tensors(saved: dict, expected: dict, what: str):
    assert set(saved) == set(expected), f"{what}: keys differ: {sorted(set(saved) ^ set(expected))[:5]}"
    differ = [key for key in expected if not torch.equal(saved[key], expected[key])]
    assert not differ, f"{what}: {len(differ)} of {len(expected)} tensors are not the best checkpoint's: {differ[:5]}"


def teacher_args(output_dir, teacher, **kwargs):
    from train.stages.teacher import TeacherConfig

    values = dict(output_dir=str(output_dir), teacher_model_name_or_path=str(teacher), num_train_epochs=3,
                  per_device_train_batch_size=6, learning_rate=5e-3, save_total_limit=None, disable_tqdm=True,
                  seed=0)
    return TeacherConfig(**{**values, **kwargs})


def test_the_teacher_saves_its_best_checkpoint_not_a_mix_with_the_last_epoch(tiny_base, tmp_path, monkeypatch):
    import train.stages.teacher as teacher_stage

    # Validation accuracy peaks at the first epoch.
    monkeypatch.setattr(teacher_stage, "accuracy_metrics", scripted_accuracy([0.9, 0.5, 0.4]))
    data = datasets.DatasetDict({"train": colour_dataset(), "validation": colour_dataset(2, seed=1)})
    trainer = teacher_stage.train_teacher(data, LABELS, teacher_args(tmp_path, tiny_base["teacher"]))
    best = best_checkpoint(trainer, tmp_path)
    assert trainer.state.best_metric == 0.9
    # Both read as a user reads them (the model's own key conversion from the checkpoint's layout).
    saved = AutoModelForImageClassification.from_pretrained(tmp_path).state_dict()
    expected = AutoModelForImageClassification.from_pretrained(best).state_dict()
    assert_same_tensors(saved, expected, "teacher")


class Killed(Exception):
    """Stands for the process being killed right after its first checkpoint was written."""


def test_a_resumed_teacher_continues_from_its_checkpoint_weights(tiny_base, tmp_path, monkeypatch):
    """Cut right after its first checkpoint, resumed: the weights of an uninterrupted run."""
    import train.stages.teacher as teacher_stage

    data = datasets.DatasetDict({"train": colour_dataset(), "validation": colour_dataset(2, seed=1)})
    set_seed(0)  # as the pipeline does: the new classifier layer is drawn before `Trainer` seeds
    whole = teacher_stage.train_teacher(data, LABELS, teacher_args(tmp_path / "whole", tiny_base["teacher"]))

    class KilledAtFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Killed

    class Interrupted(teacher_stage.TeacherTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(KilledAtFirstCheckpoint())

    with monkeypatch.context() as patch:
        patch.setattr(teacher_stage, "TeacherTrainer", Interrupted)
        set_seed(0)
        with pytest.raises(Killed):
            teacher_stage.train_teacher(data, LABELS, teacher_args(tmp_path / "cut", tiny_base["teacher"]))
    (checkpoint,) = (tmp_path / "cut").glob("checkpoint-*")
    resumed = teacher_stage.train_teacher(data, LABELS, teacher_args(tmp_path / "cut", tiny_base["teacher"]),
                                          resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == whole.state.global_step == 6
    assert resumed.state.best_model_checkpoint.endswith(Path(whole.state.best_model_checkpoint).name)
    assert_same_tensors(AutoModelForImageClassification.from_pretrained(tmp_path / "cut").state_dict(),
                        AutoModelForImageClassification.from_pretrained(tmp_path / "whole").state_dict(),
                        "resumed teacher")


def test_a_teacher_checkpoint_missing_a_tensor_is_refused_by_name(tiny_base, tmp_path):
    from train.stages.teacher import train_teacher

    data = datasets.DatasetDict({"train": colour_dataset(), "validation": colour_dataset(2, seed=1)})
    args = teacher_args(tmp_path, tiny_base["teacher"], num_train_epochs=1)
    train_teacher(data, LABELS, args)
    checkpoint = next(tmp_path.glob("checkpoint-*"))
    weights = load_file(checkpoint / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("classifier.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, checkpoint / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointLoadError, match="classifier.weight"):
        train_teacher(data, LABELS, teacher_args(tmp_path, tiny_base["teacher"], num_train_epochs=2),
                      resume_from_checkpoint=str(checkpoint))


def cached_split(n, dim=64, classes=4, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    features = centres[labels] + torch.randn(n, dim, generator=generator)
    teacher = torch.nn.functional.one_hot(labels, classes).float() * 4 + torch.randn(n, classes, generator=generator)
    return {"visual_features": features, "teacher_logits": teacher, "labels": labels}


def test_the_distilled_head_is_its_best_checkpoint(tmp_path, monkeypatch):
    import train.stages.distill as distill_stage

    monkeypatch.setattr(distill_stage, "accuracy_metrics", scripted_accuracy([0.5, 0.9, 0.6, 0.7]))
    torch.manual_seed(0)
    args = distill_stage.DistillationConfig(output_dir=str(tmp_path), num_train_epochs=4,
                                            per_device_train_batch_size=16, save_total_limit=None,
                                            disable_tqdm=True)
    head, trainer = distill_stage.train_distillation(EmoVLMKDDistillationHead(64, [32], 4, "gelu", 0.1),
                                                     cached_split(64), cached_split(32, seed=1), args)
    best = best_checkpoint(trainer, tmp_path)
    # The checkpoint holds the `Trainer` model, `DistillationStudent`: the head's tensors under `head.`.
    checkpoint = submodule_tensors(best, "head.")
    assert_same_tensors(head.state_dict(), checkpoint, "head")


def test_the_gate_is_its_best_checkpoint_when_it_selects_on_validation(tmp_path, monkeypatch):
    from test_gate import build_gate, gate_split

    import train.stages.gate as gate_stage

    monkeypatch.setattr(gate_stage, "accuracy_metrics", scripted_accuracy([0.5, 0.9, 0.6, 0.7]))
    args = gate_stage.GateConfig(output_dir=str(tmp_path), num_train_epochs=4, lbfgs_max_iter=1,
                                 eval_strategy="epoch", load_best_model_at_end=True, save_total_limit=None,
                                 disable_tqdm=True, lbfgs_tolerance_grad=0.0, lbfgs_tolerance_change=0.0)
    gate, trainer = gate_stage.train_gate(build_gate("moe", 4), "probs", gate_split(128),
                                          gate_split(64, seed=1), args)
    best = best_checkpoint(trainer, tmp_path)
    # The checkpoint holds the `Trainer` model, `GateStudent`: the gate's tensors under `gate.`.
    checkpoint = submodule_tensors(best, "gate.")
    assert_same_tensors(gate.state_dict(), checkpoint, "gate")


def test_a_head_checkpoint_with_a_foreign_tensor_is_refused_by_name(tmp_path):
    from train.stages.distill import DistillationConfig, train_distillation

    args = DistillationConfig(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=16,
                              disable_tqdm=True)
    train_distillation(EmoVLMKDDistillationHead(64, [32], 4, "gelu", 0.1), cached_split(64), cached_split(32), args)
    checkpoint = next(tmp_path.glob("checkpoint-*"))
    weights = load_file(checkpoint / "model.safetensors")
    save_file({**weights, "head.extra.weight": torch.zeros(2)}, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointLoadError, match="head.extra.weight"):
        train_distillation(EmoVLMKDDistillationHead(64, [32], 4, "gelu", 0.1), cached_split(64), cached_split(32),
                           DistillationConfig(output_dir=str(tmp_path), num_train_epochs=2,
                                              per_device_train_batch_size=16, disable_tqdm=True),
                           resume_from_checkpoint=str(checkpoint))


def test_stage1_with_a_best_checkpoint_saves_that_checkpoints_weights(tiny_base, tmp_path, monkeypatch):
    """Fully fine-tuned Qwen2-VL selected on the scored label accuracy: the merged model is the best checkpoint."""
    from train.stages.sft import EmoVLMSFTTrainer, SFTStageConfig, train_sft

    scripted = iter([0.9, 0.2, 0.3])
    monkeypatch.setattr(EmoVLMSFTTrainer, "label_metrics",
                        lambda self: {"label_accuracy": next(scripted), "label_images": 3})
    data = datasets.DatasetDict({"train": colour_dataset(2), "validation": colour_dataset(1, seed=1)})
    args = SFTStageConfig(output_dir=str(tmp_path), model_name_or_path=str(tiny_base["vlm"]), use_peft=False,
                          instruction_kinds=["categorical"], learning_rate=5e-2, num_train_epochs=3,
                          per_device_train_batch_size=6, eval_strategy="epoch", save_strategy="epoch",
                          load_best_model_at_end=True, metric_for_best_model="label_accuracy",
                          save_total_limit=None, disable_tqdm=True, gradient_checkpointing=False)
    merged = train_sft(data, LABELS, args)
    state = json.loads(max(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                       .joinpath("trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.name == "checkpoint-1"
    saved = AutoModelForImageTextToText.from_pretrained(merged).state_dict()
    expected = AutoModelForImageTextToText.from_pretrained(best).state_dict()
    assert_same_tensors(saved, expected, "stage 1")


@pytest.mark.slow
def test_a_killed_teacher_stage_resumes_to_the_weights_of_an_uninterrupted_run(tiny_run, colour_folder, tmp_path):
    reference, killed = tiny_run[0], tmp_path / "killed"
    recipe = write_recipe(tmp_path / "killed.yaml", colour_folder, killed)
    process = run_pipeline(recipe, wait=False)
    kill_when(process, "teacher/checkpoint-*/trainer_state.json", killed, timeout=600)
    assert not (killed / "teacher" / "stage_done.json").exists(), "the kill came too late to test resuming"
    run_pipeline(recipe)
    assert_same_tensors(AutoModelForImageClassification.from_pretrained(killed / "teacher").state_dict(),
                        AutoModelForImageClassification.from_pretrained(reference / "teacher").state_dict(),
                        "resumed teacher")
    shutil.rmtree(killed)
