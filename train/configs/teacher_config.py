"""The teacher's arguments (`train/stages/teacher.py` trains it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from train.configs.sections import DEFAULT_TEACHER
from train.configs.trainer_args import BestOnValidationArguments


@dataclass
class TeacherConfig(BestOnValidationArguments):
    """Arguments of the teacher: the shared select-on-validation arguments plus its base model and augmentation."""

    SET_BY_PIPELINE: ClassVar[tuple[str, ...]] = ("teacher_model_name_or_path",)  # the run's `base_models.teacher`

    teacher_model_name_or_path: str = field(
        default=DEFAULT_TEACHER, metadata={"help": "Base image classifier to fine-tune."}
    )
    augment: bool = field(default=True, metadata={"help": "Random resized crops and horizontal flips in training."})
    crop_scale: float = field(default=0.7, metadata={"help": "Smallest crop area (fraction) of the augmentation."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})


__all__ = ["TeacherConfig"]
