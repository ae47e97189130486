"""Teacher: fine-tune any `AutoModelForImageClassification` (default `google/vit-base-patch16-384`) per data set.

The best checkpoint on validation is kept; its logits become stage 2's soft targets.

    python -m train teacher --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, set_seed

from modeling_emovlm_kd.processing_emovlm_kd import to_rgb
from train.configs.teacher_config import TeacherConfig
from train.stages.trainer_utils import StrictCheckpointLoading, accuracy_metrics


def augment(image: Image.Image, crop_scale: float) -> Image.Image:
    """A random resized crop (area in [crop_scale, 1], aspect ratio in [3/4, 4/3]) and a random horizontal flip.

    Draws from torch's global generator, which `Trainer` seeds and restores on resume, so a resumed run sees the
    same augmentations as an uninterrupted one.
    """
    width, height = image.size
    u = torch.rand(5).tolist()
    area = width * height * (crop_scale + (1 - crop_scale) * u[0])
    ratio = 3 / 4 + (4 / 3 - 3 / 4) * u[1]
    w = min(width, max(1, round((area * ratio) ** 0.5)))
    h = min(height, max(1, round((area / ratio) ** 0.5)))
    left, top = int(u[2] * (width - w + 1)) % (width - w + 1), int(u[3] * (height - h + 1)) % (height - h + 1)
    image = image.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
    return ImageOps.mirror(image) if u[4] < 0.5 else image


def image_transform(image_processor, train: bool, crop_scale: float):
    def transform(batch):
        images = [to_rgb(image) for image in batch["image"]]
        if train:
            images = [augment(image, crop_scale) for image in images]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch["label"])}

    return transform


def load_teacher(name_or_path: str, labels: list[str]):
    """The base classifier with a fresh `len(labels)`-way head (kept if it already has exactly these labels)."""
    return AutoModelForImageClassification.from_pretrained(
        name_or_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )


class TeacherTrainer(StrictCheckpointLoading, Trainer):
    """`Trainer` whose best and resumed checkpoints load through the classifier's `from_pretrained`, strictly (see
    `StrictCheckpointLoading`: ViT checkpoints keep the legacy key layout)."""


def train_teacher(dataset_dict, labels: list[str], args: TeacherConfig, resume_from_checkpoint=None) -> TeacherTrainer:
    """Fine-tune the teacher on `train`, select on `validation`, save the best to `args.output_dir`."""
    image_processor = AutoImageProcessor.from_pretrained(args.teacher_model_name_or_path)
    model = load_teacher(args.teacher_model_name_or_path, labels)
    train_set = dataset_dict["train"].with_transform(image_transform(image_processor, args.augment, args.crop_scale))
    eval_set = dataset_dict["validation"].with_transform(image_transform(image_processor, False, 1.0))
    trainer = TeacherTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                             compute_metrics=accuracy_metrics)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():  # one writer: concurrent writes of the same file can corrupt it
        image_processor.save_pretrained(args.output_dir)
    trainer.accelerator.wait_for_everyone()
    return trainer


def run(context) -> dict:
    set_seed(context.seed)
    args = context.stage_args("teacher", teacher_model_name_or_path=context.base_models["teacher"])
    trainer = train_teacher(context.data, context.labels, args, resume_from_checkpoint=context.resume("teacher"))
    return {"best_validation_accuracy": trainer.state.best_metric}


__all__ = ["TeacherTrainer", "augment", "load_teacher", "run", "train_teacher"]
