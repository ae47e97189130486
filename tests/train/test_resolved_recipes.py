"""Every shipped recipe, resolved (its `base:` merged under it), equals what it was before the recipes inherited from
a base (`data/resolved_recipes.json`, written by `validate_recipe` on every recipe at the commit before), and no
finished run reruns because its recipe was rewritten.

The one intended difference: stage 1's `gradient_checkpointing`, which transformers 5 deprecates (removed in 6), is
now its current name `activation_checkpointing`, with the same value. Provenance records the old name under the new
one (`provenance.RENAMED`), so stage 1's settings hash changes but a stage finished under the old name stays up to
date. A later, deliberate change: every recipe fits the gate on the validation split with its weight decay chosen by
cross-validation (`gate.fit_on: validation`, `gate.weight_decay: auto`; issue 21), so stage 3 reruns (it is cheap)."""

import json
from pathlib import Path

import pytest

from train import STAGES
from train.infra.provenance import DONE, Provenance, new_marker, settings_hash, stage_settings
from train.infra.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "train" / "recipes"
FIXTURE = json.loads((Path(__file__).parent / "data" / "resolved_recipes.json").read_text())
TRAINER_SECTIONS = ("sft", "teacher", "distill", "gate")
OLD, NEW = "gradient_checkpointing", "activation_checkpointing"
GATE_DATA = {"fit_on": "validation", "weight_decay": "auto"}


def resolved(name: str) -> dict:
    # The 7B recipes train in bf16, which TrainingArguments accepts only on a GPU or with use_cpu (removed again).
    overrides = [] if name == "tiny/demo.yaml" else [f"{s}.use_cpu=true" for s in TRAINER_SECTIONS]
    as_set = load_recipe(RECIPES / name, overrides).as_set
    if overrides:
        for section in TRAINER_SECTIONS:
            as_set[section].pop("use_cpu")
            if not as_set[section]:
                del as_set[section]
    return as_set


def renamed(recipe: dict) -> dict:
    """The fixture's recipe with the one intended difference applied."""
    recipe = json.loads(json.dumps(recipe))
    recipe["sft"] = {NEW if key == OLD else key: value for key, value in recipe["sft"].items()}
    recipe["gate"] = {**recipe["gate"], **GATE_DATA}
    return recipe


def test_every_shipped_recipe_is_in_the_fixture():
    # own-data/ came after the fixture (tests/train/test_own_data_recipes.py validates those recipes).
    shipped = {p.relative_to(RECIPES).as_posix() for p in RECIPES.glob("*/*.yaml")
               if p.parent.name not in ("accelerate", "own-data")}
    assert shipped == set(FIXTURE)


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_resolved_recipe_and_settings_are_unchanged(name, tmp_path):
    as_set = resolved(name)
    old = FIXTURE[name]["recipe"]
    assert OLD in old["sft"] and OLD not in as_set["sft"]
    assert json.loads(json.dumps(as_set)) == renamed(old)
    hashes = {s: settings_hash(stage_settings(as_set, s)) for s in STAGES}
    assert {s: h for s, h in hashes.items() if s not in ("sft", "gate")} == {
        s: h for s, h in FIXTURE[name]["settings_hash"].items() if s not in ("sft", "gate")}
    assert hashes["gate"] != FIXTURE[name]["settings_hash"]["gate"]  # the gate's rows and weight decay changed
    # Stage 1's settings under the old name hash as before; a stage 1 finished with them is up to date.
    settings = stage_settings(as_set, "sft")
    recorded = {key.replace(f"sft.{NEW}", f"sft.{OLD}"): value for key, value in settings.items()}
    assert settings_hash(recorded) == FIXTURE[name]["settings_hash"]["sft"] != hashes["sft"]
    # The data set is not here: an empty one stands for the data stage 1 read (its fingerprint is recorded too).
    provenance = Provenance(load_recipe(RECIPES / name, output_dir=str(tmp_path)), state=None, data=lambda: {})
    for stage in ("base", "instructions"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / DONE).write_text(json.dumps(new_marker(stage, {}, {})))
    inputs = provenance.current_inputs("sft")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / DONE).write_text(json.dumps(new_marker("sft", recorded, inputs,
                                                               data=provenance.data_record("sft"))))
    assert provenance.stale_reason("sft") is None
    assert provenance.stale_reason("instructions") is not None  # a check that can fail: its settings differ


def test_a_recipe_states_only_what_differs_from_its_base():
    for name in FIXTURE:
        if name != "tiny/demo.yaml":
            text = (RECIPES / name).read_text()
            assert "base: ../paper.yaml" in text and len(text.splitlines()) <= 20, name
