"""The `TrainingArguments` the `Trainer`-based stages share: checkpoint every epoch and select on validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class BestOnValidationArguments(TrainingArguments):
    """`TrainingArguments` that checkpoint every epoch (so a killed stage resumes) and keep the model best on
    validation accuracy."""

    eval_strategy: str = field(default="epoch", metadata={"help": "Evaluate on validation every epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch (for resuming)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept besides the best."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the model best on validation."})
    metric_for_best_model: str = field(default="accuracy", metadata={"help": "Validation metric to select on."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every input column in the batch."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Logging integrations."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})


@dataclass
class CachedFeatureArguments(BestOnValidationArguments):
    """Stages 2 and 3: small modules trained on cached tensors, so large batches and the paper's lr 1e-3."""

    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=20.0, metadata={"help": "Epochs over the cached tensors."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size (the inputs are small)."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Label keys."})


__all__ = ["BestOnValidationArguments", "CachedFeatureArguments"]
