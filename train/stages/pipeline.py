"""All stages in order, from a YAML recipe: base models -> instruction answers -> stage 1 (SFT) -> teacher -> feature
caches -> stage 2 (distillation) -> stage 3 (gate) -> evaluation -> Hub-ready folder.

The stages and their order are the stage table's (`train/infra/stage_table.py`); each stage's body is the `run` of
its module in `train/stages/`. The recipe is validated as a whole before anything runs (`train/infra/recipe.py`). A
finished stage leaves `<output_dir>/<stage>/stage_done.json` with the settings it used and the stages it read
(`train/infra/provenance.py`): on rerun it is skipped if neither changed, and rerun (with everything downstream) if
either did. An interrupted stage resumes from its last `Trainer` checkpoint when its settings are unchanged. One
process at a time works on a run folder (`<output_dir>/.lock`). Runs under `torchrun`/`accelerate launch` too:
`Trainer` stages use all processes, the other stages run on the main process while the others wait.

Nothing is lost and nothing runs on bad inputs. Before any stage runs, any stage folder is removed or `recipe.yaml`
is written, `Pipeline.run` checks, in this order: that the output folder is a run folder or empty (`provenance.is_run_folder`:
it holds `recipe.yaml` or a stage marker; a non-empty folder without one is refused, so `--output-dir` never wipes a
folder of one's own); that each stage a command runs has the stages it reads finished and up to date (one line
naming the stage to run first); the data (its file list and labels: a missing root or a layout its loader refuses is
one line naming it) whenever a stage that reads it runs or is checked; the machine (`Recipe.check_device`: bf16,
fp16, tf32) for every stage about to run; and the labels against the base VLM's tokenizer. A command refused by any
of these changes nothing in the run folder.

    python -m train pipeline --config recipes/tiny/demo.yaml
    python -m train pipeline --config recipes/qwen2-vl-7b/emoset.yaml --set sft.per_device_train_batch_size=2
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import PartialState

from train.infra import stage_table
from train.infra.evaluation import format_table
from train.infra.locks import exclusive
from train.infra.provenance import Provenance, StageError
from train.infra.recipe import DeviceError, Recipe, RecipeError, load_recipe, save_recipe, validate_recipe
from train.infra.run import Run, RunFolderError
from train.stages.context import StageContext

logger = logging.getLogger(__name__)


class Pipeline:
    """The stages of one run, sharing its validated recipe, output folder, data and label set.

    `on_stage(stage, event)`, if given, is called with `event` "start" just before a stage's body runs and "end"
    once its marker is written (not for stages skipped as up to date): a benchmark times the real stages with it."""

    def __init__(self, recipe: Recipe | dict, on_stage: Callable[[str, str], None] | None = None):
        self.recipe = recipe if isinstance(recipe, Recipe) else validate_recipe(recipe)
        self.output_dir = self.recipe.output_dir
        self.seed = self.recipe.seed
        self.labels = self.recipe.labels
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.provenance = Provenance(self.recipe, self.state, data=lambda: self.context.data)
        self.context = StageContext(self.recipe, self.state, self.provenance)
        self.on_stage = on_stage or (lambda stage, event: None)

    def read(self) -> Run:
        """A reader of the run folder as it is now (`train/infra/run.py`)."""
        return self.context.read()

    def stage_dir(self, stage: str) -> Path:
        return self.provenance.stage_dir(stage)

    def is_done(self, stage: str) -> bool:
        return self.provenance.is_done(stage)

    @property
    def data(self):
        return self.context.data

    def stage_args(self, stage: str, **fixed):
        return self.context.stage_args(stage, **fixed)

    def check_labels(self) -> None:
        """The checks that need the base VLM's tokenizer (labels that tokenize apart after the prompt), at the start
        of a run instead of at the stage that first scores labels."""
        try:
            processor = self.context.processor()
        except (OSError, ValueError) as err:
            raise StageError(f"{self.recipe.source}: the base VLM {self.context.base_models['vlm']} cannot be loaded: "
                             f"{str(err).splitlines()[0]}") from None
        try:
            processor.prompt_token_ids()
        except ValueError as err:
            raise StageError(f"{self.recipe.source}: labels {self.labels} cannot be scored with "
                             f"{self.context.base_models['vlm']}'s tokenizer: {err}") from err

    def lock(self):
        """The run folder's lock, one per process of a `torchrun` job (two jobs on one folder fail at once)."""
        rank = self.state.process_index
        return exclusive(self.output_dir / (".lock" if rank == 0 else f".lock.rank{rank}"),
                         f"Run folder {self.output_dir}")

    def run_stage(self, stage: str) -> None:
        """The stage's body (its module's `run`, named by the stage table), then its marker."""
        self.on_stage(stage, "start")
        info = stage_table.get(stage).run_function()(self.context) or {}
        self.provenance.mark_done(stage, **info)
        self.on_stage(stage, "end")

    def run(self, stages: Sequence[str] | None = None, force: bool = False) -> dict:
        """Run `stages` (default: all of the stage table's) in order, skipping each that is up to date (unless
        `force`).

        Given all stages (the pipeline), a stage reruns when its settings, an input or its data changed. Given a
        subset (a single-stage command), the stages it reads must already be finished and up to date. Everything is
        checked (see the module docstring) before `recipe.yaml` is written or any stage starts."""
        stages = list(stage_table.names() if stages is None else stages)
        self.provenance.check_output_folder()
        self.provenance.check_order(stages)
        if any(stage_table.get(stage).data_splits for stage in stage_table.consulted(stages)):
            self.recipe.require_data_root()  # a mistyped data root, named before anything else
        with self.lock():
            to_run = self.plan(stages, force)
            if self.state.is_main_process:
                save_recipe(self.recipe, self.output_dir / "recipe.yaml")
            for stage in stage_table.consulted(stages):
                self.provenance.record_data(stage)
            labels_checked = "base" not in to_run
            for stage in stages:
                if stage != "base" and not labels_checked:
                    self.check_labels()
                    labels_checked = True
                # In a whole pipeline, the stages before have just been brought up to date.
                self.provenance.check_inputs_fresh(stage)
                reason = "--force" if force else self.provenance.stale_reason(stage)
                if reason is None:
                    logger.info("Stage %s already finished; skipping.", stage)
                    continue
                logger.info("Stage %s runs: %s.", stage, reason)
                self.provenance.start(stage)
                self.run_stage(stage)
        return self.read().results()

    def plan(self, stages: Sequence[str], force: bool) -> list[str]:
        """The stages that will run, after checking what they read (stages, data, this machine, the labels);
        raises `StageError`, `RecipeError` (the data) or `DeviceError` naming the first problem."""
        to_run = self.provenance.stale_stages(stages, force)
        if any(stage_table.get(stage).data_splits for stage in to_run):
            self.provenance.data_state()  # the data's file list and labels, before any stage folder goes
        for stage in to_run:
            self.recipe.check_device(stage)
        if "base" not in to_run and any(stage != "base" for stage in to_run):
            self.check_labels()
        return to_run


def child_pipeline(parent: Recipe, folder: Path, overrides: dict[str, dict], shared: Sequence[str],
                   where: str) -> Pipeline:
    """The pipeline of `parent` with recipe `overrides` (section -> values) in a child run folder `folder` that links
    the parent's `shared` stages (symbolic links) and its split file: the child runs the other stages itself, on the
    parent's caches, with provenance and resume like any run. Used by the seed spread and the ablations."""
    folder.mkdir(parents=True, exist_ok=True)
    split = folder / "split.json"
    if (parent.output_dir / "split.json").is_file() and not (split.exists() or split.is_symlink()):
        split.symlink_to(os.path.relpath(parent.output_dir / "split.json", folder))
    for stage in shared:
        link, target = folder / stage, parent.output_dir / stage
        if link.is_symlink() or link.exists():
            if link.is_symlink() and os.readlink(link) == os.path.relpath(target, folder):
                continue
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            else:
                link.unlink()
        if target.exists():
            link.symlink_to(os.path.relpath(target, folder), target_is_directory=True)
    recipe = copy.deepcopy(parent.as_set)
    recipe["output_dir"] = str(folder)
    for section, values in overrides.items():
        recipe[section] = {**(recipe.get(section) or {}), **values}
    return Pipeline(validate_recipe(recipe, where=where))


def print_results(results: dict) -> None:
    if results:
        print(f"\nHeld-out {results['split']} split ({results['num_examples']} images):\n")
        print(format_table(results))


STAGES = stage_table.STAGES

__all__ = ["STAGES", "DeviceError", "Pipeline", "RecipeError", "RunFolderError", "StageError", "child_pipeline",
           "load_recipe", "print_results"]
