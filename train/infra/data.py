"""Emotion data sets as `datasets.DatasetDict`s with fixed label orders and reproducible splits.

Every loader returns a `DatasetDict` with the splits `train`, `validation` and `test` and the columns `image`
(`datasets.Image()`, decoded lazily from the file), `label` (`datasets.ClassLabel` in the label set's fixed order
from `modeling_emovlm_kd.configuration_emovlm_kd.LABEL_SETS`, never a directory listing's order) and `image_path`
(the file's path relative to the data set root). Data sets without an official split are split once, seeded and
stratified 80/5/15, into a JSON split file; later calls read that file, so a split is reproducible and shareable.
What a loader skipped (neutral votes, missing images, ...) is logged and kept in `dataset_summary(...)`.

Training needs all three splits. Evaluation needs one: `load_evaluation_split` (what `python -m train evaluate`
reads) asks a loader for that split alone (`splits=("test",)`), so nothing about the other two is read or required:
a folder with only `test/`, EmoSet with only `test.json`, a CSV data set with train and test files. Data without a
split of its own (a flat `<label>/<image>` folder, FI, ... without a split file, a Hub data set of one split) is
evaluated whole, as the split `all`.

    from train.infra.data import dataset_summary, load_dataset_from_config, load_emoset, load_fi

    emoset = load_emoset("data/EmoSet-118K")
    fi = load_fi("data/FI", split_file="splits/fi_seed42.json", seed=42)
    fi["train"].features["label"].names  # ['amusement', 'awe', 'contentment', ..., 'sadness']
    flickr = load_dataset_from_config(
        "flickr", root="data/flickr", label_file="labels.txt", split_file="splits/flickr_seed42.json"
    )
    dataset_summary(flickr)["skipped"]  # e.g. {'neutral': 812, 'tie': 95, 'missing_image': 3}
    split, test = load_evaluation_split("imagefolder", root="photos/", labels="mikels8")  # ("all", every image)
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, Value, concatenate_datasets

from modeling_emovlm_kd.configuration_emovlm_kd import LABEL_SETS, resolve_label_set
from modeling_emovlm_kd.loading_emovlm_kd import IMAGE_SUFFIXES as IMAGE_EXTENSIONS
from modeling_emovlm_kd.loading_emovlm_kd import UNSUPPORTED_IMAGE_SUFFIXES as UNSUPPORTED_IMAGE_EXTENSIONS
from modeling_emovlm_kd.loading_emovlm_kd import skip_reason as _skip_reason
from train.infra import registry
from train.infra.files import write_json_atomic

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Every image of a data set as one split, whatever its own splits: what evaluation scores of data without splits.
ALL = "all"
DEFAULT_FRACTIONS = (0.8, 0.05, 0.15)
# Which files are images, and why an entry is skipped (`unsupported_image_format`, `non_image_file`, ...), are the
# model package's (`loading_emovlm_kd.py`): `train predict` and the app read the same.
# Skip reasons counted without a warning: ordinary files and sub-folders.
_QUIET_SKIPS = ("non_image_file", "not_a_file")
# Names under which data sets ship their validation split.
_VALIDATION_ALIASES = ("validation", "val", "valid", "dev")
_VOTE_VALUES = {"positive": 1, "pos": 1, "1": 1, "+1": 1, "neutral": 0, "neu": 0, "0": 0,
                "negative": -1, "neg": -1, "-1": -1}

PathLike = str | os.PathLike


class MissingSplitError(ValueError):
    """A split that the data set does not have and cannot cut (no split file); `available` lists the ones it has."""

    def __init__(self, message: str, available: Sequence[str] = ()):
        super().__init__(message)
        self.available = list(available)


def _requested(splits: Sequence[str]) -> tuple[str, ...]:
    """The splits a loader is asked for: some of `SPLITS`, or `ALL` alone."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    valid = splits and len(set(splits)) == len(splits) and (
        splits == (ALL,) or all(split in SPLITS for split in splits))
    if not valid:
        raise ValueError(f"splits must be some of {list(SPLITS)}, or {ALL!r} alone; got {list(splits)}.")
    return splits


def _training(splits: Sequence[str]) -> bool:
    """Whether all three splits are asked for, as training does: then each must exist and every class have images."""
    return set(splits) == set(SPLITS)


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def _label_lookup(labels: Sequence[str]) -> dict[str, int]:
    """Case-insensitive name -> class index, so a folder `Amusement` still means `amusement`."""
    lookup = {label.strip().casefold(): index for index, label in enumerate(labels)}
    if len(lookup) != len(labels):
        raise ValueError(f"Labels must be unique ignoring case, got {list(labels)}.")
    return lookup


def _label_id(name: str, lookup: Mapping[str, int], where: str) -> int:
    """The class index of `name`; an unknown label is an error, never a silently shifted index."""
    index = lookup.get(str(name).strip().casefold())
    if index is None:
        raise ValueError(f"Unknown label {name!r} in {where}; the label set is {list(lookup)}.")
    return index


def _check_nonempty(label_ids: Iterable[int], labels: Sequence[str], where: str) -> None:
    """Raise if a class has no examples: it would train nothing and make per-class metrics meaningless."""
    counts = Counter(label_ids)
    empty = [label for index, label in enumerate(labels) if counts[index] == 0]
    if empty:
        raise ValueError(f"Empty class(es) {empty} in {where}: every label of {list(labels)} needs examples.")


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _count_skip(path: Path, reason: str, skipped: Counter) -> None:
    skipped[reason] += 1
    if reason not in _QUIET_SKIPS:  # these are few and surprising: name each one
        logger.warning("Skipping %s (%s).", path, reason.replace("_", " "))


def _visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders, sorted, without hidden ones (`.ipynb_checkpoints`, `.DS_Store` folders, ...)."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory.")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_class_folders(folder: Path, labels: Sequence[str], base: Path, skipped: Counter) -> dict[str, int]:
    """Map the images under `folder/<label>/` to class indices, keyed by their posix path relative to `base`.

    Every visible sub-folder must be a known label; entries that are not images (other files, `.svg`, broken or
    looping symlinks) are skipped and counted by reason.
    """
    lookup = _label_lookup(labels)
    examples = {}
    for class_dir in _visible_dirs(folder):
        label_id = _label_id(class_dir.name, lookup, f"folder {class_dir}")
        for path in sorted(class_dir.iterdir()):
            reason = _skip_reason(path)
            if reason is None:
                examples[path.relative_to(base).as_posix()] = label_id
            elif not path.name.startswith("."):
                _count_skip(path, reason, skipped)
    return examples


def _index_images_by_stem(folder: Path, skipped: Counter | None = None) -> dict[str, list[Path]]:
    """Image files of `folder` by file name without extension, to find `<id>.jpg`, `<id>.png`, ...

    Broken or looping symlinks and unreadable image formats are counted in `skipped` (other files are ignored).
    """
    if not folder.is_dir():
        raise ValueError(f"Image folder {folder} does not exist.")
    index: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        reason = _skip_reason(path)
        if reason is None:
            index.setdefault(path.stem, []).append(path)
        elif reason not in _QUIET_SKIPS and skipped is not None and not path.name.startswith("."):
            _count_skip(path, reason, skipped)
    return index


# ----------------------------------------------------------------------------------------------------------------
# Seeded stratified splits, written to and read from a split file
# ----------------------------------------------------------------------------------------------------------------


def _check_fractions(fractions: Sequence[float], needed: Sequence[str] = ("train",)) -> tuple[float, float, float]:
    """Three non-negative (train, validation, test) shares, normalised; each split in `needed` must get a share
    (training needs train; evaluating a split needs that split, so `[0, 0, 1]` puts everything in test)."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative (train, validation, test) shares with a positive "
                         f"sum, got {list(fractions)}.")
    empty = [name for name, share in zip(SPLITS, fractions) if name in needed and share == 0]
    if empty:
        raise ValueError(f"fractions {list(fractions)} give the {empty[0]} split no images; give it a positive share.")
    total = sum(fractions)
    # Rounded so that the shares written to a split file read back equal and stay legible.
    return tuple(round(f / total, 10) for f in fractions)


def _split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Per-class (train, validation, test) sizes; train takes the rounding remainder."""
    n_validation = round(n * fractions[1])
    n_test = min(round(n * fractions[2]), n - n_validation)
    return n - n_validation - n_test, n_validation, n_test


def _stratified_split(examples: Mapping[str, int], seed: int, fractions: Sequence[float]) -> dict[str, list[str]]:
    """Shuffle each class with one seeded generator (classes in label order) and cut it 80/5/15.

    Splits keep the input order of `examples`, so a split does not depend on the shuffle's order.
    """
    rng = random.Random(seed)
    order = {key: i for i, key in enumerate(examples)}
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for label_id in sorted(set(examples.values())):
        keys = [key for key in examples if examples[key] == label_id]
        rng.shuffle(keys)
        _, n_validation, n_test = _split_counts(len(keys), fractions)
        splits["validation"] += keys[:n_validation]
        splits["test"] += keys[n_validation : n_validation + n_test]
        splits["train"] += keys[n_validation + n_test :]
    return {name: sorted(keys, key=order.__getitem__) for name, keys in splits.items()}


def _check_split_file(content: dict, examples: Mapping[str, int], header: dict, split_file: Path) -> None:
    """A split file must match the data and the settings it is read for; otherwise the split would drift."""
    for key, value in header.items():
        if content.get(key) != value:
            raise ValueError(
                f"Split file {split_file} has {key}={content.get(key)!r}, but {value!r} was asked for; "
                "pass matching arguments or another split_file."
            )
    listed = [key for name in SPLITS for key in content[name]]
    unknown = sorted(set(listed) - set(examples))
    unlisted = sorted(set(examples) - set(listed))
    if unknown or unlisted or len(listed) != len(set(listed)):
        raise ValueError(
            f"Split file {split_file} does not match the data: {len(unknown)} listed entries are not in it "
            f"(e.g. {unknown[:3]}), {len(unlisted)} entries are not listed (e.g. {unlisted[:3]}), "
            f"{len(listed) - len(set(listed))} are listed twice. Delete it to make a new split."
        )


def _read_or_create_split(
    split_file: PathLike, examples: Mapping[str, int], labels: Sequence[str], seed: int, fractions: Sequence[float]
) -> dict[str, list[str]]:
    """Read the split from `split_file` if it exists; else make the seeded stratified split and write it there."""
    split_file = Path(split_file)
    header = {"seed": seed, "fractions": list(fractions), "labels": list(labels)}
    if split_file.exists():
        content = json.loads(split_file.read_text())
        _check_split_file(content, examples, header, split_file)
        logger.info("Read the split from %s.", split_file)
        return {name: list(content[name]) for name in SPLITS}
    splits = _stratified_split(examples, seed, fractions)
    write_json_atomic({**header, **splits}, split_file)
    logger.info("Wrote a seeded (seed=%d) stratified split to %s.", seed, split_file)
    return splits


# ----------------------------------------------------------------------------------------------------------------
# Building the DatasetDict and its summary
# ----------------------------------------------------------------------------------------------------------------


def _features(labels: Sequence[str]) -> Features:
    return Features({"image": Image(), "label": ClassLabel(names=list(labels)), "image_path": Value("string")})


def _summary(name: str, dataset_dict: Mapping[str, Dataset], skipped: Mapping[str, int], **extra) -> dict:
    """Rows and class counts per split plus skip counts, logged and stored in every split's `info.description`."""
    names = next(iter(dataset_dict.values())).features["label"].names
    counters = {split: Counter(ds["label"]) for split, ds in dataset_dict.items()}
    class_counts = {split: {name: counts[i] for i, name in enumerate(names)} for split, counts in counters.items()}
    summary = {"dataset": name, "num_rows": {split: len(ds) for split, ds in dataset_dict.items()},
               "class_counts": class_counts, "skipped": dict(skipped), **extra}
    logger.info("Loaded %s: %s rows per split.", name, summary["num_rows"])
    if skipped:
        logger.warning("Skipped while loading %s: %s.", name, dict(skipped))
    return summary


def _attach_summary(dataset_dict: DatasetDict, summary: dict) -> DatasetDict:
    for ds in dataset_dict.values():
        ds.info.description = json.dumps(summary)
    return dataset_dict


def _build(
    name: str, root: Path, splits: Mapping[str, Sequence[str]], examples: Mapping[str, int], labels: Sequence[str],
    skipped: Mapping[str, int], **extra,
) -> DatasetDict:
    """One lazily decoded `Dataset` per split from relative image paths and their class indices."""
    features = _features(labels)
    dataset_dict = DatasetDict({
        split: Dataset.from_dict(
            {"image": [str(root / key) for key in keys], "label": [examples[key] for key in keys],
             "image_path": list(keys)},
            features=features, info=DatasetInfo(features=features),
        )
        for split, keys in splits.items()
    })
    return _attach_summary(dataset_dict, _summary(name, dataset_dict, skipped, root=str(root), **extra))


def _build_with_split_file(
    name: str, root: Path, examples: dict[str, int], labels: Sequence[str], split_file: PathLike | None, seed: int,
    fractions: Sequence[float], skipped: Mapping[str, int], splits: Sequence[str] = SPLITS,
) -> DatasetDict:
    """The `splits` of data without a split of its own: cut by the split file (read, or made seeded and stratified
    and written), or, for `ALL`, every image. Training checks that every class has examples."""
    splits = _requested(splits)
    if not examples:
        raise ValueError(f"{root} holds no images.")
    if splits == (ALL,):
        return _build(name, root, {ALL: list(examples)}, examples, labels, skipped, split_file=None)
    if split_file is None:
        if _training(splits):
            raise ValueError(f"{root} has no train/validation/test split of its own, so pass a split_file to split it.")
        raise MissingSplitError(f"{root} has no {splits[0]} split of its own: pass a split_file to cut one (with "
                                f"fractions), or evaluate all of it (split {ALL!r}).")
    if _training(splits):
        _check_nonempty(examples.values(), labels, str(root))
    cut = _read_or_create_split(split_file, examples, labels, seed, _check_fractions(fractions, needed=splits))
    return _build(name, root, {split: cut[split] for split in splits}, examples, labels, skipped,
                  split_file=str(split_file), seed=seed)


def dataset_summary(dataset_dict: DatasetDict) -> dict:
    """What a loader of this module loaded and skipped: `num_rows`, `class_counts`, `skipped`, `split_file`, ..."""
    return json.loads(next(iter(dataset_dict.values())).info.description)


# ----------------------------------------------------------------------------------------------------------------
# EmoSet-118K
# ----------------------------------------------------------------------------------------------------------------


def _read_emoset_split(root: Path, split_json: str, lookup: Mapping[str, int]) -> dict[str, int]:
    """Entries `[label, id, image_path, annotation_path]` of one official split -> {image path: class index}."""
    examples = {}
    for entry in json.loads((root / split_json).read_text()):
        label, _, image_path = entry[:3]
        examples[Path(image_path).as_posix()] = _label_id(label, lookup, f"{root / split_json} ({image_path})")
    missing = [key for key in examples if not (root / key).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} images listed in {root / split_json} are missing, e.g. {missing[:3]}.")
    return examples


_EMOSET_FILES = dict(zip(SPLITS, ("train.json", "val.json", "test.json")))


def load_emoset(root: PathLike, splits: Sequence[str] = SPLITS) -> DatasetDict:
    """EmoSet-118K with its official splits from `root/{train,val,test}.json` (val -> `validation`), mikels8 labels.

    Only the files of `splits` are read (`ALL`: every split file there is). Raises `ValueError` for a missing root,
    split file or image, an unknown label, or (all three splits, as training reads them) a class without images.
    """
    root, labels, splits = Path(root), LABEL_SETS["mikels8"], _requested(splits)
    if not root.is_dir():
        raise ValueError(f"EmoSet root {root} is not a folder.")
    present = [split for split, name in _EMOSET_FILES.items() if (root / name).is_file()]
    if splits == (ALL,):
        if not present:
            raise ValueError(f"EmoSet root {root} has none of {list(_EMOSET_FILES.values())}.")
        wanted = present
    else:
        wanted = splits
        absent = [split for split in splits if split not in present]
        if absent:
            message = f"EmoSet root {root} has no {absent[0]} split: {_EMOSET_FILES[absent[0]]} is missing"
            if _training(splits):
                raise ValueError(f"{message}.")
            raise MissingSplitError(f"{message}; its splits are {present}.", available=present)
    lookup = _label_lookup(labels)
    examples, by_split = {}, {}
    for split in wanted:
        split_examples = _read_emoset_split(root, _EMOSET_FILES[split], lookup)
        if _training(splits):
            _check_nonempty(split_examples.values(), labels, str(root / _EMOSET_FILES[split]))
        examples.update(split_examples)
        by_split[split] = list(split_examples)
    if splits == (ALL,):
        by_split = {ALL: [key for keys in by_split.values() for key in keys]}
    return _build("emoset", root, by_split, examples, labels, {})


# ----------------------------------------------------------------------------------------------------------------
# FI, Emotion6 and generic image folders
# ----------------------------------------------------------------------------------------------------------------


def load_fi(
    root: PathLike, split_file: PathLike | None = None, seed: int = 42, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    splits: Sequence[str] = SPLITS,
) -> DatasetDict:
    """FI from `root/<emotion>/<emotion>_<n>.jpg` (mikels8), split seeded and stratified 80/5/15 via `split_file`.

    `split_file` is read if it exists and written otherwise (relative image paths per split), so it can live next to
    the run's outputs when `root` is read-only. `splits`: which splits to build (`ALL`: every image, no split file).
    """
    root, labels, skipped = Path(root), LABEL_SETS["mikels8"], Counter()
    examples = _scan_class_folders(root, labels, root, skipped)
    return _build_with_split_file("fi", root, examples, labels, split_file, seed, fractions, skipped, splits)


def _read_emotion6_ground_truth(path: Path) -> set[str]:
    """Image names (`anger/1.jpg`) of Emotion6's tab-separated `ground_truth.txt`, header line skipped."""
    if not path.is_file():
        raise ValueError(f"Emotion6 ground truth {path} is missing.")
    lines = path.read_text().splitlines()[1:]
    return {Path(line.split("\t")[0].strip()).as_posix() for line in lines if line.strip()}


def load_emotion6(
    root: PathLike, split_file: PathLike | None = None, seed: int = 42, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    splits: Sequence[str] = SPLITS,
) -> DatasetDict:
    """Emotion6 from `root/images/<emotion>/<n>.jpg` (ekman6; label = folder), split like `load_fi`.

    Cross-checked with `root/ground_truth.txt`: images missing from it are kept (their folder is their label) and
    counted as `not_in_ground_truth`; entries without an image on disk are counted as `missing_image`.
    """
    root, labels, skipped = Path(root), LABEL_SETS["ekman6"], Counter()
    if not root.is_dir():
        raise ValueError(f"Emotion6 root {root} is not a folder.")
    examples = _scan_class_folders(root / "images", labels, root, skipped)
    listed = _read_emotion6_ground_truth(root / "ground_truth.txt")
    on_disk = {key.removeprefix("images/") for key in examples}
    if on_disk - listed:
        skipped["not_in_ground_truth"] = len(on_disk - listed)
    if listed - on_disk:
        skipped["missing_image"] = len(listed - on_disk)
    return _build_with_split_file("emotion6", root, examples, labels, split_file, seed, fractions, skipped, splits)


def _split_folders(root: Path) -> dict[str, Path]:
    """`{split: folder}` of the split folders `root` holds (`train/`, `validation/` or `val/`, ..., `test/`)."""
    found = {p.name.lower(): p for p in _visible_dirs(root)}
    validation = next((found[a] for a in _VALIDATION_ALIASES if a in found), None)
    folders = {"train": found.get("train"), "validation": validation, "test": found.get("test")}
    return {split: folder for split, folder in folders.items() if folder is not None}


def load_imagefolder(
    root: PathLike, labels: str | list[str], split_file: PathLike | None = None, seed: int = 42,
    fractions: Sequence[float] = DEFAULT_FRACTIONS, splits: Sequence[str] = SPLITS,
) -> DatasetDict:
    """Images in `root/<split>/<label>/*` (splits used as they are) or `root/<label>/*` (split like `load_fi`, which
    needs `split_file`). `labels` is a label set name or an ordered list; it fixes the class indices.

    `splits`: which splits to build. Training asks for all three (each split folder must exist); evaluation asks for
    one, which alone must exist (`root/test/` only is fine), or `ALL` (every image, no split file needed)."""
    root, labels, skipped, splits = Path(root), resolve_label_set(labels), Counter(), _requested(splits)
    folders = _split_folders(root)
    if not folders:
        examples = _scan_class_folders(root, labels, root, skipped)
        return _build_with_split_file("imagefolder", root, examples, labels, split_file, seed, fractions, skipped,
                                      splits)
    if _training(splits) and len(folders) < len(SPLITS):
        names = sorted(p.name for p in _visible_dirs(root))
        raise ValueError(f"{root} has split folders {names}; it needs all of train, validation and test.")
    for split in splits:
        if split != ALL and split not in folders:
            raise MissingSplitError(f"{root} has no {split} folder; its split folders are {list(folders)}.",
                                    available=list(folders))
    by_split = {split: _scan_class_folders(folder, labels, root, skipped) for split, folder in folders.items()
                if split in splits or splits == (ALL,)}
    if _training(splits):
        _check_nonempty(by_split["train"].values(), labels, str(folders["train"]))
    examples = {key: label_id for split_examples in by_split.values() for key, label_id in split_examples.items()}
    if splits == (ALL,):
        by_split = {ALL: examples}
    if not examples:
        raise ValueError(f"{root} holds no images under {[str(folders[s]) for s in splits if s in folders]}.")
    return _build("imagefolder", root, {s: list(e) for s, e in by_split.items()}, examples, labels, skipped)


# ----------------------------------------------------------------------------------------------------------------
# Flickr and Instagram sentiment
# ----------------------------------------------------------------------------------------------------------------


def _parse_votes(tokens: Sequence[str], where: str) -> list[int]:
    """Votes written as words or numbers -> +1 / 0 / -1."""
    votes = [_VOTE_VALUES.get(token.lower()) for token in tokens]
    if not votes or None in votes:
        raise ValueError(f"Cannot read the votes {list(tokens)} in {where}; use positive/neutral/negative or 1/0/-1.")
    return votes


def _read_vote_file(path: Path) -> dict[str, list[int]]:
    """`<id> <vote> <vote> ...` lines (whitespace- or comma-separated); a first line without votes is a header."""
    rows: dict[str, list[int]] = {}
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    for number, line in lines:
        image_id, *tokens = re.split(r"[\s,;]+", line.strip())
        if number == lines[0][0] and tokens and not any(token.lower() in _VOTE_VALUES for token in tokens):
            continue
        if image_id in rows:
            raise ValueError(f"Image id {image_id!r} is listed twice in {path} (line {number}).")
        rows[image_id] = _parse_votes(tokens, f"{path} line {number}")
    return rows


def _majority(votes: Sequence[int]) -> int | str:
    """Class index (0 negative, 1 positive) of the votes, or why they are skipped (`neutral`, `tie`).

    The winner must have strictly more votes than each of the two other answers; neutral winning is `neutral`,
    no strict winner (1 positive, 1 negative, 1 neutral, say) is a `tie`.
    """
    counts = Counter(votes)
    ranked = sorted((counts[vote], vote) for vote in (-1, 0, 1))
    if ranked[-1][0] == ranked[-2][0]:
        return "tie"
    winner = ranked[-1][1]
    return "neutral" if winner == 0 else int(winner == 1)


def _find_image(image_id: str, index: Mapping[str, list[Path]]) -> Path | None:
    paths = index.get(image_id, [])
    if len(paths) > 1:
        raise ValueError(f"Image id {image_id!r} matches several files: {[p.name for p in paths]}.")
    return paths[0] if paths else None


def load_flickr_instagram(
    root: PathLike, label_file: PathLike, split_file: PathLike | None = None, image_dir: str = "images", seed: int = 42,
    fractions: Sequence[float] = DEFAULT_FRACTIONS, name: str = "flickr_instagram", splits: Sequence[str] = SPLITS,
) -> DatasetDict:
    """Flickr or Instagram sentiment: `label_file` (relative to `root` or absolute) has one line per image, its id and
    per-annotator votes; images are `root/<image_dir>/<id>.<ext>`. Labels are binary: 0 `negative`, 1 `positive`.

    Neutral-majority and tied votes, and ids without an image, are skipped and counted (`neutral`, `tie`,
    `missing_image`). Split like `load_fi`.
    """
    root, labels, skipped = Path(root), LABEL_SETS["binary"], Counter()
    if not root.is_dir():
        raise ValueError(f"{name} root {root} is not a folder.")
    if not (root / label_file).is_file():
        raise ValueError(f"{name} vote file {root / label_file} does not exist.")
    index = _index_images_by_stem(root / image_dir, skipped)
    examples = {}
    for image_id, votes in _read_vote_file(root / label_file).items():
        label_id, path = _majority(votes), _find_image(image_id, index)
        if isinstance(label_id, str):
            skipped[label_id] += 1
        elif path is None:
            skipped["missing_image"] += 1
        else:
            examples[path.relative_to(root).as_posix()] = label_id
    return _build_with_split_file(name, root, examples, labels, split_file, seed, fractions, skipped, splits)


# ----------------------------------------------------------------------------------------------------------------
# Hub or local data sets with an image and a label column
# ----------------------------------------------------------------------------------------------------------------


def _source_label_ids(ds: Dataset, label_column: str, labels: Sequence[str], where: str) -> list[int]:
    """The source's labels as indices of `labels`: ClassLabel values and strings by name, plain ints as indices."""
    feature, values = ds.features[label_column], ds[label_column]
    lookup = _label_lookup(labels)
    if isinstance(feature, ClassLabel):
        # Map by name: the source's own index order need not be ours.
        mapping = {index: lookup.get(name.strip().casefold()) for index, name in enumerate(feature.names)}
        unknown = sorted({feature.names[v] if v in mapping else str(v) for v in values if mapping.get(v) is None})
        if unknown:
            raise ValueError(f"Unknown or missing label(s) {unknown} in {where}; the label set is {list(labels)}.")
        return [mapping[v] for v in values]
    if all(isinstance(v, str) for v in values):
        return [_label_id(v, lookup, where) for v in values]
    bad = sorted({v for v in values if not isinstance(v, int) or not 0 <= v < len(labels)}, key=str)
    if bad:
        raise ValueError(f"Label values {bad[:5]} in {where} are not indices of {list(labels)}.")
    return list(values)


def _source_image_paths(ds: Dataset, image_column: str) -> list[str]:
    """Each row's image file path ('' for images stored as bytes), read without decoding an image."""
    if isinstance(ds.features[image_column], Value):
        return [str(path) for path in ds[image_column]]
    column = ds.cast_column(image_column, Image(decode=False)).with_format("arrow")[image_column]
    return [path or "" for path in column.combine_chunks().field("path").to_pylist()]


def _convert_hub_split(
    ds: Dataset, labels: Sequence[str], image_column: str, label_column: str, where: str
) -> Dataset:
    """Keep the image and label columns as `image`, `label` (in our order) and `image_path`."""
    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise ValueError(f"Column {column!r} is not in {where}; its columns are {ds.column_names}.")
    label_ids = _source_label_ids(ds, label_column, labels, where)
    paths = _source_image_paths(ds, image_column)
    ds = ds.select_columns([image_column])
    if image_column != "image":
        ds = ds.rename_column(image_column, "image")
    ds = ds.add_column("label", label_ids).add_column("image_path", paths)
    return ds.cast(_features(labels))


def _canonical_splits(source: DatasetDict) -> dict[str, Dataset]:
    """Source splits under our names (`val`, `valid`, `dev` -> `validation`), in our order."""
    renamed = {("validation" if name in _VALIDATION_ALIASES else name): ds for name, ds in source.items()}
    return {name: renamed[name] for name in SPLITS if name in renamed}


def _carve_missing_splits(
    train: Dataset, missing: Sequence[str], labels: Sequence[str], split_file: PathLike | None, seed: int,
    fractions: Sequence[float], where: str, wanted: Sequence[str] = SPLITS,
) -> dict[str, Dataset]:
    """Cut the splits the source lacks (`missing`) from its train split, seeded and stratified; the split file lists
    train row indices. Returns the rest of train as `train` and the cut splits. The cut is the same whichever split
    is `wanted`, so evaluation reads the split file training wrote."""
    if split_file is None:
        raise ValueError(f"{where} has no {list(missing)} split(s); pass a split_file to cut them from train.")
    shares = [share if name == "train" or name in missing else 0.0 for name, share in zip(SPLITS, fractions)]
    examples = {str(i): label_id for i, label_id in enumerate(train["label"])}
    if _training(wanted):
        _check_nonempty(examples.values(), labels, f"{where} train")
    needed = ["train"] if _training(wanted) else wanted
    rows = _read_or_create_split(split_file, examples, labels, seed, _check_fractions(shares, needed=needed))
    return {name: train.select([int(i) for i in rows[name]]) for name in ["train", *missing]}


def load_hub_dataset(
    name_or_path: str, labels: str | list[str], image_column: str = "image", label_column: str = "label",
    split_file: PathLike | None = None, seed: int = 42, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    splits: Sequence[str] = SPLITS, **load_kwargs,
) -> DatasetDict:
    """`datasets.load_dataset(name_or_path, **load_kwargs)` with its labels mapped onto `labels`' order.

    ClassLabel sources are mapped by name, string labels by name and int labels taken as indices of `labels`.
    Missing validation/test splits are cut from train like `load_fi` (then `split_file` is required). `splits`:
    which splits to build; only those (and train, to cut a missing one) are converted and required (`ALL`: every
    split of the source, together).
    """
    labels, wanted = resolve_label_set(labels), _requested(splits)
    source = datasets.load_dataset(name_or_path, **load_kwargs)
    if not isinstance(source, DatasetDict):
        raise ValueError(f"load_dataset({name_or_path!r}) returned no DatasetDict; do not pass `split`.")

    def convert(name: str, ds: Dataset) -> Dataset:
        return _convert_hub_split(ds, labels, image_column, label_column, f"{name_or_path} [{name}]")

    canonical = _canonical_splits(source)
    missing = [name for name in SPLITS if name not in canonical]  # what a split file cuts from train
    if wanted == (ALL,):
        built = {ALL: concatenate_datasets([convert(name, ds) for name, ds in source.items()])}
    elif _training(wanted):
        if "train" not in canonical:
            raise ValueError(f"{name_or_path} has no train split; its splits are {list(source)}.")
        built = {name: convert(name, ds) for name, ds in canonical.items()}
        if missing:
            built.update(_carve_missing_splits(built["train"], missing, labels, split_file, seed, fractions,
                                               name_or_path))
    else:
        absent = [name for name in wanted if name not in canonical]
        if absent and ("train" not in canonical or split_file is None):
            hint = " (a split_file cuts the missing ones from train)" if "train" in canonical else ""
            raise MissingSplitError(f"{name_or_path} has no {absent[0]} split; its splits are {list(source)}{hint}.",
                                    available=list(canonical))
        # With a split file, train is what training trains on: the source's train less the splits cut from it.
        carve = bool(missing) and split_file is not None and (bool(absent) or "train" in wanted)
        built = {name: convert(name, canonical[name]) for name in wanted
                 if name in canonical and not (carve and name == "train")}
        if carve:
            built.update(_carve_missing_splits(convert("train", canonical["train"]), missing, labels, split_file,
                                               seed, fractions, name_or_path, wanted))
    dataset_dict = DatasetDict({name: built[name] for name in wanted})
    summary = _summary("hub", dataset_dict, {}, source=name_or_path,
                       split_file=None if split_file is None else str(split_file), seed=seed)
    return _attach_summary(dataset_dict, summary)


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------------


def load_dataset_from_config(kind: str, **kwargs) -> DatasetDict:
    """Call the loader that `train.infra.registry` names for data set `kind` (`emoset`, `fi`, `emotion6`, `flickr`,
    `instagram`, `imagefolder`, `hub`, or any registered one) with the recipe's `data` options."""
    entry = registry.get(kind)
    fixed = sorted(set(kwargs) & set(entry.loader_kwargs))
    if fixed:
        raise ValueError(f"Data set {entry.name!r} fixes {fixed} itself; leave them out of the recipe's data section.")
    # The recipe's `data.load_kwargs` is a mapping of further keyword arguments (`hub`: `load_dataset`'s).
    extra = kwargs.pop("load_kwargs", None) or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"data.load_kwargs must be a mapping of keyword arguments, got {extra!r}.")
    return entry.load_function()(**entry.loader_kwargs, **kwargs, **extra)


def _load_splits(kind: str, splits: tuple[str, ...], options: Mapping) -> DatasetDict:
    """`splits` of data set `kind`: asked of the loader when it takes `splits` (every built-in one does); a loader of
    one's own that does not is called as training calls it, and the splits picked from what it returns."""
    if "splits" in inspect.signature(registry.get(kind).load_function()).parameters:
        return load_dataset_from_config(kind, **options, splits=splits)
    full = load_dataset_from_config(kind, **options)
    if splits == (ALL,):
        return DatasetDict({ALL: concatenate_datasets(list(full.values()))})
    absent = [split for split in splits if split not in full]
    if absent:
        raise MissingSplitError(f"Data set {kind!r} has no {absent[0]} split; its splits are {list(full)}.",
                                available=list(full))
    return DatasetDict({split: full[split] for split in splits})


def load_evaluation_split(kind: str, split: str | None = None, **options) -> tuple[str, Dataset]:
    """The split of data set `kind` (the recipe's `data` options) that an evaluation scores, and its name; nothing
    about the other splits is read or required.

    `split` is `train`, `validation`, `test` (the data set's own, or cut by `split_file` with `fractions`, where
    zero shares are fine) or `all` (every image). Left out: `test` where the data set has one (or a split file cuts
    one), else all its images when it has no split of its own (a flat folder, FI, ... without a split file, a Hub
    data set of one split). A data set with several splits but no test needs `split` named.
    """
    if split is not None:
        return split, _load_splits(kind, _requested((split,)), options)[split]
    try:
        return "test", _load_splits(kind, ("test",), options)["test"]
    except MissingSplitError as err:
        if len(err.available) > 1:
            raise MissingSplitError(f"{err} Name the split to evaluate (one of {err.available}, or {ALL!r}).",
                                    err.available) from None
        logger.info("The data set has no split of its own: evaluating all of its images (split %r; a split_file "
                    "cuts a test split instead).", ALL)
    return ALL, _load_splits(kind, (ALL,), options)[ALL]


__all__ = [
    "ALL",
    "DEFAULT_FRACTIONS",
    "IMAGE_EXTENSIONS",
    "MissingSplitError",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "SPLITS",
    "dataset_summary",
    "load_dataset_from_config",
    "load_emoset",
    "load_emotion6",
    "load_evaluation_split",
    "load_fi",
    "load_flickr_instagram",
    "load_hub_dataset",
    "load_imagefolder",
]
