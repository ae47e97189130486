"""Feature caches for stages 2 and 3: computed once, keyed by model and data fingerprint, never read half-written.

For every image of a split, one pass of the frozen fused model gives the pooled visual features (the head's
input) and the VLM's label scores (the gate's input); one pass of the teacher gives its logits. They are stored
as safetensors with the fingerprint in the file's metadata. Files are written to a temporary name and renamed, so
a killed build leaves no file at the cache's path; a cache whose fingerprint, size or contents do not check out is
rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from modeling_emovlm_kd.modeling_emovlm_kd import pool_visual_tokens
from train.infra.assemble import assemble
from train.infra.run import SPLITS
from train.stages.teacher import pixel_values

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"


def model_fingerprint(path: str | Path) -> str:
    """Hash of a checkpoint folder's config and weight files (names, sizes and first/last MiB)."""
    path = Path(path)
    digest = hashlib.sha256(CACHE_FORMAT_VERSION.encode())
    for file in sorted(path.iterdir()):
        if file.suffix not in (".json", ".safetensors") or not file.is_file():
            continue
        digest.update(file.name.encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 1 << 20:
                handle.seek(-min(size - (1 << 20), 1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def data_fingerprint(dataset) -> str:
    """`datasets` fingerprint of a split (it changes with any transform of the data)."""
    return getattr(dataset, "_fingerprint", None) or hashlib.sha256(repr(dataset).encode()).hexdigest()[:16]


def cache_fingerprint(vlm_key: str, teacher_key: str, dataset, pooling: str) -> str:
    """The fingerprint a split's feature cache is stored under: the stage-1 model's and the teacher's
    `model_fingerprint`, the split's `data_fingerprint` and the pooling of the visual tokens."""
    return f"{vlm_key}-{teacher_key}-{data_fingerprint(dataset)}-{pooling}"


def read_fingerprint(path: str | Path) -> str | None:
    """The fingerprint a cache file was stored under (None: no such file, or not a complete cache)."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # noqa: BLE001 - missing, truncated or foreign
        return None
    return metadata.get("fingerprint") if metadata.get("complete") == "1" else None


def _read(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("fingerprint") != fingerprint or metadata.get("complete") != "1":
                return None
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        logger.warning("Cache %s is unreadable (%s); rebuilding it.", path, err)
        return None
    sizes = {t.shape[0] for t in tensors.values()}
    if len(sizes) != 1 or int(metadata.get("rows", -1)) not in sizes:
        logger.warning("Cache %s has inconsistent row counts; rebuilding it.", path)
        return None
    return tensors


def cached(path: str | Path, fingerprint: str, build: Callable[[], dict[str, torch.Tensor]], *,
           store: bool = True) -> dict[str, torch.Tensor]:
    """Load the tensors at `path` if they were built with `fingerprint`, else build and store them atomically.

    `store=False` builds without writing (the other ranks of a distributed build, whose main process writes)."""
    path = Path(path)
    if path.exists() and (tensors := _read(path, fingerprint)) is not None:
        logger.info("Using cached features %s", path)
        return tensors
    tensors = {key: value.contiguous().cpu() for key, value in build().items()}
    if not store:
        return tensors
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a build killed while writing
        stale.unlink(missing_ok=True)
    rows = next(iter(tensors.values())).shape[0]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata={"fingerprint": fingerprint, "complete": "1", "rows": str(rows)})
    os.replace(tmp, path)
    return tensors


class _PreprocessedBatches(torch.utils.data.Dataset):
    """Batch `i` of a split, decoded and preprocessed: what one `DataLoader` worker prepares while the model runs."""

    def __init__(self, dataset, batch_size: int, preprocess: Callable[[list], dict]):
        self.dataset, self.batch_size, self.preprocess = dataset, batch_size, preprocess

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        start = index * self.batch_size
        rows = self.dataset[start : start + self.batch_size]  # decodes the images
        return dict(self.preprocess(rows["image"])), torch.tensor(rows["label"])


def _batches(dataset, batch_size: int, preprocess: Callable[[list], dict], num_workers: int, description: str):
    """`(inputs, labels)` per batch in the data set's order; `num_workers > 0` decodes and preprocesses in that many
    `DataLoader` worker processes, overlapped with the model's forward (0: in this process, one batch at a time)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be at least 0, got {num_workers}.")
    # `batch_size=None`: each item already is a batch; the loader keeps the items' order whatever the workers.
    loader = torch.utils.data.DataLoader(_PreprocessedBatches(dataset, batch_size, preprocess), batch_size=None,
                                         num_workers=num_workers)
    yield from tqdm(loader, desc=description, unit="batch")


@torch.inference_mode()
def compute_vlm_features(model, image_processor, dataset, batch_size: int = 8,
                         num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Pooled visual features, VLM label scores and labels for every image, one fused-model pass per batch.

    `num_workers` `DataLoader` workers decode and preprocess the images (0: in this process)."""
    model.eval()
    device = model.vlm.get_input_embeddings().weight.device

    def preprocess(images):
        return image_processor(images, return_tensors="pt")

    features, scores, labels = [], [], []
    for inputs, label in _batches(dataset, batch_size, preprocess, num_workers, "VLM features"):
        pixel_values, grid = inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device)
        image_features = model.get_image_features(pixel_values, grid)
        features.append(pool_visual_tokens(image_features.pooler_output, model.config.pooling).float().cpu())
        scores.append(model.score_labels(image_features, grid).float().cpu())
        labels.append(label)
    return {"visual_features": torch.cat(features), "vlm_logits": torch.cat(scores), "labels": torch.cat(labels)}


@torch.inference_mode()
def compute_teacher_logits(teacher, image_processor, dataset, batch_size: int = 32,
                           num_workers: int = 0) -> dict[str, torch.Tensor]:
    """The fine-tuned teacher's logits for every image, in the data set's order (`num_workers`: as above), each image
    preprocessed as the teacher stage evaluates: the transform its saved `image_processor` holds (`teacher.eval_resize`:
    resize + centre crop by default, as the authors do)."""
    teacher.eval()
    device = next(teacher.parameters()).device

    def preprocess(images):
        return {"pixel_values": pixel_values(image_processor, images)}

    logits, labels = [], []
    for inputs, label in _batches(dataset, batch_size, preprocess, num_workers, "Teacher logits"):
        logits.append(teacher(**{key: value.to(device) for key, value in inputs.items()}).logits.float().cpu())
        labels.append(label)
    return {"teacher_logits": torch.cat(logits), "labels": torch.cat(labels)}


def run(context) -> None:
    """Pooled visual features, VLM label scores and teacher logits of every split, computed once.

    Under several processes each rank computes a contiguous shard (`split_between_processes`), the shards are
    gathered in rank order (`gather_object`) and the main process stores the cache atomically.
    """
    from accelerate.utils import gather_object
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    state, recipe, options = context.state, context.recipe, context.recipe.model
    merged, teacher_dir = context.require("sft") / "merged", context.require("teacher")
    device_map = {"": state.device} if torch.cuda.is_available() else None
    model, processor = assemble(merged, context.labels, load_in_4bit=options.load_in_4bit, dtype=options.dtype,
                                device_map=device_map, **{**recipe.model_kwargs(), **recipe.processor_kwargs()})
    teacher = AutoModelForImageClassification.from_pretrained(teacher_dir)
    teacher.to(model.vlm.get_input_embeddings().weight.device)
    teacher_processor = AutoImageProcessor.from_pretrained(teacher_dir)
    batch_size, workers = options.feature_batch_size, options.preprocess_workers
    vlm_key, teacher_key = model_fingerprint(merged), model_fingerprint(teacher_dir)
    run_folder = context.read()
    for split in SPLITS:
        dataset = context.data[split]
        fingerprint = cache_fingerprint(vlm_key, teacher_key, dataset, model.config.pooling)

        def build(dataset=dataset):
            # Every rank runs this (or none: they all find the same stored cache), so the gather is collective.
            with state.split_between_processes(dataset) as shard:
                vlm = compute_vlm_features(model, processor.image_processor, shard, batch_size, workers)
                teacher_out = compute_teacher_logits(teacher, teacher_processor, shard, batch_size * 4, workers)
            if not torch.equal(vlm["labels"], teacher_out["labels"]):
                raise RuntimeError("VLM and teacher passes saw the data in different orders.")
            part = {**vlm, "teacher_logits": teacher_out["teacher_logits"]}
            if state.num_processes == 1:
                return part
            parts = gather_object([part])
            return {key: torch.cat([p[key] for p in parts]) for key in part}

        cached(run_folder.feature_path(split), fingerprint, build, store=state.is_main_process)
        state.wait_for_everyone()

__all__ = [
    "cache_fingerprint",
    "cached",
    "compute_teacher_logits",
    "compute_vlm_features",
    "data_fingerprint",
    "model_fingerprint",
    "run",
    "read_fingerprint",
]
