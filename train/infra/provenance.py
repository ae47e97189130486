"""Stage provenance: what each stage of a run was computed from, so that a rerun redoes exactly what changed.

Every finished stage leaves `<output_dir>/<stage>/stage_done.json` with

    settings        the recipe values the stage reads (flattened `section.key` -> value; secrets left out, URL
                    credentials masked)
    settings_hash   their hash
    inputs          {upstream stage: its `provenance`} for the stages whose outputs it read
    provenance      a fresh id of this execution of the stage

A stage is up to date when its marker exists, its settings equal the recipe's and every input's current
`provenance` is the one it read. Any rerun of a stage gives it a new `provenance`, so everything downstream of a
rerun stage reruns too. A stage that starts writes `stage_started.json` with its settings and inputs; a killed
stage resumes from its checkpoints only when they were made with the same ones.

Which values and stages each stage reads is the stage table's (`train/infra/stage_table.py`); `Provenance` keeps the
markers of one run folder (the pipeline asks it what is stale, and starts and finishes stages through it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.infra import stage_table
from train.infra.files import write_json_atomic
from train.infra.recipe import SECRET_KEY
from train.infra.secrets import redact_text

if TYPE_CHECKING:
    from train.infra.recipe import Recipe

# Values that change how a stage reports or connects, never what it computes: editing them reruns nothing.
NOT_RESULTS = {"logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "report_to", "run_name",
               "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
               "dataloader_prefetch_factor", "timeout", "max_retries", "backoff", "num_workers",
               "requests_per_minute", "project", "trackio_space_id"}
# Keys a library renamed: both names are recorded under the new one, so a run finished under the old name stays up
# to date after its recipe says the new one (transformers 5 renamed `gradient_checkpointing*`).
RENAMED = {"gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
DONE, STARTED, FAILED = "stage_done.json", "stage_started.json", "stage_failed.json"


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{RENAMED.get(key, key)}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def stage_settings(recipe: dict, stage: str) -> dict[str, Any]:
    """The recipe values `stage` reads (`Recipe.as_set`), as `section.key` -> value (secrets and report-only values
    left out)."""
    flat = flatten(recipe)
    selected = {}
    keys = stage_table.get(stage).settings
    for key, value in flat.items():
        if not any(key == p or key.startswith(f"{p}.") for p in keys):
            continue
        leaf = key.rsplit(".", 1)[-1]
        if SECRET_KEY.search(leaf) or leaf in NOT_RESULTS:
            continue
        selected[key] = _redacted(value)
    return dict(sorted(selected.items()))


def _redacted(value):
    """A setting with the credentials inside URLs masked (`train/infra/secrets.py`): markers and rerun reasons never
    hold them, and a credential alone (which changes no result) reruns nothing."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    return value


def current_names(settings: dict) -> dict[str, Any]:
    """Recorded `section.key` settings with renamed keys under their current names (`RENAMED`) and URL credentials
    masked (a marker written before they were)."""
    renamed = {}
    for key, value in settings.items():
        section, _, leaf = key.rpartition(".")
        renamed[f"{section}.{RENAMED[leaf]}" if section and leaf in RENAMED else RENAMED.get(key, key)] = _redacted(value)
    return dict(sorted(renamed.items()))


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every value that differs (added and removed keys included)."""
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
            changes.append(f"{key}: {show(before)} -> {show(after)}")
    return changes


def read_marker(stage_dir: Path, name: str = DONE) -> dict | None:
    try:
        marker = json.loads((stage_dir / name).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def new_marker(stage: str, settings: dict, inputs: dict[str, str], **info) -> dict:
    return {"stage": stage, "finished": time.time(), "settings": settings, "settings_hash": settings_hash(settings),
            "inputs": inputs, "provenance": uuid.uuid4().hex, **info}


class StageError(RuntimeError):
    """A stage cannot run: what it needs is missing or out of date."""


class Provenance:
    """The markers of one run folder: whether each stage is up to date with the recipe and the stages it reads,
    and the bookkeeping of a stage's start and end. `state` is the process state (accelerate's `PartialState`):
    only the main process writes a marker, every process waits for it."""

    def __init__(self, recipe: Recipe, state):
        self.recipe = recipe
        self.output_dir = recipe.output_dir
        self.state = state

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / DONE).exists()

    def settings(self, stage: str) -> dict:
        return stage_settings(self.recipe.as_set, stage)

    def current_inputs(self, stage: str) -> dict[str, str | None]:
        """The `provenance` of each stage `stage` reads, as their markers say now."""
        return {up: (read_marker(self.stage_dir(up)) or {}).get("provenance")
                for up in stage_table.get(stage).reads}

    def stale_reason(self, stage: str) -> str | None:
        """Why `stage` must (re)run, or None when its marker matches the recipe and its inputs."""
        marker = read_marker(self.stage_dir(stage))
        if marker is None:
            return "it has not finished"
        if "settings" not in marker:
            return "it was recorded without its settings (an older version of this project)"
        changes = changed_keys(current_names(marker["settings"]), self.settings(stage))
        if changes:
            return "its settings changed: " + "; ".join(changes)
        recorded = marker.get("inputs") or {}
        for up, provenance in self.current_inputs(stage).items():
            if provenance is None or recorded.get(up) != provenance:
                return f"its input stage {up!r} was rerun or changed"
        return None

    def check_inputs_fresh(self, stage: str) -> None:
        """Raise `StageError` unless every stage upstream of `stage` is finished and up to date."""
        for up in stage_table.get(stage).reads:
            self.check_inputs_fresh(up)
            reason = self.stale_reason(up)
            if reason:
                raise StageError(
                    f"Stage {stage!r} reads stage {up!r}, which is out of date in {self.output_dir}: {reason}. "
                    f"Run `python -m train {up}` (and what follows) or the whole pipeline first."
                )

    def start(self, stage: str) -> None:
        """Clear what must not be reused, then record what this execution of the stage is computed from.

        A finished stage that reruns starts afresh (its old checkpoints hold the old settings' result); so does an
        interrupted one whose settings or inputs have changed since. An interrupted one with the same settings and
        inputs keeps its checkpoints and resumes."""
        stage_dir = self.stage_dir(stage)
        started = {"settings": self.settings(stage), "inputs": self.current_inputs(stage)}
        previous = read_marker(stage_dir, STARTED)
        if previous is not None and isinstance(previous.get("settings"), dict):
            previous["settings"] = current_names(previous["settings"])
        fresh_start = self.is_done(stage) or (
            stage_dir.exists() and (previous is None or {k: previous.get(k) for k in started} != started))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            if fresh_start and stage_dir.exists():
                shutil.rmtree(stage_dir)
            write_json_atomic(started, stage_dir / STARTED)
        self.state.wait_for_everyone()

    def mark_done(self, stage: str, **info) -> None:
        if self.state.is_main_process:
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            marker = new_marker(stage, self.settings(stage), self.current_inputs(stage), **info)
            write_json_atomic(marker, self.stage_dir(stage) / DONE)
            (self.stage_dir(stage) / STARTED).unlink(missing_ok=True)
        self.state.wait_for_everyone()

    def mark_failed(self, stage: str, error: BaseException) -> None:
        """What the main process leaves when a stage it runs alone fails, so that `wait_for_marker` stops."""
        write_json_atomic({"error": f"{type(error).__name__}: {error}"}, self.stage_dir(stage) / FAILED)

    def clear_failed(self, stage: str) -> None:
        if self.state.is_main_process:  # a failure of an earlier attempt must not stop the waiting ranks
            (self.stage_dir(stage) / FAILED).unlink(missing_ok=True)
        self.state.wait_for_everyone()  # instant: every rank is here

    def wait_for_marker(self, stage: str, poll: float = 2.0) -> None:
        """Wait, without any collective, until the main process has finished (or failed) `stage`."""
        stage_dir = self.stage_dir(stage)
        while not (stage_dir / DONE).exists():
            failed = read_marker(stage_dir, FAILED)
            if failed is not None:
                raise StageError(f"Stage {stage!r} failed on the main process: {failed.get('error')}")
            time.sleep(poll)


__all__ = ["DONE", "FAILED", "RENAMED", "STARTED", "Provenance", "StageError", "changed_keys", "current_names", "new_marker", "read_marker",
           "settings_hash", "stage_settings"]
