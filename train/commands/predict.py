"""Batch prediction over a folder of images (or a list file), streamed, resumable and robust to bad files.

    python -m train predict --model runs/demo/final --input photos/ --output predictions.jsonl
    torchrun --nproc_per_node 2 -m train predict --model runs/demo/final --input photos/ --output preds.csv

Images are classified by the checkpoint's own `pipeline("image-classification")` (`pipeline_emovlm_kd.py`, loaded by
`loading_emovlm_kd.load_pipeline`: the front door the app and the Inference Endpoints handler use too), so a file
gets the same labels and scores behind every door. Rows are written as soon as each batch is classified (JSONL or
CSV by the output's suffix), in input order. A file that cannot be read or classified gets a row with its error,
and the run goes on (only the bad image gets an error row); the summary counts it. Files of a folder that are not
images (`.svg`, broken or looping symlinks, other suffixes: `loading_emovlm_kd.skip_reason`) are reported and
counted as skipped. `--explain` adds each image's reasoning answer (`explanation`), one generation of up to
`--max-new-tokens` tokens per image: much slower than classifying. A rerun with the
same output skips the images already there, so a killed run resumes without duplicating or losing rows. Under
`torchrun`, each process classifies a disjoint shard (`accelerate`'s `split_between_processes`) into
`<output>.part<rank>`; the parts' rows are gathered (`gather_object`) and the main process merges them.
`--num-workers N` decodes and preprocesses images in N `DataLoader` worker processes (the pipeline's) while the
model runs.

While a run writes `<output>`, it holds the lock `<output>.lock` (its PID in `<output>.lock.pid`); a second run into
the same output fails at once, naming the lock and the PID. The lock is the operating system's (`flock`), so the
lock of a killed run never blocks the next one. The lock and the rows go to the output's real path: a second run
through a symbolic link to the same file is the same output.

An existing output must be a predictions file of this tool (`is_predictions_file`: empty, or JSONL rows with a
`path`, or a CSV with this tool's header): anything else (a checkpoint's `model.safetensors` or `config.json`, an
input photo) is refused before anything is written, never truncated or appended to.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

# `loading_kwargs` is also `evaluate --model`'s (imported from here).
from modeling_emovlm_kd.loading_emovlm_kd import DTYPES, load_pipeline, loading_kwargs, skip_reason
from train.commands.arguments import non_negative_int, positive_int
from train.infra.locks import LockedError, exclusive
from train.infra.records import RecordStore

logger = logging.getLogger(__name__)

CSV_FIELDS = ["path", "label", "score", "vlm_label", "head_label", "error"]
EXPLAIN_FIELDS = ["explanation"]  # with --explain


class PredictionsFileError(ValueError):
    """The output file cannot take this run's rows (it is not a predictions file, or its CSV columns are another
    run's)."""


class OutdatedCheckpointError(ValueError):
    """The checkpoint's pipeline is not the front door this tool reads (it was exported by an earlier version)."""


def require_front_door(pipeline, model_path) -> None:
    """Refuse a checkpoint whose pipeline predates the front door (`predict` and `serve` read every branch from it)."""
    if not getattr(pipeline, "answers_every_branch", False):
        raise OutdatedCheckpointError(
            f"{model_path} ships a pipeline_emovlm_kd.py from before the front door answered every branch: "
            "export it again with this version (python -m train export --config RECIPE).")


@dataclass
class PredictionSummary:
    total: int = 0
    predicted: int = 0
    failed: int = 0
    resumed: int = 0
    errors: list[dict] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files of the input folder not classified

    def __str__(self) -> str:
        text = (f"{self.total} images: {self.predicted} classified, {self.failed} failed, "
                f"{self.resumed} already in the output (resumed)")
        if self.skipped:
            counts = ", ".join(f"{len(paths)} {reason.replace('_', ' ')}" for reason, paths in self.skipped.items())
            text += f"; {sum(map(len, self.skipped.values()))} files skipped ({counts})"
        return text


def scan_inputs(source: str | Path) -> tuple[list[str], dict[str, list[str]]]:
    """Image files under a folder (recursively, sorted) and the skipped files by reason; or a list file's lines.

    A list file has one path per line (only `\\n` ends a line, so a name may hold other line separators).
    """
    source = Path(source)
    if source.is_dir():
        images, skipped = [], {}
        for path in sorted(source.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(source).parts):
                continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
            reason = skip_reason(path)
            if reason is None:
                images.append(str(path))
            elif reason != "not_a_file":  # sub-folders are walked, not skipped
                skipped.setdefault(reason, []).append(str(path))
        for reason, paths in skipped.items():
            logger.warning("Skipping %d file(s) of %s (%s), e.g. %s", len(paths), source, reason.replace("_", " "),
                           paths[:3])
        return images, skipped
    if source.is_file():
        lines = (line.rstrip("\r").strip() for line in source.read_text().split("\n"))
        return [line for line in lines if line], {}
    raise FileNotFoundError(f"Input {source} is neither a folder of images nor a file listing image paths.")


def list_inputs(source: str | Path) -> list[str]:
    """Image files under a folder (recursively, sorted), or the lines of a text file of paths."""
    return scan_inputs(source)[0]


def _read_csv(path: Path) -> list[dict]:
    """CSV rows; fields may hold any line separator (csv quotes them). A cut-off last record is truncated away."""
    with open(path, newline="") as handle:
        text = handle.read()
    consumed = 0

    def lines():
        nonlocal consumed
        for line in io.StringIO(text, newline=""):
            consumed += len(line)
            yield line

    def complete() -> bool:  # RowWriter ends every record with a line break: one without is a killed write
        return consumed > 0 and text[consumed - 1] == "\n"

    records, good = [], 0
    reader = csv.reader(lines(), strict=True)
    try:
        header = next(reader)
        if complete():
            good = consumed
            for record in reader:
                if len(record) != len(header) or not complete():
                    break
                records.append(dict(zip(header, record)))
                good = consumed
    except (StopIteration, csv.Error):  # an empty file; a quoted field cut off by the kill
        pass
    if good != len(text):
        with open(path, "w", newline="") as handle:
            handle.write(text[:good])
    return [r for r in records if r.get("path")]


# How much of an existing output is read to recognise it (its first row, or CSV header, is far shorter).
_SNIFF_BYTES = 1 << 16


def is_predictions_file(path: str | Path) -> bool:
    """Whether `path` (an existing file) is a predictions file this tool wrote, from its first bytes alone: empty;
    a CSV (by suffix) whose header is this tool's; otherwise JSONL whose first row is an object with a string
    `path` (or, killed during its first write, begins like one)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if not head:
        return True
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # a cut multi-byte character at the end of the sniffed bytes is fine
        try:
            text = head[:-3].decode("utf-8") if len(head) == _SNIFF_BYTES else None
        except UnicodeDecodeError:
            text = None
        if text is None:
            return False
    first, newline, _ = text.partition("\n")
    if path.suffix == ".csv":
        header = next(csv.reader([first.rstrip("\r")]), [])
        return header in (CSV_FIELDS, CSV_FIELDS + EXPLAIN_FIELDS)
    if not newline:  # a single row cut off by a kill (or longer than the sniffed bytes)
        return first.startswith('{"path": ')
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("path"), str)


def check_output(output: Path) -> None:
    """Raise `PredictionsFileError` unless `output` is new, or a predictions file of this tool to resume."""
    if output.is_dir():
        raise PredictionsFileError(f"{output} is a folder: --output names a .jsonl or .csv file.")
    if output.exists() and not is_predictions_file(output):
        raise PredictionsFileError(
            f"{output} exists and is not a predictions file of `train predict` (its first line is not this tool's "
            "CSV header or a JSON row with a path): it would be appended to. Choose another --output.")


def _row_store(path: Path) -> RecordStore:
    return RecordStore(path, validate=lambda row: isinstance(row.get("path"), str))


def read_rows(path: Path) -> list[dict]:
    """Rows already written; a partial last row (a killed write) is dropped, and cut off before the next write."""
    if not path.exists():
        return []
    if path.suffix == ".csv":
        return _read_csv(path)
    return _row_store(path).read()


class RowWriter:
    """Appends rows and makes each batch durable before the next one starts (JSONL: a `RecordStore`). A CSV file
    has `fields` as its columns; appending to one with other columns is refused."""

    def __init__(self, path: Path, fields: Sequence[str] = CSV_FIELDS):
        check_output(path)
        self.path = path
        self.fields = list(fields)
        self.csv = path.suffix == ".csv"
        if not self.csv:
            self.store = _row_store(path)
            path.touch()  # an empty run still leaves its (empty) output
            return
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), [])
            if header != self.fields:
                raise PredictionsFileError(
                    f"{path} has the columns {header}, this run writes {self.fields} (--explain adds "
                    f"{EXPLAIN_FIELDS}): resume it as it was started, or write to another file.")
        self.handle = open(path, "a", newline="")
        if new:
            csv.DictWriter(self.handle, self.fields).writeheader()

    def write(self, rows: Sequence[dict]) -> None:
        if not self.csv:
            self.store.append(rows)
            return
        writer = csv.DictWriter(self.handle, self.fields, extrasaction="ignore")
        writer.writerows({**row, "error": row.get("error") or ""} for row in rows)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.csv:
            self.handle.close()


class Predictor:
    """An EmoVLM-KD checkpoint's front door (`load_pipeline`) and the rows `predict` writes from its answers."""

    def __init__(self, model_path: str, top_k: int = 3, device: str | None = None, revision: str | None = None,
                 dtype: str | None = None, device_map: str | None = None, load_in_4bit: bool = False,
                 explain: bool = False, max_new_tokens: int | None = None):
        self.pipeline = load_pipeline(model_path, revision=revision, dtype=dtype or "auto", device=device,
                                      device_map=device_map, load_in_4bit=load_in_4bit)
        require_front_door(self.pipeline, model_path)
        self.model = self.pipeline.model
        self.image_processor = self.pipeline.image_processor
        self.device = self.model.get_input_embeddings().weight.device
        self.labels = self.model.config.id2label
        self.top_k = min(top_k, len(self.labels))
        self.explain = explain
        self.options = {"top_k": self.top_k}
        if explain:
            self.options.update(explain=True, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))

    @property
    def fields(self) -> list[str]:
        """The CSV columns of this predictor's rows."""
        return CSV_FIELDS + (EXPLAIN_FIELDS if self.explain else [])

    def row(self, path: str, answer: list[dict]) -> dict:
        """The row for one file from the front door's answer: path, error (None when classified), the fused label,
        its probability and the `top_k` labels, the VLM's and the head's own labels (and the explanation)."""
        top = answer[0]
        if top.get("error") is not None:
            return {"path": path, "error": top["error"]}
        row = {
            "path": path,
            "error": None,
            "label": top["label"],
            "score": round(top["score"], 6),
            "top_k": [{"label": e["label"], "score": round(e["score"], 6)} for e in answer],
            "vlm_label": top["vlm"]["label"],
            "head_label": top["head"]["label"],
        }
        if self.explain:
            row["explanation"] = top["explanation"]
        return row

    def predict(self, paths: Sequence[str]) -> list[dict]:
        """Rows for one batch of image files."""
        return next(self.predict_batches([paths]), [])

    def predict_batches(self, chunks: Sequence[Sequence[str]], num_workers: int = 0) -> Iterator[list[dict]]:
        """Rows of each chunk of paths, in order, as the pipeline classifies them (one forward pass per chunk of the
        largest chunk's size). With `num_workers` > 0 the pipeline's `DataLoader` workers decode and preprocess the
        next images while the model classifies; the rows are the same."""
        chunks = [list(chunk) for chunk in chunks]
        paths = [path for chunk in chunks for path in chunk]
        if not paths:
            return
        answers = iter(self.pipeline(_Paths(paths), batch_size=max(map(len, chunks)), num_workers=num_workers,
                                     **self.options))
        for chunk in chunks:
            yield [self.row(path, next(answers)) for path in chunk]


class _Paths(TorchDataset):
    """Paths as a map-style data set: the pipeline streams its answers (and may decode in workers) instead of
    classifying a whole list before returning."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        return self.paths[index]


def batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def lock_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.lock")


def output_lock(output: Path):
    """Hold `<output>.lock` (no waiting) while writing `output` (`train/infra/locks.py`: the holder's PID is recorded
    beside it, a second writer fails at once naming both, a killed holder's lock is released by the system). The
    lock is the real path's: two names of one file (a symbolic link) share it."""
    output = Path(output).resolve()
    return exclusive(lock_path(output), f"Predictions file {output}")


def predict_files(predictor: Predictor, paths: Sequence[str], output: Path, batch_size: int = 8,
                  show_progress: bool = True, done: set[str] = frozenset(), num_workers: int = 0) -> PredictionSummary:
    """Classify `paths` into `output`, skipping those already there (or in `done`); `output` is locked meanwhile.
    `num_workers` > 0 decodes and preprocesses in that many `DataLoader` worker processes (same rows)."""
    output = Path(output).resolve()
    check_output(output)
    with output_lock(output):
        return _predict_files(predictor, paths, output, batch_size, show_progress, done, num_workers)


def _predict_files(predictor: Predictor, paths: Sequence[str], output: Path, batch_size: int,
                   show_progress: bool, done: set[str], num_workers: int = 0) -> PredictionSummary:
    summary = PredictionSummary(total=len(paths))
    done = set(done) | {row["path"] for row in read_rows(output)}
    summary.resumed = sum(path in done for path in paths)
    todo = [path for path in paths if path not in done]
    writer = RowWriter(output, predictor.fields)
    try:
        chunks = list(batches(todo, batch_size))
        for rows in tqdm(predictor.predict_batches(chunks, num_workers), total=len(chunks), desc="Predicting",
                         unit="batch", disable=not show_progress):
            writer.write(rows)
            for row in rows:
                if row.get("error"):
                    summary.failed += 1
                    summary.errors.append({"path": row["path"], "error": row["error"]})
                else:
                    summary.predicted += 1
    finally:
        writer.close()
    return summary


def summarize(rows: Sequence[dict], total: int) -> PredictionSummary:
    errors = [{"path": r["path"], "error": r["error"]} for r in rows if r.get("error")]
    return PredictionSummary(total=total, predicted=len(rows) - len(errors), failed=len(errors), errors=errors)


def merge_rows(shard_rows: Sequence[dict], paths: Sequence[str], output: Path,
               fields: Sequence[str] = CSV_FIELDS) -> None:
    """Write the earlier output's rows and the shards' (gathered) rows into `output` in input order, atomically."""
    rows = {row["path"]: row for row in (*read_rows(output), *shard_rows)}
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.unlink(missing_ok=True)
    writer = RowWriter(tmp, fields)
    writer.write([rows[path] for path in paths if path in rows])
    writer.close()
    os.replace(tmp, output)


def run_predict(model: str, source: str, output: str | Path, batch_size: int = 8, top_k: int = 3,
                show_progress: bool = True, num_workers: int = 0, **loading) -> PredictionSummary:
    """Classify every image of `source` into `output`; `num_workers` `DataLoader` workers decode and preprocess
    (0: the main process does); `loading`: `Predictor`'s revision, dtype, device_map, load_in_4bit, explain and
    max_new_tokens."""
    state = PartialState(cpu=not torch.cuda.is_available())
    output = Path(output).resolve()  # a symbolic link's rows (and lock, and merge) go to the file it names
    check_output(output)  # before the lock: a refused target gets nothing written beside it
    output.parent.mkdir(parents=True, exist_ok=True)
    # The main process holds the output's lock for the whole run (shards, merge), before the model loads, so that
    # a second run into the same output fails at once.
    with output_lock(output) if state.is_main_process else contextlib.nullcontext():
        summary = _run_predict(state, model, source, output, batch_size, top_k, show_progress, loading, num_workers)
    return summary


def _run_predict(state: PartialState, model: str, source: str, output: Path, batch_size: int, top_k: int,
                 show_progress: bool, loading: dict, num_workers: int = 0) -> PredictionSummary:
    paths, skipped = scan_inputs(source)
    predictor = Predictor(model, top_k=top_k, device=None if state.num_processes == 1 else "cpu"
                          if not torch.cuda.is_available() else f"cuda:{state.local_process_index}", **loading)
    if state.num_processes == 1:
        summary = _predict_files(predictor, paths, output, batch_size, show_progress, set(), num_workers)
    else:
        # Each rank takes a disjoint contiguous shard and writes (and, after a kill, resumes) its own part file;
        # the parts' rows are then gathered on the main process, which merges them into the output.
        part = output.with_name(f"{output.name}.part{state.process_index}")
        with state.split_between_processes(list(paths)) as shard:
            shard = list(shard)
        done = {row["path"] for row in read_rows(output)} if output.exists() else set()
        summary = predict_files(predictor, shard, part, batch_size, show_progress and state.is_main_process, done,
                                num_workers)
        print(f"Rank {state.process_index}/{state.num_processes}: shard of {len(shard)} images: {summary}", flush=True)
        rows = gather_object(read_rows(part))
        if state.is_main_process:
            merge_rows(rows, paths, output, predictor.fields)
            summary = summarize(read_rows(output), len(paths))
        state.wait_for_everyone()  # the output is complete before any part file goes
        part.unlink(missing_ok=True)  # every rank has released its part's lock; the output's lock still guards the run
        lock_path(part).unlink(missing_ok=True)
    summary.skipped = skipped
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="EmoVLM-KD folder or Hub repo id (remote code is trusted).")
    parser.add_argument("--input", required=True, help="A folder of images or a text file listing image paths.")
    parser.add_argument("--output", required=True, help="predictions.jsonl or predictions.csv (appended/resumed).")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="Images per forward pass (>= 1).")
    parser.add_argument("--top-k", type=positive_int, default=3, help="Labels kept per image (>= 1).")
    parser.add_argument("--num-workers", type=non_negative_int, default=0,
                        help="DataLoader worker processes decoding and preprocessing images while the model runs "
                             "(0: the main process does it; the rows are the same).")
    parser.add_argument("--revision", help="Branch, tag or commit of a Hub repo (pin a commit for reproducible runs).")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="Weights' dtype (auto: bfloat16 on a GPU that has it, else float32; head and gate stay "
                             "float32).")
    parser.add_argument("--device-map", help="accelerate device map, e.g. 'auto' to spread a large model over GPUs.")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="Load the VLM in 4-bit NF4 with double quantisation (bitsandbytes; lm_head, the visual "
                             "merger, the head and the gate stay in full precision).")
    parser.add_argument("--explain", action="store_true",
                        help="Also write each image's reasoning answer (column `explanation`): the VLM generates it "
                             "after the paper's reasoning prompt, one generation per image, much slower than "
                             "classifying. The label is unchanged.")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128,
                        help="Bound of each explanation, in tokens (with --explain; default 128).")


def main(args: argparse.Namespace) -> int:
    """`python -m train predict`: bad files are reported in the output; the status is 1 only when no image could be
    classified."""
    try:
        summary = run_predict(args.model, args.input, args.output, args.batch_size, args.top_k,
                              num_workers=args.num_workers, revision=args.revision, dtype=args.dtype,
                              device_map=args.device_map, load_in_4bit=args.load_in_4bit, explain=args.explain,
                              max_new_tokens=args.max_new_tokens)
    except (LockedError, PredictionsFileError, OutdatedCheckpointError) as err:
        raise SystemExit(f"train predict: {err}") from None
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        print(summary)
        for reason, paths in summary.skipped.items():
            for path in paths:
                print(f"  skipped ({reason.replace('_', ' ')}): {path}")
        for error in summary.errors:
            print(f"  failed: {error['path']}: {error['error']}")
    return 1 if summary.failed and not summary.predicted else 0


__all__ = ["OutdatedCheckpointError", "PredictionSummary", "PredictionsFileError", "Predictor", "add_arguments",
           "check_output", "is_predictions_file", "list_inputs", "loading_kwargs", "output_lock", "predict_files",
           "main", "read_rows", "require_front_door", "run_predict", "scan_inputs"]
