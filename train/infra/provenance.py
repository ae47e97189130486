"""Stage provenance: what each stage of a run was computed from, so that a rerun redoes exactly what changed.

Every finished stage leaves `<output_dir>/<stage>/stage_done.json` with

    settings        the recipe values the stage reads (flattened `section.key` -> value; secrets left out)
    settings_hash   their hash
    inputs          {upstream stage: its `provenance`} for the stages whose outputs it read
    provenance      a fresh id of this execution of the stage

A stage is up to date when its marker exists, its settings equal the recipe's and every input's current
`provenance` is the one it read. Any rerun of a stage gives it a new `provenance`, so everything downstream of a
rerun stage reruns too. A stage that starts writes `stage_started.json` with its settings and inputs; a killed
stage resumes from its checkpoints only when they were made with the same ones.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from train.infra.recipe import SECRET_KEY

# The stages whose outputs each stage reads.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "instructions": ("base",),
    "sft": ("base", "instructions"),
    "teacher": ("base",),
    "features": ("sft", "teacher"),
    "distill": ("features",),
    "gate": ("features", "distill"),
    "evaluate": ("features", "distill", "gate"),
    "export": ("sft", "distill", "gate", "evaluate"),
}
# The recipe values (a section, or one `section.key`) each stage reads.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "base": ("seed", "labels", "base_models"),
    # The answers depend on the images, their labels, the generator (the base VLM for `local`) and which kinds
    # stage 1 trains on; not on how fast they are asked for (num_workers, requests_per_minute: NOT_RESULTS).
    "instructions": ("labels", "data", "base_models", "instructions", "sft.instruction_kinds", "model.min_pixels",
                     "model.max_pixels"),
    "sft": ("seed", "labels", "data", "base_models", "sft", "model.categorical_prompt",
            "model.conversation_prompt", "model.reasoning_prompt", "model.min_pixels", "model.max_pixels"),
    "teacher": ("seed", "labels", "data", "base_models", "teacher"),
    "features": ("labels", "data", "model.load_in_4bit", "model.dtype", "model.feature_batch_size", "model.pooling",
                 "model.categorical_prompt", "model.min_pixels", "model.max_pixels"),
    "distill": ("seed", "distill", "model.head_hidden_dims", "model.head_activation", "model.head_dropout"),
    "gate": ("seed", "gate", "model.gate_type", "model.gate_vlm_signal", "model.gate_head_signal",
             "model.gate_num_experts"),
    "evaluate": ("labels", "model"),
    "export": ("labels", "model"),
}
# Values that change how a stage reports or connects, never what it computes: editing them reruns nothing.
NOT_RESULTS = {"logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "report_to", "run_name",
               "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
               "dataloader_prefetch_factor", "timeout", "max_retries", "backoff", "num_workers",
               "requests_per_minute", "project", "trackio_space_id"}
DONE, STARTED = "stage_done.json", "stage_started.json"


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def stage_settings(recipe: dict, stage: str) -> dict[str, Any]:
    """The recipe values `stage` reads, as `section.key` -> value (secrets and report-only values left out)."""
    flat = flatten(recipe)
    selected = {}
    for key, value in flat.items():
        if not any(key == p or key.startswith(f"{p}.") for p in STAGE_SETTINGS[stage]):
            continue
        leaf = key.rsplit(".", 1)[-1]
        if SECRET_KEY.search(leaf) or leaf in NOT_RESULTS:
            continue
        selected[key] = value
    return dict(sorted(selected.items()))


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


__all__ = ["DONE", "STAGE_INPUTS", "STAGE_SETTINGS", "STARTED", "changed_keys", "new_marker", "read_marker",
           "settings_hash", "stage_settings"]
