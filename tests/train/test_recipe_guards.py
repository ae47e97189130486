"""What a recipe may not do, refused when it is validated: leak URL credentials into what is shown, logged or
published; carry a value out of its range; blow up through YAML aliases; need the machine's hardware to be checked;
point at data that is not there (when asked)."""

import dataclasses
import math
import os
import resource
import stat
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from train.infra import stage_table
from train.infra.recipe import RecipeError, load_recipe, public_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "train" / "recipes" / "tiny" / "demo.yaml"
# Every runnable recipe; the bases (the paper's values, the authors' code's) are only merged under others.
BASES = ("paper.yaml", "authors-code.yaml")
SHIPPED = sorted(p for p in (ROOT / "train" / "recipes").rglob("*.yaml")
                 if p.parent.name != "accelerate" and p.name not in BASES)
URL = "https://alice:pa55-w0rd@llm.example.com/v1?api-key=key-0123456789&api-version=2024-10-21"
SECRETS = ("alice", "pa55-w0rd", "key-0123456789")


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def openai_recipe(tmp_path, base_url=URL):
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["instructions"] = {"generator": "openai", "base_url": base_url, "model": "m"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---- credentials in URLs --------------------------------------------------------------------------------------


def test_url_credentials_never_reach_what_is_published_or_printed(tmp_path):
    path = openai_recipe(tmp_path)
    recipe = load_recipe(path)
    text = yaml.safe_dump(public_recipe(recipe.as_set, recipe.output_dir))
    assert not [s for s in SECRETS if s in text], text
    # What stays legible: the host, the path, the API version.
    assert recipe.public()["instructions"]["base_url"] == (
        "https://***@llm.example.com/v1?api-key=***&api-version=2024-10-21")
    printed = cli("recipe", "--config", str(path))
    assert printed.returncode == 0, printed.stderr
    assert not [s for s in SECRETS if s in printed.stdout + printed.stderr]


def test_url_credentials_never_reach_stage_markers_or_rerun_reasons(tmp_path):
    from train.infra.provenance import changed_keys, current_names, stage_settings

    recipe = load_recipe(openai_recipe(tmp_path))
    settings = stage_settings(recipe.as_set, "instructions")
    assert settings["instructions.base_url"] == "https://***@llm.example.com/v1?api-key=***&api-version=2024-10-21"
    # A marker written before URLs were redacted compares equal (a credential changes no answer): no rerun.
    old = {**settings, "instructions.base_url": URL}
    assert changed_keys(current_names(old), settings) == []
    other = load_recipe(openai_recipe(tmp_path, URL.replace("llm.example.com", "other.example.com")))
    reason = "; ".join(changed_keys(current_names(old), stage_settings(other.as_set, "instructions")))
    assert "other.example.com" in reason and not [s for s in SECRETS if s in reason]


def test_an_error_message_about_a_url_is_redacted(tmp_path):
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["instructions"] = {"generator": "openai", "base_url": [URL]}  # a list: the message quotes the value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"instructions\.base_url: expected") as error:
        load_recipe(path)
    assert "llm.example.com" in str(error.value) and not [s for s in SECRETS if s in str(error.value)], error.value


def test_the_runs_own_recipe_copy_is_readable_by_its_owner_only(tmp_path):
    recipe = load_recipe(openai_recipe(tmp_path))
    target = tmp_path / "run" / "recipe.yaml"
    save_recipe(recipe, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o644)  # a copy saved by an older version is made private when saved again
    save_recipe(recipe, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert yaml.safe_load(target.read_text())["instructions"]["base_url"] == URL  # kept whole, for this machine


# ---- ranges ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("sft.num_train_epochs=0", r"sft\.num_train_epochs: must be a finite number > 0, got 0\.0"),
    ("teacher.num_train_epochs=-1", r"teacher\.num_train_epochs: must be a finite number > 0, got -1\.0"),
    ("distill.num_train_epochs=.inf", r"distill\.num_train_epochs: must be a finite number > 0, got inf"),
    ("distill.temperature=.inf", r"distill\.temperature: must be a finite number > 0, got inf"),
    ("distill.temperature=.nan", r"distill\.temperature: must be a finite number > 0, got nan"),
    ("gate.num_train_epochs=0", r"gate\.num_train_epochs: must be a finite number > 0"),
    ("sft.learning_rate=-1e-4", r"sft\.learning_rate: must be a finite number > 0, got -0\.0001"),
    ("gate.learning_rate=0", r"gate\.learning_rate: must be a finite number > 0"),
    ("model.head_dropout=2", r"model\.head_dropout: must be a finite number in \[0, 1\), got 2\.0"),
    ("model.head_hidden_dims=[64,-4]", r"model\.head_hidden_dims \(item 1\): must be an integer >= 1, got -4"),
    ("seed=-1", r"seed: must be an integer in \[0, 4294967295\], got -1"),
    ("teacher.seed=-3", r"teacher\.seed: must be an integer in \[0, 4294967295\], got -3"),
    ("data.seed=-3", r"data\.seed: must be an integer in \[0, 4294967295\]"),
    ("sft.max_steps=0", r"sft\.max_steps: must be an integer >= 1, or -1 \(-1: train num_train_epochs\)"),
    ("distill.alpha=1.5", r"distill\.alpha: must be a finite number in \[0, 1\], got 1\.5"),
    ("teacher.crop_scale=0", r"teacher\.crop_scale: must be a finite number in \(0, 1\]"),
    ("sft.lora_dropout=1", r"sft\.lora_dropout: must be a finite number in \[0, 1\)"),
    ("distill.per_device_train_batch_size=0", r"distill\.per_device_train_batch_size: must be an integer >= 1"),
    ("gate.weight_decay=-1", r"gate\.weight_decay: must be a finite number >= 0"),
    ("sft.adam_beta2=1", r"sft\.adam_beta2: must be a finite number in \[0, 1\)"),
    ("model.gate_num_experts=0", r"model\.gate_num_experts: must be an integer >= 1"),
    ("model.feature_batch_size=0", r"model\.feature_batch_size: must be an integer >= 1"),
    ("data.fractions=[0.8,-0.1,0.3]", r"data\.fractions \(item 1\): must be a finite number >= 0"),
])
def test_a_value_out_of_range_is_refused_naming_the_key_and_the_range(override, message):
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(DEMO, [override])
    assert str(error.value).startswith(f"{DEMO}: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["instructions.generator=openai", "instructions.temperature=3"],
     r"instructions\.temperature: must be a finite number in \[0, 2\]"),
    (["instructions.generator=openai", "instructions.timeout=0"], r"instructions\.timeout: must be a finite number > 0"),
    (["model.min_pixels=5000", "model.max_pixels=4000"], r"model\.min_pixels \(5000\) must not exceed model\.max_pixels"),
    (["sft.fp16=true", "sft.bf16=true"], r"sft\.fp16 and sft\.bf16: at most one of them can be true"),
])
def test_values_that_go_together_are_checked_together(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, overrides)


def _numeric(annotation) -> bool:
    members = typing.get_args(annotation) or (annotation,)
    return any(m in (int, float) or typing.get_origin(m) is list and typing.get_args(m)[0] in (int, float)
               for m in members)


def test_every_numeric_recipe_value_has_a_range_that_holds_its_default():
    from train.configs.ranges import range_of
    from train.infra.recipe import _field_types, _set_by_pipeline, section_classes

    missing = []
    for section, cls in section_classes().items():
        for name, annotation in _field_types(cls).items():
            if section in stage_table.config_sections() and name in _set_by_pipeline(cls):
                continue
            if not _numeric(annotation):
                continue
            allowed = range_of(section, name)
            if allowed is None:
                missing.append(f"{section}.{name}")
                continue
            field = next(f for f in dataclasses.fields(cls) if f.name == name)
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                continue
            for value in default if isinstance(default, list) else [default]:
                if value is not None and not isinstance(value, str):
                    assert allowed.contains(value), f"{section}.{name}: default {value!r} is out of its range"
    assert not missing, f"numeric recipe values without a range in train/configs/ranges.py: {missing}"
    assert range_of("", "seed").contains(42) and not range_of("", "seed").contains(math.inf)


# ---- YAML aliases -----------------------------------------------------------------------------------------------

BOMB = """
output_dir: {output_dir}
labels: binary
data:
  kind: hub
  name_or_path: some/data
  load_kwargs:
    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB.format(output_dir=tmp_path / "run"))
    with pytest.raises(RecipeError, match=r"bomb\.yaml: its aliases expand to more than 100,000 values"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"--set .*aliases expand to more than 100,000 values"):
        load_recipe(DEMO, ["data.load_kwargs=" + BOMB.split("load_kwargs:")[1].replace("\n    ", "\n")])


def _limit_memory():
    # The refusal must come before any expansion: 4 GiB of address space (the imports need about 2) and 60 s of CPU.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))


def test_the_recipe_command_refuses_an_alias_bomb_within_bounded_memory_and_time(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB.format(output_dir=tmp_path / "run"))
    result = cli("recipe", "--config", str(path), preexec_fn=_limit_memory, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "aliases expand to more than 100,000 values" in result.stderr and "Traceback" not in result.stderr


def test_ordinary_aliases_and_self_references(tmp_path):
    path = tmp_path / "aliases.yaml"
    recipe = DEMO.read_text().replace("  learning_rate: 2.0e-3\n  num_train_epochs: 8",
                                      "  learning_rate: &lr 2.0e-3\n  num_train_epochs: 8", 1)
    recipe = recipe.replace("teacher:\n  learning_rate: 2.0e-3", "teacher:\n  learning_rate: *lr", 1)
    path.write_text(recipe)
    assert load_recipe(path).teacher.learning_rate == 2e-3
    path.write_text("output_dir: x\nlabels: binary\ndata: &d {kind: hub, load_kwargs: {x: *d}}\n")
    with pytest.raises(RecipeError, match=r"aliases\.yaml: an alias refers to the value that contains it"):
        load_recipe(path)


# ---- validation on any machine ----------------------------------------------------------------------------------


def test_every_shipped_recipe_validates_on_this_cpu_machine_without_overrides():
    assert len(SHIPPED) >= 16
    for path in SHIPPED:
        assert load_recipe(path).labels, path
    result = cli("recipe", "--config", str(ROOT / "train" / "recipes" / "qwen2-vl-7b" / "emoset.yaml"))
    assert result.returncode == 0, result.stderr
    assert "data.root data/EmoSet-118K does not exist here: not checked" in result.stderr


def test_device_checks_happen_when_a_stage_starts_with_one_line_naming_the_key(monkeypatch):
    from train.infra import recipe as recipe_module

    monkeypatch.setattr(recipe_module, "_bf16_gpu", lambda: False)
    monkeypatch.setattr(recipe_module, "_cuda", lambda: False)
    recipe = load_recipe(ROOT / "train" / "recipes" / "qwen2-vl-7b" / "emoset.yaml")
    assert recipe.sft.bf16 is True and recipe.teacher.bf16 is True  # as the recipe says
    with pytest.raises(recipe_module.DeviceError) as error:
        recipe.check_device("sft")
    assert str(error.value).endswith("sft.bf16: this machine has no GPU with bf16; set sft.bf16=false (or "
                                     "sft.use_cpu=true to train in bf16 on the CPU), or run on a GPU with bf16.")
    recipe.check_device("distill")  # distill does not ask for bf16
    load_recipe(ROOT / "train" / "recipes" / "qwen2-vl-7b" / "emoset.yaml", ["teacher.use_cpu=true"]).check_device(
        "teacher")
    with pytest.raises(recipe_module.DeviceError, match=r"gate\.fp16: this machine has no CUDA GPU; set "
                                                        r"gate\.fp16=false, or run on a GPU\."):
        load_recipe(DEMO, ["gate.fp16=true"]).check_device("gate")


def _demo_with_root(tmp_path, root, **data):
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["data"] = {"kind": "imagefolder", "root": str(root), **data}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_recipe_command_checks_data_that_is_here_and_says_what_it_could_not_check(tmp_path):
    missing = _demo_with_root(tmp_path, tmp_path / "no-such-folder")
    result = cli("recipe", "--config", str(missing))
    assert result.returncode == 0, result.stderr
    assert f"data.root {tmp_path / 'no-such-folder'} does not exist here: not checked" in result.stderr
    required = cli("recipe", "--config", str(missing), "--check-data")
    assert required.returncode == 2 and "Traceback" not in required.stderr
    assert f"data.root: {tmp_path / 'no-such-folder'} does not exist" in required.stderr
    # A folder that is here is checked whatever the flag: split folders, class folders, the split file.
    photos = tmp_path / "photos"
    (photos / "train" / "t-shirt").mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"data: .*it needs all of train, validation and test"):
        load_recipe(_demo_with_root(tmp_path, photos)).check_data()
    (photos / "validation" / "hat").mkdir(parents=True)
    (photos / "test").mkdir()
    with pytest.raises(RecipeError, match=r"data: Unknown label 'hat'"):
        load_recipe(_demo_with_root(tmp_path, photos)).check_data()
    demo_data = ROOT / "train" / "demo_data" / "fashion_mnist_sample"
    assert load_recipe(_demo_with_root(tmp_path, demo_data)).check_data(required=True) is None
    # A flat folder without a split file: checking it writes nothing (the split is made in a temporary folder).
    flat = tmp_path / "flat"
    for label in yaml.safe_load(DEMO.read_text())["labels"]:
        (flat / label).mkdir(parents=True)
        for i in range(3):
            (flat / label / f"{i}.png").write_bytes(next((demo_data / "train" / label).glob("*.png")).read_bytes())
    split = tmp_path / "split.json"
    assert load_recipe(_demo_with_root(tmp_path, flat, split_file=str(split))).check_data(required=True) is None
    assert load_recipe(_demo_with_root(tmp_path, flat, split_file=None)).check_data(required=True) is None
    assert not split.exists() and not (tmp_path / "run").exists()
    assert sorted(os.listdir(flat)) == sorted(yaml.safe_load(DEMO.read_text())["labels"])  # nothing added to the data
    with pytest.raises(RecipeError, match=r"data: .* pass a split_file to split it"):
        load_recipe(_demo_with_root(tmp_path, flat)).check_data()


def test_a_lock_records_its_holders_command_line_without_url_credentials(tmp_path, monkeypatch):
    from train.infra.locks import LockedError, exclusive

    monkeypatch.setattr(sys, "argv", ["train", "pipeline", "--set", f"instructions.base_url={URL}"])
    with exclusive(tmp_path / ".lock", "Run folder"):
        recorded = (tmp_path / ".lock.pid").read_text()
        with pytest.raises(LockedError) as error:
            with exclusive(tmp_path / ".lock", "Run folder"):
                pass
    assert "llm.example.com" in recorded and not [s for s in SECRETS if s in recorded + str(error.value)]
