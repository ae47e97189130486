"""Batch prediction over a folder of images (or a list file), streamed, resumable and robust to bad files.

    python -m train predict --model runs/demo/final --input photos/ --output predictions.jsonl
    torchrun --nproc_per_node 2 -m train predict --model runs/demo/final --input photos/ --output preds.csv

Rows are written as soon as each batch is classified (JSONL or CSV by the output's suffix), in input order. A file
that cannot be read gets a row with its error, and the run goes on; the summary counts it. A rerun with the same
output skips the images already there, so a killed run resumes without duplicating or losing rows. Under
`torchrun`, each process classifies a disjoint shard into `<output>.part<rank>` and the main process merges them.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CSV_FIELDS = ["path", "label", "score", "vlm_label", "head_label", "error"]


@dataclass
class PredictionSummary:
    total: int = 0
    predicted: int = 0
    failed: int = 0
    resumed: int = 0
    errors: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.total} images: {self.predicted} classified, {self.failed} failed, "
                f"{self.resumed} already in the output (resumed)")


def list_inputs(source: str | Path) -> list[str]:
    """Image files under a folder (recursively, sorted), or the lines of a text file of paths."""
    source = Path(source)
    if source.is_dir():
        return sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if source.is_file():
        return [line.strip() for line in source.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"Input {source} is neither a folder of images nor a file listing image paths.")


def read_rows(path: Path) -> list[dict]:
    """Rows already written; a partial last line (a killed write) is dropped and truncated away."""
    if not path.exists():
        return []
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]
        if complete != text:
            path.write_text(complete)
        rows = list(csv.DictReader(complete.splitlines()))
        return [r for r in rows if r.get("path")]
    rows, good = [], 0
    with open(path, "rb") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
                good += len(line)
            except json.JSONDecodeError:
                break
    if good != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return rows


class RowWriter:
    """Appends rows and makes each batch durable before the next one starts."""

    def __init__(self, path: Path):
        self.path = path
        self.csv = path.suffix == ".csv"
        new = not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "a", newline="")
        if self.csv and new:
            csv.DictWriter(self.handle, CSV_FIELDS).writeheader()

    def write(self, rows: Sequence[dict]) -> None:
        if self.csv:
            writer = csv.DictWriter(self.handle, CSV_FIELDS, extrasaction="ignore")
            writer.writerows({**row, "error": row.get("error") or ""} for row in rows)
        else:
            self.handle.writelines(json.dumps(row) + "\n" for row in rows)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


class Predictor:
    """An EmoVLM-KD checkpoint ready for batched, error-tolerant inference."""

    def __init__(self, model_path: str, top_k: int = 3, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.model = AutoModelForImageClassification.from_pretrained(model_path, trust_remote_code=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
        self.labels = self.model.config.id2label
        self.top_k = min(top_k, len(self.labels))

    def _load(self, path: str):
        try:
            return self.image_processor.load_images(path), None
        except (OSError, ValueError, TypeError) as err:
            return None, f"{type(err).__name__}: {err}"

    @torch.inference_mode()
    def predict(self, paths: Sequence[str]) -> list[dict]:
        loaded = [self._load(path) for path in paths]
        good = [i for i, (image, _) in enumerate(loaded) if image is not None]
        rows = [{"path": path, "error": error} for path, (_, error) in zip(paths, loaded)]
        if good:
            inputs = self.image_processor([loaded[i][0] for i in good], return_tensors="pt").to(self.device)
            out = self.model(**inputs)
            probs = out.logits.float().softmax(-1)
            top = probs.topk(self.top_k, dim=-1)
            for j, i in enumerate(good):
                rows[i].update(
                    label=self.labels[int(top.indices[j, 0])],
                    score=round(float(top.values[j, 0]), 6),
                    top_k=[{"label": self.labels[int(k)], "score": round(float(v), 6)}
                           for v, k in zip(top.values[j], top.indices[j])],
                    vlm_label=self.labels[int(out.vlm_logits[j].argmax())],
                    head_label=self.labels[int(out.head_logits[j].argmax())],
                )
        return rows


def batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(predictor: Predictor, paths: Sequence[str], output: Path, batch_size: int = 8,
                  show_progress: bool = True, done: set[str] = frozenset()) -> PredictionSummary:
    """Classify `paths` into `output`, skipping those already there (or in `done`)."""
    summary = PredictionSummary(total=len(paths))
    done = set(done) | {row["path"] for row in read_rows(output)}
    summary.resumed = sum(path in done for path in paths)
    todo = [path for path in paths if path not in done]
    writer = RowWriter(output)
    try:
        for chunk in tqdm(list(batches(todo, batch_size)), desc="Predicting", unit="batch", disable=not show_progress):
            rows = predictor.predict(chunk)
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


def merge_parts(parts: Sequence[Path], paths: Sequence[str], output: Path) -> None:
    """Write the earlier output's and the shards' rows into `output` in input order, atomically."""
    rows = {row["path"]: row for part in (output, *parts) for row in read_rows(part)}
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.unlink(missing_ok=True)
    writer = RowWriter(tmp)
    writer.write([rows[path] for path in paths if path in rows])
    writer.close()
    os.replace(tmp, output)


def run_predict(model: str, source: str, output: str | Path, batch_size: int = 8, top_k: int = 3,
                show_progress: bool = True) -> PredictionSummary:
    state = PartialState(cpu=not torch.cuda.is_available())
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = list_inputs(source)
    predictor = Predictor(model, top_k=top_k, device=None if state.num_processes == 1 else "cpu"
                          if not torch.cuda.is_available() else f"cuda:{state.local_process_index}")
    if state.num_processes == 1:
        summary = predict_files(predictor, paths, output, batch_size, show_progress)
    else:
        # Each rank takes every `world`-th image, a disjoint shard, and resumes its own part file.
        part = output.with_name(f"{output.name}.part{state.process_index}")
        shard = paths[state.process_index :: state.num_processes]
        done = {row["path"] for row in read_rows(output)} if output.exists() else set()
        summary = predict_files(predictor, shard, part, batch_size, show_progress and state.is_main_process, done)
        print(f"Rank {state.process_index}/{state.num_processes}: shard of {len(shard)} images: {summary}", flush=True)
        state.wait_for_everyone()
        if state.is_main_process:
            parts = [output.with_name(f"{output.name}.part{r}") for r in range(state.num_processes)]
            merge_parts(parts, paths, output)
            for p in parts:
                p.unlink()
            summary = summarize(read_rows(output), len(paths))
        state.wait_for_everyone()
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="EmoVLM-KD folder or Hub repo id (remote code is trusted).")
    parser.add_argument("--input", required=True, help="A folder of images or a text file listing image paths.")
    parser.add_argument("--output", required=True, help="predictions.jsonl or predictions.csv (appended/resumed).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=3)


def run(args: argparse.Namespace) -> PredictionSummary:
    summary = run_predict(args.model, args.input, args.output, args.batch_size, args.top_k)
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        print(summary)
        for error in summary.errors:
            print(f"  failed: {error['path']}: {error['error']}")
    return summary


__all__ = ["PredictionSummary", "Predictor", "add_arguments", "list_inputs", "predict_files", "read_rows", "run",
           "run_predict"]
