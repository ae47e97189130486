"""`report_to` in every stage: the recipe's trackers get each stage's logs, under a run name that names the run and the
stage, so one tracker groups a run's stages."""

import os

import pytest
import yaml
from conftest import write_recipe
from transformers import TrainerCallback
from transformers.integrations import integration_utils

from train.stages.pipeline import Pipeline

TRAINER_STAGES = ("sft", "teacher", "distill", "gate")


class RecordingTracker(TrainerCallback):
    """An offline tracker: keeps in memory what `Trainer` reports to a `report_to` integration."""

    events: list = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append({"run_name": args.run_name, "begin": True})

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append({"run_name": args.run_name, **(logs or {})})


@pytest.fixture
def recording_tracker(monkeypatch):
    """`report_to: recording` selects `RecordingTracker` the way `report_to: wandb` selects `WandbCallback`."""
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recording", RecordingTracker)
    RecordingTracker.events = []
    return RecordingTracker.events


def test_every_stage_logs_to_the_recipes_tracker_as_run_slash_stage(colour_folder, tmp_path, recording_tracker):
    recipe = yaml.safe_load(write_recipe(tmp_path / "recipe.yaml", colour_folder, tmp_path / "colours-run",
                                         sft_epochs=1, distill_epochs=2).read_text())
    recipe["instructions"] = {"generator": "none"}
    for stage in TRAINER_STAGES:
        recipe[stage]["report_to"] = ["recording"]
    recipe["sft"].update(eval_strategy="epoch", eval_max_images=6)
    Pipeline(recipe).run(stages=("base", "instructions", "sft", "teacher", "features", "distill", "gate"))

    for stage in TRAINER_STAGES:
        events = [e for e in recording_tracker if e["run_name"] == f"colours-run/{stage}"]
        assert any(e.get("begin") for e in events), f"stage {stage} never started a tracker run"
        assert any("train_loss" in e for e in events), f"stage {stage} logged no training loss"
    assert {e["run_name"] for e in recording_tracker} == {f"colours-run/{stage}" for stage in TRAINER_STAGES}
    # Stage 1's evaluation reaches the tracker with its loss: the scored label's accuracy on 6 validation images.
    (evaluation,) = [e for e in recording_tracker if "eval_loss" in e and e["run_name"] == "colours-run/sft"]
    assert evaluation["eval_label_images"] == 6 and 0.0 <= evaluation["eval_label_accuracy"] <= 1.0
    # The selection stages report their validation accuracy too.
    for stage in ("teacher", "distill"):
        assert any("eval_accuracy" in e for e in recording_tracker if e["run_name"] == f"colours-run/{stage}")


def test_a_recipes_run_name_wins_and_wandb_groups_the_runs_stages(tmp_path, monkeypatch):
    from train.configs.distill_config import DistillationConfig
    from train.configs.sft_config import SFTStageConfig

    # The recipe's trackers must be installed (checked at validation); this test needs wandb's name only.
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    monkeypatch.setenv("WANDB_RUN_GROUP", "placeholder")
    monkeypatch.delenv("WANDB_RUN_GROUP")  # restored (removed) after the test
    recipe = {"output_dir": str(tmp_path / "emoset-7b"), "labels": "mikels8",
              "data": {"kind": "imagefolder", "root": "x"},
              "sft": {"report_to": ["wandb"], "run_name": "my-own-name"}, "distill": {"report_to": "wandb"}}
    pipeline = Pipeline(recipe)
    distill = pipeline.stage_args("distill")
    assert isinstance(distill, DistillationConfig)
    assert distill.report_to == ["wandb"] and distill.run_name == "emoset-7b/distill"
    assert os.environ["WANDB_RUN_GROUP"] == "emoset-7b"
    sft = pipeline.stage_args("sft", model_name_or_path="unused")
    assert isinstance(sft, SFTStageConfig)
    assert sft.report_to == ["wandb"] and sft.run_name == "my-own-name"
    monkeypatch.setenv("WANDB_RUN_GROUP", "chosen-by-the-user")
    pipeline.stage_args("distill")
    assert os.environ["WANDB_RUN_GROUP"] == "chosen-by-the-user"


def test_a_recipe_naming_a_tracker_that_is_not_installed_is_refused_at_validation(tmp_path, monkeypatch):
    """transformers checks a tracker only when `Trainer` starts (and for TensorBoard asks for tensorboardX): the
    recipe is refused up front, in one line naming the key and what to install."""
    from train.infra.recipe import RecipeError, validate_recipe

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    recipe = {"output_dir": str(tmp_path / "run"), "labels": "binary", "data": {"kind": "imagefolder", "root": "x"},
              "teacher": {"report_to": ["tensorboard"]}}
    with pytest.raises(RecipeError, match=r"teacher\.report_to: tensorboard is not installed: pip install "
                                          r"\"emovlm-kd\[tracking\]\"") as error:
        validate_recipe(recipe, where="r.yaml")
    assert "\n" not in str(error.value)
    recipe["teacher"]["report_to"] = ["tensorbord"]
    with pytest.raises(RecipeError, match=r"teacher\.report_to: 'tensorbord' is not a tracker transformers knows"):
        validate_recipe(recipe, where="r.yaml")
