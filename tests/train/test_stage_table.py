"""The stage table (`train/infra/stage_table.py`) is the one place a stage is declared: the pipeline's order,
provenance, the recipe's stage sections, the model card's stage titles and the command line's stage commands are
views of it, and a stage added there alone runs, resumes and invalidates what reads it."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments

import train
from train.__main__ import parse_args
from train.commands.card import STAGE_TITLES
from train.infra import stage_table
from train.infra.provenance import DONE
from train.infra.recipe import section_classes, top_level
from train.infra.stage_table import Stage
from train.stages.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_every_view_of_the_stages_agrees_with_the_table():
    names = tuple(stage.name for stage in stage_table.TABLE)
    assert train.STAGES == stage_table.STAGES == names and len(set(names)) == len(names)
    for index, stage in enumerate(stage_table.TABLE):
        assert callable(stage.run_function()), stage.name
        # A stage reads only stages the pipeline has run before it.
        assert set(stage.reads) <= set(names[:index]), stage.name
    configs = {stage.name: stage.config_class() for stage in stage_table.TABLE if stage.config}
    assert set(configs) == {"sft", "teacher", "distill", "gate"}
    assert all(issubclass(cls, TrainingArguments) for cls in configs.values())
    assert {name: cls for name, cls in section_classes().items() if name in configs} == configs
    assert set(configs) <= set(top_level())
    assert STAGE_TITLES == {stage.name: stage.title for stage in stage_table.TABLE if stage.title}
    assert set(STAGE_TITLES) == set(configs)  # every trained stage has its section on the model card
    for stage in stage_table.TABLE:
        assert parse_args([stage.name, "--config", "recipe.yaml"]).command == stage.name
        for key in stage.settings:  # provenance reads keys the recipe has
            assert key.split(".")[0] in top_level(), (stage.name, key)


def test_the_command_line_lists_the_stages_without_loading_the_training_stack():
    code = ("import sys; from train.__main__ import parse_args; parse_args(['sft', '--config', 'x.yaml']); "
            "print(sorted({'torch', 'trl', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and all(name in result.stdout for name in stage_table.STAGES)


# ---- a toy stage, added in one place ----------------------------------------------------------------------------

RUNS: list[str] = []


def tally(context):
    """A toy stage: writes the run's `distill.alpha` (the one recipe value it reads)."""
    RUNS.append("tally")
    path = context.stage_dir("tally") / "tally.json"
    path.write_text(json.dumps({"alpha": context.recipe.distill.alpha}))
    return {"written": str(path)}


def double(context):
    """A toy stage reading the toy stage's output."""
    RUNS.append("double")
    alpha = json.loads((context.require("tally") / "tally.json").read_text())["alpha"]
    (context.stage_dir("double") / "double.json").write_text(json.dumps({"alpha": 2 * alpha}))


@pytest.fixture
def toy_stages(monkeypatch):
    toys = (Stage("tally", f"{__name__}:tally", "a toy stage", reads=("base",), settings=("distill.alpha",)),
            Stage("double", f"{__name__}:double", "a toy stage reading the toy stage", reads=("tally",)))
    table = stage_table.TABLE
    monkeypatch.setattr(stage_table, "TABLE", (table[0], *toys, *table[1:]))
    RUNS.clear()
    return ("base", "tally", "double")


def toy_recipe(tmp_path, tiny_base, **distill):
    return {"output_dir": str(tmp_path / "run"), "labels": "mikels8", "data": {"kind": "imagefolder", "root": "x"},
            "base_models": {"vlm": str(tiny_base["vlm"]), "teacher": str(tiny_base["teacher"])}, "distill": distill}


def test_a_stage_added_to_the_table_runs_resumes_and_invalidates_what_reads_it(tmp_path, tiny_base, toy_stages):
    assert stage_table.names()[:3] == toy_stages and "tally" in parse_args(["tally", "--config", "x"]).command
    events = []

    def on_stage(stage, event):
        events.append((stage, event, (tmp_path / "run" / stage / DONE).exists()))

    Pipeline(toy_recipe(tmp_path, tiny_base, alpha=0.25), on_stage=on_stage).run(stages=toy_stages)
    assert RUNS == ["tally", "double"]
    assert json.loads((tmp_path / "run" / "double" / "double.json").read_text()) == {"alpha": 0.5}
    marker = json.loads((tmp_path / "run" / "tally" / DONE).read_text())
    assert marker["settings"] == {"distill.alpha": 0.25} and marker["written"].endswith("tally.json")
    # The hook sees each stage start before its marker and end after it, in the table's order.
    assert events == [(stage, event, event == "end") for stage in toy_stages for event in ("start", "end")]

    events.clear()
    Pipeline(toy_recipe(tmp_path, tiny_base, alpha=0.25), on_stage=on_stage).run(stages=toy_stages)
    assert RUNS == ["tally", "double"] and events == []  # up to date: nothing reruns

    Pipeline(toy_recipe(tmp_path, tiny_base, alpha=0.5)).run(stages=toy_stages)
    assert RUNS == ["tally", "double"] * 2  # its setting changed: it reruns, and so does the stage reading it
    assert json.loads((tmp_path / "run" / "double" / "double.json").read_text()) == {"alpha": 1.0}
    assert json.loads((tmp_path / "run" / "base" / DONE).read_text())["provenance"] == marker["inputs"]["base"]


def test_stage_configs_set_by_the_pipeline_are_no_recipe_keys():
    for stage in stage_table.TABLE:
        cls = stage.config_class()
        if cls is None:
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(getattr(cls, "SET_BY_PIPELINE", ())) <= fields, stage.name
