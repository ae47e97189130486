"""Teacher: fine-tune any `AutoModelForImageClassification` (default `google/vit-base-patch16-384`) per data set.

The best checkpoint on validation is kept; its logits become stage 2's soft targets. The teacher sees a square of
`teacher.image_size` pixels (default: the checkpoint's own). In evaluation, and in the feature caches that read the
saved image processor, an image is fitted to it as `teacher.eval_resize` says: `center_crop`, the shorter side
resized to the size and the centre square kept (the authors' `Resize(384)` + `CenterCrop(384)`, data_utils.py), or
`squash`, both sides resized (what `ViTImageProcessor` does by itself). Training crops are squashed to the square,
as torchvision's `RandomResizedCrop` does.

    python -m train teacher --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, set_seed

from modeling_emovlm_kd.processing_emovlm_kd import to_rgb
from train.configs.teacher_config import TeacherConfig
from train.stages.trainer_utils import StrictCheckpointLoading, accuracy_metrics, kept_model_metric


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


def native_image_size(config, image_processor) -> int:
    """The square input a teacher checkpoint was trained at: its config's `image_size`, else its image processor's."""
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    if isinstance(size, int):
        return size
    processor_size = dict(image_processor.size or {})
    size = processor_size.get("height") or processor_size.get("shortest_edge")
    if not size:
        raise ValueError(f"Cannot tell the teacher's input size from its config or image processor ({processor_size});"
                         " set teacher.image_size.")
    return int(size)


def eval_transform(image_size: int, eval_resize: str) -> dict:
    """Image processor settings of the teacher's evaluation transform at `image_size` pixels (module docstring)."""
    square = {"height": image_size, "width": image_size}
    if eval_resize == "center_crop":
        return {"size": {"shortest_edge": image_size}, "do_center_crop": True, "crop_size": square}
    if eval_resize == "squash":
        return {"size": square, "do_center_crop": False}
    raise ValueError(f"teacher.eval_resize must be center_crop or squash, got {eval_resize!r}.")


def load_image_processor(name_or_path: str, image_size: int, eval_resize: str):
    """The teacher's image processor set to its evaluation transform; `save_pretrained` keeps the settings, so
    whoever loads the saved teacher's processor (the feature caches) evaluates alike. Refuses a processor that does
    not then give `image_size`-square inputs (one that ignores these settings)."""
    image_processor = AutoImageProcessor.from_pretrained(name_or_path, **eval_transform(image_size, eval_resize))
    probe = Image.new("RGB", (2 * image_size, image_size))  # not square: a crop and a squash both give the square
    shape = tuple(image_processor(probe, return_tensors="pt")["pixel_values"].shape[-2:])
    if shape != (image_size, image_size):
        raise ValueError(f"The teacher's image processor ({type(image_processor).__name__}) gives {shape} inputs with "
                         f"teacher.eval_resize={eval_resize} and image_size {image_size}, not a {image_size}-pixel "
                         "square: it does not resize and crop as transformers' image processor base classes do.")
    return image_processor


def pixel_values(image_processor, images: list, train: bool = False, crop_scale: float = 1.0) -> torch.Tensor:
    """The teacher's inputs for PIL `images`: any mode as RGB, then the evaluation transform the processor holds
    (`load_image_processor`), or in training random resized crops and flips squashed to the processor's square."""
    images = [to_rgb(image) for image in images]
    if not train:
        return image_processor(images, return_tensors="pt")["pixel_values"]
    size = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
    square = {"height": size["height"], "width": size["width"]}
    images = [augment(image, crop_scale) for image in images]
    return image_processor(images, size=square, do_center_crop=False, return_tensors="pt")["pixel_values"]


def image_transform(image_processor, train: bool, crop_scale: float):
    def transform(batch):
        inputs = pixel_values(image_processor, batch["image"], train, crop_scale)
        return {"pixel_values": inputs, "labels": torch.tensor(batch["label"])}

    return transform


def resize_position_embeddings(model, image_size: int):
    """`model` (a ViT-style classifier) at `image_size` pixels: its position embeddings interpolated once, bicubic,
    by the model's own `interpolate_pos_encoding` (what `forward(..., interpolate_pos_encoding=True)` computes at
    every call), in a copy built from its config with that `image_size`, so it saves and reloads at that size. A
    model whose config has no `image_size` (a CNN) takes any size as it is."""
    if getattr(model.config, "image_size", None) is None:
        return model
    embeddings = getattr(model.base_model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    patch = getattr(model.config, "patch_size", None)
    if table is None or not hasattr(embeddings, "interpolate_pos_encoding") or not isinstance(patch, int):
        raise ValueError(f"teacher.image_size {image_size}: {type(model).__name__} has no ViT-style position "
                         "embeddings to interpolate; leave teacher.image_size unset (the checkpoint's own size) or "
                         "choose a teacher trained at that size.")
    if image_size % patch:
        raise ValueError(f"teacher.image_size must be a multiple of the teacher's patch size {patch}, got {image_size}.")
    probe = torch.zeros(1, (image_size // patch) ** 2 + 1, table.shape[-1], dtype=table.dtype)
    with torch.no_grad():
        resized_table = embeddings.interpolate_pos_encoding(probe, image_size, image_size).clone()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.image_size = image_size
    resized = AutoModelForImageClassification.from_config(config)
    state = model.state_dict()
    state[next(name for name, parameter in model.named_parameters() if parameter is table)] = resized_table
    resized.load_state_dict(state)
    return resized.to(table.dtype)


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
    model = load_teacher(args.teacher_model_name_or_path, labels)
    native = native_image_size(model.config, AutoImageProcessor.from_pretrained(args.teacher_model_name_or_path))
    image_size = args.image_size or native
    if image_size != native:
        model = resize_position_embeddings(model, image_size)
    image_processor = load_image_processor(args.teacher_model_name_or_path, image_size, args.eval_resize)
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
    return {"best_validation_accuracy": kept_model_metric(trainer)}


__all__ = ["TeacherTrainer", "augment", "eval_transform", "load_image_processor", "load_teacher", "native_image_size",
           "pixel_values", "resize_position_embeddings", "run", "train_teacher"]
