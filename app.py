# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD demo app: the VLM, the distilled head and the gate's fused decision, side by side.

Runs locally (`make app`, or `python app.py --checkpoint PATH_OR_REPO_ID --port 7860`) and as a Hugging Face Space
(`app.py` at the top of the Space repository; Spaces run `python app.py` and set `GRADIO_SERVER_NAME`/`PORT`).

Settings, each a CLI flag or an environment variable:

- `--checkpoint` / `EMOVLM_CHECKPOINT`: a local EmoVLM-KD folder or a Hub repo id (default: `runs/demo/final`,
  the output of `make demo`). The model is loaded with `trust_remote_code=True`, so the checkpoint's own
  modeling code runs, gate included.
- `--revision` / `EMOVLM_REVISION`: the branch, tag or commit hash of a Hub checkpoint (default: its `main`).
- `--host` / `GRADIO_SERVER_NAME` (default `127.0.0.1`), `--port` / `GRADIO_SERVER_PORT` (default 7860).
- `--examples` / `EMOVLM_EXAMPLES`: a folder of `<label>/<image>` example images (default: the bundled demo data).
- `--max-file-size` / `EMOVLM_MAX_FILE_SIZE`: the largest upload the server accepts, bytes or `<n>kb|mb|gb`
  (default `20mb`); larger uploads are refused by Gradio before they are stored. Decoded images are bounded
  separately by the image processor (`max_image_pixels`; each image is shrunk as soon as it is decoded).

In a Space published by `python -m train push-space`, `emovlm_space.json` next to this file holds the defaults of
`checkpoint`, `revision` (the model's commit hash, resolved when the Space was pushed, so the Space keeps showing
exactly that model) and `examples` (a folder relative to this file); flags and environment variables still win.

Only `transformers`, `torch`, `PIL` and `gradio` are imported, never the project's packages: what the page shows
is what a user of the published checkpoint gets. The checkpoint's own `loading_emovlm_kd.load_pipeline` (its remote
code, fetched as `pipeline()` fetches its pipeline class) loads it with the options `train predict` uses, and files
are classified by its `pipeline("image-classification")`, the front door `train predict` and the Inference
Endpoints handler call too: the page shows what `predict` writes for the same files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Read at import time; this app needs no telemetry and the machine it runs on may have no network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = HERE / "runs" / "demo" / "final"
DEFAULT_EXAMPLES = HERE / "train" / "demo_data" / "fashion_mnist_sample" / "test"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "20mb"
# Written by `python -m train push-space` into the Space: the pinned model and the examples folder.
SPACE_SETTINGS = HERE / "emovlm_space.json"
BATCH_SIZE = 16
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# CommonMark (and Gradio's renderer) treat a backslash before any ASCII punctuation as that character, literally.
MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
BATCH_COLUMNS = [
    "image", "fused label", "fused p", "VLM label", "VLM p", "head label", "head p", "VLM share", "head share", "error",
]
# The Batch tab's CSV download: `train predict --output x.csv`'s columns (its CSV_FIELDS; a test checks they agree),
# with `path` the uploaded file's name.
CSV_COLUMNS = ["path", "label", "score", "vlm_label", "head_label", "error"]
# "Why?" generates at most this many tokens (the model's default bound; `--max-new-tokens`).
DEFAULT_MAX_NEW_TOKENS = 128
# A checkpoint with fewer parameters than this is a test or demo model (the tiny ones have about 0.4 M): its
# generated text is noise, and the page says so.
TINY_MODEL_PARAMETERS = 100_000_000

# What a gate's `branch_weights` is (`modeling_emovlm_kd/fusion.py`: the numbers come from the gate module itself).
GATE_EXPLANATIONS = {
    "concat_linear": "This gate is one Linear(2C→C) over both branches' inputs, so the fused logits are a VLM part "
                     "plus a head part (plus a bias); each share is that part's size, summed over all labels, out of "
                     "both parts' sizes.",
    "moe": "This gate's router mixes its linear experts into one linear map per image, so the fused logits are a VLM "
           "part plus a head part (plus a bias); each share is that part's size, summed over all labels, out of both.",
    "bilinear": "Every term of a bilinear gate multiplies both branches, so no part of the logits belongs to one "
                "branch: each share is the branch's Shapley value, how much the logits change (summed over all labels) "
                "when its input is revealed instead of an input without class information, averaged over the other "
                "branch hidden and shown.",
    "dynamic_weighting": "This gate weights the two inputs per image (a softmax) and then applies one Linear(C→C), so "
                         "the fused logits are a VLM part plus a head part (plus a bias); each share is that part's "
                         "size, summed over all labels, out of both.",
    "cross_gating": "This gate scales each branch's input by a sigmoid of the other's and then applies one "
                    "Linear(C→C), so the fused logits are a VLM part plus a head part (plus a bias); each share is "
                    "that part's size, summed over all labels, out of both.",
}
SHARE_MEANING = ("A share says how strongly a branch moved the fused logits, up or down, over every label: it is not "
                 "the probability that the branch is right, nor its vote for the label shown.")
ONE_HOT_NOTE = ("The gate sees the VLM's answer as a one-hot label (gate_vlm_signal: one_hot), so the VLM's share "
                "depends on which label it chose, not on how sure it was.")
BRANCH_NAMES = {"vlm": "VLM", "head": "distilled head"}


class CheckpointError(RuntimeError):
    """The checkpoint cannot be found or loaded; the message tells the user what to do."""


@dataclass
class Classifier:
    """A loaded EmoVLM-KD checkpoint: its front door (`pipeline("image-classification")`, the checkpoint's own
    class) and the image suffixes of its loading code."""

    name: str
    pipeline: Any
    labels: list[str]
    image_suffixes: tuple[str, ...]

    @property
    def model(self):
        return self.pipeline.model

    @property
    def image_processor(self):
        return self.pipeline.image_processor

    @property
    def gate_type(self) -> str:
        return self.model.config.gate_type


@dataclass
class Prediction:
    """Everything the page shows for one image; probabilities are dicts label -> probability."""

    fused: dict[str, float]
    vlm: dict[str, float]
    vlm_log_likelihood: dict[str, float]
    head: dict[str, float]
    vlm_share: float
    head_share: float

    @property
    def label(self) -> str:
        return max(self.fused, key=self.fused.get)


# ---- checkpoint ------------------------------------------------------------------------------------------


def resolve_checkpoint(reference: str | os.PathLike) -> str:
    """A local folder or a Hub repo id to pass to `from_pretrained`; raises `CheckpointError` with advice."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return str(path)
    if path.resolve() == DEFAULT_CHECKPOINT:
        raise CheckpointError(
            f"No checkpoint at `{DEFAULT_CHECKPOINT}`: the demo model has not been built yet. "
            "Run `make demo` first, or point the app at another checkpoint with "
            "`--checkpoint PATH_OR_REPO_ID` or `EMOVLM_CHECKPOINT=...`."
        )
    if REPO_ID.match(str(reference)) and not path.exists():
        return str(reference)
    raise CheckpointError(
        f"`{reference}` is neither a checkpoint folder nor a Hub repo id (`org/name`). "
        "Pass `--checkpoint PATH_OR_REPO_ID` or set `EMOVLM_CHECKPOINT`."
    )


def checkpoint_code(source: str, name: str, revision: str | None = None) -> Any:
    """`name` from the checkpoint's own `loading_emovlm_kd.py`, loaded by transformers' remote-code loader (the
    module `pipeline()` and `from_pretrained` use for the checkpoint's other files)."""
    return get_class_from_dynamic_module(f"loading_emovlm_kd.{name}", source, revision=revision)


def load_classifier(reference: str | os.PathLike, revision: str | None = None, dtype: str = "auto",
                    device_map: str | None = None, load_in_4bit: bool = False) -> Classifier:
    """Load the checkpoint's front door with its own code (`trust_remote_code=True`).

    `revision` (a Hub checkpoint's branch, tag or commit hash) is ignored for a local folder. `dtype` (auto: bf16 on
    a GPU that has it, else float32), `device_map` and `load_in_4bit` are the checkpoint's `load_pipeline` options,
    `train predict`'s: the one 4-bit configuration (NF4, double quantisation, `lm_head` and the visual merger kept),
    and the head and the gate in float32 in every case.
    """
    source = resolve_checkpoint(reference)
    revision = revision if revision and not Path(source).is_dir() else None
    try:
        load_pipeline = checkpoint_code(source, "load_pipeline", revision)
        image_suffixes = tuple(checkpoint_code(source, "IMAGE_SUFFIXES", revision))
    except (OSError, AttributeError) as err:
        raise CheckpointError(f"`{source}` does not ship the EmoVLM-KD front door (`loading_emovlm_kd.py`, "
                              f"`pipeline_emovlm_kd.py`): export it again with this version of the project ({err})."
                              ) from err
    try:
        classifier = load_pipeline(source, revision=revision, dtype=dtype, device_map=device_map,
                                   load_in_4bit=load_in_4bit)
    except Exception as err:  # noqa: BLE001 - any load failure becomes a message on the page
        raise CheckpointError(f"Could not load the EmoVLM-KD checkpoint `{source}`: {err}") from err
    model = classifier.model
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    name = display_name(source) + (f"@{revision}" if revision else "")
    return Classifier(name, classifier, labels, image_suffixes)


def display_name(source: str) -> str:
    """The checkpoint as the page names it: relative to the project when it lies inside, else as given."""
    try:
        return str(Path(source).resolve().relative_to(HERE))
    except ValueError:
        return source


# ---- inference -------------------------------------------------------------------------------------------


def check_image_file(path: str | os.PathLike, shown_name: str) -> None:
    """Fail early, with the user's file name, on files the image processor would reject less legibly."""
    if not os.path.isfile(path):
        raise ValueError(f"{shown_name} was not received by the server; please upload it again.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{shown_name} is empty (0 bytes), not an image.")


def readable_error(error: str, path: str, shown_name: str) -> str:
    """The inference code's error for a file, as the user reads it: naming their file, not the server's path."""
    return f"{shown_name} is not a readable image ({error.replace(path, shown_name)})."


def prediction_of(classifier: Classifier, answer: list[dict]) -> Prediction:
    """What the page shows for one classified file: the front door's answer for every label, in label order."""
    by_label = {element["label"]: element for element in answer}
    per_label = lambda key: {label: by_label[label][key] for label in classifier.labels}  # noqa: E731
    shares = answer[0]["branch_weights"]
    return Prediction(
        fused=per_label("score"),
        vlm=per_label("vlm_score"),
        vlm_log_likelihood=per_label("vlm_log_likelihood"),
        head=per_label("head_score"),
        vlm_share=shares["vlm"],
        head_share=shares["head"],
    )


def error_of(answer: list[dict]) -> str | None:
    """The error of a front-door answer for a file that could not be classified, or None."""
    return answer[0].get("error")


def classify_files(classifier: Classifier, paths: list[str]) -> list[list[dict]]:
    """The checkpoint's front door on files (`train predict` runs the same): one answer per path, every label with
    its fused, VLM and head scores, or an error entry; `BATCH_SIZE` images per forward pass."""
    if not paths:
        return []
    return classifier.pipeline(list(paths), batch_size=BATCH_SIZE, top_k=len(classifier.labels))


def predict_paths(classifier: Classifier, paths: list[str]) -> list[Prediction]:
    """Predictions for a list of readable image files; ValueError naming the first file that is not one."""
    answers = classify_files(classifier, paths)
    for answer in answers:
        if error_of(answer) is not None:
            raise ValueError(error_of(answer))
    return [prediction_of(classifier, answer) for answer in answers]


def predict_one(classifier: Classifier, path: str, shown_name: str) -> Prediction:
    """Validate and classify one file; errors name the user's file."""
    check_image_file(path, shown_name)
    (answer,) = classify_files(classifier, [path])
    if error_of(answer) is not None:
        raise ValueError(readable_error(error_of(answer), path, shown_name))
    return prediction_of(classifier, answer)


def explain_one(classifier: Classifier, path: str, shown_name: str, max_new_tokens: int | None = None) -> dict:
    """The fused label of one file with the VLM's reasoning answer, generated after the paper's reasoning prompt
    (`EmoVLMKDForImageClassification.explain`): `{"label", "score", "explanation", "explanation_tokens",
    "explanation_truncated"}`. It costs one generation of up to `max_new_tokens` tokens (default: the model's,
    128), far slower than classifying; the label is the one `predict_one` gives. Errors name the user's file."""
    check_image_file(path, shown_name)
    options = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    (answer,) = classifier.pipeline([path], top_k=1, explain=True, **options)
    if error_of(answer) is not None:
        raise ValueError(readable_error(error_of(answer), path, shown_name))
    keys = ("label", "score", "explanation", "explanation_tokens", "explanation_truncated")
    return {key: answer[0][key] for key in keys}


# ---- presentation ----------------------------------------------------------------------------------------


def markdown_literal(text: Any) -> str:
    """`text` for a Markdown component, shown as it is: no emphasis, links, HTML or line breaks from its characters."""
    return MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))


def top_label(probabilities: dict[str, float]) -> str:
    return max(probabilities, key=probabilities.get)


def share_explanation(prediction: Prediction, gate_type: str, vlm_signal: str = "one_hot") -> str:
    """The branch shares in words: what they are for this gate type, what they are not, and, when the branch with
    the larger share answered another label than the fused one, that it did (plain text)."""
    words = [GATE_EXPLANATIONS.get(gate_type, "The shares are the gate's own branch weights."), SHARE_MEANING]
    if vlm_signal == "one_hot":
        words.append(ONE_HOT_NOTE)
    shares = {"vlm": prediction.vlm_share, "head": prediction.head_share}
    if shares["vlm"] != shares["head"]:
        larger = max(shares, key=shares.get)
        other = "head" if larger == "vlm" else "vlm"
        answers = {"vlm": top_label(prediction.vlm), "head": top_label(prediction.head)}
        fused = prediction.label
        if answers[larger] != fused:
            given = getattr(prediction, larger)[fused]
            words.append(f"Here the {BRANCH_NAMES[larger]} has the larger share but answered {answers[larger]}, not "
                         f"the fused {fused} (it gives {fused} {100 * given:.1f} %): its share counts how much it "
                         f"moved all the logits, including toward {answers[larger]}.")
            words.append(f"The fused {fused} is the {BRANCH_NAMES[other]}'s answer." if answers[other] == fused else
                         "And neither branch's own answer is the fused label: it comes from how the gate combines "
                         "both.")
    return " ".join(words)


def contribution_html(prediction: Prediction, gate_type: str, vlm_signal: str = "one_hot") -> str:
    """A stacked bar of the two branches' shares, with what the share means for this gate type in words."""
    vlm, head = 100 * prediction.vlm_share, 100 * prediction.head_share
    return (
        '<div class="contrib"><p class="title">How much each branch drove this decision</p>'
        f'<div class="contrib-bar"><span class="vlm" style="width:{vlm:.1f}%"></span>'
        f'<span class="head" style="width:{head:.1f}%"></span></div>'
        f'<p><b class="vlm-key">VLM {vlm:.1f}%</b> · <b class="head-key">distilled head {head:.1f}%</b></p>'
        f'<p class="how">Gate <code>{html.escape(gate_type)}</code>. '
        f"{html.escape(share_explanation(prediction, gate_type, vlm_signal))}</p></div>"
    )


def score_rows(prediction: Prediction) -> list[list]:
    """Per-label table: fused, VLM and head probabilities and the VLM's raw label log-likelihood."""
    return [
        [
            label,
            round(prediction.fused[label], 4),
            round(prediction.vlm[label], 4),
            round(prediction.vlm_log_likelihood[label], 3),
            round(prediction.head[label], 4),
        ]
        for label in sorted(prediction.fused, key=prediction.fused.get, reverse=True)
    ]


def batch_row(name: str, prediction: Prediction | None = None, error: str = "") -> list:
    """One row of the batch table; a bad file gets its error instead of scores."""
    if prediction is None:
        return [name, "", None, "", None, "", None, None, None, error]
    vlm_label, head_label = top_label(prediction.vlm), top_label(prediction.head)
    return [
        name,
        prediction.label,
        round(prediction.fused[prediction.label], 4),
        vlm_label,
        round(prediction.vlm[vlm_label], 4),
        head_label,
        round(prediction.head[head_label], 4),
        round(prediction.vlm_share, 4),
        round(prediction.head_share, 4),
        "",
    ]


def csv_row(name: str, prediction: Prediction | None = None, error: str = "") -> dict:
    """One row of the CSV download, as `train predict` writes it (`CSV_COLUMNS`; fused score to 6 decimals)."""
    if prediction is None:
        return {"path": name, "error": error}
    return {"path": name, "label": prediction.label, "score": round(prediction.fused[prediction.label], 6),
            "vlm_label": top_label(prediction.vlm), "head_label": top_label(prediction.head), "error": ""}


def write_csv(rows: list[dict]) -> str:
    """`predictions.csv` in a fresh temporary folder (Gradio serves files of the system's temporary folder)."""
    path = Path(tempfile.mkdtemp(prefix="emovlm-batch-")) / "predictions.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def uploaded_path(payload: Any) -> tuple[str, str] | None:
    """(server path, user's file name) of a raw Gradio file payload, or None when nothing is uploaded."""
    if payload is None:
        return None
    if isinstance(payload, (str, os.PathLike)):
        return os.fspath(payload), Path(payload).name
    path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
    name = payload.get("orig_name") if isinstance(payload, dict) else getattr(payload, "orig_name", None)
    if not path:
        return None
    return path, name or Path(path).name


# ---- event handlers --------------------------------------------------------------------------------------


def classify_image(classifier: Classifier | None, load_error: str, payload: Any,
                   truths: dict[str, str] | None = None):
    """Single image: fused label chart, branch shares (explained), VLM and head probabilities, score table, the
    true class when the image is one of the examples (`truths`: `example_truths`), error text."""
    if classifier is None:
        raise gr.Error(load_error.replace("`", ""), duration=None)  # toasts show no Markdown
    empty = (None, "", None, None, None, "")
    upload = uploaded_path(payload)
    if upload is None:
        return (*empty, "")
    path, name = upload
    try:
        prediction = predict_one(classifier, path, name)
    except ValueError as err:
        # Clear the previous result (it belongs to another image) and say why in the page; returning instead
        # of raising keeps the outputs consistent with the input, and the server serves on either way.
        gr.Warning(str(err))
        return (*empty, f"**⚠️ {markdown_literal(err)}**")
    truth = truths.get(file_digest(path)) if truths else None  # hashing a 20 MB upload only when there are examples
    verdict = "matches" if truth == prediction.label else f"differs (fused: {markdown_literal(prediction.label)})"
    return (
        prediction.fused,
        contribution_html(prediction, classifier.gate_type, classifier.model.config.gate_vlm_signal),
        prediction.vlm,
        prediction.head,
        score_rows(prediction),
        f"True class of this example: **{markdown_literal(truth)}**; the fused decision {verdict}." if truth else "",
        "",
    )


def explain_image(classifier: Classifier | None, load_error: str, payload: Any,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[str, str]:
    """The "Why?" button: the VLM's reasoning answer for the image (`explain_one`), and a note (Markdown) on what
    it cost and how far to trust it."""
    if classifier is None:
        raise gr.Error(load_error.replace("`", ""), duration=None)
    upload = uploaded_path(payload)
    if upload is None:
        return "", "Upload or pick an image first."
    path, name = upload
    try:
        explained = explain_one(classifier, path, name, max_new_tokens)
    except ValueError as err:
        return "", f"**⚠️ {markdown_literal(err)}**"
    cut = ", cut at the bound" if explained["explanation_truncated"] else ""
    note = (f"The VLM's reasoning answer, generated after the paper's reasoning prompt: it cost one generation "
            f"({explained['explanation_tokens']} of at most {max_new_tokens} tokens{cut}), far slower than "
            f"classifying. The fused label ({markdown_literal(explained['label'])}) is unchanged.")
    parameters = sum(p.numel() for p in classifier.model.parameters())
    if parameters < TINY_MODEL_PARAMETERS:
        note += (f" This checkpoint has only {parameters:,} parameters (a test or demo model): its text is noise; a "
                 "trained full-size VLM writes a reasoning answer.")
    return explained["explanation"], note


@dataclass
class BatchResult:
    """One file of the Batch tab: its name as uploaded, and its prediction or its error."""

    name: str
    prediction: Prediction | None = None
    error: str = ""


def batch_results(classifier: Classifier | None, load_error: str, files: list[Any] | None) -> list[BatchResult]:
    """Several images, in upload order; unreadable files get an error and a warning, not a crash."""
    if classifier is None:
        raise gr.Error(load_error.replace("`", ""), duration=None)  # toasts show no Markdown
    uploads = [upload for upload in map(uploaded_path, files or []) if upload is not None]
    results: dict[int, BatchResult] = {}
    good: list[tuple[int, str, str]] = []
    for index, (path, name) in enumerate(uploads):
        try:
            check_image_file(path, name)
            good.append((index, path, name))
        except ValueError as err:
            results[index] = BatchResult(name, error=str(err))
    for (index, path, name), answer in zip(good, classify_files(classifier, [path for _, path, _ in good])):
        error = error_of(answer)
        results[index] = (BatchResult(name, error=readable_error(error, path, name)) if error is not None
                          else BatchResult(name, prediction_of(classifier, answer)))
    failed = sum(1 for result in results.values() if result.error)
    if failed:
        gr.Warning(f"{failed} of {len(uploads)} files could not be read as images; see the error column.")
    return [results[i] for i in sorted(results)]


def classify_batch(classifier: Classifier | None, load_error: str, files: list[Any] | None) -> list[list]:
    """Several images: one table row each; unreadable files get an error row."""
    return [batch_row(r.name, r.prediction, r.error) for r in batch_results(classifier, load_error, files)]


def classify_batch_download(classifier: Classifier | None, load_error: str,
                            files: list[Any] | None) -> tuple[list[list], str | None]:
    """The Batch tab's button: the table, and the same results as a CSV file with `predict`'s columns."""
    results = batch_results(classifier, load_error, files)
    if not results:
        return [], None
    table = [batch_row(r.name, r.prediction, r.error) for r in results]
    return table, write_csv([csv_row(r.name, r.prediction, r.error) for r in results])


# ---- page ------------------------------------------------------------------------------------------------


def folder_name(label: str) -> str:
    """A label as `push` names its examples folder (`train.commands.publish.safe_name`: letters, digits, `.`, `_`
    and `-` kept, anything else `_`; a test checks they agree)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "image"


def true_label(folder: str, labels: list[str]) -> str | None:
    """The model's label an example folder is named after (as it is, or as `push` names it), or None: a folder of
    `--example-images` is named after its file, not a class."""
    return next((label for label in labels if folder in (label, folder_name(label))), None)


def example_captions(paths: list[str], labels: list[str]) -> list[str]:
    """What each example shows under it: `true class: <label>`, or its folder's name when that is no label."""
    captions = []
    for path in paths:
        label = true_label(Path(path).parent.name, labels)
        captions.append(f"true class: {label}" if label else Path(path).parent.name)
    return captions


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def example_truths(paths: list[str], labels: list[str]) -> dict[str, str]:
    """The true class of each example with one, by the file's content (Gradio hands the handler a copy)."""
    truths = {}
    for path in paths:
        label = true_label(Path(path).parent.name, labels)
        if label:
            truths[file_digest(path)] = label
    return truths


def example_images(folder: str | os.PathLike | None, per_label: int = 1,
                   suffixes: tuple[str, ...] | None = None) -> list[str]:
    """The first `per_label` images of each `<label>/` subfolder (sorted), or none if the folder is absent. Images
    are the files with one of `suffixes` (the checkpoint's `IMAGE_SUFFIXES`); without them, every visible file."""
    if not folder or not Path(folder).is_dir():
        return []
    examples = []
    for label_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        images = sorted(p for p in label_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                        and (suffixes is None or p.suffix.lower() in suffixes))
        examples += [str(p) for p in images[:per_label]]
    return examples


def header_markdown(classifier: Classifier | None, load_error: str) -> str:
    """Title and what is loaded, or the loading error in plain words."""
    title = "# EmoVLM-KD: VLM + distilled head + gate\n"
    if classifier is None:
        return title + f"\n**⚠️ No model loaded.** {load_error}"
    config = classifier.model.config
    name, gate, signal = map(markdown_literal, (classifier.name, config.gate_type, config.gate_vlm_signal))
    labels = ", ".join(markdown_literal(label) for label in classifier.labels)
    return title + (
        f"Checkpoint **{name}** · gate **{gate}** (VLM signal: **{signal}**) · {len(classifier.labels)} labels: "
        f"{labels}. "
        "The Qwen2-VL scores every label after its prompt; the distilled head reads the same visual features; "
        "the gate fuses both ([arXiv 2505.07164](https://arxiv.org/abs/2505.07164))."
    )


CSS = """
.contrib-bar {display:flex; height:22px; border-radius:6px; overflow:hidden; margin:6px 0;}
.contrib-bar .vlm {background:#2563eb;} .contrib-bar .head {background:#f59e0b;}
#input-image img {width:100%; height:100%; object-fit:contain;}
#image-error {color:#b91c1c;}
.contrib .title {font-weight:600; margin-bottom:0;}
.vlm-key {color:#2563eb;} .head-key {color:#b45309;} .contrib .how {font-size:0.85em; opacity:0.8;}
"""


def build_demo(classifier: Classifier | None, load_error: str = "", examples_dir: str | None = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> gr.Blocks:
    """The Gradio page: one-image tab (with examples and "Why?") and batch tab (with a CSV download).

    Its API (`gradio_client`, the page's "Use via API"): `/classify` (one image), `/explain` (its reasoning answer)
    and `/classify_batch` (the table and the CSV file)."""
    num_labels = len(classifier.labels) if classifier else None
    examples = example_images(examples_dir, suffixes=classifier.image_suffixes) if classifier else []
    truths = example_truths(examples, classifier.labels) if examples else {}
    with gr.Blocks(title="EmoVLM-KD demo") as demo:
        gr.Markdown(header_markdown(classifier, load_error), elem_id="header")
        with gr.Tab("One image"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Image (upload or pick an example)", sources=["upload", "clipboard"],
                                     type="filepath", height=300, elem_id="input-image")
                    truth = gr.Markdown(elem_id="true-class")
                    error = gr.Markdown(elem_id="image-error")
                    examples_slot = gr.Column()  # filled below, once the outputs exist
                with gr.Column(scale=1):
                    fused = gr.Label(label="Fused decision (gate)", num_top_classes=num_labels, elem_id="fused-label")
                    contribution = gr.HTML(label="Branch contributions to the decision", elem_id="contribution")
                    why = gr.Button("Why? (the VLM's reasoning: one generation, slow)", elem_id="why")
                    why_text = gr.Textbox(label="The VLM's reasoning answer", interactive=False, lines=4,
                                          elem_id="why-text")
                    why_note = gr.Markdown(elem_id="why-note")
            with gr.Row():
                vlm = gr.Label(label="VLM label probabilities (softmax of label log-likelihoods)",
                               num_top_classes=num_labels, elem_id="vlm-label")
                head = gr.Label(label="Distilled head probabilities", num_top_classes=num_labels, elem_id="head-label")
            table = gr.Dataframe(headers=["label", "fused p", "VLM p", "VLM log-likelihood", "head p"],
                                 label="All label scores", interactive=False, elem_id="scores")
            outputs = [fused, contribution, vlm, head, table, truth, error]

            def classify(payload):
                return classify_image(classifier, load_error, payload, truths)

            def clear_results():
                return None, "", None, None, None, "", "", "", ""

            def clear_reasoning():
                return "", ""

            def explain(payload):
                return explain_image(classifier, load_error, payload, max_new_tokens)

            # `upload` (not `change`, which fires twice per upload here) runs once per file. preprocess=False: the
            # handler reads the file itself, so a text or empty file gets a message naming it instead of an
            # exception inside Gradio's image decoding.
            image.upload(classify, inputs=image, outputs=outputs, preprocess=False, api_name="classify")
            image.clear(clear_results, outputs=[*outputs, why_text, why_note], api_visibility="private")
            image.change(clear_reasoning, outputs=[why_text, why_note], api_visibility="private")
            why.click(explain, inputs=image, outputs=[why_text, why_note], preprocess=False, api_name="explain")
            if examples:
                with examples_slot:
                    # Not cached (Spaces would cache by default): the examples run live, like an upload.
                    gr.Examples(examples, inputs=image, outputs=outputs, fn=classify, run_on_click=True,
                                cache_examples=False, preprocess=False, label="Examples (click one)",
                                examples_per_page=len(examples),
                                example_labels=example_captions(examples, classifier.labels))
        with gr.Tab("Batch"):
            files = gr.File(label="Upload several images", file_count="multiple", elem_id="batch-files")
            run = gr.Button("Classify all", variant="primary", elem_id="batch-run")
            results = gr.Dataframe(headers=BATCH_COLUMNS, label="Results", interactive=False, elem_id="batch-table")
            download = gr.File(label="Download the results as CSV (the columns of `predict --output x.csv`)",
                               interactive=False, elem_id="batch-csv")

            def classify_all(payload):
                return classify_batch_download(classifier, load_error, payload)

            run.click(classify_all, inputs=files, outputs=[results, download], preprocess=False,
                      api_name="classify_batch")
    return demo


def space_settings(path: Path | None = None) -> dict:
    """The Space's pinned defaults (`checkpoint`, `revision`, `examples`), or none outside such a Space."""
    path = SPACE_SETTINGS if path is None else path
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("examples"):
        settings["examples"] = str(path.parent / settings["examples"])
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    settings = space_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.environ.get("EMOVLM_CHECKPOINT",
                                                                settings.get("checkpoint", str(DEFAULT_CHECKPOINT))),
                        help="local EmoVLM-KD folder or Hub repo id (env EMOVLM_CHECKPOINT)")
    parser.add_argument("--revision", default=os.environ.get("EMOVLM_REVISION", settings.get("revision")),
                        help="branch, tag or commit hash of a Hub checkpoint (env EMOVLM_REVISION)")
    parser.add_argument("--dtype", default=os.environ.get("EMOVLM_DTYPE", "auto"),
                        help="weights' dtype, a name the checkpoint's loading code takes (auto: bfloat16 on a GPU that "
                             "has it, else float32; env EMOVLM_DTYPE)")
    parser.add_argument("--device-map", default=os.environ.get("EMOVLM_DEVICE_MAP"),
                        help="accelerate device map, e.g. auto (env EMOVLM_DEVICE_MAP)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="load the VLM in 4-bit NF4 with double quantisation, as train predict does (bitsandbytes)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
                        help="address to listen on (env GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                        help="port to listen on (env GRADIO_SERVER_PORT)")
    parser.add_argument("--examples", default=os.environ.get("EMOVLM_EXAMPLES",
                                                              settings.get("examples", str(DEFAULT_EXAMPLES))),
                        help="folder of <label>/<image> examples (env EMOVLM_EXAMPLES)")
    parser.add_argument("--max-new-tokens", type=positive_int,
                        default=int(os.environ.get("EMOVLM_MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS)),
                        help="bound of the \"Why?\" button's reasoning answer, in tokens (env EMOVLM_MAX_NEW_TOKENS, "
                             f"default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--max-file-size", type=file_size,
                        default=file_size(os.environ.get("EMOVLM_MAX_FILE_SIZE", DEFAULT_MAX_FILE_SIZE)),
                        help=f"largest upload accepted, bytes or <n>kb/mb/gb (env EMOVLM_MAX_FILE_SIZE, default "
                             f"{DEFAULT_MAX_FILE_SIZE})")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def file_size(text: str) -> int:
    """argparse type: `20mb`, `512kb`, `1gb` or a byte count, parsed as Gradio parses `max_file_size`."""
    text = text.strip().lower()
    try:
        size = int(text) if text.isdigit() else gr.utils._parse_file_size(text)
    except (ValueError, TypeError, AttributeError):
        size = None
    if not isinstance(size, int) or size < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 20mb, 512kb or 1000000, got {text!r}")
    return size


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    classifier, load_error = None, ""
    try:
        classifier = load_classifier(args.checkpoint, args.revision, args.dtype, args.device_map, args.load_in_4bit)
    except CheckpointError as err:
        # Serve the page anyway (a Space must start) and say what is wrong there and on the console.
        load_error = str(err)
        print(f"app.py: {load_error}", file=sys.stderr)
    demo = build_demo(classifier, load_error, args.examples, args.max_new_tokens)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, show_error=True, css=CSS, max_file_size=args.max_file_size,
        allowed_paths=[args.examples] if args.examples else None,
    )


if __name__ == "__main__":
    main()
