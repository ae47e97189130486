"""The teacher's input: its resolution (`teacher.image_size`) and how evaluation fits an image to it
(`teacher.eval_resize`), in the teacher stage and in the feature caches' teacher logits.

The authors evaluate the teacher on `Resize(384)` + `CenterCrop(384)` (sange1104/EmoVLM-KD, data_utils.py): the
shorter side to 384 px (the longer one truncated to an integer, torchvision's rounding), then the centre square.
`ViTImageProcessor` by itself squashes both sides to 384. The references below are written with PIL by hand."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from train.configs.teacher_config import TeacherConfig
from train.infra.recipe import RecipeError, load_recipe
from train.infra.tiny import build_tiny_vit
from train.stages.features import compute_teacher_logits
from train.stages.teacher import pixel_values, resize_position_embeddings, train_teacher

LABELS = ["a", "b", "c"]
SIZE = 56  # the tiny ViT's own input (train/infra/tiny.py), patch 7


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("vit"), LABELS, seed=0)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# Wide, tall, odd margins and small images: each (width, height).
SIZES = [(90, 40), (40, 90), (101, 57), (57, 101), (28, 28), (200, 120)]


def _dataset_dict():
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})

    def split(seed, n):
        images = _images([SIZES[i % len(SIZES)] for i in range(n)], seed)
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)

    return datasets.DatasetDict({"train": split(1, 6), "validation": split(2, 3), "test": split(3, 3)})


def _normalise(image: Image.Image) -> np.ndarray:
    """ViT's rescale and normalisation (mean = std = 0.5), channels first."""
    return ((np.asarray(image, dtype=np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)


def resize_centre_crop(image: Image.Image, size: int) -> np.ndarray:
    """The authors' eval transform by hand: shorter side to `size` (bilinear), centre `size` square."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    image = image.resize(new, Image.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return _normalise(image.crop((left, top, left + size, top + size)))


def squash(image: Image.Image, size: int) -> np.ndarray:
    return _normalise(image.resize((size, size), Image.BILINEAR))


def _args(tmp_path, **kwargs):
    defaults = {"num_train_epochs": 1, "learning_rate": 1e-3}
    return TeacherConfig(output_dir=str(tmp_path / "teacher"), per_device_train_batch_size=3,
                         per_device_eval_batch_size=3, report_to="none", save_total_limit=1, logging_steps=1,
                         **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def trained(tiny_vit, tmp_path_factory):
    """A teacher trained by the stage with the defaults (`eval_resize: center_crop`, the checkpoint's own size)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    train_teacher(_dataset_dict(), LABELS, _args(tmp_path, teacher_model_name_or_path=str(tiny_vit)))
    return tmp_path / "teacher"


def test_the_saved_teacher_evaluates_on_resize_then_centre_crop(trained):
    processor = AutoImageProcessor.from_pretrained(trained)
    for image in _images(SIZES, seed=5):
        ours = processor(image, return_tensors="pt")["pixel_values"][0].numpy()
        np.testing.assert_allclose(ours, resize_centre_crop(image, SIZE), atol=1e-6, rtol=0)


def test_the_feature_caches_use_the_same_transform(trained):
    """The caches' teacher logits are the teacher's on the centre-cropped images (the saved processor carries it)."""
    teacher = AutoModelForImageClassification.from_pretrained(trained).eval()
    data = _dataset_dict()["test"]
    cached = compute_teacher_logits(teacher, AutoImageProcessor.from_pretrained(trained), data, batch_size=2)
    by_hand = torch.from_numpy(np.stack([resize_centre_crop(image, SIZE) for image in data["image"]]))
    with torch.no_grad():
        expected = teacher(pixel_values=by_hand).logits
    torch.testing.assert_close(cached["teacher_logits"], expected, atol=1e-5, rtol=0)  # fp32 reorderings only


def test_squash_is_the_processor_own_resize_and_agrees_on_square_images(tiny_vit, tmp_path):
    """`eval_resize: squash` keeps the previous behaviour; on square images (the demo's) both transforms agree."""
    torch.manual_seed(0)
    train_teacher(_dataset_dict(), LABELS, _args(tmp_path, teacher_model_name_or_path=str(tiny_vit),
                                                 eval_resize="squash"))
    squashing = AutoImageProcessor.from_pretrained(tmp_path / "teacher")
    for image in _images(SIZES, seed=6):
        np.testing.assert_allclose(squashing(image, return_tensors="pt")["pixel_values"][0].numpy(),
                                   squash(image, SIZE), atol=1e-6, rtol=0)
    (square,) = _images([(28, 28)], seed=7)
    np.testing.assert_array_equal(squash(square, SIZE), resize_centre_crop(square, SIZE))


def test_training_crops_are_squashed_to_the_square(trained):
    """Training: a random resized crop of any shape becomes the full square (torchvision's RandomResizedCrop)."""
    processor = AutoImageProcessor.from_pretrained(trained)
    torch.manual_seed(0)
    batch = pixel_values(processor, _images(SIZES, seed=8), train=True, crop_scale=0.5)
    assert batch.shape == (len(SIZES), 3, SIZE, SIZE)


def test_image_size_interpolates_the_position_embeddings_once(tiny_vit, tmp_path):
    """`teacher.image_size` 84 on a 56-pixel ViT: the stage's model equals the original run with
    `interpolate_pos_encoding=True`, and saves and reloads at 84 pixels with no forward flag."""
    original = AutoModelForImageClassification.from_pretrained(tiny_vit).eval()
    resized = resize_position_embeddings(original, 84).eval()
    assert resized.config.image_size == 84 and original.config.image_size == SIZE
    inputs = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        expected = original(pixel_values=inputs, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(resized(pixel_values=inputs).logits, expected, atol=1e-6, rtol=0)
        resized.save_pretrained(tmp_path / "resized")
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "resized").eval()
        torch.testing.assert_close(reloaded(pixel_values=inputs).logits, expected, atol=1e-6, rtol=0)


def test_the_stage_trains_and_saves_at_the_recipe_resolution(tiny_vit, tmp_path):
    torch.manual_seed(0)
    train_teacher(_dataset_dict(), LABELS, _args(tmp_path, teacher_model_name_or_path=str(tiny_vit), image_size=84))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "teacher")
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "teacher").eval()
    assert teacher.config.image_size == 84
    (image,) = _images([(101, 57)], seed=9)
    inputs = processor(image, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(inputs[0].numpy(), resize_centre_crop(image, 84), atol=1e-6, rtol=0)
    assert teacher(pixel_values=inputs).logits.shape == (1, len(LABELS))


def test_bad_resolutions_and_transforms_are_refused(tiny_vit, tmp_path):
    model = AutoModelForImageClassification.from_pretrained(tiny_vit)
    with pytest.raises(ValueError, match=r"teacher.image_size must be a multiple of the teacher's patch size 7"):
        resize_position_embeddings(model, 80)
    from transformers import BeitConfig, BeitForImageClassification, ResNetConfig, ResNetForImageClassification

    cnn = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=3))
    assert resize_position_embeddings(cnn, 84) is cnn  # a CNN takes any input size: nothing to interpolate
    relative = BeitForImageClassification(BeitConfig(image_size=56, patch_size=7, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    with pytest.raises(ValueError, match="has no ViT-style position embeddings"):
        resize_position_embeddings(relative, 84)  # BEiT's positions are relative biases, not one table
    with pytest.raises(ValueError, match="eval_resize must be one of center_crop, squash"):
        _args(tmp_path, eval_resize="stretch")


def test_a_recipe_checks_the_teacher_input_values(tmp_path):
    demo = "train/recipes/tiny/demo.yaml"
    recipe = load_recipe(demo, ["teacher.image_size=84", "teacher.eval_resize=squash"])
    assert (recipe.teacher.image_size, recipe.teacher.eval_resize) == (84, "squash")
    assert (load_recipe(demo).teacher.image_size, load_recipe(demo).teacher.eval_resize) == (None, "center_crop")
    with pytest.raises(RecipeError, match=r"teacher\.eval_resize: expected one of \['center_crop', 'squash'\]"):
        load_recipe(demo, ["teacher.eval_resize=stretch"])
    with pytest.raises(RecipeError, match=r"teacher\.image_size"):
        load_recipe(demo, ["teacher.image_size=large"])


def test_without_selection_the_stage_records_the_kept_model_accuracy(tiny_vit, tmp_path):
    """`load_best_model_at_end: false` (authors-code.yaml: the code keeps the last epoch) records the validation
    accuracy of the model it saves, the last epoch's, not the best epoch's, which it does not keep."""
    from train.stages.trainer_utils import kept_model_metric

    torch.manual_seed(0)
    args = _args(tmp_path, teacher_model_name_or_path=str(tiny_vit), load_best_model_at_end=False,
                 num_train_epochs=3, learning_rate=5e-3)
    trainer = train_teacher(_dataset_dict(), LABELS, args)
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "teacher").eval()
    validation = _dataset_dict()["validation"]
    processor = AutoImageProcessor.from_pretrained(tmp_path / "teacher")
    with torch.no_grad():
        predicted = teacher(pixel_values=pixel_values(processor, validation["image"])).logits.argmax(-1)
    saved_accuracy = float((predicted == torch.tensor(validation["label"])).float().mean())
    accuracies = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert len(accuracies) == 3 and kept_model_metric(trainer) == accuracies[-1] == saved_accuracy
    assert trainer.state.best_metric == max(accuracies)
