"""Publish a finished run to the Hugging Face Hub with a rendered model card: `python -m train push`.

    python -m train push --run-dir runs/emoset-qwen2-vl-7b --variant emoset --repo-id my-org/emovlm-kd-emoset
    python -m train push --config train/recipes/qwen2-vl-7b/fi.yaml --variant fi --repo-id my-org/emovlm-kd-fi --private
    python -m train push --run-dir runs/demo --variant custom --repo-id me/emovlm-kd-demo --dry-run /tmp/to-upload
    python -m train push --run-dir RUN --variant emoset --repo-id ORG/NAME --space ORG/NAME-demo --example-images a.jpg b.jpg
    python -m train push --run-dir RUN --variant emoset --repo-id ORG/NAME --eval-results eval/fi/results.json

The run's Hub-ready folder (`<run>/final`: safetensors weights, `config.json` with `auto_map`, the remote-code and
processor files, `results.json`, `confusion_matrix.png`) is uploaded with a `README.md` rendered from
`hub_cards/README.md.j2`, the data set's entry of `train/infra/registry.py` and `hub_cards/variants.yaml` (what every card
shares, the `custom` variant). The card's `model-index` carries the
accuracy and macro-F1 measured in the run's `results.json`; a run without results gets a card that says so. Next to
them go `handler.py` (the Inference Endpoints custom handler, from `modeling_emovlm_kd/`), a `requirements.txt`
for the endpoint, and example images under `examples/` that the card's `widget:` shows (`--example-images`, or for
a `custom` run on an image folder the first test image of up to four labels; never automatically for the named
data sets, whose images are their owners'). `--space ORG/NAME-demo` links the card to the Space that
`python -m train push-space` publishes. `--eval-results` (repeatable) adds the results.json of `python -m train
evaluate --model` on this model as a further model-index entry (its data set and split) and uploads it under
`evaluations/`.

Pinning the revision. `trust_remote_code=True` runs the repository's code, so the card's snippets pass `revision=`.
A commit's hash covers every file in it, README.md included, so no card can name the hash of its own commit. A
second commit that writes the first one's hash into README.md would make the push two steps (a failure between
them leaves a card without a pin, and a concurrent push could land between them) and would double the history.
So a push stays one atomic commit: the snippets name the branch pushed to (`revision="main"` or `--revision`),
the card tells the reader to replace it with the commit hash they reviewed (shown on the Hub), and the push prints
the snippet with the new commit's hash. `push-space` resolves and pins that hash in the Space by itself.

Everything is one commit (`create_commit`), so a push is atomic and a push of a new run replaces the previous one
in one step, older revisions staying loadable by their commit hash. The token comes from the usual places
(`HF_TOKEN`, `hf auth login`). `--dry-run DIR` writes exactly the files that would be uploaded into DIR instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jinja2
import yaml
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from train.infra import registry, stage_table
from train.infra import run as run_folder  # the run folder's light readers (no torch)

logger = logging.getLogger(__name__)

# `hub_cards/` sits next to the `train` package, in the source tree as in an installed wheel.
CARDS_DIR = Path(__file__).resolve().parents[2] / "hub_cards"
TEMPLATE_PATH = CARDS_DIR / "README.md.j2"
VARIANTS_PATH = CARDS_DIR / "variants.yaml"
# Display names of results.json's branches, as in `train.infra.evaluation.BRANCHES` (not imported: it loads torch).
BRANCH_TITLES = {"vlm": "VLM alone", "head": "Distilled head", "teacher": "ViT teacher", "fused": "EmoVLM-KD (fused)"}
STAGE_TITLES = {stage.name: stage.title for stage in stage_table.stages() if stage.title}
# Recipe keys that describe logging rather than training; the card leaves them out.
NOT_HYPERPARAMETERS = {"disable_tqdm", "logging_steps", "report_to", "save_steps", "save_strategy", "save_total_limit"}
# The files a folder needs to load with `from_pretrained(..., trust_remote_code=True)`.
REQUIRED_FILES = run_folder.HUB_FOLDER_FILES
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
# Shipped from `modeling_emovlm_kd/` with every push: Inference Endpoints load `EndpointHandler` from it.
HANDLER_FILE = "handler.py"
EXAMPLES_FOLDER = "examples"
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_EXAMPLES, MAX_EXAMPLE_BYTES, DEFAULT_EXAMPLES = 8, 5 * 1024 * 1024, 4


class PublishError(Exception):
    """A problem the user can fix (wrong variant, missing token, ...): the CLI prints it without a traceback."""


# ---- the run's folder ------------------------------------------------------------------------------------------


@dataclass
class HubFolder:
    """A run's Hub-ready folder with its parsed `config.json` and, when the run was evaluated, `results.json`."""

    path: Path
    config: dict
    results: dict | None

    @classmethod
    def load(cls, run_dir: str | Path) -> HubFolder:
        path = find_hub_folder(run_dir)
        config = json.loads((path / "config.json").read_text())
        results_path = path / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else None
        folder = cls(path, config, results)
        folder.check()
        return folder

    @property
    def labels(self) -> list[str]:
        id2label = self.config.get("id2label") or {}
        return [id2label[key] for key in sorted(id2label, key=int)]

    @property
    def recipe(self) -> dict:
        return (self.results or {}).get("recipe") or {}

    def check(self) -> None:
        """Refuse folders that would not load from the Hub, or whose results belong to another label set."""
        if not any((self.path / name).exists() for name in WEIGHTS_FILES):
            raise PublishError(f"{self.path} has no safetensors weights ({' or '.join(WEIGHTS_FILES)}).")
        modules = {ref.split(".")[0] for ref in (self.config.get("auto_map") or {}).values()}
        if not modules:
            raise PublishError(f"{self.path}/config.json has no auto_map: the model would not load with remote code.")
        modules |= {task["impl"].split(".")[0] for task in (self.config.get("custom_pipelines") or {}).values()
                    if isinstance(task, dict) and task.get("impl")}
        missing = sorted(f"{module}.py" for module in modules if not (self.path / f"{module}.py").exists())
        if missing:
            raise PublishError(f"{self.path} lacks the remote-code files {missing} named by config.json's auto_map.")
        # ... and the modules those import relatively (e.g. the modeling file's fast path), which transformers
        # downloads with them.
        imported = set()
        for module in modules:
            imported |= set(re.findall(r"^\s*from \.(\w+) import", (self.path / f"{module}.py").read_text(), re.M))
        missing = sorted(f"{name}.py" for name in imported if not (self.path / f"{name}.py").exists())
        if missing:
            raise PublishError(f"{self.path} lacks the remote-code files {missing} that its modeling code imports.")
        if self.results is not None and self.results.get("labels") != self.labels:
            raise PublishError(f"{self.path}/results.json is for labels {self.results.get('labels')}, but the model "
                               f"predicts {self.labels}: the results belong to another run.")


def find_hub_folder(run_dir: str | Path) -> Path:
    """The Hub-ready folder of a run: `<run_dir>/final`, or `run_dir` itself when it holds a `config.json`."""
    found = run_folder.find_hub_folder(run_dir)
    if found is not None:
        return found
    run_dir = Path(run_dir)
    raise PublishError(f"No Hub-ready folder in {run_dir}: expected {run_dir / 'final'} with config.json and "
                       "weights (`python -m train pipeline` writes it in its export stage).")


def folder_files(folder: Path) -> dict[str, Path]:
    """Files of the folder to upload, by path in the repo: all but hidden files, caches and a stale README."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or relative == "README.md":
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in relative.split("/")):
            continue
        files[relative] = path
    return files


# ---- variants and label sets -----------------------------------------------------------------------------------


def load_variants(path: str | Path = VARIANTS_PATH) -> dict:
    """The cards' metadata: `common` and `label_sets` from `hub_cards/variants.yaml`, and one entry per variant: each
    named data set's card metadata from `train.infra.registry`, plus `custom` (any other data) from the YAML file."""
    data = yaml.safe_load(Path(path).read_text())
    variants = {name: registry.get(name).card() for name in registry.named_datasets()}
    for name, meta in variants.items():
        if meta["label_set"] not in data["label_sets"]:
            raise ValueError(f"Data set {name!r} of train/infra/registry.py has label set {meta['label_set']!r}, which "
                             f"{path} does not describe under label_sets ({sorted(data['label_sets'])}).")
    return {**data, "variants": {**variants, "custom": data["custom"]}}


def package_dir() -> Path:
    """The folder of the `modeling_emovlm_kd` package (found without importing it, which would load torch)."""
    spec = importlib.util.find_spec("modeling_emovlm_kd")
    return Path(next(iter(spec.submodule_search_locations)))


def package_label_sets() -> tuple[dict[str, list[str]], dict[str, str]]:
    """`LABEL_SETS` and `DATASET_LABEL_SETS` of `modeling_emovlm_kd` (imported here: it loads torch)."""
    from modeling_emovlm_kd import DATASET_LABEL_SETS, LABEL_SETS

    return LABEL_SETS, DATASET_LABEL_SETS


def check_variant(variant: str, folder: HubFolder, variants: dict) -> dict:
    """The variant's metadata, after checking that the run fits it: same labels in the same order, same data."""
    if variant not in variants["variants"]:
        raise PublishError(f"Unknown variant {variant!r}; use one of {', '.join(variants['variants'])}.")
    meta = variants["variants"][variant]
    if variant == "custom":
        return meta
    expected = package_label_sets()[0][meta["label_set"]]
    if folder.labels != expected:
        raise PublishError(
            f"The run's labels {folder.labels} are not the {variant} label set {meta['label_set']} {expected} "
            f"(same labels, same order). Train with `labels: {meta['label_set']}` in the recipe, or push with --variant custom."
        )
    kind = str((folder.recipe.get("data") or {}).get("kind", "")).lower()
    if kind in variants["variants"] and kind != variant:
        raise PublishError(f"The run was trained on the {kind!r} data set; pushing it as {variant!r} would name the "
                           f"wrong data set on its card. Use --variant {kind}.")
    return meta


def custom_dataset(recipe: dict, dataset_name: str | None) -> tuple[str | None, str | None]:
    """(name, model-index type) of a custom run's data: `--dataset-name`, else what the recipe says."""
    data = recipe.get("data") or {}
    kind = data.get("kind")
    if kind == "hub":
        source = data.get("name_or_path")
    elif data.get("root") or data.get("root_name"):
        # An absolute root is not published (train/infra/recipe.py: public_recipe); its folder name is.
        source = Path(str(data.get("root") or data["root_name"])).name
    else:
        source = kind
    name = dataset_name or source
    return name, (source or name or "custom")


# ---- example images and the endpoint's files ------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A file or folder name for the repo: letters, digits, `.`, `_` and `-` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def run_examples(folder: HubFolder, limit: int = DEFAULT_EXAMPLES) -> list[tuple[str, Path]]:
    """(title, file): the first test image of each of the first `limit` labels of a run on an image folder.

    Read from the run's own `recipe.yaml` (it holds the data root; results.json's recipe does not), so only a
    folder inside a run (`<run>/final`) with a `root/test/<label>/` layout has them.
    """
    recipe = run_folder.stored_recipe(folder.path.parent) if folder.path.name == "final" else None
    if recipe is None:
        return []
    data = recipe.get("data") or {}
    if str(data.get("kind", "")).lower() != "imagefolder" or not data.get("root"):
        return []
    test = Path(str(data["root"])) / "test"
    examples = []
    for label in folder.labels[:limit]:
        label_dir = test / label
        images = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES) \
            if label_dir.is_dir() else []
        if images:
            examples.append((label, images[0]))
    return examples


def given_examples(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """(title, file) for `--example-images`: image files, or folders whose images are taken in sorted order."""
    examples = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXAMPLE_SUFFIXES)
            if not files:
                raise PublishError(f"--example-images: {path} holds no {'/'.join(EXAMPLE_SUFFIXES)} images.")
        elif path.is_file():
            files = [path]
        else:
            raise PublishError(f"--example-images: {path} does not exist.")
        examples += [(file.stem, file) for file in files]
    return examples


def example_files(examples: list[tuple[str, Path]]) -> dict[str, tuple[str, Path]]:
    """Path in the repo (`examples/<title>/<file>`, the layout app.py reads) -> (title, file), checked."""
    if len(examples) > MAX_EXAMPLES:
        raise PublishError(f"{len(examples)} example images; the card's widget takes at most {MAX_EXAMPLES}.")
    files = {}
    for title, path in examples:
        if path.suffix.lower() not in EXAMPLE_SUFFIXES:
            raise PublishError(f"Example image {path} is not one of {', '.join(EXAMPLE_SUFFIXES)}.")
        if path.stat().st_size > MAX_EXAMPLE_BYTES:
            raise PublishError(f"Example image {path} is over {MAX_EXAMPLE_BYTES // 2**20} MB.")
        in_repo = f"{EXAMPLES_FOLDER}/{safe_name(title)}/{safe_name(path.stem)}{path.suffix.lower()}"
        if in_repo in files:
            raise PublishError(f"Two example images would be uploaded as {in_repo}; rename one.")
        files[in_repo] = (title, path)
    return files


def widget(repo_id: str, branch: str, files: dict[str, tuple[str, Path]], endpoint: str | None = None) -> list[dict]:
    """The card's `widget:` entries: each example image by its URL on the Hub it is pushed to."""
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    return [{"src": f"{endpoint}/{repo_id}/resolve/{quote(branch, safe='')}/{quote(in_repo)}", "example_title": title}
            for in_repo, (title, _) in files.items()]


def endpoint_requirements(min_transformers: str) -> bytes:
    """`requirements.txt` of the repo: what an Inference Endpoint installs before it imports handler.py."""
    return ("# Installed by Hugging Face Inference Endpoints before loading handler.py (the endpoint's image brings\n"
            "# torch). The remote code needs transformers 5.x; this is the oldest version it is tested with.\n"
            f"transformers>={min_transformers}\npillow\n").encode()


def backbone_rows(base_vlm: str | None, teacher: str | None, licences: dict[str, str]) -> list[dict]:
    """The card's backbone table: each base model's name and licence (tiny test runs derive from none)."""
    unknown = "not recorded here: see the model's own card"
    rows = []
    for role, model_id, kind in (("VLM (stages 1-3, at inference)", base_vlm, "Qwen2-VL"),
                                 ("Vision teacher (training only)", teacher, "ViT")):
        if model_id is None:
            rows.append({"role": role, "model": f"tiny random {kind} built from a config (test run)",
                         "url": None, "licence": "none: no released weights were used"})
        else:
            rows.append({"role": role, "model": model_id, "url": f"https://huggingface.co/{model_id}",
                         "licence": licences.get(model_id, unknown)})
    return rows


# ---- the model card --------------------------------------------------------------------------------------------


def format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value) if value else "[]"
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    return str(value)


def stage_rows(recipe: dict) -> list[dict]:
    """Each stage's hyperparameters as given in the recipe the run used (results.json's `recipe`)."""
    stages = []
    for key, title in STAGE_TITLES.items():
        values = recipe.get(key) or {}
        stages.append({"key": key, "title": title, "hyperparameters": [
            (name, format_value(value)) for name, value in values.items() if name not in NOT_HYPERPARAMETERS
        ]})
    return stages


def results_context(results: dict, labels: list[str]) -> dict:
    """The numbers of the card's results table, straight from results.json."""
    validation = results.get("validation") or {}
    rows = []
    for branch, metrics in results["branches"].items():
        val = validation.get(branch) or {}
        rows.append({
            "title": BRANCH_TITLES.get(branch, branch),
            "accuracy": f"{metrics['accuracy']:.4f}", "macro_f1": f"{metrics['macro_f1']:.4f}",
            "validation_accuracy": f"{val['accuracy']:.4f}" if "accuracy" in val else "–",
            "validation_macro_f1": f"{val['macro_f1']:.4f}" if "macro_f1" in val else "–",
        })
    per_class = (results["branches"].get("fused") or {}).get("per_class_accuracy") or []
    return {"split": results.get("split", "test"), "num_examples": results.get("num_examples"), "rows": rows,
            "has_validation": bool(validation),
            "fused_per_class": [(label, f"{value:.3f}") for label, value in zip(labels, per_class)]}


def parameter_counts(results: dict | None) -> dict | None:
    """Parameter counts per part (results.json's `parameters`), with every key the template reads."""
    counts = (results or {}).get("parameters")
    return {key: counts.get(key) for key in ("vlm", "head", "gate", "teacher")} if counts else None


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def stored_dtype(folder: Path) -> str | None:
    """The dtype most of the exported weights' elements are stored in (the VLM's: the head and the gate stay
    float32), read from the safetensors headers; None for a folder without weights."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                size = 1
                for dim in tensor.get_shape():
                    size *= dim
                dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype().lower())
                counts[dtype] = counts.get(dtype, 0) + size
    return max(counts, key=counts.get) if counts else None


def eval_results(results: dict, dataset_name: str, dataset_type: str) -> list[EvalResult]:
    """The model-index entries: the fused model's accuracy and macro-F1 as measured, never typed in."""
    fused = results["branches"]["fused"]
    common = {"task_type": "image-classification", "task_name": "Image Classification", "dataset_name": dataset_name,
              "dataset_type": dataset_type, "dataset_split": results.get("split", "test")}
    return [
        EvalResult(metric_type="accuracy", metric_name="Accuracy", metric_value=fused["accuracy"], **common),
        EvalResult(metric_type="f1", metric_name="Macro F1", metric_value=fused["macro_f1"],
                   metric_args={"average": "macro"}, **common),
    ]


@dataclass
class Evaluation:
    """A results.json of `python -m train evaluate --model` (train/commands/evaluate_model.py) and the data set it names."""

    path: Path
    results: dict
    dataset_name: str
    dataset_type: str

    @property
    def split(self) -> str:
        return self.results.get("split", "test")

    @property
    def path_in_repo(self) -> str:
        return f"evaluations/{safe_name(self.dataset_name)}-{self.split}.json"


def load_evaluations(paths: list[str | Path], folder: HubFolder, variants: dict, variant: str = "custom",
                     dataset_name: str | None = None) -> list[Evaluation]:
    """The further model-index entries, read from evaluation results only: each must be of this model's kind (an
    EmoVLM-KD model with a fused branch, not a zero-shot VLM) and labels, one per data set and split."""
    evaluations, seen = [], {}
    if folder.results is not None:
        name, _ = main_dataset(folder, variants, variant, dataset_name)
        seen[(name, folder.results.get("split", "test"))] = f"{folder.path}/results.json"
    for path in map(Path, paths):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PublishError(f"--eval-results {path}: cannot read it ({err}).") from None
        evaluated = results.get("evaluated") if isinstance(results, dict) else None
        if not isinstance(evaluated, dict) or "branches" not in results:
            raise PublishError(f"--eval-results {path} is not the results.json of `python -m train evaluate "
                               "--model` (it has no `evaluated` description).")
        model = evaluated.get("model") or {}
        if model.get("kind") != "emovlm-kd" or "fused" not in results["branches"]:
            raise PublishError(f"--eval-results {path} holds {model.get('kind', 'unknown')} results of "
                               f"{model.get('name', 'another model')}, not of an EmoVLM-KD model: they do not "
                               "describe the model pushed.")
        if results.get("labels") != folder.labels:
            raise PublishError(f"--eval-results {path} is for labels {results.get('labels')}, but the model "
                               f"predicts {folder.labels}.")
        data = evaluated.get("data") or {}
        kind = str(data.get("kind", "")).lower()
        if kind in variants["variants"] and kind != "custom":
            name, dataset_type = variants["variants"][kind]["dataset"], variants["variants"][kind]["dataset_type"]
        else:
            name, dataset_type = custom_dataset({"data": data}, None)
        evaluation = Evaluation(path, results, name or "custom", dataset_type or "custom")
        key = (evaluation.dataset_name, evaluation.split)
        if key in seen:
            raise PublishError(f"--eval-results {path} and {seen[key]} are both results on {key[0]} [{key[1]}]: "
                               "the card takes one entry per data set and split.")
        seen[key] = str(path)
        evaluations.append(evaluation)
    return evaluations


def main_dataset(folder: HubFolder, variants: dict, variant: str = "custom", dataset_name: str | None = None):
    """(name, model-index type) of the data set the run's own results.json is on."""
    if variant == "custom":
        return custom_dataset(folder.recipe, dataset_name)
    meta = variants["variants"][variant]
    return dataset_name or meta["dataset"], meta["dataset_type"]


def card_eval_results(folder: HubFolder, name: str | None, dataset_type: str | None,
                      evaluations: list[Evaluation] = ()) -> list[EvalResult] | None:
    """The run's own model-index entries, then one per further evaluation; None when there are no results."""
    entries = eval_results(folder.results, name or "custom", dataset_type or "custom") if folder.results else []
    for evaluation in evaluations:
        entries += eval_results(evaluation.results, evaluation.dataset_name, evaluation.dataset_type)
    return entries or None


def build_card(folder: HubFolder, variant: str, repo_id: str, dataset_name: str | None = None,
               variants: dict | None = None, revision: str | None = None, space: str | None = None,
               examples: dict[str, tuple[str, Path]] | None = None,
               evaluations: list[Evaluation] = ()) -> ModelCard:
    """Render `hub_cards/README.md.j2` for a run and a variant; checks the variant fits the run first.

    `revision` is the branch the card is pushed to (its snippets name it; see the module docstring for why not a
    commit hash), `space` the repo id of the demo Space to link, `examples` the uploaded example images
    (`example_files`), shown by the card's widget, `evaluations` further results (`load_evaluations`), one more
    model-index entry each.
    """
    variants = variants or load_variants()
    meta = check_variant(variant, folder, variants)
    common, recipe = variants["common"], folder.recipe
    name, dataset_type = main_dataset(folder, variants, variant, dataset_name)
    base_models = recipe.get("base_models") or {}
    tiny_run = bool(base_models.get("tiny"))
    # A tiny test run derives from no Hub model; naming Qwen2-VL-7B as its base would be false.
    base_vlm = None if tiny_run else base_models.get("vlm", common["base_model"])
    teacher = None if tiny_run else base_models.get("teacher", common["teacher_model"])
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        license=common["license"],
        library_name=common["library_name"],
        pipeline_tag=common["pipeline_tag"],
        base_model=base_vlm,
        tags=list(dict.fromkeys([*common["tags"], *meta.get("tags", []), *([] if not tiny_run else ["test-run"])])),
        eval_results=card_eval_results(folder, name, dataset_type, evaluations),
        **({"widget": widget(repo_id, revision or "main", examples)} if examples else {}),
    )
    label_set = meta["label_set"]
    if variant == "custom":  # a custom run may still use a named set: say which
        named = package_label_sets()[0]
        label_set = next((key for key, labels in named.items() if labels == folder.labels), label_set)
    model_options = [(k, format_value(v)) for k, v in (recipe.get("model") or {}).items()]
    return render_card(
        card_data,
        model_name=model_name,
        repo_id=repo_id,
        dataset_name=name,
        dataset_url=meta.get("dataset_url"),
        dataset_citation=meta.get("citation"),
        licence_note=meta["licence_note"],
        labels=folder.labels,
        label_set=label_set,
        label_set_description=variants["label_sets"][label_set],
        paper=common["paper"],
        base_vlm=base_vlm,
        teacher_model=teacher,
        tiny_run=tiny_run,
        parameters=parameter_counts(folder.results),
        weights_dtype=stored_dtype(folder.path),
        results=results_context(folder.results, folder.labels) if folder.results else None,
        has_confusion_matrix=(folder.path / "confusion_matrix.png").exists(),
        stages=stage_rows(recipe) if recipe else None,
        model_options=model_options,
        revision=revision or "main",
        min_transformers=common["min_transformers"],
        space_url=f"{constants.ENDPOINT.rstrip('/')}/spaces/{space}" if space else None,
        space=space,
        backbones=backbone_rows(base_vlm, teacher, common["backbone_licences"]),
        has_examples=bool(examples),
    )


def render_card(card_data: ModelCardData, template_path: str | Path = TEMPLATE_PATH, **context) -> ModelCard:
    """`ModelCard.from_template`, with `trim_blocks`/`lstrip_blocks` so that the template can be laid out readably."""
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined)
    template = environment.from_string(Path(template_path).read_text(encoding="utf-8"))
    return ModelCard(template.render(card_data=card_data.to_yaml(), **context))


def check_card(card: ModelCard, folder: HubFolder, evaluations: list[Evaluation] = ()) -> None:
    """Parse the rendered card back, as the Hub will, and compare its model-index with results.json (and with the
    further evaluations' results files)."""
    parsed = ModelCard(str(card))
    if evaluations:
        entries = parsed.data.eval_results or []
        found = [(r.dataset_name, r.dataset_split, r.metric_type, r.metric_value) for r in entries]
        measured = [(e.dataset_name, e.split, metric, e.results["branches"]["fused"][key])
                    for e in evaluations for metric, key in (("accuracy", "accuracy"), ("f1", "macro_f1"))]
        if found[len(found) - len(measured):] != measured:
            raise RuntimeError(f"The card's model-index {found} does not end with the evaluations' {measured}.")
        parsed.data.eval_results = entries[:len(entries) - len(measured)] or None  # the run's own, checked below
    if folder.results is None:
        if parsed.data.eval_results:
            raise RuntimeError("A card without results must not carry a model-index.")
        return
    measured = {"accuracy": folder.results["branches"]["fused"]["accuracy"],
                "f1": folder.results["branches"]["fused"]["macro_f1"]}
    found = {result.metric_type: result.metric_value for result in parsed.data.eval_results or []}
    if found != measured:
        raise RuntimeError(f"The card's model-index {found} differs from results.json {measured}.")


# ---- what gets uploaded ----------------------------------------------------------------------------------------


def without_local_paths(data):
    """A config's JSON with every `_name_or_path` that names a local absolute path emptied, at any depth.

    `save_pretrained` records where each (sub-)config was loaded from: for a trained run, a folder of the machine
    (`<run>/sft/merged`). It only informs, loading never reads it, and it must not be published.
    """
    if isinstance(data, dict):
        return {key: "" if key == "_name_or_path" and isinstance(value, str) and (
            os.path.isabs(value) or value.startswith("~")) else without_local_paths(value)
            for key, value in data.items()}
    if isinstance(data, list):
        return [without_local_paths(value) for value in data]
    return data


def published_json(path: Path) -> Path | bytes:
    """A `*.json` file of the folder as uploaded: unchanged, unless it records a local path (then rewritten)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    cleaned = without_local_paths(data)
    if cleaned == data:
        return path
    return (json.dumps(cleaned, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def upload_plan(folder: HubFolder, card: ModelCard, examples: dict[str, tuple[str, Path]] | None = None,
                min_transformers: str | None = None) -> dict[str, Path | bytes]:
    """Path in the repo -> local file or bytes: the folder's files, the endpoint's handler.py and requirements.txt,
    the example images and the rendered README.md, nothing else."""
    plan: dict[str, Path | bytes] = {
        in_repo: published_json(path) if path.suffix == ".json" else path
        for in_repo, path in folder_files(folder.path).items()
    }
    plan[HANDLER_FILE] = package_dir() / HANDLER_FILE
    plan["requirements.txt"] = endpoint_requirements(min_transformers or load_variants()["common"]["min_transformers"])
    plan.update({in_repo: path for in_repo, (_, path) in (examples or {}).items()})
    plan["README.md"] = str(card).encode()
    return dict(sorted(plan.items()))


def write_plan(plan: dict[str, Path | bytes], destination: str | Path) -> Path:
    """Write a plan's files into `destination` (the dry run), refusing a non-empty folder so nothing else mixes in."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise PublishError(f"{destination} is not empty; give --dry-run a new or empty folder.")
    for path_in_repo, source in plan.items():
        target = destination / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copy2(source, target)
    return destination


# ---- talking to the Hub ----------------------------------------------------------------------------------------


def authenticate(api: HfApi) -> dict:
    """`whoami`, turned into messages that say where the token came from and what to do."""
    try:
        user = api.whoami()
    except OfflineModeIsEnabled:
        raise PublishError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push.") from None
    except LocalTokenNotFoundError:
        raise PublishError("No Hugging Face token found: set HF_TOKEN or run `hf auth login` "
                           "(a token with write access, https://huggingface.co/settings/tokens).") from None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise PublishError(f"The Hub at {api.endpoint} rejected the token: {error}".rstrip(".") +
                               ". Set HF_TOKEN to a valid write token or run `hf auth login --force`.") from None
        raise
    role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(f"The token of {user.get('name')} is read-only; pushing needs a token with write access.")
    return user


def push(
    run_dir: str | Path,
    variant: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dataset_name: str | None = None,
    dry_run: str | Path | None = None,
    token: str | None = None,
    space: str | None = None,
    example_images: list[str | Path] | None = None,
    eval_results_files: list[str | Path] | None = None,
):
    """Upload a run's Hub-ready folder and its card in one commit; with `dry_run`, write them there instead.

    `example_images` (files or folders) become the card's widget examples; without them, a `custom` run on an
    image folder contributes its first test images. `eval_results_files` (results.json files of `python -m train
    evaluate --model` on this model) add one model-index entry each and are uploaded under `evaluations/`. Returns the `CommitInfo` of the push, or the dry-run folder.
    """
    folder = HubFolder.load(run_dir)
    if example_images:
        chosen = given_examples(example_images)
    else:
        chosen = run_examples(folder) if variant == "custom" else []
    examples = example_files(chosen)
    evaluations = load_evaluations(eval_results_files or [], folder, load_variants(), variant, dataset_name)
    card = build_card(folder, variant, repo_id, dataset_name, revision=revision, space=space, examples=examples,
                      evaluations=evaluations)
    check_card(card, folder, evaluations)
    plan = upload_plan(folder, card, examples)
    plan.update({evaluation.path_in_repo: published_json(evaluation.path) for evaluation in evaluations})
    if dry_run is not None:
        return write_plan(plan, dry_run)

    api = HfApi(token=token)
    user = authenticate(api)
    branch = revision or "main"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.repo_info(repo_id, revision=branch)
        if private and not info.private:
            logger.warning("%s already exists and is public: --private only applies to new repos.", repo_id)
        operations = mirror_operations(set(api.list_repo_files(repo_id, revision=info.sha)), plan)
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload EmoVLM-KD ({variant}) from {folder.path.parent.name}",
            commit_description=f"Pushed by {user.get('name')} with `python -m train push --variant {variant}`.",
            revision=branch,
            # Fails instead of overwriting if someone pushed since `info`: the deletions above were computed from it.
            parent_commit=info.sha,
        )
    except (RepositoryNotFoundError, HfHubHTTPError) as error:
        raise hub_write_error(error, repo_id, f"{repo_id}@{branch} changed while pushing (someone else pushed); "
                                             "nothing was committed. Run the push again.") from None


def mirror_operations(remote: set[str], plan: dict) -> list:
    """Commit operations that make a repo hold exactly `plan`: a file of an earlier push that this one lacks
    (another shard layout, say) would otherwise be loaded along with the new files. `.gitattributes` belongs to
    the repo, not the run."""
    stale = sorted(remote - set(plan) - {".gitattributes"})
    return [CommitOperationDelete(path) for path in stale] + [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=source if isinstance(source, bytes) else str(source))
        for path, source in plan.items()
    ]


def hub_write_error(error: Exception, target: str, conflict: str) -> Exception:
    """A `PublishError` for what a user can act on (no access, refused write, a concurrent push: `conflict`), or
    the Hub's own error for anything else."""
    if isinstance(error, RepositoryNotFoundError):
        return PublishError(f"Cannot reach {target} with this token: {error}")
    status = error.response.status_code if getattr(error, "response", None) is not None else None
    if status in (401, 403):
        return PublishError(f"The Hub refused to write to {target} (HTTP {status}): {error}")
    if status == 412:
        return PublishError(conflict)
    return error


# ---- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `python -m train push` subcommand's arguments."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="The run's output_dir (or its final/ folder).")
    source.add_argument("--config", help="The run's YAML recipe; its output_dir is the run.")
    parser.add_argument("--variant", required=True, choices=registry.card_variants(),
                        help="Data set the model was trained on; sets the card's metadata and checks the labels.")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--revision", help="Branch to push to (created from main if missing); default main.")
    parser.add_argument("--commit-message", help="Commit title; default names the variant and the run.")
    parser.add_argument("--dataset-name", help="Data set name on the card (custom variant; default from the recipe).")
    parser.add_argument("--space", metavar="ORG/NAME", help="Link the card to this demo Space (`push-space`).")
    parser.add_argument("--example-images", nargs="+", metavar="PATH",
                        help=f"Images (files or folders, at most {MAX_EXAMPLES}) uploaded to examples/ for the "
                             "card's widget; default for a custom run on an image folder: its first test images.")
    parser.add_argument("--eval-results", action="append", metavar="RESULTS_JSON",
                        help="results.json of `python -m train evaluate --model` on this model: one more model-index "
                             "entry (its data set and split); repeat for several.")
    parser.add_argument("--dry-run", metavar="DIR", help="Write the files that would be uploaded into DIR instead.")
    return parser


def run(args: argparse.Namespace) -> None:
    """Run `push` from parsed arguments; user errors exit with status 1 and a message, without a traceback."""
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = (yaml.safe_load(Path(args.config).read_text()) or {}).get("output_dir")
        if not run_dir:
            sys.exit(f"push: error: {args.config} has no output_dir.")
    try:
        result = push(run_dir, args.variant, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message, dataset_name=args.dataset_name, dry_run=args.dry_run,
                      space=args.space, example_images=args.example_images,
                      eval_results_files=args.eval_results)
    except PublishError as error:
        sys.exit(f"push: error: {error}")
    if args.dry_run is not None:
        files = sorted(p for p in Path(result).rglob("*") if p.is_file())
        print(f"Dry run: the {len(files)} files that would be pushed to {args.repo_id} are in {result}:")
        for path in files:
            print(f"  {path.relative_to(result).as_posix():<32} {path.stat().st_size:>12,} bytes")
        return
    print(f"Pushed to {args.repo_id}@{args.revision or 'main'}: commit {result.oid}\n  {result.commit_url}\n"
          f"Load exactly this commit (the card names the branch; pin the hash):\n"
          f"  pipeline('image-classification', model={args.repo_id!r}, revision={result.oid!r}, "
          f"trust_remote_code=True)"
          + (f"\nor follow the branch with revision={args.revision!r}" if args.revision else ""))


__all__ = [
    "HubFolder",
    "PublishError",
    "add_arguments",
    "build_card",
    "example_files",
    "check_variant",
    "find_hub_folder",
    "load_variants",
    "package_label_sets",
    "push",
    "run",
    "upload_plan",
    "write_plan",
]
