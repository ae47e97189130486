"""Tests of `train.infra.data` on tiny archives built in `tmp_path` with the original data sets' layouts."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from modeling_emovlm_kd import LABEL_SETS
from train.infra.data import (
    _majority,
    dataset_summary,
    load_dataset_from_config,
    load_emoset,
    load_emotion6,
    load_fi,
    load_flickr_instagram,
    load_hub_dataset,
    load_imagefolder,
)

MIKELS8, EKMAN6, BINARY = LABEL_SETS["mikels8"], LABEL_SETS["ekman6"], LABEL_SETS["binary"]
# Alphabetical order differs from the fixed order, so a label order taken from a directory listing fails the tests.
assert sorted(MIKELS8) != MIKELS8


def _image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (8, 8), color).save(path)
    return path


def _label_names(ds: Dataset) -> list[str]:
    return [ds.features["label"].int2str(i) for i in ds["label"]]


def _row(ds: Dataset, image_path: str) -> dict:
    return ds[ds["image_path"].index(image_path)]


def _per_class_sizes(dd: DatasetDict, label: str) -> tuple[int, ...]:
    return tuple(_label_names(dd[split]).count(label) for split in ("train", "validation", "test"))


# ---------------------------------------------------------------------------------------------------------------
# EmoSet
# ---------------------------------------------------------------------------------------------------------------


def _emoset(root: Path, per_split=(("train", 3), ("val", 1), ("test", 2))) -> Path:
    counter = 0
    for split, n in per_split:
        entries = []
        for label in reversed(MIKELS8):  # reversed, so first-appearance order is not the label order
            for _ in range(n):
                counter += 1
                image = f"image/{label}/{label}_{counter:05d}.jpg"
                _image(root / image)
                entries.append([label, f"{label}_{counter:05d}", image, f"annotation/{label}/{label}_{counter:05d}.json"])
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def test_emoset_official_splits_and_labels(tmp_path):
    dd = load_emoset(_emoset(tmp_path))
    assert list(dd) == ["train", "validation", "test"]
    assert [len(dd[s]) for s in dd] == [24, 8, 16]
    assert dd["train"].features["label"].names == MIKELS8
    assert isinstance(dd["train"].features["image"], Image)
    row = _row(dd["validation"], "image/fear/fear_00026.jpg")  # val starts at 25, with sadness
    assert dd["validation"].features["label"].int2str(row["label"]) == "fear" and row["label"] == 6
    assert row["image"].size == (8, 8)
    for split in dd.values():
        assert _label_names(split) == [path.split("/")[1] for path in split["image_path"]]


def test_emoset_missing_image_is_an_error(tmp_path):
    root = _emoset(tmp_path)
    (root / "image/awe/awe_00031.jpg").unlink()
    with pytest.raises(ValueError, match="awe_00031.jpg"):
        load_emoset(root)


def test_emoset_unknown_label_is_an_error(tmp_path):
    root = _emoset(tmp_path)
    entries = json.loads((root / "test.json").read_text())
    entries[0][0] = "joy"
    (root / "test.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="'joy'"):
        load_emoset(root)


def test_emoset_empty_class_is_an_error(tmp_path):
    root = _emoset(tmp_path)
    entries = [e for e in json.loads((root / "val.json").read_text()) if e[0] != "contentment"]
    (root / "val.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="contentment"):
        load_emoset(root)


# ---------------------------------------------------------------------------------------------------------------
# FI
# ---------------------------------------------------------------------------------------------------------------


def _fi(root: Path) -> Path:
    """20 images per class, 40 for every other class: 16/1/3 and 32/2/6 in an 80/5/15 split."""
    for index, label in enumerate(MIKELS8):
        for n in range(20 if index % 2 else 40):
            _image(root / label / f"{label}_{n}.jpg", color=(index * 30, n, 0))
    return root


@pytest.fixture
def fi_root(tmp_path):
    return _fi(tmp_path / "FI")


def test_fi_labels_follow_folders_in_fixed_order(fi_root, tmp_path):
    dd = load_fi(fi_root, split_file=tmp_path / "split.json")
    assert dd["train"].features["label"].names == MIKELS8
    rows = [r for split in dd.values() for r in split.select_columns(["label", "image_path"])]
    row = next(r for r in rows if r["image_path"] == "anger/anger_3.jpg")
    assert row["label"] == 4  # anger is 5th in Mikels' order (and 2nd alphabetically)
    for split in dd.values():
        assert _label_names(split) == [path.split("/")[0] for path in split["image_path"]]


def test_fi_split_is_stratified_80_5_15(fi_root, tmp_path):
    dd = load_fi(fi_root, split_file=tmp_path / "split.json")
    for index, label in enumerate(MIKELS8):
        assert _per_class_sizes(dd, label) == ((16, 1, 3) if index % 2 else (32, 2, 6))
    paths = [p for split in dd.values() for p in split["image_path"]]
    assert len(paths) == len(set(paths)) == 240


def test_fi_split_file_is_written_and_read_back(fi_root, tmp_path):
    split_file = tmp_path / "splits" / "fi.json"
    dd = load_fi(fi_root, split_file=split_file, seed=3)
    content = json.loads(split_file.read_text())
    assert content["seed"] == 3 and content["labels"] == MIKELS8
    for split in dd:
        assert content[split] == dd[split]["image_path"]
    assert load_fi(fi_root, split_file=split_file, seed=3)["test"]["image_path"] == dd["test"]["image_path"]
    # The file, not the seed, decides: a hand-moved image follows the file.
    moved = content["train"].pop(0)
    content["test"].append(moved)
    split_file.write_text(json.dumps(content))
    reread = load_fi(fi_root, split_file=split_file, seed=3)
    assert moved in reread["test"]["image_path"] and moved not in reread["train"]["image_path"]
    assert dataset_summary(reread)["split_file"] == str(split_file)


def test_fi_same_seed_same_split_other_seed_other_split(fi_root, tmp_path):
    first = load_fi(fi_root, split_file=tmp_path / "a.json", seed=42)
    again = load_fi(fi_root, split_file=tmp_path / "b.json", seed=42)
    other = load_fi(fi_root, split_file=tmp_path / "c.json", seed=7)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert first["test"]["image_path"] == again["test"]["image_path"]
    assert set(first["test"]["image_path"]) != set(other["test"]["image_path"])


def test_fi_split_file_with_other_seed_is_an_error(fi_root, tmp_path):
    load_fi(fi_root, split_file=tmp_path / "split.json", seed=1)
    with pytest.raises(ValueError, match="seed"):
        load_fi(fi_root, split_file=tmp_path / "split.json", seed=2)


def test_fi_image_missing_since_the_split_is_an_error(fi_root, tmp_path):
    load_fi(fi_root, split_file=tmp_path / "split.json")
    (fi_root / "awe" / "awe_7.jpg").unlink()
    with pytest.raises(ValueError, match="awe/awe_7.jpg"):
        load_fi(fi_root, split_file=tmp_path / "split.json")


def test_fi_unknown_label_folder_is_an_error(fi_root, tmp_path):
    _image(fi_root / "joy" / "joy_0.jpg")
    with pytest.raises(ValueError, match="'joy'"):
        load_fi(fi_root, split_file=tmp_path / "split.json")
    assert not (tmp_path / "split.json").exists()


@pytest.mark.parametrize("remove_folder", [False, True])
def test_fi_empty_class_is_an_error(fi_root, tmp_path, remove_folder):
    shutil.rmtree(fi_root / "excitement")
    if not remove_folder:
        (fi_root / "excitement").mkdir()
    with pytest.raises(ValueError, match="excitement"):
        load_fi(fi_root, split_file=tmp_path / "split.json")


def test_fi_non_image_files_are_skipped_and_counted(fi_root, tmp_path):
    (fi_root / "awe" / "notes.txt").write_text("not an image")
    dd = load_fi(fi_root, split_file=tmp_path / "split.json")
    assert dataset_summary(dd)["skipped"] == {"non_image_file": 1}
    assert sum(map(len, dd.values())) == 240


def test_fi_svg_and_broken_or_looping_symlinks_are_reported_and_counted(fi_root, tmp_path, caplog):
    (fi_root / "awe" / "notes.txt").write_text("not an image")
    (fi_root / "awe" / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (fi_root / "fear" / "broken.jpg").symlink_to(fi_root / "fear" / "deleted.jpg")
    (fi_root / "fear" / "loop.jpg").symlink_to(fi_root / "fear" / "loop.jpg")
    (fi_root / "fear" / "linked.jpg").symlink_to(fi_root / "fear" / "fear_0.jpg")  # a good symlink is an image
    with caplog.at_level(logging.WARNING, logger="train.infra.data"):
        dd = load_fi(fi_root, split_file=tmp_path / "split.json")
    assert dataset_summary(dd)["skipped"] == {
        "non_image_file": 1, "unsupported_image_format": 1, "broken_symlink": 1, "symlink_loop": 1,
    }
    assert sum(map(len, dd.values())) == 241
    for name in ("drawing.svg", "broken.jpg", "loop.jpg"):
        assert name in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Emotion6
# ---------------------------------------------------------------------------------------------------------------

EMOTION6_HEADER = (
    "[image_filename]\t[valence]\t[arousal]\t[prob. anger]\t[prob. disgust]\t[prob. fear]\t[prob. joy]\t"
    "[prob. sadness]\t[prob. surprise]\t[prob. neutral]"
)


def _emotion6(root: Path) -> Path:
    """20 images per emotion, plus `joy/21.jpg` on disk but not in the ground truth and `fear/99.jpg` the reverse."""
    lines = [EMOTION6_HEADER]
    for label in EKMAN6:
        for n in range(1, 21):
            _image(root / "images" / label / f"{n}.jpg")
            lines.append(f"{label}/{n}.jpg\t5.0\t4.0\t0.1\t0.1\t0.1\t0.4\t0.1\t0.1\t0.1")
    _image(root / "images" / "joy" / "21.jpg")
    lines.append("fear/99.jpg\t5.0\t4.0\t0.1\t0.1\t0.4\t0.1\t0.1\t0.1\t0.1")
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    return root


def test_emotion6_labels_splits_and_ground_truth_cross_check(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="train.infra.data"):
        dd = load_emotion6(_emotion6(tmp_path / "Emotion6"), split_file=tmp_path / "e6.json")
    assert dd["train"].features["label"].names == EKMAN6
    rows = [r for split in dd.values() for r in split.select_columns(["label", "image_path"])]
    assert next(r["label"] for r in rows if r["image_path"] == "images/joy/3.jpg") == EKMAN6.index("joy")
    assert dataset_summary(dd)["skipped"] == {"not_in_ground_truth": 1, "missing_image": 1}
    assert "not_in_ground_truth" in caplog.text and "missing_image" in caplog.text
    assert _per_class_sizes(dd, "anger") == (16, 1, 3)
    assert _per_class_sizes(dd, "joy") == (17, 1, 3)  # the extra image is kept: its folder is its label
    assert json.loads((tmp_path / "e6.json").read_text())["labels"] == EKMAN6


def test_emotion6_missing_ground_truth_is_an_error(tmp_path):
    root = _emotion6(tmp_path / "Emotion6")
    (root / "ground_truth.txt").unlink()
    with pytest.raises(ValueError, match="ground_truth.txt"):
        load_emotion6(root, split_file=tmp_path / "e6.json")


def test_emotion6_unknown_emotion_folder_is_an_error(tmp_path):
    root = _emotion6(tmp_path / "Emotion6")
    _image(root / "images" / "neutral" / "1.jpg")
    with pytest.raises(ValueError, match="'neutral'"):
        load_emotion6(root, split_file=tmp_path / "e6.json")


# ---------------------------------------------------------------------------------------------------------------
# Flickr and Instagram
# ---------------------------------------------------------------------------------------------------------------


def _flickr(root: Path) -> Path:
    """20 positive and 20 negative images (votes in words and numbers, mixed separators and extensions), plus
    3 neutral-majority, 2 tied and 1 imageless id."""
    lines = ["id vote1 vote2 vote3"]
    for n in range(20):
        _image(root / "images" / f"p{n}.{'png' if n % 3 == 0 else 'jpg'}")
        lines.append(f"p{n} positive positive neutral" if n % 2 else f"p{n},1,-1,1")
        _image(root / "images" / f"n{n}.{'jpeg' if n % 4 == 0 else 'jpg'}")
        lines.append(f"n{n}\tnegative negative positive" if n % 2 else f"n{n}, -1, -1, -1")
    for n, votes in enumerate(["neutral neutral positive", "0,0,-1", "neutral neutral neutral"]):
        _image(root / "images" / f"u{n}.jpg")
        lines.append(f"u{n} {votes}")
    for n, votes in enumerate(["positive negative neutral", "1,-1"]):
        _image(root / "images" / f"t{n}.jpg")
        lines.append(f"t{n} {votes}")
    lines.append("gone positive positive positive")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def test_flickr_majority_votes_both_labels_and_skip_counts(tmp_path, caplog):
    root = _flickr(tmp_path / "flickr")
    with caplog.at_level(logging.WARNING, logger="train.infra.data"):
        dd = load_flickr_instagram(root, "labels.txt", split_file=tmp_path / "flickr.json")
    assert dd["train"].features["label"].names == ["negative", "positive"]
    rows = {r["image_path"]: r["label"] for split in dd.values() for r in split.select_columns(["label", "image_path"])}
    assert rows["images/p0.png"] == 1 and rows["images/p1.jpg"] == 1
    assert rows["images/n0.jpeg"] == 0 and rows["images/n1.jpg"] == 0
    assert len(rows) == 40 and not any(path.startswith(("images/u", "images/t")) for path in rows)
    assert set(dd["train"]["label"]) == {0, 1} and set(dd["test"]["label"]) == {0, 1}
    assert _per_class_sizes(dd, "positive") == _per_class_sizes(dd, "negative") == (16, 1, 3)
    assert dataset_summary(dd)["skipped"] == {"neutral": 3, "tie": 2, "missing_image": 1}
    assert "'neutral': 3" in caplog.text and "'tie': 2" in caplog.text


def test_flickr_broken_symlinks_and_svg_images_are_counted(tmp_path, caplog):
    root = _flickr(tmp_path / "flickr")
    (root / "images" / "gone.jpg").symlink_to(root / "images" / "nowhere.jpg")  # the id listed without an image
    (root / "images" / "extra.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    with caplog.at_level(logging.WARNING, logger="train.infra.data"):
        dd = load_flickr_instagram(root, "labels.txt", split_file=tmp_path / "flickr.json")
    assert dataset_summary(dd)["skipped"] == {
        "neutral": 3, "tie": 2, "missing_image": 1, "broken_symlink": 1, "unsupported_image_format": 1,
    }
    assert "gone.jpg" in caplog.text and "extra.svg" in caplog.text


@pytest.mark.parametrize(
    "votes, expected",
    [([1, 1, 0], 1), ([-1, -1, 1], 0), ([1, -1, -1, -1, 0], 0), ([0, 0, 1], "neutral"), ([1, 0, -1], "tie"),
     ([1, 1, -1, -1], "tie"), ([0, 1, -1, 0], "neutral"), ([1, 1, 0, 0, -1], "tie"), ([0, 0, 0], "neutral")],
)
def test_majority(votes, expected):
    assert _majority(votes) == expected


def test_flickr_unreadable_vote_is_an_error(tmp_path):
    root = _flickr(tmp_path / "flickr")
    with (root / "labels.txt").open("a") as handle:
        handle.write("p0x positive maybe positive\n")
    with pytest.raises(ValueError, match="maybe"):
        load_flickr_instagram(root, "labels.txt", split_file=tmp_path / "flickr.json")


def test_flickr_without_negatives_is_an_error(tmp_path):
    root = _flickr(tmp_path / "flickr")
    lines = (root / "labels.txt").read_text().splitlines()
    (root / "labels.txt").write_text("\n".join(line for line in lines if not line.startswith("n")))
    with pytest.raises(ValueError, match="negative"):
        load_flickr_instagram(root, "labels.txt", split_file=tmp_path / "flickr.json")


def test_instagram_through_the_dispatcher(tmp_path):
    root = _flickr(tmp_path / "instagram")
    (root / "images").rename(root / "photos")
    dd = load_dataset_from_config(
        "instagram", root=root, label_file=root / "labels.txt", image_dir="photos", split_file=tmp_path / "ig.json"
    )
    assert dataset_summary(dd)["dataset"] == "instagram"
    assert sorted(set(dd["train"]["label"])) == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------


def test_imagefolder_with_split_folders_uses_given_label_order(tmp_path):
    for split, n in (("train", 4), ("val", 1), ("test", 2)):
        for label in ("cat", "ant"):
            for i in range(n):
                _image(tmp_path / split / label / f"{i}.jpg")
    dd = load_imagefolder(tmp_path, ["cat", "ant"])
    assert [len(dd[s]) for s in ("train", "validation", "test")] == [8, 2, 4]
    assert dd["train"].features["label"].names == ["cat", "ant"]
    assert _row(dd["validation"], "val/cat/0.jpg")["label"] == 0
    assert _row(dd["test"], "test/ant/1.jpg")["label"] == 1


def test_imagefolder_without_split_folders_needs_a_split_file(tmp_path):
    root = _fi(tmp_path / "flat")
    with pytest.raises(ValueError, match="split_file"):
        load_imagefolder(root, "mikels8")
    dd = load_dataset_from_config("imagefolder", root=root, labels="mikels8", split_file=tmp_path / "s.json")
    assert _per_class_sizes(dd, "awe") == (16, 1, 3)
    assert json.loads((tmp_path / "s.json").read_text())["test"] == dd["test"]["image_path"]


def test_imagefolder_incomplete_split_folders_is_an_error(tmp_path):
    _image(tmp_path / "train" / "cat" / "0.jpg")
    _image(tmp_path / "test" / "cat" / "0.jpg")
    with pytest.raises(ValueError, match="validation"):
        load_imagefolder(tmp_path, ["cat", "ant"])


# ---------------------------------------------------------------------------------------------------------------
# Hub / local data sets
# ---------------------------------------------------------------------------------------------------------------


def _parquet_dataset(root: Path, splits: dict[str, list[tuple]], features: Features) -> Path:
    for split, rows in splits.items():
        columns = {name: [row[i] for row in rows] for i, name in enumerate(features)}
        Dataset.from_dict(columns, features=features).to_parquet(str(root / "data" / f"{split}.parquet"))
    return root / "data"


def test_hub_class_label_names_are_mapped_by_name(tmp_path):
    image = str(_image(tmp_path / "img.jpg"))
    # The source's index order is the reverse of ours: index 0 means "positive" there.
    features = Features({"image": Image(), "label": ClassLabel(names=["positive", "negative"])})
    rows = {"train": [(image, 0), (image, 1)], "validation": [(image, 1)], "test": [(image, 0)]}
    data_dir = _parquet_dataset(tmp_path, rows, features)
    dd = load_hub_dataset(str(data_dir), "binary", cache_dir=str(tmp_path / "cache"))
    assert dd["train"].features["label"].names == BINARY
    assert dd["train"]["label"] == [1, 0] and dd["validation"]["label"] == [0] and dd["test"]["label"] == [1]
    assert dd["test"][0]["image"].size == (8, 8)


def test_hub_string_labels_and_carved_splits(tmp_path):
    image = str(_image(tmp_path / "img.jpg"))
    features = Features({"img": Value("string"), "sentiment": Value("string")})
    rows = [(image, "positive" if i % 2 else "negative") for i in range(40)]
    data_dir = _parquet_dataset(tmp_path, {"train": rows}, features)
    kwargs = dict(image_column="img", label_column="sentiment", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="split_file"):
        load_hub_dataset(str(data_dir), "binary", **kwargs)
    dd = load_dataset_from_config("hub", name_or_path=str(data_dir), labels="binary",
                                  split_file=tmp_path / "hub.json", **kwargs)
    assert _per_class_sizes(dd, "positive") == _per_class_sizes(dd, "negative") == (16, 1, 3)
    assert dd["train"].column_names == ["image", "label", "image_path"] and dd["train"][0]["image_path"] == image
    assert len(json.loads((tmp_path / "hub.json").read_text())["validation"]) == 2


def test_hub_unknown_label_name_is_an_error(tmp_path):
    image = str(_image(tmp_path / "img.jpg"))
    features = Features({"image": Image(), "label": ClassLabel(names=["negative", "positive", "neutral"])})
    rows = {"train": [(image, 2)], "validation": [(image, 0)], "test": [(image, 1)]}
    data_dir = _parquet_dataset(tmp_path, rows, features)
    with pytest.raises(ValueError, match="neutral"):
        load_hub_dataset(str(data_dir), "binary", cache_dir=str(tmp_path / "cache"))


def test_dispatcher_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="'affectnet'"):
        load_dataset_from_config("affectnet", root="x")


def test_hub_recipe_load_kwargs_reach_load_dataset(tmp_path):
    # A recipe's `data.load_kwargs` is a mapping of `load_dataset` arguments, not one argument named `load_kwargs`.
    image = str(_image(tmp_path / "img.jpg"))
    features = Features({"image": Image(), "label": ClassLabel(names=["negative", "positive"])})
    rows = {"train": [(image, 0), (image, 1)], "validation": [(image, 1)], "test": [(image, 0)]}
    data_dir = _parquet_dataset(tmp_path, rows, features)
    dd = load_dataset_from_config("hub", name_or_path=str(data_dir), labels="binary",
                                  load_kwargs={"cache_dir": str(tmp_path / "cache")})
    assert dd["train"]["label"] == [0, 1] and (tmp_path / "cache").is_dir()
    with pytest.raises(ValueError, match="load_kwargs"):
        load_dataset_from_config("hub", name_or_path=str(data_dir), labels="binary", load_kwargs=["cache_dir"])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: one split of whatever the data set has (training still needs train, validation and test)
# ---------------------------------------------------------------------------------------------------------------


def _evaluation_split(kind, split=None, **options):
    from train.infra.data import load_evaluation_split

    return load_evaluation_split(kind, split, **options)


def test_a_flat_folder_is_evaluated_whole_or_cut_by_a_split_file(tmp_path):
    root = _fi(tmp_path / "flat")
    everything = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    name, ds = _evaluation_split("imagefolder", root=root, labels="mikels8")
    assert name == "all" and sorted(ds["image_path"]) == everything and len(everything) == 240
    # A split file cuts it; zero shares are allowed when the evaluated split gets a share.
    name, ds = _evaluation_split("imagefolder", "test", root=root, labels="mikels8", split_file=tmp_path / "a.json",
                                 fractions=[0, 0, 1])
    assert name == "test" and sorted(ds["image_path"]) == everything
    name, ds = _evaluation_split("imagefolder", root=root, labels="mikels8", split_file=tmp_path / "b.json")
    assert name == "test" and len(ds) == 36  # the 15 % test cut, as training's split file has it
    with pytest.raises(ValueError, match="validation split no images"):
        _evaluation_split("imagefolder", "validation", root=root, labels="mikels8", split_file=tmp_path / "c.json",
                          fractions=[0, 0, 1])
    with pytest.raises(ValueError, match="no validation split of its own.*split_file"):
        _evaluation_split("imagefolder", "validation", root=root, labels="mikels8")
    # The named data sets without an official split are the same: all of FI without a split file.
    name, ds = _evaluation_split("fi", root=root)
    assert name == "all" and len(ds) == 240 and ds.features["label"].names == MIKELS8


def test_training_still_needs_a_positive_train_share(fi_root, tmp_path):
    with pytest.raises(ValueError, match=r"fractions \[0.0, 0.0, 1.0\] give the train split no images"):
        load_fi(fi_root, split_file=tmp_path / "s.json", fractions=[0, 0, 1])
    with pytest.raises(ValueError, match="pass a split_file"):
        load_fi(fi_root)


def test_a_test_only_folder_is_evaluated_without_train_or_validation(tmp_path):
    for label in ("cat", "ant"):
        for i in range(3):
            _image(tmp_path / "data" / "test" / label / f"{i}.jpg")
    _image(tmp_path / "data" / "test" / "cat" / "3.jpg")
    name, ds = _evaluation_split("imagefolder", root=tmp_path / "data", labels=["cat", "ant"])
    assert name == "test" and len(ds) == 7 and _row(ds, "test/cat/3.jpg")["label"] == 0
    with pytest.raises(ValueError, match=r"no train folder; its split folders are \['test'\]"):
        _evaluation_split("imagefolder", "train", root=tmp_path / "data", labels=["cat", "ant"])
    with pytest.raises(ValueError, match="validation"):  # training still needs all three
        load_imagefolder(tmp_path / "data", ["cat", "ant"])


def test_emoset_with_only_its_test_file(tmp_path):
    root = _emoset(tmp_path / "EmoSet", per_split=(("test", 2),))
    name, ds = _evaluation_split("emoset", root=root)
    assert name == "test" and len(ds) == 16 and ds.features["label"].names == MIKELS8
    with pytest.raises(ValueError, match=r"no train split.*\['test'\]"):
        _evaluation_split("emoset", "train", root=root)
    with pytest.raises(ValueError, match="train.json"):
        load_emoset(root)


def test_a_missing_root_is_a_one_line_value_error(tmp_path):
    missing = tmp_path / "missing"
    for kind, options in (("emoset", {}), ("fi", {}), ("emotion6", {}), ("imagefolder", {"labels": "mikels8"}),
                          ("flickr", {"label_file": "labels.txt"})):
        with pytest.raises(ValueError, match=str(missing)) as raised:
            _evaluation_split(kind, root=missing, **options)
        assert "\n" not in str(raised.value), kind
    with pytest.raises(ValueError, match=str(missing)):
        load_emoset(missing)


def _csv_splits(tmp_path, names):
    """A CSV data set of image paths and string labels, one file per split."""
    files = {}
    for split in names:
        rows = [f"{_image(tmp_path / split / f'{i}.jpg')},{'positive' if i % 2 else 'negative'}" for i in range(4)]
        files[split] = tmp_path / f"{split}.csv"
        files[split].write_text("image,label\n" + "\n".join(rows) + "\n")
    return {"name_or_path": "csv", "labels": "binary",
            "load_kwargs": {"data_files": {split: str(path) for split, path in files.items()},
                            "cache_dir": str(tmp_path / "cache")}}


def test_a_csv_data_set_with_train_and_test_files(tmp_path):
    options = _csv_splits(tmp_path, ("train", "test"))
    name, ds = _evaluation_split("hub", **options)
    assert name == "test" and ds["label"] == [0, 1, 0, 1] and ds[0]["image_path"].endswith("test/0.jpg")
    name, ds = _evaluation_split("hub", "train", **options)
    assert name == "train" and ds[0]["image_path"].endswith("train/0.jpg")
    with pytest.raises(ValueError, match=r"no validation split; its splits are \['train', 'test'\]"):
        _evaluation_split("hub", "validation", **options)
    with pytest.raises(ValueError, match="split_file"):  # training needs a validation split (or a split file)
        load_dataset_from_config("hub", **options)


def test_hub_data_with_only_a_test_split_or_one_split(tmp_path):
    for label in ("negative", "positive"):
        for i in range(2):
            _image(tmp_path / "folder" / "test" / label / f"{i}.jpg")
    name, ds = _evaluation_split("hub", name_or_path="imagefolder", labels="binary",
                                 load_kwargs={"data_dir": str(tmp_path / "folder"), "cache_dir": str(tmp_path / "c")})
    assert name == "test" and sorted(ds["label"]) == [0, 0, 1, 1]
    single = _csv_splits(tmp_path / "single", ("train",))  # `load_dataset` names a lone file's split "train"
    name, ds = _evaluation_split("hub", **single)
    assert name == "all" and len(ds) == 4
    two = _csv_splits(tmp_path / "two", ("train", "validation"))
    with pytest.raises(ValueError, match=r"no test split; its splits are \['train', 'validation'\]"):
        _evaluation_split("hub", **two)  # not silently all of train and validation
    name, ds = _evaluation_split("hub", "all", **two)
    assert name == "all" and len(ds) == 8
