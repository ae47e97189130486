"""The named data sets: for each one its loader, its label set and its model card's metadata, in one table.

Importable without torch or `datasets` (a loader is named as `module:function` and imported when it is called), so
that `python -m train push` and the recipe checks read it cheaply. `train.infra.data.load_dataset_from_config`, the
recipe's `data.kind` check, `push --variant` and the card template (`hub_cards/README.md.j2`) all read this table.

Adding a named data set is one loader plus one entry:

    from train.infra.registry import DatasetEntry, register

    register(DatasetEntry(
        name="artphoto", loader="my_project.loaders:load_artphoto", label_set="mikels8",
        title="ArtPhoto", url="https://example.org/artphoto", tags=("artphoto",),
        licence_note="The images remain their owners' property ...", citation="@article{...}",
    ))

Label sets themselves (the ordered label lists) live in `modeling_emovlm_kd.configuration_emovlm_kd.LABEL_SETS`.
The model package keeps its own `DATASET_LABEL_SETS` aliases for the built-in data sets because the Hub payload
cannot import `train/`; a test checks that they agree with this table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_RESEARCH_ONLY = ("The Apache-2.0 licence of this model covers the weights and code, not the training images: check "
                  "the data set's terms before any commercial use.")
_KATSURAI_LICENCE = ("The images are photos that remain their uploaders' property, with sentiment votes collected by "
                     "the data set's authors for research. " + _RESEARCH_ONLY)
_KATSURAI_CITATION = """\
@inproceedings{katsurai2016image,
  title     = {Image Sentiment Analysis Using Latent Correlations Among Visual, Textual, and Sentiment Views},
  author    = {Katsurai, Marie and Satoh, Shin'ichi},
  booktitle = {Proceedings of the IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year      = {2016}
}
"""


@dataclass(frozen=True)
class DatasetEntry:
    """One data set kind of a recipe's `data.kind`.

    `loader` is `module:function`; `loader_kwargs` are fixed arguments the recipe does not give (e.g. the summary
    name of a loader shared by two data sets). A named data set (`label_set` set, `title` set) gets a model card
    variant of `push --variant NAME`; a generic loader (`label_set=None`) does not.
    """

    name: str
    loader: str
    label_set: str | None = None
    title: str | None = None
    url: str | None = None
    tags: tuple[str, ...] = ()
    licence_note: str | None = None
    citation: str | None = None
    loader_kwargs: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or self.name != self.name.lower() or self.name == "custom":
            raise ValueError(f"Data set entry name {self.name!r} must be a non-empty lower-case name other than "
                             "'custom' (the card variant of runs on other data).")
        module, _, function = self.loader.partition(":")
        if not module or not function:
            raise ValueError(f"Data set entry {self.name!r}: loader {self.loader!r} must be 'module:function'.")
        if self.label_set is not None and self.title is None:
            raise ValueError(f"Data set entry {self.name!r} has a label set but no title for its model card.")
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "loader_kwargs", MappingProxyType(dict(self.loader_kwargs)))

    @property
    def named(self) -> bool:
        """Whether this is a named data set with a fixed label set and a card variant."""
        return self.label_set is not None

    def load_function(self) -> Callable:
        """The loader function itself (imports its module, e.g. `train.infra.data`, which loads `datasets`)."""
        module, _, function = self.loader.partition(":")
        try:
            return getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Data set {self.name!r}: cannot import its loader {self.loader!r}: {error}") from None

    def card(self) -> dict:
        """The entry's model card metadata, in the shape `hub_cards/README.md.j2`'s context reads."""
        return {"dataset": self.title, "dataset_type": self.name, "dataset_url": self.url, "label_set": self.label_set,
                "tags": list(self.tags), "licence_note": self.licence_note, "citation": self.citation}


_REGISTRY: dict[str, DatasetEntry] = {}


def register(entry: DatasetEntry, replace: bool = False) -> DatasetEntry:
    """Add `entry` to the registry (an existing name needs `replace=True`)."""
    if entry.name in _REGISTRY and not replace:
        raise ValueError(f"Data set {entry.name!r} is already registered; pass replace=True to change it.")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> DatasetEntry:
    """Remove and return a registered entry (tests that register their own data set clean up with it)."""
    return _REGISTRY.pop(get(name).name)


def get(name: str) -> DatasetEntry:
    """The entry of data set kind `name` (case-insensitive); an unknown name is an error naming the known ones."""
    entry = _REGISTRY.get(str(name).lower())
    if entry is None:
        raise ValueError(f"unknown data set kind {name!r}; use one of {names()}.")
    return entry


def names() -> list[str]:
    """Every registered data set kind, sorted."""
    return sorted(_REGISTRY)


def named_datasets() -> list[str]:
    """The registered data sets with a fixed label set and a card variant, in registration order."""
    return [name for name, entry in _REGISTRY.items() if entry.named]


def card_variants() -> list[str]:
    """The variants of `push --variant`: every named data set, then `custom` (any other data and labels)."""
    return [*named_datasets(), "custom"]


for _entry in (
    DatasetEntry(
        name="emoset", loader="train.infra.data:load_emoset", label_set="mikels8", title="EmoSet-118K",
        url="https://vcc.tech/EmoSet", tags=("emoset", "mikels-emotions"),
        licence_note="EmoSet's images were collected from social networks and art websites and remain their owners' "
                     "property; the data set's terms of use are set by its authors (see the project page). "
                     + _RESEARCH_ONLY,
        citation="""\
@inproceedings{yang2023emoset,
  title     = {EmoSet: A Large-scale Visual Emotion Dataset with Rich Attributes},
  author    = {Yang, Jingyuan and Huang, Qirui and Ding, Tingting and Lischinski, Dani and Cohen-Or, Daniel and Huang, Hui},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}
""",
    ),
    DatasetEntry(
        name="fi", loader="train.infra.data:load_fi", label_set="mikels8", title="FI", tags=("fi", "mikels-emotions"),
        licence_note="FI's images are Flickr and Instagram photos that remain their uploaders' property; the data set "
                     "is distributed by its authors for research. " + _RESEARCH_ONLY,
        citation="""\
@inproceedings{you2016building,
  title     = {Building a Large Scale Dataset for Image Emotion Recognition: The Fine Print and The Benchmark},
  author    = {You, Quanzeng and Luo, Jiebo and Jin, Hailin and Yang, Jianchao},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2016}
}
""",
    ),
    DatasetEntry(
        name="emotion6", loader="train.infra.data:load_emotion6", label_set="ekman6", title="Emotion6",
        tags=("emotion6", "ekman-emotions"),
        licence_note="Emotion6's images were collected from Flickr and remain their owners' property; the data set is "
                     "distributed by its authors for research. " + _RESEARCH_ONLY + " This model predicts the "
                     "dominant emotion only, not Emotion6's emotion distributions.",
        citation="""\
@inproceedings{peng2015mixed,
  title     = {A Mixed Bag of Emotions: Model, Predict, and Transfer Emotion Distributions},
  author    = {Peng, Kuan-Chuan and Chen, Tsuhan and Sadovnik, Amir and Gallagher, Andrew C.},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2015}
}
""",
    ),
    DatasetEntry(
        name="flickr", loader="train.infra.data:load_flickr_instagram", label_set="binary",
        title="Flickr (Katsurai & Satoh)", tags=("flickr", "sentiment-analysis"), licence_note=_KATSURAI_LICENCE,
        citation=_KATSURAI_CITATION, loader_kwargs={"name": "flickr"},
    ),
    DatasetEntry(
        name="instagram", loader="train.infra.data:load_flickr_instagram", label_set="binary",
        title="Instagram (Katsurai & Satoh)", tags=("instagram", "sentiment-analysis"),
        licence_note=_KATSURAI_LICENCE, citation=_KATSURAI_CITATION, loader_kwargs={"name": "instagram"},
    ),
    # Generic loaders: the recipe's `labels` decide; a run on them is pushed as `--variant custom`.
    DatasetEntry(name="imagefolder", loader="train.infra.data:load_imagefolder"),
    DatasetEntry(name="hub", loader="train.infra.data:load_hub_dataset"),
):
    register(_entry)
del _entry


__all__ = [
    "DatasetEntry",
    "card_variants",
    "get",
    "named_datasets",
    "names",
    "register",
    "unregister",
]
