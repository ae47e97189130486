"""The allowed range of every numeric recipe value, declared once and checked when a recipe is validated.

A value out of its range (a negative learning rate, `num_train_epochs: 0`, which trains no step and marks the stage
done, an infinite temperature, which saves a NaN head, `head_dropout: 2`, a negative seed) is refused by
`python -m train recipe` and before any stage runs, naming `section.key` and the range:

    recipe.yaml: distill.temperature: must be a finite number > 0, got inf.

`RANGES` maps a field name (any section that has it) or `section.key` (that section only: it wins) to its `Range`;
a list value (`head_hidden_dims`, `fractions`) is checked item by item. Every numeric field of every recipe section
has an entry (a test checks it, and that every default is in range), so a field added to a config needs one here.
NaN and infinities are never allowed. Checks that relate two values (min_pixels <= max_pixels) are in `related`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SEED_MAX = 2**32 - 1  # numpy's seeds (`transformers.set_seed` seeds numpy too)


@dataclass(frozen=True)
class Range:
    """`low` <= value <= `high` (strict where `*_open`); `None`: unbounded. `also`: further allowed values (e.g.
    `max_steps: -1`, "use num_train_epochs"). `note`: what the special values mean, for the message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    note: str = ""

    def contains(self, value) -> bool:
        if value in self.also and not isinstance(value, bool):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self, integer: bool = False) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_show(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_show(self.high)}"
        else:
            text = "any value"
        text = f"{'an integer' if integer else 'a finite number'} {text}"
        if self.also:
            text += f", or {' or '.join(map(str, self.also))}"
        return text + (f" ({self.note})" if self.note else "")


def _show(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1, high_open=True)  # dropout, betas, label smoothing: 1 would drop or keep everything
SEED = Range(0, SEED_MAX)

RANGES: dict[str, Range] = {
    # the run, and every Trainer stage's own seed
    "seed": SEED,
    # data
    "data.seed": SEED,
    "data.fractions": NON_NEGATIVE,
    # instructions (the generator)
    "instructions.timeout": POSITIVE,
    "instructions.max_retries": NON_NEGATIVE,
    "instructions.temperature": Range(0, 2, note="the OpenAI API's sampling range"),
    "instructions.max_tokens": AT_LEAST_1,
    "instructions.max_image_size": AT_LEAST_1,
    "instructions.num_workers": AT_LEAST_1,
    "instructions.requests_per_minute": POSITIVE,
    "instructions.max_new_tokens": AT_LEAST_1,
    "instructions.batch_size": AT_LEAST_1,
    # the fused model and the caches
    "model.head_hidden_dims": AT_LEAST_1,
    "model.head_dropout": FRACTION,
    "model.gate_num_experts": AT_LEAST_1,
    "model.feature_batch_size": AT_LEAST_1,
    "model.preprocess_workers": NON_NEGATIVE,
    "model.min_pixels": AT_LEAST_1,
    "model.max_pixels": AT_LEAST_1,
    # every Trainer stage (TrainingArguments, SFTConfig)
    "learning_rate": POSITIVE,
    "num_train_epochs": POSITIVE,
    "max_steps": Range(1, also=(-1,), note="-1: train num_train_epochs"),
    "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "eval_accumulation_steps": AT_LEAST_1,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": POSITIVE,
    "max_grad_norm": Range(0, note="0: no clipping"),
    "warmup_steps": Range(0, note="below 1: a fraction of the training steps"),
    "label_smoothing_factor": FRACTION,
    "logging_steps": Range(0, low_open=True, note="below 1: a fraction of the training steps"),
    "eval_steps": Range(0, low_open=True, note="below 1: a fraction of the training steps"),
    "save_steps": Range(0, low_open=True, note="below 1: a fraction of the training steps"),
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": AT_LEAST_1,
    "data_seed": SEED,
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": AT_LEAST_1,
    "dataset_num_proc": AT_LEAST_1,
    "ddp_bucket_cap_mb": AT_LEAST_1,
    "ddp_timeout": AT_LEAST_1,
    "local_rank": Range(-1, note="set by the launcher; -1: not distributed"),
    "torch_empty_cache_steps": AT_LEAST_1,
    "neftune_noise_alpha": NON_NEGATIVE,
    "router_aux_loss_coef": NON_NEGATIVE,
    # stage 1
    "sft.lora_r": AT_LEAST_1,
    "sft.lora_alpha": AT_LEAST_1,
    "sft.lora_dropout": FRACTION,
    "sft.max_length": AT_LEAST_1,
    "sft.pad_to_multiple_of": AT_LEAST_1,
    "sft.eval_max_images": AT_LEAST_1,
    # the teacher
    "teacher.crop_scale": Range(0, 1, low_open=True),
    "teacher.image_size": AT_LEAST_1,
    # stage 2
    "distill.alpha": Range(0, 1),
    "distill.temperature": POSITIVE,
    # stage 3
    "gate.lbfgs_max_iter": AT_LEAST_1,
    "gate.lbfgs_history_size": AT_LEAST_1,
    "gate.lbfgs_tolerance_grad": NON_NEGATIVE,
    "gate.lbfgs_tolerance_change": NON_NEGATIVE,
    "gate.weight_decay_grid": NON_NEGATIVE,
    "gate.folds": Range(2),
}


def range_of(section: str, key: str) -> Range | None:
    """The range of `section.key` (a section's own entry wins over the field name's; `section` "" for the recipe's
    top-level values), or None."""
    return RANGES.get(f"{section}.{key}", RANGES.get(key)) if section else RANGES.get(key)


def check_value(section: str, key: str, value: Any) -> str | None:
    """Why `value` is not allowed for `section.key` (one line, naming it), or None. `None` values (unset) and values
    that are not numbers (a `str` member of a union such as `pad_to_multiple_of`) are left to the type checks."""
    allowed = range_of(section, key)
    if allowed is None or value is None:
        return None
    name = f"{section}.{key}" if section else key
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, str) or item is None:
            continue
        if not allowed.contains(item):
            where = f" (item {items.index(item)})" if isinstance(value, (list, tuple)) else ""
            integer = isinstance(item, int) and not isinstance(item, bool)
            return f"{name}{where}: must be {allowed.describe(integer)}, got {item!r}."
    return None


RELATED_KEYS = ("min_pixels", "max_pixels", "fp16", "bf16")  # what `related` reads of a section


def related(section: str, values: dict) -> str | None:
    """Checks that relate two values of one section (`values`: the section's values, defaults included)."""
    if section == "model":
        low, high = values.get("min_pixels"), values.get("max_pixels")
        if low is not None and high is not None and low > high:
            return f"model.min_pixels ({low}) must not exceed model.max_pixels ({high})."
    if values.get("fp16") and values.get("bf16"):
        return f"{section}.fp16 and {section}.bf16: at most one of them can be true."
    return None


__all__ = ["RANGES", "RELATED_KEYS", "Range", "check_value", "range_of", "related"]
