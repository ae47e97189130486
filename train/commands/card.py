"""The model card of a run's Hub-ready folder: the README.md that `python -m train push` uploads.

The card is rendered from `hub_cards/README.md.j2` with the data set's entry of `train/infra/registry.py` and
`hub_cards/variants.yaml` (what every card shares, the `custom` variant). The variant is checked against the run
first (same labels in the same order, same data set). The card's results table and `model-index` carry the accuracy
and macro-F1 measured in the run's `results.json` (a run without results gets a card that says so); each
`--eval-results` file (`python -m train evaluate-model` on this model) adds one more model-index entry; the example
images uploaded with the model become the card's `widget:`. The rendered card is parsed back as the Hub parses it,
and its model-index compared with the results files, before anything is uploaded.

The card's snippets name the branch pushed to, not a commit hash: `train/commands/publish.py` says why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants

from train.configs.base_models import DEFAULT_TEACHER, DEFAULT_VLM
from train.infra import registry, stage_table
from train.infra import run as run_folder  # the run folder's light readers (no torch)
from train.infra.evaluation import branch_name, vlm_name

# `hub_cards/` sits next to the `train` package, in the source tree as in an installed wheel.
CARDS_DIR = Path(__file__).resolve().parents[2] / "hub_cards"
TEMPLATE_PATH = CARDS_DIR / "README.md.j2"
VARIANTS_PATH = CARDS_DIR / "variants.yaml"
STAGE_TITLES = {stage.name: stage.title for stage in stage_table.stages() if stage.title}
# Recipe keys that describe logging rather than training; the card leaves them out.
NOT_HYPERPARAMETERS = {"disable_tqdm", "logging_steps", "report_to", "save_steps", "save_strategy", "save_total_limit"}
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")


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

    @property
    def vlm_type(self) -> str | None:
        """The wrapped VLM's `model_type` (`qwen2_vl`, ...), which names its family on the card."""
        return (self.config.get("vlm_config") or {}).get("model_type")

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


# ---- the model card --------------------------------------------------------------------------------------------


def widget(repo_id: str, branch: str, files: dict[str, tuple[str, Path]], endpoint: str | None = None) -> list[dict]:
    """The card's `widget:` entries: each example image by its URL on the Hub it is pushed to."""
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    return [{"src": f"{endpoint}/{repo_id}/resolve/{quote(branch, safe='')}/{quote(in_repo)}", "example_title": title}
            for in_repo, (title, _) in files.items()]


def backbone_rows(base_vlm: str | None, teacher: str | None, licences: dict[str, str],
                  vlm_type: str | None = None) -> list[dict]:
    """The card's backbone table: each base model's name and licence (tiny test runs derive from none)."""
    unknown = "not recorded here: see the model's own card"
    rows = []
    for role, model_id, kind in (("VLM (stages 1-3, at inference)", base_vlm, vlm_name(vlm_type)),
                                 ("Vision teacher (training only)", teacher, "ViT")):
        if model_id is None:
            rows.append({"role": role, "model": f"tiny random {kind} built from a config (test run)",
                         "url": None, "licence": "none: no released weights were used"})
        else:
            rows.append({"role": role, "model": model_id, "url": f"https://huggingface.co/{model_id}",
                         "licence": licences.get(model_id, unknown)})
    return rows


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


def results_context(results: dict, labels: list[str], vlm_type: str | None = None) -> dict:
    """The numbers of the card's results table, straight from results.json."""
    validation = results.get("validation") or {}
    in_sample = results.get("validation_in_sample") or {}
    rows = []
    for branch, metrics in results["branches"].items():
        val = validation.get(branch) or {}
        mark = " (in-sample)" if branch in in_sample else ""
        rows.append({
            "title": branch_name(branch, vlm_type),
            "accuracy": f"{metrics['accuracy']:.4f}", "macro_f1": f"{metrics['macro_f1']:.4f}",
            "validation_accuracy": f"{val['accuracy']:.4f}{mark}" if "accuracy" in val else "–",
            "validation_macro_f1": f"{val['macro_f1']:.4f}{mark}" if "macro_f1" in val else "–",
        })
    per_class = (results["branches"].get("fused") or {}).get("per_class_accuracy") or []
    fused = in_sample.get("fused") or {}
    cross_validated = fused.get("cross_validated_accuracy")
    return {"split": results.get("split", "test"), "num_examples": results.get("num_examples"), "rows": rows,
            "has_validation": bool(validation), "fused_in_sample": bool(fused),
            "fused_cross_validated": f"{cross_validated:.4f}" if cross_validated is not None else None,
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
    """A results.json of `python -m train evaluate-model` (train/commands/evaluate_model.py) and the data set it names."""

    path: Path
    results: dict
    dataset_name: str
    dataset_type: str

    @property
    def split(self) -> str:
        return self.results.get("split", "test")


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
            raise PublishError(f"--eval-results {path} is not the results.json of `python -m train evaluate-model` "
                               "(it has no `evaluated` description).")
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
    base_vlm = None if tiny_run else base_models.get("vlm", DEFAULT_VLM)
    teacher = None if tiny_run else base_models.get("teacher", DEFAULT_TEACHER)
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
        vlm_name=vlm_name(folder.vlm_type),
        teacher_model=teacher,
        tiny_run=tiny_run,
        parameters=parameter_counts(folder.results),
        weights_dtype=stored_dtype(folder.path),
        results=results_context(folder.results, folder.labels, folder.vlm_type) if folder.results else None,
        has_confusion_matrix=(folder.path / "confusion_matrix.png").exists(),
        stages=stage_rows(recipe) if recipe else None,
        model_options=model_options,
        revision=revision or "main",
        min_transformers=common["min_transformers"],
        space_url=f"{constants.ENDPOINT.rstrip('/')}/spaces/{space}" if space else None,
        space=space,
        backbones=backbone_rows(base_vlm, teacher, common["backbone_licences"], folder.vlm_type),
        has_examples=bool(examples),
    )



def render_template(path: str | Path, **context) -> str:
    """A `hub_cards/` Jinja template, with `trim_blocks`/`lstrip_blocks` so that it can be laid out readably, and
    every variable required (`StrictUndefined`)."""
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined)
    return environment.from_string(Path(path).read_text(encoding="utf-8")).render(**context)


def render_card(card_data: ModelCardData, template_path: str | Path = TEMPLATE_PATH, **context) -> ModelCard:
    """`ModelCard.from_template`, through `render_template`."""
    return ModelCard(render_template(template_path, card_data=card_data.to_yaml(), **context))


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


__all__ = [
    "CARDS_DIR",
    "Evaluation",
    "HubFolder",
    "PublishError",
    "build_card",
    "check_card",
    "check_variant",
    "find_hub_folder",
    "load_evaluations",
    "load_variants",
    "package_label_sets",
    "render_template",
    "widget",
]
