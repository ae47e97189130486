"""What every stage's `run(context)` works with: the run's validated recipe, its folder, its data (loaded once per
pipeline), the process state and the few helpers the stages share."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from train.infra.assemble import load_processor
from train.infra.provenance import Provenance
from train.infra.recipe import Recipe
from train.infra.run import Run
from train.stages.trainer_utils import last_complete_checkpoint


class StageContext:
    """The shared pieces of one run's stages. `state` is accelerate's `PartialState`; `provenance` the run folder's
    markers (a stage that runs on the main process alone waits through it on the others)."""

    def __init__(self, recipe: Recipe, state, provenance: Provenance):
        self.recipe = recipe
        self.output_dir = recipe.output_dir
        self.labels = recipe.labels
        self.seed = recipe.seed
        self.state = state
        self.provenance = provenance

    def read(self) -> Run:
        """A reader of the run folder as it is now (`train/infra/run.py`): one per stage, so that a stage reads what
        the stages before it have just written, each file once."""
        return Run(self.recipe)

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    def require(self, stage: str) -> Path:
        return self.read().require(stage)

    @cached_property
    def data(self):
        """The recipe's data set (`Run.data`), loaded once per pipeline."""
        return self.read().data

    @cached_property
    def base_models(self) -> dict[str, str]:
        """The base VLM and teacher: the recipe's, or the tiny ones stage `base` built."""
        models = self.recipe.base_models
        if models.tiny:
            root = self.require("base")
            return {"vlm": str(root / "vlm"), "teacher": str(root / "teacher")}
        return {"vlm": models.vlm, "teacher": models.teacher}

    def processor(self):
        """The base VLM's processor with the recipe's labels, prompts and resolution bounds."""
        return load_processor(self.base_models["vlm"], self.labels, **self.recipe.processor_kwargs())

    def stage_args(self, stage: str, **fixed):
        """The stage's `TrainingArguments` (`Recipe.stage_config`). A tracker (`report_to`) names the stage's run
        `<run>/<stage>` unless the recipe sets `run_name`; W&B also groups a run's stages (`WANDB_RUN_GROUP`, unless
        set). TensorBoard writes under `<output_dir>/<stage>/runs/`."""
        args = self.recipe.stage_config(stage, **fixed)
        if "wandb" in args.report_to:
            os.environ.setdefault("WANDB_RUN_GROUP", self.output_dir.name)
        return args

    def resume(self, stage: str):
        """The stage's last complete `Trainer` checkpoint (an interrupted stage resumes from it), or None."""
        return last_complete_checkpoint(self.stage_dir(stage))

    @property
    def answers_cache(self) -> Path:
        # Outside the stage's folder: a rerun of the stage (new settings) keeps the answers already paid for.
        return self.output_dir / "answers.jsonl"


__all__ = ["StageContext"]
