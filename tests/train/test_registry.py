"""The data set registry: one table that the loaders, the recipe check, `push --variant` and the card read; adding a
named data set is one loader plus one entry, and the registry (with the card metadata) loads without torch."""

import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from PIL import Image as PILImage

from modeling_emovlm_kd import DATASET_LABEL_SETS, LABEL_SETS
from train.commands.card import HubFolder, PublishError, build_card, load_variants
from train.infra import registry
from train.infra.data import _build, _scan_class_folders, dataset_summary, load_dataset_from_config
from train.infra.recipe import RecipeError, validate_recipe

ROOT = Path(__file__).resolve().parents[2]
ARTPHOTO_LICENCE = "ArtPhoto's images are artworks that remain their owners' property; test licence note."
ARTPHOTO_CITATION = "@article{machajdik2010affective,\n  title = {Affective Image Classification}\n}\n"


def load_artphoto(root, split_name: str = "train"):
    """A test loader: `root/<split>/<emotion>/*.png` in mikels8, the way a contributor would write one."""
    from collections import Counter

    root, labels, skipped = Path(root), LABEL_SETS["mikels8"], Counter()
    by_split = {split: _scan_class_folders(root / split, labels, root, skipped)
                for split in ("train", "validation", "test")}
    examples = {key: label for split in by_split.values() for key, label in split.items()}
    return _build("artphoto", root, {s: list(e) for s, e in by_split.items()}, examples, labels, skipped)


@pytest.fixture
def artphoto():
    entry = registry.register(registry.DatasetEntry(
        name="artphoto", loader=f"{__name__}:load_artphoto", label_set="mikels8", title="ArtPhoto",
        url="https://example.org/artphoto", tags=("artphoto", "mikels-emotions"), licence_note=ARTPHOTO_LICENCE,
        citation=ARTPHOTO_CITATION,
    ))
    yield entry
    registry.unregister("artphoto")


def _artphoto_tree(root: Path) -> Path:
    for split in ("train", "validation", "test"):
        for index, label in enumerate(LABEL_SETS["mikels8"]):
            (root / split / label).mkdir(parents=True)
            PILImage.new("RGB", (8, 8), (index * 30, 10, 10)).save(root / split / label / "0.png")
    return root


def _folder(tmp_path: Path, labels: list[str], recipe: dict | None = None) -> HubFolder:
    results = {"recipe": recipe, "labels": labels} if recipe else None
    return HubFolder(tmp_path, {"id2label": {str(i): label for i, label in enumerate(labels)}}, results)


def test_a_data_set_added_through_the_registry_loads_validates_and_gets_its_card(artphoto, tmp_path):
    root = _artphoto_tree(tmp_path / "artphoto")
    dataset = load_dataset_from_config("artphoto", root=str(root))
    assert dataset["test"].features["label"].names == LABEL_SETS["mikels8"]
    assert dataset_summary(dataset)["num_rows"] == {"train": 8, "validation": 8, "test": 8}

    recipe = {"output_dir": str(tmp_path / "run"), "labels": "mikels8", "data": {"kind": "artphoto", "root": "x"}}
    assert validate_recipe(recipe).data.kind == "artphoto"
    with pytest.raises(RecipeError, match=r"data\.label_file is not an option of data kind 'artphoto'"):
        validate_recipe({**recipe, "data": {"kind": "artphoto", "root": "x", "label_file": "y"}})

    assert "artphoto" in registry.card_variants() and load_variants()["variants"]["artphoto"]["label_set"] == "mikels8"
    folder = _folder(tmp_path, LABEL_SETS["mikels8"])
    text = ModelCard(str(build_card(folder, "artphoto", "emo-org/emovlm-kd-artphoto"))).text
    assert "trained on **ArtPhoto**" in text and "(https://example.org/artphoto)" in text
    assert ARTPHOTO_LICENCE in text and "Affective Image Classification" in text
    assert "label set `mikels8`" in text
    with pytest.raises(PublishError, match=r"not the artphoto label set mikels8"):
        build_card(_folder(tmp_path, LABEL_SETS["binary"]), "artphoto", "emo-org/x")
    trained_on_fi = _folder(tmp_path, LABEL_SETS["mikels8"], {"data": {"kind": "fi"}})
    with pytest.raises(PublishError, match=r"trained on the 'fi' data set.*--variant fi"):
        build_card(trained_on_fi, "artphoto", "emo-org/x")


def test_the_registry_and_the_model_package_agree_on_every_built_in_data_set():
    assert registry.named_datasets() == ["emoset", "fi", "emotion6", "flickr", "instagram"]
    assert set(registry.names()) == {*registry.named_datasets(), "imagefolder", "hub"}
    for name, label_set in DATASET_LABEL_SETS.items():
        entry = registry.get(name)
        assert entry.label_set == label_set and entry.label_set in LABEL_SETS
        assert entry.citation.startswith("@") and entry.licence_note and entry.title
        assert callable(entry.load_function())
    assert set(DATASET_LABEL_SETS) == set(registry.named_datasets())


def test_bad_entries_and_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"loader 'train.infra.data.load_fi' must be 'module:function'"):
        registry.DatasetEntry(name="x", loader="train.infra.data.load_fi")
    with pytest.raises(ValueError, match=r"'custom'"):
        registry.DatasetEntry(name="custom", loader="train.infra.data:load_fi")
    with pytest.raises(ValueError, match=r"'x' has a label set but no title"):
        registry.DatasetEntry(name="x", loader="train.infra.data:load_fi", label_set="mikels8")
    with pytest.raises(ValueError, match=r"already registered"):
        registry.register(registry.get("fi"))
    with pytest.raises(ValueError, match=r"cannot import its loader 'train.infra.data:load_nothing'"):
        registry.DatasetEntry(name="x", loader="train.infra.data:load_nothing").load_function()
    with pytest.raises(ValueError, match=r"unknown data set kind 'affectnet'; use one of \[.*'emoset'"):
        registry.get("affectnet")
    with pytest.raises(ValueError, match=r"'flickr' fixes \['name'\] itself"):
        load_dataset_from_config("flickr", root="x", label_file="y", split_file="z", name="other")


def test_registry_and_card_metadata_load_without_torch_or_datasets():
    code = ("import sys; from train.infra import registry; from train.commands.publish import load_variants; "
            "assert load_variants()['variants']['emoset']['dataset'] == 'EmoSet-118K'; "
            "assert registry.get('fi').label_set == 'mikels8'; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
