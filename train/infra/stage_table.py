"""The stages of a run, each declared once: its name, the stages it reads, the recipe values it depends on, its
config (for the `Trainer` stages), its model-card title, its command-line help and its run function.

Everything that knows the stages reads this table: the pipeline's order and loop (`train/stages/pipeline.py`),
provenance (`train/infra/provenance.py`: what a stage's marker records), recipe validation (`train/infra/recipe.py`:
which sections are stage configs), the model card (`train/commands/publish.py`: one section per titled stage) and the
command line (`python -m train <stage>`). Adding a stage is one entry here plus its module's `run(context)`.

Run functions and configs are named by dotted path (`"train.stages.features:run"`) and imported only when used: the
table sits below the stages (infrastructure never imports a stage) and `python -m train --help` loads no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    `reads`: the stages whose outputs it reads (it reruns when one of them reran). `settings`: the recipe values it
    depends on, a section or one `section.key` (it reruns when one of them changed). `config`: the class its recipe
    section (named like the stage) is parsed into, for the `Trainer` stages. `title`: its section of the model card.
    `run`: `"module:function"`, called with the pipeline's `StageContext`; it returns what the stage's marker records
    besides its provenance (or None). `data_splits`: the splits of the recipe's data set it reads: their fingerprint
    (files, sizes, modification times, labels: `train/infra/provenance.py`) is part of its provenance, so it reruns
    when the data folder's contents change under the same recipe."""

    name: str
    run: str
    help: str
    reads: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    config: str | None = None
    title: str | None = None
    data_splits: tuple[str, ...] = ()

    def run_function(self):
        return _resolve(self.run)

    def config_class(self) -> type | None:
        return _resolve(self.config) if self.config else None


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


TABLE: tuple[Stage, ...] = (
    Stage("base", "train.stages.base:run", "tiny offline base models (recipes with base_models.tiny)",
          settings=("seed", "labels", "base_models")),
    Stage("instructions", "train.stages.instructions:run", "generate stage 1's conversation/reasoning answers",
          reads=("base",),
          # The answers depend on the images, their labels, the generator (the base VLM for `local`) and which kinds
          # stage 1 trains on; not on how fast they are asked for (num_workers, requests_per_minute: NOT_RESULTS).
          settings=("labels", "data", "base_models", "instructions", "sft.instruction_kinds", "model.min_pixels",
                    "model.max_pixels"), data_splits=("train",)),
    Stage("sft", "train.stages.sft:run", "stage 1: instruction-tune the VLM", reads=("base", "instructions"),
          settings=("seed", "labels", "data", "base_models", "sft", "model.categorical_prompt",
                    "model.conversation_prompt", "model.reasoning_prompt", "model.min_pixels", "model.max_pixels"),
          config="train.configs.sft_config:SFTStageConfig", data_splits=("train", "validation"),
          title="Stage 1: instruction tuning of the VLM (TRL `SFTTrainer`)"),
    Stage("teacher", "train.stages.teacher:run", "fine-tune the vision teacher", reads=("base",),
          settings=("seed", "labels", "data", "base_models", "teacher"),
          config="train.configs.teacher_config:TeacherConfig", data_splits=("train", "validation"),
          title="Teacher: fine-tuning the vision teacher on the labels"),
    Stage("features", "train.stages.features:run", "cache the frozen VLM's features and the teacher's logits",
          reads=("sft", "teacher"),
          settings=("labels", "data", "model.load_in_4bit", "model.dtype", "model.feature_batch_size",
                    "model.pooling", "model.categorical_prompt", "model.min_pixels", "model.max_pixels"),
          data_splits=("train", "validation", "test")),
    Stage("distill", "train.stages.distill:run", "stage 2: distil the teacher into the head", reads=("features",),
          settings=("seed", "distill", "model.head_hidden_dims", "model.head_activation", "model.head_dropout"),
          config="train.configs.distill_config:DistillationConfig",
          title="Stage 2: distilling the teacher into the head, on the frozen VLM's visual features"),
    Stage("gate", "train.stages.gate:run", "stage 3: train the gate", reads=("features", "distill"),
          settings=("seed", "gate", "model.gate_type", "model.gate_vlm_signal", "model.gate_head_signal",
                    "model.gate_num_experts"),
          config="train.configs.gate_config:GateConfig",
          title="Stage 3: training the gate on the frozen VLM's and head's predictions"),
    Stage("evaluate", "train.stages.evaluate:run", "every branch on the validation and test splits",
          reads=("features", "distill", "gate"), settings=("labels", "model")),
    Stage("export", "train.stages.export:run", "the Hub-ready model folder final/",
          reads=("sft", "distill", "gate", "evaluate"), settings=("labels", "model")),
)


def stages() -> tuple[Stage, ...]:
    """Every stage, in the order the pipeline runs them (read at call time, so a test may add one)."""
    return TABLE


def names() -> tuple[str, ...]:
    return tuple(stage.name for stage in TABLE)


def get(name: str) -> Stage:
    for stage in TABLE:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(names())}.")


def upstream(name: str) -> set[str]:
    """Every stage whose outputs `name` reads, directly or through others."""
    found: set[str] = set()
    pending = list(get(name).reads)
    while pending:
        up = pending.pop()
        if up not in found:
            found.add(up)
            pending.extend(get(up).reads)
    return found


def consulted(stages) -> list[str]:
    """The stages `stages` are and those they read, in the table's order."""
    wanted = set(stages).union(*(upstream(stage) for stage in stages))
    return [stage for stage in names() if stage in wanted]


def config_sections() -> tuple[str, ...]:
    """The recipe sections that are stage configs (each named like its stage)."""
    return tuple(stage.name for stage in TABLE if stage.config)


STAGES = names()  # the order, for the command line and the analysis tools

__all__ = ["STAGES", "TABLE", "Stage", "config_sections", "consulted", "get", "names", "stages", "upstream"]
