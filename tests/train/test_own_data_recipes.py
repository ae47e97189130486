"""The recipes for one's own data (`train/recipes/own-data/`) and the authors' code's values
(`train/recipes/authors-code.yaml`): each validates as shipped, with only its data pointed at a folder that exists,
and reads the layout the README's "Train on your own data" describes."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from train.infra.recipe import load_recipe, read_recipe
from train.infra.run import Run

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "train" / "recipes"
OWN = RECIPES / "own-data"
PAPER = yaml.safe_load((RECIPES / "paper.yaml").read_text())
# The 7B recipes train in bf16, which TrainingArguments accepts only on a GPU or with use_cpu.
ON_CPU = [f"{section}.use_cpu=true" for section in ("sft", "teacher", "distill", "gate")]


def _shipped(name: str) -> dict:
    return yaml.safe_load((OWN / name).read_text())


def _write_images(folder: Path, labels, per_label: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for index, label in enumerate(labels):
        (folder / label).mkdir(parents=True)
        for i in range(per_label):
            pixels = rng.integers(0, 256, (20 + index, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{label}-{i}.png")


def _inherits_the_base(as_set: dict) -> None:
    """Every value of paper.yaml is in the resolved recipe unchanged: the file states only data, labels and VLM."""
    for section, values in PAPER.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert as_set[section][key] == value, f"{section}.{key}"
        else:
            assert as_set[section] == values, section


@pytest.mark.parametrize("name", ["imagefolder.yaml", "hub.yaml"])
def test_the_recipe_names_a_real_backbone_and_states_only_what_differs(name):
    shipped = _shipped(name)
    assert shipped["base"] == "../paper.yaml"
    assert shipped["base_models"] == {"vlm": "Qwen/Qwen2-VL-7B-Instruct"}
    assert shipped["data"]["kind"] == name.removesuffix(".yaml")
    assert set(shipped) == {"base", "output_dir", "labels", "data", "base_models"}


def test_the_imagefolder_recipe_reads_split_folders(tmp_path):
    labels = _shipped("imagefolder.yaml")["labels"]
    for split, count in (("train", 4), ("val", 2), ("test", 3)):  # `val/` is a validation folder too
        _write_images(tmp_path / "photos" / split, labels, count)
    recipe = load_recipe(OWN / "imagefolder.yaml", [*ON_CPU, f"data.root={tmp_path / 'photos'}"],
                         output_dir=str(tmp_path / "run"))
    assert recipe.data.kind == "imagefolder" and recipe.base_models.vlm == "Qwen/Qwen2-VL-7B-Instruct"
    assert recipe.labels == labels
    _inherits_the_base(recipe.as_set)
    data = Run(recipe).data
    assert {split: len(data[split]) for split in data} == {"train": 12, "validation": 6, "test": 9}
    assert data["train"].features["label"].names == labels


def test_the_imagefolder_recipe_splits_a_flat_folder_once(tmp_path):
    labels = _shipped("imagefolder.yaml")["labels"]
    _write_images(tmp_path / "photos", labels, 20)
    split_file = tmp_path / "split.json"
    overrides = [*ON_CPU, f"data.root={tmp_path / 'photos'}", f"data.split_file={split_file}"]
    recipe = load_recipe(OWN / "imagefolder.yaml", overrides, output_dir=str(tmp_path / "run"))
    data = Run(recipe).data
    assert {split: len(data[split]) for split in data} == {"train": 48, "validation": 3, "test": 9}  # 80/5/15 of 60
    assert split_file.exists()
    again = Run(load_recipe(OWN / "imagefolder.yaml", overrides, output_dir=str(tmp_path / "run"))).data
    assert again["test"]["image_path"] == data["test"]["image_path"]


def test_the_hub_recipe_reads_a_data_set_through_load_dataset(tmp_path):
    """`data.name_or_path` is what `datasets.load_dataset` takes: here its packaged `imagefolder` builder on a local
    folder (a Hub repo id needs the network). Its ClassLabel names are matched to the recipe's labels by name."""
    labels = _shipped("hub.yaml")["labels"]
    for split, count in (("train", 4), ("validation", 2), ("test", 3)):
        _write_images(tmp_path / "photos" / split, [label.upper() for label in labels], count)
    overrides = [*ON_CPU, "data.name_or_path=imagefolder", f"data.load_kwargs={{data_dir: {tmp_path / 'photos'}}}"]
    recipe = load_recipe(OWN / "hub.yaml", overrides, output_dir=str(tmp_path / "run"))
    assert recipe.data.kind == "hub" and recipe.base_models.vlm == "Qwen/Qwen2-VL-7B-Instruct"
    _inherits_the_base(recipe.as_set)
    data = Run(recipe).data
    assert {split: len(data[split]) for split in data} == {"train": 12, "validation": 6, "test": 9}
    assert data["train"].features["label"].names == labels


def test_the_hub_recipe_cuts_missing_splits_from_train(tmp_path):
    labels = _shipped("hub.yaml")["labels"]
    _write_images(tmp_path / "photos" / "train", labels, 20)
    overrides = [*ON_CPU, "data.name_or_path=imagefolder", f"data.load_kwargs={{data_dir: {tmp_path / 'photos'}}}",
                 f"data.split_file={tmp_path / 'split.json'}"]
    data = Run(load_recipe(OWN / "hub.yaml", overrides, output_dir=str(tmp_path / "run"))).data
    assert {split: len(data[split]) for split in data} == {"train": 48, "validation": 3, "test": 9}


# ---- the authors' code's values as a second base ----------------------------------------------------------------

# From sange1104/EmoVLM-KD (commit fdffa10): train_ViT.py's argparse defaults and optimiser, data_utils.py's
# RandomResizedCrop (torchvision's default scale starts at 0.08), train_distillation.py's defaults, train_vlm.py's
# LoRA target modules.
AUTHORS_CODE = {
    "sft": {"lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "teacher": {"learning_rate": 3e-5, "weight_decay": 1e-5, "per_device_train_batch_size": 10, "num_train_epochs": 10,
                "lr_scheduler_type": "constant", "bf16": False, "load_best_model_at_end": False, "crop_scale": 0.08,
                "eval_resize": "center_crop"},
    "distill": {"learning_rate": 1e-5, "weight_decay": 1e-4, "per_device_train_batch_size": 1, "num_train_epochs": 5,
                "lr_scheduler_type": "constant", "load_best_model_at_end": False, "alpha": 0.5, "temperature": 2.0},
}


def test_authors_code_yaml_as_a_second_base_sets_the_code_values_and_nothing_else(tmp_path):
    recipe_file = tmp_path / "emoset-authors-code.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "base": [str(RECIPES / "paper.yaml"), str(RECIPES / "authors-code.yaml")],
        **{k: v for k, v in yaml.safe_load((RECIPES / "qwen2-vl-7b" / "emoset.yaml").read_text()).items()
           if k != "base"}}))
    (tmp_path / "data" / "EmoSet-118K").mkdir(parents=True)
    overrides = [*ON_CPU, f"data.root={tmp_path / 'data' / 'EmoSet-118K'}"]
    ours = load_recipe(recipe_file, overrides, output_dir=str(tmp_path / "run"))
    for section, values in AUTHORS_CODE.items():
        config = getattr(ours, section)
        for key, value in values.items():
            assert getattr(config, key) == value, f"{section}.{key}"
    assert ours.teacher.optim == ours.distill.optim == "adamw_torch"
    paper = read_recipe(RECIPES / "qwen2-vl-7b" / "emoset.yaml")
    resolved = read_recipe(recipe_file)
    for section in paper:
        if isinstance(paper[section], dict):
            changed = {key for key in paper[section] if resolved[section].get(key) != paper[section][key]}
            assert changed <= set(AUTHORS_CODE.get(section, {})), section
