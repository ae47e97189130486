"""What the `Trainer`-based stages share: cached-tensor data sets, checkpoint discovery and the accuracy metric used
for selection (their shared arguments are `train/configs/trainer_args.py`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


class FeatureDataset(torch.utils.data.Dataset):
    """Rows of equally long tensors as dicts, for `Trainer`'s default collator."""

    def __init__(self, **tensors: torch.Tensor):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"Cached tensors disagree on the number of rows: {lengths}.")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def last_complete_checkpoint(directory: str | Path) -> str | None:
    """The newest `checkpoint-N` folder that `Trainer` finished writing, or None.

    `Trainer` writes `trainer_state.json` last, so a process killed while saving leaves a newest folder without
    it, or with it empty or cut short; `transformers.trainer_utils.get_last_checkpoint` would return that folder
    and resuming would fail. Such folders are skipped (and named in the log) in favour of the one before.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = {}
    for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if path.is_dir() and suffix.isdigit():
            steps[int(suffix)] = path
    for step in sorted(steps, reverse=True):
        state_file = steps[step] / "trainer_state.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            logger.warning("Skipping %s: it was not finished (no readable trainer_state.json).", steps[step])
            continue
        if state.get("global_step") == step:
            return str(steps[step])
        logger.warning("Skipping %s: its trainer_state.json is for step %s.", steps[step], state.get("global_step"))
    return None


def accuracy_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


__all__ = ["FeatureDataset", "accuracy_metrics",
           "last_complete_checkpoint"]
