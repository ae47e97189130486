"""What the `Trainer`-based stages share: strict checkpoint loading, cached-tensor data sets, checkpoint discovery
and the accuracy metric used for selection (their shared arguments are `train/configs/trainer_args.py`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, _is_peft_model
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, is_sagemaker_mp_enabled

logger = logging.getLogger(__name__)


class CheckpointLoadError(RuntimeError):
    """A checkpoint's tensors do not match the model being trained; the message names the folder and the keys."""


def _listed(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def read_checkpoint_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `Trainer` checkpoint of a model that is not a `PreTrainedModel` (`model.safetensors`, or the
    shards its index lists), keyed as the `Trainer` model's `state_dict()`."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return load_file(folder / SAFE_WEIGHTS_NAME)
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        shards = sorted(set(json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
        return {key: value for shard in shards for key, value in load_file(folder / shard).items()}
    raise CheckpointLoadError(f"{folder} holds no {SAFE_WEIGHTS_NAME} (nor its index): not a finished checkpoint.")


def submodule_tensors(folder: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """A sub-module's tensors in a checkpoint, keyed as the sub-module's own `state_dict()`.

    The key mapping of the cached-feature stages: their `Trainer` model wraps the module they save, so stage 2's
    checkpoints hold the head as `head.<key>` (`DistillationStudent.head`; `distill/head.safetensors` holds `<key>`)
    and stage 3's the gate as `gate.<key>` (`GateStudent.gate`; `gate/gate.safetensors` holds `<key>`)."""
    return {key[len(prefix):]: value for key, value in read_checkpoint_tensors(folder).items()
            if key.startswith(prefix)}


def load_checkpoint_strictly(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy a checkpoint's weights into `model`, every tensor or none: missing, unexpected or mis-shaped keys raise
    `CheckpointLoadError`.

    A `PreTrainedModel` is read with its class's `from_pretrained`, so the key conversions of its version apply (a
    ViT checkpoint saved as `vit.encoder.layer.N.attention.attention.key.weight` loads into `vit.layers.N.attention.
    k_proj.weight`; a Qwen2-VL one as `model.layers.*` into `model.language_model.layers.*`); any other module from
    its `model.safetensors`, keyed as its `state_dict()`."""
    folder = Path(folder)
    if isinstance(model, PreTrainedModel):
        restored, info = type(model).from_pretrained(folder, dtype=model.dtype, device_map="cpu",
                                                     output_loading_info=True)
        problems = [f"{name.replace('_', ' ')} {_listed(k if isinstance(k, str) else k[0] for k in info[name])}"
                    for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(name)]
        if problems or info.get("error_msgs"):
            raise CheckpointLoadError(f"{folder} does not match the {type(model).__name__} being trained: "
                                      f"{'; '.join(problems + list(info.get('error_msgs') or []))}.")
        state = restored.state_dict()
    else:
        state = read_checkpoint_tensors(folder)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ
        raise CheckpointLoadError(f"{folder} does not match the {type(model).__name__} being trained: "
                                  f"{' '.join(str(err).split())}") from None
    problems = [f"{name.replace('_', ' ')} {_listed(keys)}" for name, keys in
                (("missing_keys", result.missing_keys), ("unexpected_keys", result.unexpected_keys)) if keys]
    if problems:
        raise CheckpointLoadError(f"{folder} does not match the {type(model).__name__} being trained: "
                                  f"{'; '.join(problems)}.")


class StrictCheckpointLoading:
    """`Trainer` mixin (list it before `Trainer`): the best checkpoint (`load_best_model_at_end`) and a resumed one
    are loaded by `load_checkpoint_strictly`, through the model's own loading, all tensors or an error.

    `Trainer` reads a checkpoint's state dict as saved and loads it non-strictly, logging the keys it could not
    place. Under transformers 5.x a `PreTrainedModel` is saved in its checkpoint layout, which is not always the
    live modules' names (ViT: 8 of 40 tensors placed; a fully fine-tuned Qwen2-VL: only `lm_head`, transformers
    issue #43701): the model kept, evaluated and resumed would silently be part one epoch, part another.

    PEFT adapters (peft's `load_adapter`), DeepSpeed, FSDP and SageMaker checkpoints keep the library's loading."""

    def _library_loads(self, model) -> bool:
        return (_is_peft_model(model) or self.is_deepspeed_enabled or self.is_fsdp_enabled
                or is_sagemaker_mp_enabled())

    def _load_best_model(self) -> None:
        if self._library_loads(self.model):
            return super()._load_best_model()
        logger.info("Loading the best model from %s (%s: %s).", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        load_checkpoint_strictly(self.model, self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        model = model if model is not None else self.model
        if self._library_loads(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Resuming the model's weights from %s.", resume_from_checkpoint)
        load_checkpoint_strictly(model, resume_from_checkpoint)


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


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Right predictions / rows in double precision, as `accuracy_metrics` (numpy) computes it."""
    return int((logits.argmax(-1) == labels).sum()) / len(labels)


def accuracy_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def kept_model_metric(trainer) -> float | None:
    """The validation `metric_for_best_model` of the model a stage keeps: the best epoch's with
    `load_best_model_at_end` (the recipes' default), else the last evaluation's, the trained model's own (the
    authors' code keeps the last epoch: train/recipes/authors-code.yaml)."""
    if trainer.args.load_best_model_at_end:
        return trainer.state.best_metric
    key = f"eval_{trainer.args.metric_for_best_model}"
    return next((entry[key] for entry in reversed(trainer.state.log_history) if key in entry), None)


__all__ = ["CheckpointLoadError", "FeatureDataset",
           "StrictCheckpointLoading", "accuracy_metrics", "kept_model_metric", "last_complete_checkpoint",
           "load_checkpoint_strictly", "read_checkpoint_tensors", "submodule_tensors"]
