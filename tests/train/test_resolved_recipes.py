"""Every shipped recipe, resolved, equals what it was before the recipes inherited from a base
(`data/resolved_recipes.json`, written by `validate_recipe` on every recipe at the commit before), and every stage's
settings hash is unchanged, so no finished run reruns because its recipe was rewritten."""

import json
from pathlib import Path

import pytest

from train import STAGES
from train.infra.provenance import settings_hash, stage_settings
from train.infra.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "train" / "recipes"
FIXTURE = json.loads((Path(__file__).parent / "data" / "resolved_recipes.json").read_text())
TRAINER_SECTIONS = ("sft", "teacher", "distill", "gate")


def resolved(name: str) -> dict:
    # The 7B recipes train in bf16, which TrainingArguments accepts only on a GPU or with use_cpu (removed again).
    overrides = [] if name == "tiny/demo.yaml" else [f"{s}.use_cpu=true" for s in TRAINER_SECTIONS]
    raw = load_recipe(RECIPES / name, overrides).as_set
    if overrides:
        for section in TRAINER_SECTIONS:
            raw[section].pop("use_cpu")
            if not raw[section]:
                del raw[section]
    return raw


def test_every_shipped_recipe_is_in_the_fixture():
    shipped = {p.relative_to(RECIPES).as_posix() for p in RECIPES.glob("*/*.yaml") if p.parent.name != "accelerate"}
    assert shipped == set(FIXTURE)


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_resolved_recipe_and_settings_hashes_are_unchanged(name):
    raw = resolved(name)
    assert json.loads(json.dumps(raw)) == FIXTURE[name]["recipe"]
    assert {s: settings_hash(stage_settings(raw, s)) for s in STAGES} == FIXTURE[name]["settings_hash"]
