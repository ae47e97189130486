"""The typed recipe: every section a dataclass, validated before any stage runs.

A recipe is a YAML file with these top-level keys:

    output_dir, seed, labels     plain values
    data                         `DataSection` (which loader of `train/infra/data.py`, and its options)
    base_models                  `BaseModelsSection`
    instructions                 `InstructionsSection` (who writes the conversation/reasoning answers)
    model                        `ModelSection` (the fused model's options, saved in its config)
    sft, teacher, distill, gate  the stage configs of the stage table (`train/configs/`: `SFTStageConfig`, ...)
    base                         optional: recipe file(s) merged under this one (`train/recipes/paper.yaml` holds
                                 the paper's hyperparameters; each data set/backbone recipe states what differs)

`load_recipe` merges the bases first, so what is validated, hashed for provenance and stored is the resolved
recipe. It parses each section with `HfArgumentParser.parse_dict(..., allow_extra_keys=False)` after checking
every key and the type of every value against the section's dataclass, so a misspelled section or key, or a value
of the wrong type, fails at once with `section.key`, what was wrong and the allowed keys, before anything is trained
or deleted. `python -m train recipe --help` lists every field with its help text and default.

Every numeric value must lie in its range (`train/configs/ranges.py`), so `num_train_epochs: 0`, an infinite
temperature or a negative seed stop the run at start too. YAML anchors and aliases are allowed, but a document whose
aliases expand to more than `MAX_YAML_VALUES` values (an "alias bomb") or that refers to itself is refused before
anything expands it.

What is checked does not depend on the machine: a recipe for a bf16 GPU validates on a laptop. What this machine
must have is checked when a stage starts (`Recipe.check_device`: `sft.bf16` without a bf16 GPU is one line naming
the key to change), and the data (`Recipe.check_data`) where it is: `python -m train recipe` checks the data root's
layout when the root is here (and refuses a missing one with `--check-data`); the pipeline and the stage commands
load the data's file list before any stage runs or any stage folder is removed.

What a run stores about its recipe: `<output_dir>/recipe.yaml` keeps it whole (it never leaves the machine; only
its owner may read it, mode 0600); `public_recipe` is what goes into `results.json`, the report and the model card,
with secrets removed (keys naming a key, token, secret or password; credentials inside URLs, such as
`https://user:password@host` or `?api-key=...`) and local paths made relative to the run or dropped. Error messages
redact URL credentials too.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from modeling_emovlm_kd import resolve_label_set
from train.configs import ranges
from train.configs.sections import BaseModelsSection, DataSection, InstructionsSection, ModelSection
from train.infra import registry, stage_table
from train.infra.secrets import redact_text
from train.infra.trackers import check_report_to

if TYPE_CHECKING:
    from train.configs.distill_config import DistillationConfig
    from train.configs.gate_config import GateConfig
    from train.configs.sft_config import SFTStageConfig
    from train.configs.teacher_config import TeacherConfig


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the file, the `section.key` and what is allowed (credentials
    inside URLs redacted: a message may quote a value)."""

    def __init__(self, message: str):
        super().__init__(redact_text(str(message)))


class DeviceError(RecipeError):
    """A valid recipe that this machine cannot run now (bf16 without a bf16 GPU, fp16 without CUDA, ...): the message
    names the key to change."""


@dataclass
class _RunValues:
    """The recipe's top-level values (typed like the sections)."""

    output_dir: str
    seed: int = 42


SCALARS = typing.get_type_hints(_RunValues)
SECTIONS = {"data": DataSection, "base_models": BaseModelsSection, "instructions": InstructionsSection,
            "model": ModelSection}


def top_level() -> tuple[str, ...]:
    """Every top-level key of a recipe: the scalars, the labels, the sections and the stage configs."""
    return (*SCALARS, "labels", *SECTIONS, *stage_table.config_sections())


def section_classes() -> dict[str, type]:
    """Each section's dataclass: the recipe's own and the stage configs of the stage table (imported here: they pull
    in TRL/peft, which `python -m train recipe` and the tools need not load up front)."""
    return {**SECTIONS, **{name: stage_table.get(name).config_class() for name in stage_table.config_sections()}}


def _set_by_pipeline(cls) -> tuple[str, ...]:
    """Fields of a stage config that the pipeline sets itself (not recipe keys)."""
    return ("output_dir", *getattr(cls, "SET_BY_PIPELINE", ()))


# ---- types ---------------------------------------------------------------------------------------------------


def _describe(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# What each argparse `type` of `HfArgumentParser` accepts, for the error messages.
_EXPECTED = {int: "an integer", float: "a number", str: "a string", string_to_bool: "true or false", dict: "a mapping"}


@functools.cache
def _field_actions(cls) -> dict[str, argparse.Action]:
    """`HfArgumentParser`'s argparse action of every field of `cls`: its `type`, `nargs` and `choices`."""
    actions = {}
    for action in HfArgumentParser(cls)._actions:
        actions.setdefault(action.dest, action)  # a bool field's `--no_*` complement comes second
    return actions


def _typed(value: Any, annotation, action: argparse.Action) -> Any:
    """`value` typed as `HfArgumentParser` types the field on a command line (its argparse `type`, on each item of a
    list field, and its `choices`), so that a YAML or `--set` string means what it would as a flag (`"1e-3"` ->
    1e-3, `"true"` -> True); raises `TypeError` saying what was expected."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if value is None:
        if type(None) in members:
            return None
        raise TypeError(f"expected {_describe(annotation)}, got null")
    if isinstance(value, str) and str in members or isinstance(value, dict) and (dict in members or annotation is dict):
        return value  # the string or mapping member of a union (`report_to: str | list[str]`, `fsdp_config`)
    if action.nargs in ("+", "*"):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        return [_typed_item(item, action, str in members) for item in value]
    return _typed_item(value, action, str in members, _describe(annotation) if members else None)


def _typed_item(value: Any, action: argparse.Action, any_string: bool, expected: str | None = None) -> Any:
    expected = expected or _EXPECTED.get(action.type, f"one of {action.choices}" if action.choices else "a value")
    if isinstance(value, (list, tuple, dict)) or action.type is None:
        raise TypeError(f"expected {expected}, got {value!r}")
    try:
        typed = action.type(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise TypeError(f"expected {expected}, got {value!r}") from None
    if action.choices and typed not in action.choices and not any_string:
        raise TypeError(f"expected one of {list(action.choices)}, got {value!r}")
    return typed


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def parse_section(name: str, cls, values: Any, where: str = "recipe", defaults: dict | None = None):
    """The dataclass `cls` from a recipe section (over `defaults`), through
    `HfArgumentParser.parse_dict(allow_extra_keys=False)`, after checking every key and value type; errors name
    `name.key`."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: section {name!r} must be a mapping of keys to values, got {values!r}.")
    types_ = _field_types(cls)
    settable = sorted(set(types_) - set(_set_by_pipeline(cls) if name in stage_table.config_sections() else ()))
    checked = {}
    for key, value in values.items():
        if key not in settable:
            hint = _close_match(key, settable)
            raise RecipeError(f"{where}: unknown key {name}.{key}{hint}. Allowed keys of {name!r}: "
                              f"{', '.join(settable)}.")
        try:
            checked[key] = _typed(value, types_[key], _field_actions(cls)[key])
        except TypeError as err:
            raise RecipeError(f"{where}: {name}.{key}: {err}.") from None
        problem = ranges.check_value(name, key, checked[key])
        if problem:
            raise RecipeError(f"{where}: {problem}")
    values = {**(defaults or {}), **checked}
    # Validation does not depend on the machine: TrainingArguments refuses bf16 (and tf32) where the hardware lacks
    # it, so the section is parsed with them off and given back as the recipe says; `Recipe.check_device` checks
    # them when a stage starts.
    hardware = {key: None if key == "tf32" else False for key in HARDWARE_KEYS if values.get(key)}
    try:
        (parsed,) = HfArgumentParser(cls).parse_dict({**values, **hardware}, allow_extra_keys=False)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: section {name!r} is invalid: {err}") from err
    for key in hardware:
        setattr(parsed, key, values[key])
    problem = ranges.related(name, {key: getattr(parsed, key, None) for key in ranges.RELATED_KEYS})
    if problem:
        raise RecipeError(f"{where}: {problem}")
    return parsed, checked


# TrainingArguments' values that only some machines can run (checked by `Recipe.check_device` at stage start).
HARDWARE_KEYS = ("bf16", "bf16_full_eval", "fp16", "fp16_full_eval", "tf32")


def _bf16_gpu() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _tf32() -> bool:
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()


def _close_match(key: str, allowed) -> str:
    import difflib

    match = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ---- the recipe ----------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A validated recipe, every section a typed attribute (`recipe.model.gate_type`, `recipe.sft.learning_rate`;
    the stage configs with the run's `output_dir/<stage>` and seed).

    `as_set` is what the file (and `--set`) said, each value converted to its field's type: what provenance hashes
    (`train/infra/provenance.py`), `recipe.yaml` keeps and `public_recipe` publishes. Values left unset are not in
    it, so a default that changes reruns nothing that was finished."""

    output_dir: Path
    seed: int
    labels: list[str]
    data: DataSection
    base_models: BaseModelsSection
    instructions: InstructionsSection
    model: ModelSection
    sft: SFTStageConfig
    teacher: TeacherConfig
    distill: DistillationConfig
    gate: GateConfig
    as_set: dict
    source: str = "recipe"

    def model_kwargs(self) -> dict[str, Any]:
        """The fused model's config options the recipe sets (unset ones keep `EmoVLMKDConfig`'s defaults)."""
        return self.model.config_kwargs(self.as_set.get("model") or {})

    def processor_kwargs(self) -> dict[str, Any]:
        """The prompts and resolution bounds the recipe sets (`train.infra.assemble.load_processor`'s options)."""
        return self.model.processor_kwargs(self.as_set.get("model") or {})

    def stage_config(self, stage: str, **fixed):
        """A fresh config of `stage` for running it: its section over `stage_defaults`, with the fields the
        pipeline sets (`fixed`, e.g. the base model's resolved folder). This machine must be able to run it
        (`check_device`)."""
        self.check_device(stage)
        values = {**stage_defaults(self.output_dir, self.seed, stage), **(self.as_set.get(stage) or {}), **fixed}
        return stage_table.get(stage).config_class()(**values)

    def check_device(self, stage: str) -> None:
        """Raise `DeviceError`, one line naming the key to change, if this machine cannot run `stage` as the recipe
        says (the hardware checks `validate_recipe` leaves out, so that a recipe validates on any machine)."""
        config = getattr(self, stage, None)
        if stage not in stage_table.config_sections() or config is None:
            return
        for key in ("bf16", "bf16_full_eval"):
            if getattr(config, key) and not config.use_cpu and not _bf16_gpu():
                raise DeviceError(f"{self.source}: {stage}.{key}: this machine has no GPU with bf16; set "
                                  f"{stage}.{key}=false (or {stage}.use_cpu=true to train in bf16 on the CPU), or run "
                                  "on a GPU with bf16.")
        for key in ("fp16", "fp16_full_eval"):
            if getattr(config, key) and not _cuda():
                raise DeviceError(f"{self.source}: {stage}.{key}: this machine has no CUDA GPU; set {stage}.{key}=false, "
                                  "or run on a GPU.")
        if config.tf32 and not _tf32():
            raise DeviceError(f"{self.source}: {stage}.tf32: this machine has no GPU with TF32 (Ampere or newer); "
                              f"unset {stage}.tf32, or run on such a GPU.")

    def data_options(self) -> tuple[str, dict[str, Any]]:
        """The data set's kind and its loader's options, as a run reads them (`Run.data`): the recipe's labels for a
        generic loader, `split_file: null` in the run folder."""
        data = dict(self.as_set["data"])
        kind = data.pop("kind")
        if not registry.get(kind).named:  # generic loaders (imagefolder, hub) take the recipe's labels
            data.setdefault("labels", self.labels)
        if "split_file" in data and data["split_file"] is None:
            data["split_file"] = str(self.output_dir / "split.json")
        return kind, data

    def require_data_root(self) -> None:
        """Raise `RecipeError` if the data's root folder (or a Hub data set named by a local path) is not here."""
        kind, options = self.data_options()
        if kind == "hub":
            source = str(options.get("name_or_path"))
            if _looks_like_local_path(source) and not Path(source).expanduser().exists():
                raise RecipeError(f"{self.source}: data.name_or_path: {source} does not exist.")
            return
        root = options.get("root")
        if root is not None and not Path(root).exists():
            raise RecipeError(f"{self.source}: data.root: {root} does not exist (data kind {kind!r}).")

    def check_data(self, required: bool = False) -> str | None:
        """Check the recipe's data on this machine, as cheaply as its loader allows (the file list and labels, no
        image decoded; a split file that does not exist yet is made in a temporary folder, so checking writes
        nothing). A root that is not here is an error when `required`, else the returned note says it was not
        checked (a recipe written for another machine). A Hub data set is not loaded (it may be large): the first
        stage reads it. Raises `RecipeError` naming what is wrong."""
        import tempfile

        kind, options = self.data_options()
        try:
            self.require_data_root()
        except RecipeError:
            if required:
                raise
            where = f"data.name_or_path {options.get('name_or_path')}" if kind == "hub" else f"data.root {options.get('root')}"
            return f"{where} does not exist here: not checked (--check-data requires it)."
        if kind == "hub":
            return (f"data.name_or_path {options.get('name_or_path')}: a Hub data set is read when the first stage "
                    "runs, not checked here.")
        from train.infra.data import load_dataset_from_config

        with tempfile.TemporaryDirectory(prefix="emovlm-check-") as scratch:
            split = options.get("split_file")
            if split is not None and not Path(split).exists():
                options["split_file"] = str(Path(scratch) / "split.json")
            try:
                dataset = load_dataset_from_config(kind, **options)
            except (ValueError, OSError, KeyError) as err:
                raise RecipeError(f"{self.source}: data: {err}") from None
        names = next(iter(dataset.values())).features["label"].names
        if names != self.labels:
            raise RecipeError(f"{self.source}: data: the data set's labels {names} differ from the recipe's "
                              f"labels {self.labels}.")
        return None

    def public(self) -> dict:
        """What may leave the machine (`public_recipe`), local paths relative to the run folder."""
        return public_recipe(self.as_set, self.output_dir)


# The most values a recipe's YAML may expand to through its aliases: a recipe has a few hundred; a "billion laughs"
# document of a few lines expands to 10^9 and exhausts memory wherever it is walked (merged, hashed, published).
MAX_YAML_VALUES = 100_000


class AliasBombError(yaml.YAMLError):
    """A YAML document whose aliases expand too far, or refer to the value that contains them."""


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses, before anything is constructed, a document that refers to itself or whose
    aliases expand to more than `MAX_YAML_VALUES` values (an alias is composed once and shared; only walking the
    constructed value expands it)."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root) -> None:
    """Count the values `root` expands to (each shared node counted once per place it appears, computed once per
    node), depth first without recursion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise AliasBombError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values; write the "
                                     "values out (an alias bomb?)")
            continue
        if id(node) in sizes:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise AliasBombError("an alias refers to the value that contains it")
            if id(child) not in sizes:
                stack.append((child, False))


def load_yaml(text: str):
    """YAML as recipes are read: safe, with bounded aliases (`RecipeLoader`)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def apply_overrides(recipe: dict, overrides) -> dict:
    """`section.key=value` overrides (values parsed as YAML), all of them, in order."""
    for override in overrides or ():
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {override!r} is not of the form section.key=value.")
        *parents, leaf = key.split(".")
        node = recipe
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {override!r}: {parent!r} is not a section.")
            node = child
        try:
            node[leaf] = load_yaml(value)
        except AliasBombError as err:
            raise RecipeError(f"--set {key}: {err}.") from None
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {key}: the value is not valid YAML: {err}") from None
    return recipe


def _read_yaml(path: Path) -> dict:
    try:
        recipe = load_yaml(path.read_text()) or {}
    except OSError as err:
        raise RecipeError(f"Cannot read recipe {path}: {err}") from err
    except AliasBombError as err:
        raise RecipeError(f"{path}: {err}.") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path} must be a mapping of sections, got {type(recipe).__name__}.")
    return recipe


def merge(base: dict, override: dict) -> dict:
    """`override` over `base`: sections merge key by key (recursively), any other value (a list too) replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_bases(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe file with its `base:` recipes (a path, or a list of paths, relative to the file) merged under it:
    each base first (in order, each with its own bases resolved), then the file's own values over them."""
    path = Path(path)
    if path.resolve() in _seen:
        raise RecipeError(f"Recipe {path} is its own base (through {' -> '.join(str(p) for p in _seen)}).")
    recipe = _read_yaml(path)
    bases = recipe.pop("base", None) or []
    if not isinstance(bases, list):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: base: expected a path or a list of paths, got {base!r}.")
        merged = merge(merged, resolve_bases(path.parent / base, (*_seen, path.resolve())))
    return merge(merged, recipe)


def read_recipe(path: str | Path, overrides=()) -> dict:
    """The recipe file as a dict, its bases merged under it and the overrides applied (not yet validated)."""
    return apply_overrides(resolve_bases(path), overrides)


def stage_defaults(output_dir: Path, seed: int, stage: str) -> dict[str, Any]:
    """What a stage config takes from the run unless its section sets it: its folder `<output_dir>/<stage>`, the
    run's seed, and the tracker run name `<run>/<stage>` (`<run>`: the run folder's name)."""
    return {"output_dir": str(output_dir / stage), "seed": seed, "run_name": f"{output_dir.name}/{stage}"}


def validate_recipe(recipe: dict, where: str = "recipe") -> Recipe:
    """Check every section, key and value of `recipe`; raise `RecipeError` naming the first problem."""
    allowed = top_level()
    unknown = [key for key in recipe if key not in allowed]
    if unknown:
        key = unknown[0]
        raise RecipeError(f"{where}: unknown section {key!r}{_close_match(key, allowed)}. "
                          f"Allowed sections: {', '.join(allowed)}.")
    for key in ("output_dir", "labels", "data"):
        if recipe.get(key) in (None, "", [], {}):
            raise RecipeError(f"{where}: {key!r} is required.")
    as_set: dict[str, Any] = {}
    for key, kind in SCALARS.items():
        if key in recipe:
            try:
                as_set[key] = _typed(recipe[key], kind, _field_actions(_RunValues)[key])
            except TypeError as err:
                raise RecipeError(f"{where}: {key}: {err}.") from None
            problem = ranges.check_value("", key, as_set[key])
            if problem:
                raise RecipeError(f"{where}: {problem}")
    try:
        labels = resolve_label_set(recipe["labels"])
    except (ValueError, TypeError, KeyError) as err:
        raise RecipeError(f"{where}: labels: {err}") from None
    as_set["labels"] = recipe["labels"]
    output_dir, seed = Path(as_set["output_dir"]), as_set.get("seed", 42)
    stage_sections = stage_table.config_sections()
    sections = {}
    for name, cls in section_classes().items():
        defaults = stage_defaults(output_dir, seed, name) if name in stage_sections else None
        sections[name], checked = parse_section(name, cls, recipe.get(name), where, defaults)
        if name in recipe:
            as_set[name] = checked
    _check_data(sections["data"], as_set["data"], where)
    _check_instructions(sections["instructions"], where)
    _check_model(sections["model"], as_set.get("model", {}), labels, where)
    for name in stage_sections:
        try:
            check_report_to(sections[name].report_to, f"{name}.report_to")
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from None
    return Recipe(output_dir=output_dir, seed=seed, labels=labels, as_set=as_set, source=where, **sections)


def _check_data(data: DataSection, explicit: dict, where: str) -> None:
    try:
        entry = registry.get(data.kind)
        loader = entry.load_function()
    except ValueError as error:
        raise RecipeError(f"{where}: data.kind: {error}") from None
    parameters = {name: p for name, p in inspect.signature(loader).parameters.items() if name not in entry.loader_kwargs}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = {name for name in parameters if name != "name"}
    for key in explicit:
        if key == "kind" or key == "load_kwargs" and takes_any:
            continue
        if key not in accepted:
            raise RecipeError(f"{where}: data.{key} is not an option of data kind {data.kind!r}; it takes "
                              f"{', '.join(sorted(accepted - {'labels'}))}.")
    required = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
                and name not in ("labels", "split_file")]
    missing = [name for name in required if name not in explicit]
    if missing:
        raise RecipeError(f"{where}: data kind {data.kind!r} needs data.{missing[0]}.")


def _check_instructions(instructions: InstructionsSection, where: str) -> None:
    options = InstructionsSection.OPTIONS
    if instructions.generator not in options:
        raise RecipeError(f"{where}: instructions.generator must be one of {', '.join(options)}, "
                          f"got {instructions.generator!r}.")
    allowed = options[instructions.generator]
    for f in dataclasses.fields(InstructionsSection):
        if f.name != "generator" and f.name not in allowed and getattr(instructions, f.name) is not None:
            raise RecipeError(f"{where}: instructions.{f.name} is not an option of generator "
                              f"{instructions.generator!r} (it takes {', '.join(allowed) or 'nothing'}).")


def _check_model(model: ModelSection, explicit: dict, labels: list[str], where: str) -> None:
    from modeling_emovlm_kd import EmoVLMKDConfig

    try:
        EmoVLMKDConfig.from_label_set(labels, **model.config_kwargs(explicit))
    except (ValueError, TypeError, KeyError) as err:
        raise RecipeError(f"{where}: model: {err}") from None


def load_recipe(path: str | Path, overrides=(), output_dir: str | None = None) -> Recipe:
    """Read, override and validate a recipe file: the one entry point of every stage command."""
    recipe = read_recipe(path, overrides)
    if output_dir:
        recipe["output_dir"] = output_dir
    return validate_recipe(recipe, where=str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """The whole validated recipe (secrets included) for this machine's run folder only: readable by its owner
    alone (mode 0600), like any file that holds a credential."""
    from train.infra.files import write_text_atomic

    write_text_atomic(yaml.safe_dump(recipe.as_set, sort_keys=False), path, mode=0o600)


def recipe_help() -> str:
    """Every section and field with its help text and default, from the dataclasses themselves."""
    lines = ["Recipe sections and their fields (YAML keys; override any with --set section.key=value):", "",
             "output_dir (str, required)  Run folder.", "seed (int, default 42)  Seed of every stage.",
             "labels (required)  A label set name (mikels8, ekman6, binary) or an ordered list of class names.",
             "base (optional)  A recipe file, or a list of them, relative to this one, merged under it: the file",
             "  states only what differs (sections merge key by key; any other value, a list too, replaces the base's).",
             "  train/recipes/paper.yaml holds the paper's hyperparameters; the recipes under train/recipes/ name it.",
             ""]
    for name, cls in section_classes().items():
        lines.append(f"{name}:  {inspect.getdoc(cls).splitlines()[0]}")
        types_ = _field_types(cls)
        for f in dataclasses.fields(cls):
            if not f.init or name in stage_table.config_sections() and f.name in _set_by_pipeline(cls):
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "required"
            default = default.value if isinstance(default, enum.Enum) else default
            text = " ".join(str(f.metadata.get("help", "")).split())
            lines.append(f"  {f.name} ({_describe(types_[f.name])}, default {default!r})  {text}".rstrip())
        lines.append("")
    return "\n".join(lines)


# ---- what leaves the machine ---------------------------------------------------------------------------------

SECRET_KEY = re.compile(r"key|token|secret|password", re.IGNORECASE)
SECRET_VALUE = re.compile(r"^\s*(bearer\s+\S+|sk-[A-Za-z0-9_\-]{6,}|hf_[A-Za-z0-9]{10,}|gh[pousr]_[A-Za-z0-9]{10,}|"
                          r"xox[abpr]-[A-Za-z0-9\-]{10,}|AKIA[0-9A-Z]{12,}|eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-.]+)\s*$",
                          re.IGNORECASE)
REDACTED = "<redacted>"


def public_recipe(recipe: dict, run_dir: str | Path | None = None) -> dict:
    """`recipe` without secrets (keys naming a key, token, secret or password; values that look like bearer
    tokens; credentials inside URLs) and without local paths: an absolute path inside `run_dir` becomes relative to it, any other absolute
    path is dropped (so is `output_dir`)."""
    run_dir = Path(run_dir).resolve() if run_dir else None

    def clean(value, key=""):
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if SECRET_KEY.search(str(k)):
                    if v not in (None, ""):
                        out[k] = REDACTED
                    continue
                v = clean(v, str(k))
                if v is not _DROP:
                    out[k] = v
            return out
        if isinstance(value, (list, tuple)):
            return [v for v in (clean(v, key) for v in value) if v is not _DROP]
        if isinstance(value, str):
            if SECRET_VALUE.match(value):
                return REDACTED
            value = redact_text(value)  # credentials inside URLs: `https://user:pw@host`, `?api-key=...`
            if _looks_like_local_path(value):
                path = Path(value).expanduser()
                if run_dir is not None:
                    try:
                        return path.resolve().relative_to(run_dir).as_posix()
                    except ValueError:
                        pass
                return _DROP
        return value

    public = clean({k: v for k, v in recipe.items() if k != "output_dir"})
    root = (recipe.get("data") or {}).get("root")
    if isinstance(root, str) and root and "root" not in public.get("data", {}):
        public["data"]["root_name"] = Path(root).name  # the data set's folder name (for the card), not its path
    return public


_DROP = object()


def _looks_like_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "\\\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", value)) or value.startswith(
        os.path.expanduser("~"))


__all__ = ["MAX_YAML_VALUES", "BaseModelsSection", "DataSection", "DeviceError", "InstructionsSection",
           "ModelSection", "Recipe", "RecipeError", "RecipeLoader", "apply_overrides", "load_recipe", "load_yaml",
           "merge", "parse_section", "public_recipe", "read_recipe", "recipe_help", "resolve_bases", "save_recipe",
           "validate_recipe"]
