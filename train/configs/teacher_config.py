"""The teacher's arguments (`train/stages/teacher.py` trains it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from train.configs.base_models import DEFAULT_TEACHER
from train.configs.trainer_args import BestOnValidationArguments

# How evaluation (and the teacher logits of the feature caches) fit an image to the teacher's square input.
EVAL_RESIZES = ("center_crop", "squash")


@dataclass
class TeacherConfig(BestOnValidationArguments):
    """Arguments of the teacher: the shared select-on-validation arguments plus its base model, input resolution,
    evaluation transform and augmentation."""

    SET_BY_PIPELINE: ClassVar[tuple[str, ...]] = ("teacher_model_name_or_path",)  # the run's `base_models.teacher`

    teacher_model_name_or_path: str = field(
        default=DEFAULT_TEACHER, metadata={"help": "Base image classifier to fine-tune."}
    )
    image_size: int | None = field(default=None, metadata={
        "help": "The teacher's square input, in pixels. Unset: the checkpoint's own (its config's image_size: 384 "
                "for google/vit-base-patch16-384). Another value sets the image processor's size and, for a ViT-style "
                "teacher, interpolates its position embeddings once at load (bicubic, as the model's own "
                "interpolate_pos_encoding), so the fine-tuned teacher is saved at that resolution."})
    eval_resize: Literal["center_crop", "squash"] = field(default="center_crop", metadata={
        "help": "How validation, test and the feature caches' teacher logits fit an image to image_size: center_crop "
                "(the shorter side to image_size, then the centre square: the authors' Resize + CenterCrop) or "
                "squash (both sides to image_size, the aspect ratio lost: ViTImageProcessor's own resize). Saved in "
                "the teacher's image processor, so the caches use the same."})
    augment: bool = field(default=True, metadata={
        "help": "Training: random resized crops (squashed to image_size, as torchvision's RandomResizedCrop) and "
                "horizontal flips. Without it, training images get the evaluation transform."})
    crop_scale: float = field(default=0.7, metadata={
        "help": "Smallest crop area (fraction of the image) of the augmentation (torchvision's default: 0.08)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})

    def __post_init__(self):
        super().__post_init__()
        if self.eval_resize not in EVAL_RESIZES:
            raise ValueError(f"eval_resize must be one of {', '.join(EVAL_RESIZES)}, got {self.eval_resize!r}.")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be at least 1 pixel, got {self.image_size}.")


__all__ = ["EVAL_RESIZES", "TeacherConfig"]
