"""Stage provenance: what each stage of a run was computed from, so that a rerun redoes exactly what changed.

Every finished stage leaves `<output_dir>/<stage>/stage_done.json` with

    settings        the recipe values the stage reads (flattened `section.key` -> value; secrets left out, URL
                    credentials masked)
    settings_hash   their hash
    inputs          {upstream stage: its `provenance`} for the stages whose outputs it read
    data            (stages that read the data set: the stage table's `data_splits`) each split's fingerprint
    provenance      a fresh id of this execution of the stage

A stage is up to date when its marker exists, its settings equal the recipe's, every input's current `provenance` is
the one it read and (if it reads the data set) the data's fingerprint is the one it read.

The data's fingerprint (`DataState`, computed once per pipeline from the data set the stages read, no image decoded):
per split, the label names, and each row's image path, label, and the file's size and modification time (files
removed, added, replaced, relabelled or moved between class folders all change it; a file rewritten with the same
size and modification time does not). Images stored inside a data set (a Hub data set's bytes) are covered by the
`datasets` fingerprint of what was loaded, which follows the source files and every transform. A marker recorded
before fingerprints existed has no `data`: that stage is kept, and given its fingerprint, when no file or folder of
its data (the data root's tree, the image files, the split file, a Hub data set's cache files) changed status after
the stage finished (their ctime, which copying or touching cannot set back; `Pipeline` records it), and rerun
otherwise. So it is neither silently reused on data that changed nor rerun for nothing. Any rerun of a stage gives it a new `provenance`, so everything downstream of a
rerun stage reruns too. A stage that starts writes `stage_started.json` with its settings and inputs; a killed
stage resumes from its checkpoints only when they were made with the same ones.

Which values and stages each stage reads is the stage table's (`train/infra/stage_table.py`); `Provenance` keeps the
markers of one run folder (the pipeline asks it what is stale, and starts and finishes stages through it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.infra import stage_table
from train.infra.files import write_json_atomic
from train.infra.recipe import SECRET_KEY, RecipeError
from train.infra.secrets import redact_text

if TYPE_CHECKING:
    from train.infra.recipe import Recipe

logger = logging.getLogger(__name__)

# Values that change how a stage reports or connects, never what it computes: editing them reruns nothing.
NOT_RESULTS = {"logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "report_to", "run_name",
               "disable_tqdm", "include_num_input_tokens_seen", "dataloader_num_workers", "dataloader_pin_memory",
               "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
               "timeout", "max_retries", "backoff", "num_workers", "requests_per_minute", "project",
               "trackio_space_id"}
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


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` is a run folder: it holds the run's `recipe.yaml` (written by every run before its first
    stage starts) or a stage folder with a stage's marker (finished or started)."""
    folder = Path(folder)
    return (folder / "recipe.yaml").is_file() or any(
        (folder / stage / marker).is_file() for stage in stage_table.names() for marker in (DONE, STARTED))


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


# ---- the data's fingerprint ------------------------------------------------------------------------------------


def _arrow_column(dataset, name: str):
    """A column as a list of pyarrow arrays (its chunks, row selection applied), read without decoding images."""
    column = dataset.with_format("arrow")[name]
    return getattr(column, "chunks", [column])


class DataState:
    """The data set a run's stages read, as it is now: each split's fingerprint (`splits`: {split: {"rows",
    "sha256"}}) and, for markers recorded without a fingerprint, whether anything of it changed after a time."""

    def __init__(self, dataset, root: str | None = None, extra_files=()):
        self.root = root
        self.extra_files = [str(f) for f in extra_files if f]
        self._newest_file: tuple[int, str] = (0, "")
        self._newest: tuple[int, str] | None = None
        self._folders: set[str] = set()
        self.splits = {split: self._split(dataset[split]) for split in dataset}
        for split in dataset:
            self.extra_files += [entry["filename"] for entry in getattr(dataset[split], "cache_files", [])]

    def _split(self, split) -> dict:
        digest = hashlib.sha256(json.dumps(split.features["label"].names).encode())
        labels = [label for chunk in _arrow_column(split, "label") for label in chunk.to_pylist()]
        try:
            images = _arrow_column(split, "image")
            paths = [p for chunk in images for p in chunk.field("path").to_pylist()]
            inline = [v for chunk in images for v in chunk.field("bytes").is_valid().to_pylist()]
        except (AttributeError, KeyError, TypeError):  # no `Image` column: the `datasets` fingerprint alone
            paths, inline = [""] * len(labels), [True] * len(labels)
        names = ([n for chunk in _arrow_column(split, "image_path") for n in chunk.to_pylist()]
                 if "image_path" in split.column_names else paths)
        if any(inline):  # images stored in the data set: what `datasets` says of what was loaded
            digest.update(str(split._fingerprint).encode())
        for path, name, label, stored in zip(paths, names, labels, inline):
            if stored or not path:
                digest.update(f"{name}\t{label}\tstored\n".encode())
                continue
            try:
                status = os.stat(path)
            except OSError:
                digest.update(f"{name}\t{label}\tmissing\n".encode())
                continue
            digest.update(f"{name}\t{label}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
            self._newest_file = max(self._newest_file, (status.st_ctime_ns, path))
            self._folders.add(os.path.dirname(path))
        return {"rows": len(labels), "sha256": digest.hexdigest()[:16]}

    def record(self, splits) -> dict:
        """The fingerprints of `splits` (a stage's `data_splits`), as its marker stores them."""
        return {split: self.splits.get(split) for split in splits}

    def changed_after(self, when: float) -> str | None:
        """A file or folder of the data whose status changed after `when` (seconds since the epoch), or None."""
        ctime, path = self._newest_change()
        if ctime > int(when * 1e9):
            return f"{path} (changed {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ctime / 1e9))})"
        return None

    def _newest_change(self) -> tuple[int, str]:
        """The latest status change (ctime) of the data: its root's tree, the image files and their folders, the
        split and label files, a Hub data set's cache files (walked once: the data does not change during a run)."""
        if self._newest is not None:
            return self._newest
        newest = self._newest_file
        for path in [*self._folders, *self.extra_files]:
            try:
                newest = max(newest, (os.stat(path).st_ctime_ns, path))
            except OSError:
                continue
        if self.root and os.path.isdir(self.root):
            for folder, dirs, files in os.walk(self.root):
                for name in [*dirs, *files, "."]:
                    path = os.path.normpath(os.path.join(folder, name))
                    try:
                        newest = max(newest, (os.lstat(path).st_ctime_ns, path))
                    except OSError:
                        continue
        self._newest = newest
        return newest


def data_fingerprint(dataset) -> dict[str, dict]:
    """Each split's fingerprint of a loaded data set (`DataState`): {split: {"rows": n, "sha256": ...}}."""
    return DataState(dataset).splits


def describe_data_change(recorded: dict, current: dict) -> str | None:
    """Which splits' images or labels differ between a marker's `data` and now, or None."""
    changes = []
    for split, before in recorded.items():
        after = current.get(split)
        if after == before:
            continue
        if not after or not before:
            changes.append(f"the {split} split {'is gone' if not after else 'is new'}")
            continue
        count = (f"{before['rows']} -> {after['rows']} images" if before["rows"] != after["rows"]
                 else f"{after['rows']} images")
        changes.append(f"the {split} split's images or labels ({count})")
    return "; ".join(changes) or None


class Provenance:
    """The markers of one run folder: whether each stage is up to date with the recipe and the stages it reads,
    and the bookkeeping of a stage's start and end. `state` is the process state (accelerate's `PartialState`):
    only the main process writes a marker, every process waits for it."""

    def __init__(self, recipe: Recipe, state, data: Callable[[], Any] | None = None):
        """`data`: returns the run's data set (the pipeline's, loaded once); by default `Run(recipe).data`."""
        self.recipe = recipe
        self.output_dir = recipe.output_dir
        self.state = state
        self._load_data = data
        self._data_state: DataState | None = None

    def load_data(self):
        """The run's data set; a data root that is not here, or data its loader refuses, is a `RecipeError` (one
        line naming it), raised before any stage runs or any stage folder is removed."""
        if self._load_data is None:  # (the pipeline passes its own, having checked the root itself)
            from train.infra.run import Run

            self.recipe.require_data_root()
            self._load_data = lambda: Run(self.recipe).data
        try:
            return self._load_data()
        except (ValueError, OSError, KeyError) as err:
            raise RecipeError(f"{self.recipe.source}: data: {err}") from None

    def data_state(self) -> DataState:
        """The data's fingerprint (computed once)."""
        if self._data_state is None:
            dataset = self.load_data()
            kind, options = self.recipe.data_options()
            self._data_state = DataState(dataset, options.get("root"), [options.get("split_file"),
                                                                        options.get("label_file")])
        return self._data_state

    def data_record(self, stage: str) -> dict | None:
        """What `stage`'s marker records of the data (None: it reads no data)."""
        splits = stage_table.get(stage).data_splits
        return self.data_state().record(splits) if splits else None

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
        return self._data_reason(stage, marker)

    def _data_reason(self, stage: str, marker: dict) -> str | None:
        if not stage_table.get(stage).data_splits:
            return None
        if "data" not in marker:  # recorded before data fingerprints (see the module docstring)
            finished = marker.get("finished")
            changed = self.data_state().changed_after(finished) if isinstance(finished, (int, float)) else "unknown"
            if changed:
                return ("it was recorded without a fingerprint of its data (an older version of this project), and "
                        f"its data changed after it finished: {changed}")
            return None
        change = describe_data_change(marker["data"] or {}, self.data_record(stage))
        return f"its data changed: {change}" if change else None

    def record_data(self, stage: str) -> bool:
        """Give an up-to-date marker recorded without a data fingerprint the current one (the main process writes);
        whether it did."""
        marker = read_marker(self.stage_dir(stage))
        if marker is None or "data" in marker or not stage_table.get(stage).data_splits:
            return False
        if self.stale_reason(stage) is not None:
            return False
        if self.state.is_main_process:
            write_json_atomic({**marker, "data": self.data_record(stage)}, self.stage_dir(stage) / DONE)
            logger.info("Stage %s: recorded the fingerprint of its data (its marker predates data fingerprints, and "
                        "no file of the data changed since it finished).", stage)
        return True

    def check_output_folder(self) -> None:
        """Refuse an output folder that holds files but no run (`is_run_folder`): a run would replace its stage
        folders. Nothing is written, not even the lock."""
        folder, source = self.output_dir, self.recipe.source
        if not folder.exists():
            return
        if not folder.is_dir():
            raise StageError(f"{folder} is a file, not a run folder: choose another --output-dir (or output_dir in "
                             f"{source}).")
        # Hidden entries do not count: the lock, the temporary files of atomic writes (another rank's, under
        # torchrun), a `.git`; a run writes no stage folder or result under such a name.
        if any(not p.name.startswith(".") for p in folder.iterdir()) and not is_run_folder(folder):
            raise StageError(f"{folder} is not empty and is not a run folder (it has no recipe.yaml and no stage "
                             "marker): a run would replace its stage folders (base/, features/, evaluate/, final/, "
                             f"...). Choose a new or empty folder with --output-dir (or output_dir in {source}).")

    def check_order(self, stages) -> None:
        """Every stage that `stages` read (directly or through others) and do not run themselves has finished: else
        one line naming the first of them to run (the table's order), before anything is written."""
        needed = set().union(*(stage_table.upstream(stage) for stage in stages)) - set(stages)
        for up in sorted(needed, key=stage_table.names().index):
            if not self.is_done(up):
                first = next(stage for stage in stages if up in stage_table.upstream(stage))
                raise StageError(f"Stage {first!r} needs stage {up!r}, which has not finished in {self.output_dir}: "
                                 f"run `python -m train {up}` (and the stages after it) or the whole pipeline first.")

    def stale_stages(self, stages, force: bool = False) -> list[str]:
        """The stages of `stages` that will run (stale, forced, or reading one that runs), after checking that what
        they read without running it is up to date (else `StageError` naming the stage to run first)."""
        checked: set[str] = set()
        for stage in stages:
            self.check_inputs_fresh(stage, skip=stages, checked=checked)
        to_run: list[str] = []
        for stage in stages:
            reads = stage_table.get(stage).reads
            if force or any(up in to_run for up in reads) or self.stale_reason(stage) is not None:
                to_run.append(stage)
        return to_run

    def check_made_with(self, stages) -> None:
        """Raise `StageError` unless each of `stages` is finished and up to date with this recipe (what a tool
        reading a finished run, e.g. the seed spread, relies on)."""
        for stage in stages:
            reason = self.stale_reason(stage)
            if reason:
                raise StageError(f"The run in {self.output_dir} was not made with this recipe: stage {stage!r}: "
                                 f"{reason}. Give the --set overrides it was made with, or bring it up to date with "
                                 "`python -m train pipeline` first.")

    def check_inputs_fresh(self, stage: str, skip=(), checked: set[str] | None = None) -> None:
        """Raise `StageError` unless every stage upstream of `stage` is finished and up to date, depth first. The
        stages `stage` reads directly that are in `skip` are not checked (they are about to run); `checked` holds the
        stages already found up to date, so each is read once per call however many stages read it."""
        checked = set() if checked is None else checked
        for up in stage_table.get(stage).reads:
            if up in skip or up in checked:
                continue
            self.check_inputs_fresh(up, checked=checked)
            reason = self.stale_reason(up)
            if reason:
                raise StageError(
                    f"Stage {stage!r} reads stage {up!r}, which is out of date in {self.output_dir}: {reason}. "
                    f"Run `python -m train {up}` (and what follows) or the whole pipeline first."
                )
            checked.add(up)

    def start(self, stage: str) -> None:
        """Clear what must not be reused, then record what this execution of the stage is computed from.

        A finished stage that reruns starts afresh (its old checkpoints hold the old settings' result); so does an
        interrupted one whose settings or inputs have changed since. An interrupted one with the same settings and
        inputs keeps its checkpoints and resumes."""
        stage_dir = self.stage_dir(stage)
        started = {"settings": self.settings(stage), "inputs": self.current_inputs(stage)}
        if stage_table.get(stage).data_splits:
            started["data"] = self.data_record(stage)
        previous = read_marker(stage_dir, STARTED)
        if previous is not None and isinstance(previous.get("settings"), dict):
            previous["settings"] = current_names(previous["settings"])
        if previous is not None and "data" in started and "data" not in previous:
            # Started by an older version: resume only if nothing of the data changed since it started.
            since = (stage_dir / STARTED).stat().st_mtime
            previous["data"] = None if self.data_state().changed_after(since) else started["data"]
        fresh_start = self.is_done(stage) or (
            stage_dir.exists() and (previous is None or {k: previous.get(k) for k in started} != started))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            if fresh_start and stage_dir.exists():
                shutil.rmtree(stage_dir)
            write_json_atomic(started, stage_dir / STARTED)
        self.state.wait_for_everyone()

    def mark_done(self, stage: str, **info) -> None:
        data = self.data_record(stage)
        if data is not None:
            info = {"data": data, **info}
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


__all__ = ["DONE", "DataState", "FAILED", "Provenance", "RENAMED", "STARTED", "StageError", "changed_keys",
           "current_names", "data_fingerprint", "describe_data_change", "is_run_folder", "new_marker", "read_marker",
           "settings_hash", "stage_settings"]
