"""Batch prediction over a folder of images (or a list file), streamed, resumable and robust to bad files.

    python -m train predict --model runs/demo/final --input photos/ --output predictions.jsonl
    torchrun --nproc_per_node 2 -m train predict --model runs/demo/final --input photos/ --output preds.csv

Rows are written as soon as each batch is classified (JSONL or CSV by the output's suffix), in input order. A file
that cannot be read or classified gets a row with its error, and the run goes on (a batch that fails is retried one
image at a time, so only the bad image gets an error row); the summary counts it. Files of a folder that are not
images (`.svg`, broken or looping symlinks, other suffixes) are reported and counted as skipped. A rerun with the
same output skips the images already there, so a killed run resumes without duplicating or losing rows. Under
`torchrun`, each process classifies a disjoint shard (`accelerate`'s `split_between_processes`) into
`<output>.part<rank>`; the parts' rows are gathered (`gather_object`) and the main process merges them.
`--num-workers N` decodes and preprocesses images in N `DataLoader` worker processes while the model runs.

While a run writes `<output>`, it holds the lock `<output>.lock` (its PID in `<output>.lock.pid`); a second run into
the same output fails at once, naming the lock and the PID. The lock is the operating system's (`flock`), so the
lock of a killed run never blocks the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification

from modeling_emovlm_kd.inference import PreparedBatch, classify, prepare_batch
from train.commands.arguments import non_negative_int, positive_int
from train.infra.locks import LockedError, exclusive
from train.infra.records import RecordStore

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Image formats PIL cannot decode (vector graphics, HEIF): skipped with their own reason, not as "not an image".
UNSUPPORTED_IMAGE_SUFFIXES = {".svg", ".svgz", ".heic", ".heif"}
CSV_FIELDS = ["path", "label", "score", "vlm_label", "head_label", "error"]


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


def skip_reason(path: Path) -> str | None:
    """Why a file of an input folder is not an image to classify, or None if it is one."""
    try:
        path.stat()
    except OSError as err:
        return "symlink_loop" if err.errno == errno.ELOOP else "broken_symlink" if path.is_symlink() else "unreadable"
    if not path.is_file():
        return "not_a_file"
    suffix = path.suffix.lower()
    if suffix in UNSUPPORTED_IMAGE_SUFFIXES:
        return "unsupported_format"
    return None if suffix in IMAGE_SUFFIXES else "not_an_image"


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
    """Appends rows and makes each batch durable before the next one starts (JSONL: a `RecordStore`)."""

    def __init__(self, path: Path):
        self.path = path
        self.csv = path.suffix == ".csv"
        if not self.csv:
            self.store = _row_store(path)
            path.touch()  # an empty run still leaves its (empty) output
            return
        new = not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "a", newline="")
        if new:
            csv.DictWriter(self.handle, CSV_FIELDS).writeheader()

    def write(self, rows: Sequence[dict]) -> None:
        if not self.csv:
            self.store.append(rows)
            return
        writer = csv.DictWriter(self.handle, CSV_FIELDS, extrasaction="ignore")
        writer.writerows({**row, "error": row.get("error") or ""} for row in rows)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.csv:
            self.handle.close()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loading_kwargs(device: str, revision: str | None = None, dtype: str | None = None, device_map: str | None = None,
                   load_in_4bit: bool = False) -> dict:
    """`from_pretrained` arguments for a checkpoint as users load it: a pinned `revision`, a dtype (default: bf16 on
    a GPU that has it, else float32), `device_map` (e.g. "auto"), or 4-bit NF4 weights (the head and the gate stay
    in float32: the model class keeps them out of quantization)."""
    if dtype in (None, "auto"):
        dtype_ = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype_ = DTYPES[dtype]
    kwargs = {"dtype": dtype_}
    if revision:
        kwargs["revision"] = revision
    if device_map:
        kwargs["device_map"] = device_map
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype_)
        kwargs.setdefault("device_map", {"": device})
    return kwargs


class Predictor:
    """An EmoVLM-KD checkpoint ready for batched, error-tolerant inference."""

    def __init__(self, model_path: str, top_k: int = 3, device: str | None = None, revision: str | None = None,
                 dtype: str | None = None, device_map: str | None = None, load_in_4bit: bool = False):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = loading_kwargs(self.device, revision, dtype, device_map, load_in_4bit)
        self.model = AutoModelForImageClassification.from_pretrained(model_path, trust_remote_code=True, **kwargs)
        if "device_map" not in kwargs:
            self.model.to(self.device)
        self.model.eval()
        self.device = self.model.get_input_embeddings().weight.device
        self.image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True,
                                                                  revision=revision)
        self.labels = self.model.config.id2label
        self.top_k = min(top_k, len(self.labels))

    def prepare(self, paths: Sequence[str]) -> PreparedBatch:
        """Decode and preprocess a batch on the CPU (`prepare_batch` with this checkpoint's processor)."""
        return prepare_batch(self.image_processor, paths)

    def classify(self, batch: PreparedBatch) -> list[dict]:
        """One row per path of a prepared batch: its labels, or the error that kept it from being classified
        (`modeling_emovlm_kd/inference.py`, the app's code too: a failing batch is retried one image at a time)."""
        return [result.row(self.labels, self.top_k) for result in classify(self.model, self.image_processor, batch)]

    def predict(self, paths: Sequence[str]) -> list[dict]:
        """Rows for one batch of image files (decoded, preprocessed and classified here)."""
        return self.classify(self.prepare(paths))

    def predict_batches(self, chunks: Sequence[Sequence[str]], num_workers: int = 0) -> Iterator[list[dict]]:
        """Rows of each chunk of paths, in order. With `num_workers` > 0, `DataLoader` worker processes decode and
        preprocess the next chunks while the model classifies the current one; the rows are the same."""
        if num_workers == 0:
            for chunk in chunks:
                yield self.predict(chunk)
            return
        loader = DataLoader(_Chunks(self, chunks), batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        for batch in loader:
            yield self.classify(batch)


class _Chunks(TorchDataset):
    """Chunk `i` of the paths, decoded and preprocessed (workers get the processor, never the model's weights)."""

    def __init__(self, predictor: Predictor, chunks: Sequence[Sequence[str]]):
        self.image_processor = predictor.image_processor
        self.chunks = list(chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> PreparedBatch:
        return prepare_batch(self.image_processor, self.chunks[index])


def _as_is(batch):
    return batch


def batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def lock_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.lock")


def output_lock(output: Path):
    """Hold `<output>.lock` (no waiting) while writing `output` (`train/infra/locks.py`: the holder's PID is recorded
    beside it, a second writer fails at once naming both, a killed holder's lock is released by the system)."""
    return exclusive(lock_path(output), f"Predictions file {output}")


def predict_files(predictor: Predictor, paths: Sequence[str], output: Path, batch_size: int = 8,
                  show_progress: bool = True, done: set[str] = frozenset(), num_workers: int = 0) -> PredictionSummary:
    """Classify `paths` into `output`, skipping those already there (or in `done`); `output` is locked meanwhile.
    `num_workers` > 0 decodes and preprocesses in that many `DataLoader` worker processes (same rows)."""
    with output_lock(output):
        return _predict_files(predictor, paths, output, batch_size, show_progress, done, num_workers)


def _predict_files(predictor: Predictor, paths: Sequence[str], output: Path, batch_size: int,
                   show_progress: bool, done: set[str], num_workers: int = 0) -> PredictionSummary:
    summary = PredictionSummary(total=len(paths))
    done = set(done) | {row["path"] for row in read_rows(output)}
    summary.resumed = sum(path in done for path in paths)
    todo = [path for path in paths if path not in done]
    writer = RowWriter(output)
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


def merge_rows(shard_rows: Sequence[dict], paths: Sequence[str], output: Path) -> None:
    """Write the earlier output's rows and the shards' (gathered) rows into `output` in input order, atomically."""
    rows = {row["path"]: row for row in (*read_rows(output), *shard_rows)}
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.unlink(missing_ok=True)
    writer = RowWriter(tmp)
    writer.write([rows[path] for path in paths if path in rows])
    writer.close()
    os.replace(tmp, output)


def run_predict(model: str, source: str, output: str | Path, batch_size: int = 8, top_k: int = 3,
                show_progress: bool = True, num_workers: int = 0, **loading) -> PredictionSummary:
    """Classify every image of `source` into `output`; `num_workers` `DataLoader` workers decode and preprocess
    (0: the main process does); `loading`: `Predictor`'s revision, dtype, device_map and load_in_4bit."""
    state = PartialState(cpu=not torch.cuda.is_available())
    output = Path(output)
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
            merge_rows(rows, paths, output)
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
    parser.add_argument("--load-in-4bit", action="store_true", help="Load the VLM in 4-bit NF4 (bitsandbytes).")


def main(args: argparse.Namespace) -> int:
    """`python -m train predict`: bad files are reported in the output; the status is 1 only when no image could be
    classified."""
    try:
        summary = run_predict(args.model, args.input, args.output, args.batch_size, args.top_k,
                              num_workers=args.num_workers, revision=args.revision, dtype=args.dtype, device_map=args.device_map,
                              load_in_4bit=args.load_in_4bit)
    except LockedError as err:
        raise SystemExit(f"train predict: {err}") from None
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        print(summary)
        for reason, paths in summary.skipped.items():
            for path in paths:
                print(f"  skipped ({reason.replace('_', ' ')}): {path}")
        for error in summary.errors:
            print(f"  failed: {error['path']}: {error['error']}")
    return 1 if summary.failed and not summary.predicted else 0


__all__ = ["PreparedBatch", "PredictionSummary", "Predictor", "add_arguments", "list_inputs", "output_lock",
           "main", "predict_files", "read_rows", "run_predict", "scan_inputs"]
