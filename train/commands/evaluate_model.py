"""Evaluate any model on any data set: `python -m train evaluate-model --model M --data KIND ...`.

    python -m train evaluate-model --model runs/demo/final --data imagefolder --root data/colours --output-dir eval/demo
    python -m train evaluate-model --model my-org/emovlm-kd-emoset --revision main --data fi --root data/FI \\
        --split-file splits/fi_seed42.json --output-dir eval/emoset-on-fi
    python -m train evaluate-model --model Qwen/Qwen2-VL-7B-Instruct --data emoset --root data/EmoSet-118K \\
        --output-dir eval/qwen2-vl-zero-shot                # zero-shot: the VLM branch only

`--model` is an EmoVLM-KD folder (an exported `final/`) or Hub repo (`--revision` pins it), or a stock Qwen2-VL
checkpoint. A stock VLM is wrapped with `train.infra.assemble.assemble` and scored zero-shot: each label's log-likelihood
after the paper's categorical prompt, no training; its distillation head and gate are untrained, so only the `vlm`
branch is reported. `--data` is any data kind the recipes know; the data options are the recipe's `data` section
(`python -m train recipe --help`), checked the same way. The labels come from the model (EmoVLM-KD: the data must
have the same labels in the same order) or from the data (a stock VLM; `imagefolder` and `hub` data need
`--labels`).

Only the evaluated split is read (`train.infra.data.load_evaluation_split`): a folder with only `test/`, EmoSet with
only `test.json`, a CSV/JSON/parquet or Hub data set with whatever splits it has (`--split` picks one). Data without
a split of its own (a flat `<label>/<image>` folder, FI, ... without `--split-file`, a Hub data set of one split) is
evaluated whole (split `all`); `--split-file` with `--fractions` cuts it instead (`[0,0,1]`: everything in test).

Images stream through the model `--batch-size` at a time; the per-image outputs are cached in `<output-dir>/cache/`
every `--cache-every` images (keyed by the model's and the data's fingerprints), so an interrupted run resumes where
it stopped. `<output-dir>/results.json` holds accuracy, macro-F1 and per-class accuracy of every branch (`vlm`,
`head`, `fused` for an EmoVLM-KD model), and what was evaluated (model, revision, data kind, split, count: no
secrets or local paths); `confusion_matrix.png` shows each branch's confusion matrix. `python -m train push
--eval-results <output-dir>/results.json` adds the numbers to the model's card.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from train.commands.arguments import positive_int

logger = logging.getLogger(__name__)

EMOVLM_KD_MODEL_TYPE = "emovlm_kd"
RESULTS_FILE, FIGURE_FILE, CACHE_DIR = "results.json", "confusion_matrix.png", "cache"
EMOVLM_KD_BRANCHES = ("vlm", "head", "fused")
ZERO_SHOT_BRANCHES = ("vlm",)
WHERE = "python -m train evaluate-model"


class EvaluationError(ValueError):
    """A model, data set or option that cannot be evaluated; the message names it."""


@dataclass
class ModelSource:
    """Where the evaluated model is: a local folder, and how results.json names it (never a local path)."""

    path: Path
    name: str
    revision: str | None = None
    commit: str | None = None

    def public(self) -> dict:
        return {key: value for key, value in
                {"name": self.name, "revision": self.revision, "commit": self.commit}.items() if value is not None}


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """A local folder as it is, or a Hub repo downloaded (`snapshot_download`) at `revision`."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            raise EvaluationError(f"--revision {revision} names a Hub revision, but --model {model} is a local folder.")
        return ModelSource(path, path.resolve().name)
    if path.exists():
        raise EvaluationError(f"--model {model} is a file, not a model folder or Hub repo.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        local = Path(snapshot_download(model, revision=revision))
    except HFValidationError as err:
        raise EvaluationError(f"--model {model} is neither a local folder nor a Hub repo id: {err}") from None
    except Exception as err:  # noqa: BLE001 - not found, no access, offline without a cached copy: say which model
        raise EvaluationError(f"--model {model} (revision {revision or 'main'}) could not be downloaded: "
                              f"{type(err).__name__}: {err}") from None
    # A snapshot folder is named by the commit it holds.
    return ModelSource(local, model, revision or "main", local.name)


def read_model_config(source: ModelSource) -> dict:
    config_path = source.path / "config.json"
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise EvaluationError(f"--model {source.name}: cannot read {config_path.name} ({err}); expected an "
                              "EmoVLM-KD or Qwen2-VL checkpoint folder.") from None


def config_labels(config: dict) -> list[str]:
    id2label = config.get("id2label") or {}
    return [id2label[key] for key in sorted(id2label, key=int)]


# ---- data ------------------------------------------------------------------------------------------------------


def data_option_fields():
    """The recipe's `data` section fields other than `kind`: the command's data options."""
    from train.infra.recipe import DataSection

    return [field for field in dataclasses.fields(DataSection) if field.name != "kind"]


def data_section(kind: str, options: dict) -> dict:
    """The `data` section these options make, checked as a recipe's is (unknown options, wrong types, options of
    another kind, missing required ones: a `RecipeError` naming the option)."""
    from train.infra.recipe import DataSection, _check_data, parse_section

    values = {"kind": kind, **{key: value for key, value in options.items() if value is not None}}
    section, checked = parse_section("data", DataSection, values, where=WHERE)
    _check_data(section, checked, WHERE)
    return checked


def load_split(data: dict, split: str | None, labels: list[str] | None):
    """(split name, split) of the data set `data` describes (a `data` section), through `load_evaluation_split`:
    only that split is read, whatever splits the data set has (None: its test split, or all of data without
    splits)."""
    from train.infra import registry
    from train.infra.data import load_evaluation_split

    options = dict(data)
    kind = options.pop("kind")
    if not registry.get(kind).named:
        if labels is None:
            raise EvaluationError(f"--data {kind} needs --labels (a label set name or a comma-separated list) to "
                                  "evaluate a stock VLM: the labels fix the class order.")
        options["labels"] = labels
    try:
        return load_evaluation_split(kind, split, **options)
    except (ValueError, OSError) as err:  # a missing root or file, a bad layout or label: one line naming it
        message = str(err).rstrip(".")
        known = f"; the model's labels are {labels}" if labels is not None and "label" in message.lower() else ""
        raise EvaluationError(f"--data {kind}: {message}{known}.") from None


# ---- the model's outputs ---------------------------------------------------------------------------------------


def load_model(source: ModelSource, config: dict, labels: list[str], dtype: str, device: str):
    """(model, image processor, branches): an EmoVLM-KD checkpoint as users load it (remote code), or a stock VLM
    wrapped by `assemble` for these labels."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from train.commands.predict import loading_kwargs

    kwargs = loading_kwargs(device, dtype=dtype)
    if config.get("model_type") == EMOVLM_KD_MODEL_TYPE:
        model = AutoModelForImageClassification.from_pretrained(source.path, trust_remote_code=True, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(source.path, trust_remote_code=True)
        branches = EMOVLM_KD_BRANCHES
    else:
        from train.infra.assemble import assemble

        try:
            model, processor = assemble(source.path, labels, dtype=kwargs["dtype"])
            processor.prompt_token_ids()  # labels that do not tokenize apart after the prompt: fail before scoring
        except (ValueError, OSError, KeyError) as err:
            raise EvaluationError(f"--model {source.name} cannot be scored zero-shot on labels {labels}: "
                                  f"{type(err).__name__}: {err}") from None
        image_processor = processor.image_processor
        branches = ZERO_SHOT_BRANCHES
    model.to(device).eval()
    return model, image_processor, branches


def score_batch(model, image_processor, images) -> dict:
    """Logits `(batch, C)` of each branch for a list of images: `vlm` (label scores), `head`, `fused`."""
    import torch

    with torch.inference_mode():
        return _score_batch(model, image_processor, images)


def _score_batch(model, image_processor, images) -> dict:
    device = model.get_input_embeddings().weight.device
    inputs = image_processor(images, return_tensors="pt").to(device)
    out = model(**inputs)
    return {"vlm": out.vlm_logits.float().cpu(), "head": out.head_logits.float().cpu(),
            "fused": out.logits.float().cpu()}


def chunk_fingerprint(model_fingerprint: str, dataset_fingerprint: str, settings: dict, start: int, stop: int) -> str:
    text = json.dumps({"model": model_fingerprint, "data": dataset_fingerprint, "settings": settings,
                       "rows": [start, stop]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def branch_outputs(model, image_processor, dataset, branches, cache_dir: Path, fingerprints: tuple[str, str],
                   settings: dict, batch_size: int, cache_every: int) -> tuple[dict, object]:
    """Every branch's logits over `dataset` and its labels, `batch_size` images at a time, stored in `cache_dir`
    every `cache_every` images (`train.stages.features.cached`: atomic, checked against the fingerprint on reading)."""
    import torch
    from tqdm.auto import tqdm

    from train.stages.features import cached

    chunk = max(batch_size, cache_every // batch_size * batch_size)
    parts = []
    with tqdm(total=len(dataset), desc="Evaluating", unit="image") as progress:
        for start in range(0, len(dataset), chunk):
            stop = min(start + chunk, len(dataset))

            def build(start=start, stop=stop):
                outputs, labels = {branch: [] for branch in branches}, []
                for first in range(start, stop, batch_size):
                    rows = dataset[first:min(first + batch_size, stop)]  # only these images are decoded
                    scores = score_batch(model, image_processor, rows["image"])
                    for branch in branches:
                        outputs[branch].append(scores[branch])
                    labels.extend(rows["label"])
                    progress.update(len(rows["label"]))
                return {**{branch: torch.cat(parts) for branch, parts in outputs.items()},
                        "labels": torch.tensor(labels)}

            done = progress.n
            part = cached(cache_dir / f"rows-{start:09d}-{stop:09d}.safetensors",
                          chunk_fingerprint(*fingerprints, settings, start, stop), build)
            progress.update(stop - start - (progress.n - done))  # a chunk read from the cache
            parts.append(part)
    logits = {branch: torch.cat([part[branch] for part in parts]) for branch in branches}
    return logits, torch.cat([part["labels"] for part in parts])


# ---- the command -----------------------------------------------------------------------------------------------


def evaluate_model(model: str, data: dict, output_dir: str | Path, split: str | None = None,
                   revision: str | None = None,
                   labels=None, batch_size: int = 8, cache_every: int = 256, dtype: str = "auto",
                   device: str | None = None, force: bool = False) -> dict:
    """Evaluate `model` on a split of the data set `data` describes (a recipe `data` section); returns and writes
    results.json. `split`: `train`, `validation`, `test` or `all`; None: test, or all of data without splits. See
    the module docstring."""
    import torch

    from modeling_emovlm_kd import resolve_label_set
    from train.infra.evaluation import evaluate_branches, format_table, plot_confusion_matrices
    from train.infra.files import write_json_atomic
    from train.infra.locks import exclusive
    from train.infra.recipe import public_recipe
    from train.stages.features import data_fingerprint, model_fingerprint

    output_dir = Path(output_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model(model, revision)
    config = read_model_config(source)
    given = resolve_label_set(labels) if labels is not None else None
    emovlm_kd = config.get("model_type") == EMOVLM_KD_MODEL_TYPE
    if emovlm_kd:
        model_labels = config_labels(config)
        if given is not None and given != model_labels:
            raise EvaluationError(f"--labels {given} differ from the labels of the model {source.name}: "
                                  f"{model_labels}.")
        given = model_labels
    split, dataset = load_split(data, split, given)
    data_labels = dataset.features["label"].names
    if emovlm_kd and data_labels != model_labels:
        raise EvaluationError(f"The model {source.name} predicts the labels {model_labels}, but the data set "
                              f"(--data {data['kind']}) has the labels {data_labels}: they must be the same labels "
                              "in the same order.")
    with exclusive(output_dir / ".evaluate.lock", f"The evaluation folder {output_dir}"):
        cache_dir = output_dir / CACHE_DIR
        if force:
            shutil.rmtree(cache_dir, ignore_errors=True)
        net, image_processor, branches = load_model(source, config, data_labels, dtype, device)
        settings = {"branches": list(branches), "labels": data_labels, "dtype": str(net.dtype),
                    "kind": "emovlm-kd" if emovlm_kd else "zero-shot"}
        logits, references = branch_outputs(
            net, image_processor, dataset, branches, cache_dir,
            (model_fingerprint(source.path), data_fingerprint(dataset)), settings, batch_size, cache_every)
        results = evaluate_branches(logits, references, data_labels)
        results["split"] = split
        results["evaluated"] = {
            "model": {**source.public(), "kind": settings["kind"]},
            "data": public_recipe({"data": data})["data"],
            "split": split,
            "num_examples": len(dataset),
            "computed_with": {"dtype": str(net.dtype).removeprefix("torch."), "device": torch.device(device).type,
                              "batch_size": batch_size},
        }
        write_json_atomic(results, output_dir / RESULTS_FILE)
        plot_confusion_matrices(results, output_dir / FIGURE_FILE)
    print(f"{source.name} on {data['kind']} [{split}], {len(dataset)} images:\n{format_table(results)}\n"
          f"Written: {output_dir / RESULTS_FILE}, {output_dir / FIGURE_FILE}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `python -m train evaluate-model` (also those of its alias `evaluate --model`)."""
    add_model_arguments(parser)
    parser.add_argument("--output-dir", help="Folder of results.json, confusion_matrix.png and the resumable cache.")
    parser.add_argument("--force", action="store_true", help="Drop the cache and score every image again.")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the data and how to score: what `evaluate-model` and `verify --model` share."""
    from train.infra import registry
    from train.infra.data import ALL, SPLITS

    group = parser.add_argument_group("evaluate any model (instead of --config)")
    group.add_argument("--model", help="EmoVLM-KD folder or Hub repo, or a stock Qwen2-VL folder or repo "
                                       "(zero-shot).")
    group.add_argument("--revision", help="Hub revision (branch, tag or commit) of --model.")
    group.add_argument("--data", choices=registry.names(), help="Data set kind (the recipe's data.kind).")
    group.add_argument("--split", choices=[*SPLITS, ALL],
                       help="Split to evaluate: the data set's own, or cut by --split-file (zero --fractions shares "
                            "are fine); `all`: every image. Default: test, or all of data without splits (a flat "
                            "<label>/<image> folder, a named set without --split-file, a Hub data set of one split).")
    group.add_argument("--labels", help="Label set name or comma-separated labels (imagefolder/hub data with a stock "
                                        "VLM; an EmoVLM-KD model brings its own).")
    group.add_argument("--batch-size", type=positive_int, default=8, help="Images per forward pass (default 8).")
    group.add_argument("--cache-every", type=positive_int, default=256,
                       help="Cache the outputs every this many images, so an interrupted run resumes (default 256).")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="dtype of the VLM (auto: bf16 on a GPU that has it, else float32).")
    group.add_argument("--device", help="cuda, cpu, ... (default: cuda when available).")
    options = parser.add_argument_group("data options (the recipe's data section, see `python -m train recipe --help`)")
    for field in data_option_fields():
        options.add_argument(f"--{field.name.replace('_', '-')}", dest=f"data_{field.name}",
                             metavar=field.name.upper(), help=field.metadata.get("help"))


def data_from_args(args: argparse.Namespace) -> tuple[dict, list[str] | str | None]:
    """The checked `data` section and the `--labels` of parsed `add_arguments` options (`RecipeError` naming a bad
    option). Lists and mappings (fractions, load_kwargs) are YAML, as in `--set`; other options are taken as written."""
    import yaml

    text_fields = {"root", "split_file", "label_file", "image_dir", "name_or_path", "image_column", "label_column"}
    options = {}
    for field in data_option_fields():
        value = getattr(args, f"data_{field.name}")
        if value is not None:
            options[field.name] = value if field.name in text_fields else yaml.safe_load(value)
    labels = args.labels.split(",") if args.labels and "," in args.labels else args.labels
    return data_section(args.data, options), labels


def main(args: argparse.Namespace) -> int:
    """`python -m train evaluate-model`: user errors exit with status 2 and a message, without a traceback."""
    from train.infra.locks import LockedError
    from train.infra.recipe import RecipeError

    if not args.data or not args.output_dir:
        print("error: evaluate-model needs --data KIND and --output-dir DIR.", file=sys.stderr)
        return 2
    try:
        data, labels = data_from_args(args)
        evaluate_model(args.model, data, args.output_dir, split=args.split,
                       revision=args.revision, labels=labels, batch_size=args.batch_size,
                       cache_every=args.cache_every, dtype=args.dtype, device=args.device, force=args.force)
    except (EvaluationError, RecipeError, LockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["EvaluationError", "add_arguments", "add_model_arguments", "data_from_args", "evaluate_model", "main",
           "resolve_model", "score_batch"]
