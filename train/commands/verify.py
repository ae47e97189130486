"""Check that a run's saved models are the ones its numbers describe: `python -m train verify RUN_DIR`.

    python -m train verify runs/demo
    python -m train verify --model runs/demo/final --data imagefolder --root train/demo_data/fashion_mnist_sample
    python -m train verify --model my-org/emovlm-kd-emoset --revision <commit sha> --data emoset --root data/EmoSet-118K

`RUN_DIR` (a finished run): every stage's saved artefact is reloaded the way a user loads it and what the run
records is computed again:

- the provenance chain: each stage's recorded `inputs` are the `provenance` of the markers it read, and its recorded
  settings are the stored recipe's;
- the feature caches' fingerprints, from the stage-1 model, the teacher and the data as they are now;
- the validation accuracy each stage recorded (`stage_done.json`): the teacher's from its saved folder
  (`AutoModelForImageClassification`) on the validation images, the head's and the gate's from their safetensors on
  the cached features;
- `results.json`'s per-branch tables of the test and validation splits from the caches (and which validation numbers
  it marks in-sample: the fused model's when stage 3 fitted the gate on validation), and the VLM's, head's and fused model's
  from `final/` itself (loaded with `from_pretrained`, as a user loads it, in the dtype the run recorded);
- `final/`: its weights' SHA-256 is the one the export recorded, its head and gate are stage 2's and stage 3's, its
  `results.json` is the evaluation's.

`--model FOLDER_OR_REPO --data KIND ...` (the data options of `python -m train evaluate --model`): the numbers a
published model carries (`results.json` in the folder and, with a model card, its model-index) against the model
evaluated again on that data (`train/commands/evaluate_model.py`).

It prints a table of recorded and recomputed values with the tolerance of each. Accuracies and macro-F1 must agree
exactly (tolerance 0) when recomputed on the same kind of machine in the same dtype: other CPUs and GPUs run other
float kernels (bf16 above all), which can flip a near-tie; `--tolerance` then states the accepted difference.
Exit status: 0 when every check agrees, 1 when any differs, 2 when the run or the model cannot be read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from train import STAGES


@dataclass
class Check:
    """One recorded value and the value computed again. `tolerance` None: the two must be equal (hashes,
    fingerprints, provenance); a number: they may differ by at most that much."""

    name: str
    recorded: object
    recomputed: object
    tolerance: float | None = None
    note: str = ""

    @property
    def agrees(self) -> bool:
        if self.recorded is None or self.recomputed is None:
            return False
        if self.tolerance is None:
            return self.recorded == self.recomputed
        try:
            return abs(float(self.recorded) - float(self.recomputed)) <= self.tolerance
        except (TypeError, ValueError):
            return False


def _show(value) -> str:
    if value is None:
        return "(not recorded)"
    if isinstance(value, float):
        return f"{value:.10g}"  # enough digits to show a difference in float32 rounding
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_checks(checks: list[Check]) -> str:
    """A Markdown table: check, recorded, recomputed, tolerance, agrees."""
    lines = ["| check | recorded | recomputed | tolerance | agrees |", "|---|---|---|---|---|"]
    for check in checks:
        tolerance = "equal" if check.tolerance is None else f"{check.tolerance:g}"
        if check.note:
            tolerance += f" ({check.note})"
        lines.append(f"| {check.name} | {_show(check.recorded)} | {_show(check.recomputed)} | {tolerance} | "
                     f"{'yes' if check.agrees else '**NO**'} |")
    return "\n".join(lines)


def _guarded(name: str, recorded, compute: Callable[[], list[Check]]) -> list[Check]:
    """The checks `compute` returns, or one failing check naming what could not be recomputed and why."""
    try:
        return compute()
    except Exception as err:  # noqa: BLE001 - a file that does not load is a finding, reported in the table
        return [Check(name, recorded, f"error: {type(err).__name__}: {' '.join(str(err).split())}")]


def _tensors_digest(tensors: dict) -> str:
    """SHA-256 over named tensors (names, dtypes, shapes, bytes), independent of the file they are stored in."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _folder_tensors(folder: Path, prefix: str) -> dict:
    """The tensors of a model folder (one file or shards) whose names start with `prefix`, prefix removed."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    tensors[key[len(prefix):]] = handle.get_tensor(key)
    return tensors


# ---- a run ------------------------------------------------------------------------------------------------------


def provenance_checks(run, markers: dict) -> list[Check]:
    """Each marker's recorded inputs are the provenance of the markers it read (`markers`: each stage's, as read
    once by `verify_run`); its settings are the recipe's."""
    from train.infra import stage_table
    from train.infra.provenance import current_names, settings_hash, stage_settings

    checks = []
    for stage in STAGES:
        marker = markers[stage]
        if marker is None:
            checks.append(Check(f"{stage}/stage_done.json", None, "missing"))
            continue
        # Recorded settings under their current key names (`provenance.RENAMED`), as the pipeline compares them.
        checks.append(Check(f"{stage}: settings (hash) are the recipe's",
                            settings_hash(current_names(marker.get("settings") or {})),
                            settings_hash(stage_settings(run.recipe.as_set, stage))))
        reads = stage_table.get(stage).reads
        if reads:
            recorded = {up: (marker.get("inputs") or {}).get(up) for up in reads}
            current = {up: (markers[up] or {}).get("provenance") for up in reads}
            checks.append(Check(f"{stage}: read {', '.join(reads)} (provenance)",
                                _Keyed(recorded) if all(recorded.values()) else None, _Keyed(current)))
    return checks


class _Keyed(dict):
    """A dict of provenance ids shown abbreviated in the table."""

    def __str__(self) -> str:
        return ", ".join(f"{key}={str(value)[:6]}" for key, value in self.items())


def cache_checks(run) -> list[Check]:
    """Each split's cache was built from the stage-1 model, the teacher and the data as they are now."""
    from train.stages.features import cache_fingerprint, model_fingerprint, read_fingerprint

    vlm_key = model_fingerprint(run.stage_dir("sft") / "merged")
    teacher_key = model_fingerprint(run.stage_dir("teacher"))
    return [Check(f"features/{split}.safetensors: fingerprint", read_fingerprint(run.feature_path(split)),
                  cache_fingerprint(vlm_key, teacher_key, run.data[split], run.fused_config.pooling))
            for split in ("train", "validation", "test")]


def teacher_validation_accuracy(run, device: str) -> tuple[float, str]:
    """The saved teacher's accuracy on the validation images, preprocessed, batched and in the precision its stage
    evaluated it (float32, or bf16/fp16 autocast when the stage trained so), and that precision."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from train.stages.teacher import image_transform

    folder = run.stage_dir("teacher")
    model = AutoModelForImageClassification.from_pretrained(folder).to(device).eval()
    dataset = run.data["validation"].with_transform(
        image_transform(AutoImageProcessor.from_pretrained(folder), False, 1.0))
    args = run.recipe.teacher  # the stage's typed config, as it ran
    batch_size = args.per_device_eval_batch_size
    half = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    correct = 0
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None):
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            logits = model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    precision = "float32" if half is None else f"{str(half).removeprefix('torch.')} autocast"
    return correct / len(dataset), f"{precision} on {device}"


def _accuracy_and_note(result: tuple[float, str]) -> tuple[float, float, str]:
    """(recomputed, tolerance 0, note) of an accuracy recomputed in a stated precision."""
    return result[0], 0.0, result[1]


def stage_accuracy_checks(run, markers: dict, device: str) -> list[Check]:
    """The validation accuracy the teacher, distill and gate markers record, recomputed from the saved files."""
    from train.stages.trainer_utils import accuracy

    validation = run.features("validation")
    recorded = {stage: (markers.get(stage) or {}).get("best_validation_accuracy")
                for stage in ("teacher", "distill", "gate")}
    return [
        *_guarded("teacher/: validation accuracy", recorded["teacher"], lambda: [Check(
            "teacher/: validation accuracy (teacher/stage_done.json)", recorded["teacher"],
            *_accuracy_and_note(teacher_validation_accuracy(run, device)))]),
        *_guarded("distill/head.safetensors: validation accuracy", recorded["distill"], lambda: [Check(
            "distill/head.safetensors: validation accuracy (distill/stage_done.json)", recorded["distill"],
            accuracy(run.head_logits("validation"), validation["labels"]), 0.0)]),
        *_guarded("gate/gate.safetensors: validation accuracy", recorded["gate"], lambda: [Check(
            "gate/gate.safetensors: validation accuracy (gate/stage_done.json)", recorded["gate"],
            accuracy(run.fused_logits(run.gate_inputs("validation")), validation["labels"]), 0.0)]),
    ]


def _branch_checks(source: str, recorded: dict, recomputed: dict, branches, tolerance: float, note: str = ""):
    checks = []
    for branch in branches:
        for metric in ("accuracy", "macro_f1"):
            checks.append(Check(f"results.json {branch} {metric} ({source})",
                                ((recorded.get("branches") or {}).get(branch) or {}).get(metric),
                                recomputed["branches"][branch][metric], tolerance, note))
    return checks


def results_from_caches(run, gate_marker: dict | None) -> list[Check]:
    """`results.json`'s test and validation tables computed again from the caches, the head and the gate, and its
    mark of the validation numbers that are in-sample (the gate fitted on validation: stage 3's marker)."""
    from train.infra.evaluation import evaluate_branches, validation_in_sample

    recorded = run.results()
    recomputed = evaluate_branches(*run.branch_logits("test"), run.labels)
    validation = evaluate_branches(*run.branch_logits("validation"), run.labels)
    in_sample = validation_in_sample(gate_marker)
    return [Check("results.json num_examples (test split)", recorded.get("num_examples"),
                  recomputed["num_examples"]),
            *_branch_checks("caches", recorded, recomputed, recomputed["branches"], 0.0),
            *_branch_checks("caches, validation split", {"branches": recorded.get("validation")}, validation,
                            validation["branches"], 0.0),
            Check("results.json validation_in_sample (gate/stage_done.json fit_on)",
                  recorded.get("validation_in_sample", {} if not in_sample else None), in_sample, None,
                  "" if "validation_in_sample" in recorded or not in_sample else
                  "not marked: rerun `python -m train evaluate --force`, then `python -m train export`")]


def load_final(folder: Path, computed_with: dict, device: str):
    """`final/` as a user loads it (`from_pretrained`, remote code), in the dtype its numbers were computed in."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from train.commands.predict import loading_kwargs

    dtype = computed_with.get("dtype") or "auto"
    if computed_with.get("load_in_4bit"):
        kwargs = loading_kwargs(device, dtype=None if dtype == "auto" else dtype, load_in_4bit=True)
    else:
        # "auto": the dtype the weights were saved in, the one the caches ran the VLM in.
        kwargs = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, **kwargs)
    if not computed_with.get("load_in_4bit"):
        model.to(device)
    return model.eval(), AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)


def final_checks(run, markers: dict, device: str, tolerance: float) -> list[Check]:
    """`final/` is the exported model (weights hash, head, gate, results.json), and its own predictions on the test
    images give `results.json`'s VLM, head and fused numbers."""
    from safetensors.torch import load_file

    from train.commands.evaluate_model import EMOVLM_KD_BRANCHES, branch_outputs
    from train.infra.evaluation import evaluate_branches
    from train.infra.files import weights_sha256
    from train.stages.features import data_fingerprint, model_fingerprint

    final = run.output_dir / "final"
    recorded = run.results()
    checks = [
        Check("final/: weights SHA-256 (export/stage_done.json)", (markers.get("export") or {}).get("weights_sha256"),
              weights_sha256(final)),
        Check("final/: distillation head is distill/head.safetensors",
              _tensors_digest(load_file(run.stage_dir("distill") / "head.safetensors")),
              _tensors_digest(_folder_tensors(final, "distillation_head."))),
        Check("final/: gate is gate/gate.safetensors", _tensors_digest(load_file(run.stage_dir("gate") /
                                                                                 "gate.safetensors")),
              _tensors_digest(_folder_tensors(final, "gate."))),
        Check("final/results.json is evaluate/results.json", _Digest(recorded) if recorded else None,
              _Digest(json.loads((final / "results.json").read_text())) if (final / "results.json").is_file()
              else None),
    ]
    computed_with = recorded.get("computed_with") or {}
    model, image_processor = load_final(final, computed_with, device)
    dataset = run.data["test"]
    batch_size = run.recipe.model.feature_batch_size  # the caches' batches
    with tempfile.TemporaryDirectory(prefix="emovlm-verify-") as cache_dir:
        logits, labels = branch_outputs(model, image_processor, dataset, EMOVLM_KD_BRANCHES, Path(cache_dir),
                                        (model_fingerprint(final), data_fingerprint(dataset)), {"verify": True},
                                        batch_size, cache_every=max(batch_size, len(dataset)))
    recomputed = evaluate_branches(logits, labels, run.labels)
    dtype = str(model.dtype).removeprefix("torch.") + (", 4-bit" if computed_with.get("load_in_4bit") else "")
    note = f"{dtype} on {device}, as recorded" + ("" if tolerance == 0 else ", stated by --tolerance")
    return checks + _branch_checks("final/ on the test images", recorded, recomputed, EMOVLM_KD_BRANCHES,
                                   tolerance, note)


class _Digest:
    """A JSON document compared by content and shown by a short hash of it."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Digest) and self.value == other.value

    def __str__(self) -> str:
        return "sha256 " + hashlib.sha256(json.dumps(self.value, sort_keys=True).encode()).hexdigest()[:12]


def verify_run(run_dir: str | Path, device: str | None = None, tolerance: float = 0.0) -> list[Check]:
    """Every check of a finished run (see the module docstring)."""
    import torch

    from train.infra.provenance import read_marker
    from train.infra.run import open_run

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = open_run(run_dir)
    markers = {stage: read_marker(run.stage_dir(stage)) for stage in STAGES}
    return [
        *provenance_checks(run, markers),
        *_guarded("feature caches: fingerprints", None, lambda: cache_checks(run)),
        *_guarded("stage accuracies", None, lambda: stage_accuracy_checks(run, markers, device)),
        *_guarded("results.json from the caches", None, lambda: results_from_caches(run, markers.get("gate"))),
        *_guarded("final/", None, lambda: final_checks(run, markers, device, tolerance)),
    ]


# ---- a published model --------------------------------------------------------------------------------------------


def card_metrics(folder: Path, split: str) -> dict[str, float]:
    """The fused model's accuracy and macro-F1 in the folder's model card (model-index), first entry of each for
    `split` (the run's own results; later entries are further evaluations), or {} without a card."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    from huggingface_hub import ModelCard

    found = {}
    for result in ModelCard.load(card).data.eval_results or []:
        if result.dataset_split in (None, split) and result.metric_type in ("accuracy", "f1"):
            found.setdefault(result.metric_type, result.metric_value)
    return found


def verify_model(model: str, data: dict, split: str | None = None, revision: str | None = None, labels=None,
                 dtype: str = "auto", device: str | None = None, output_dir: str | Path | None = None,
                 batch_size: int = 8, cache_every: int = 256, tolerance: float = 0.0) -> list[Check]:
    """A published model's recorded numbers (results.json, model card) against the model evaluated again."""
    from train.commands.evaluate_model import EMOVLM_KD_BRANCHES, EvaluationError, evaluate_model, resolve_model

    source = resolve_model(model, revision)
    results_path = source.path / "results.json"
    if not results_path.is_file():
        raise EvaluationError(f"--model {source.name} has no results.json: it records no numbers to verify.")
    recorded = json.loads(results_path.read_text())
    split = split or recorded.get("split") or "test"  # by default, the split the recorded numbers are on
    if recorded.get("split", split) != split:
        raise EvaluationError(f"--model {source.name}'s results.json is on the {recorded['split']!r} split, not "
                              f"--split {split}.")
    recorded_kind = ((recorded.get("recipe") or {}).get("data") or {}).get("kind")
    if recorded_kind and recorded_kind != data["kind"]:
        raise EvaluationError(f"--model {source.name}'s results.json was computed on --data {recorded_kind}, not "
                              f"{data['kind']}.")
    computed_with = recorded.get("computed_with") or {}
    if dtype == "auto" and computed_with.get("dtype") not in (None, "auto"):
        dtype = computed_with["dtype"]
    with tempfile.TemporaryDirectory(prefix="emovlm-verify-") as scratch:
        results = evaluate_model(model, data, output_dir or scratch, split=split, revision=revision, labels=labels,
                                 batch_size=batch_size, cache_every=cache_every, dtype=dtype, device=device)
    used = results["evaluated"]["computed_with"]
    note = f"{used['dtype']} on {used['device']}" + ("" if tolerance == 0 else ", stated by --tolerance")
    checks = [Check(f"results.json num_examples ({split} split)", recorded.get("num_examples"),
                    results["num_examples"])]
    checks += _branch_checks(f"{source.name} on --data {data['kind']}", recorded, results,
                             [b for b in EMOVLM_KD_BRANCHES if b in results["branches"]], tolerance, note)
    card, fused = card_metrics(source.path, split), results["branches"]["fused"]
    if card:  # a folder with a model card: its model-index carries the fused model's numbers
        for metric, key in (("accuracy", "accuracy"), ("f1", "macro_f1")):
            checks.append(Check(f"README.md model-index fused {metric}", card.get(metric), fused[key], tolerance,
                                note))
    return checks


# ---- the command ----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from train.commands.evaluate_model import add_model_arguments

    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="A finished run folder to verify.")
    add_model_arguments(parser)
    parser.add_argument("--output-dir", help="--model: keep the recomputed outputs here (resumable; default: a "
                                             "temporary folder).")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="Accepted difference of accuracies and macro-F1 recomputed from a model (default 0: "
                             "the same machine and dtype; state it when verifying on another kind of machine).")


def _refuse(message: str):
    print(f"verify: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(args: argparse.Namespace) -> int:
    """`python -m train verify`: prints the table; exits 1 when a check differs, 2 when nothing can be verified."""
    from train.commands.evaluate_model import EvaluationError, data_from_args
    from train.infra.recipe import RecipeError
    from train.infra.run import RunFolderError

    if (args.run_dir is None) == (args.model is None):
        _refuse("give a run folder (RUN_DIR) or --model FOLDER_OR_REPO --data KIND, not both.")
    if args.tolerance < 0:
        _refuse(f"--tolerance must not be negative, got {args.tolerance}.")
    try:
        if args.run_dir is not None:
            what = f"run {args.run_dir}"
            checks = verify_run(args.run_dir, device=args.device, tolerance=args.tolerance)
        else:
            if not args.data:
                _refuse("--model needs --data KIND (and the data's options).")
            data, labels = data_from_args(args)
            what = f"model {args.model} on --data {args.data}" + (f" [{args.split}]" if args.split else "")
            checks = verify_model(args.model, data, split=args.split, revision=args.revision, labels=labels,
                                  dtype=args.dtype, device=args.device, output_dir=args.output_dir,
                                  batch_size=args.batch_size, cache_every=args.cache_every, tolerance=args.tolerance)
    except (RunFolderError, EvaluationError, RecipeError) as err:
        _refuse(str(err))
    print(f"\nVerifying {what}: recorded values against values computed again from the saved files.\n")
    print(format_checks(checks))
    failed = [check for check in checks if not check.agrees]
    if failed:
        print(f"\n{len(failed)} of {len(checks)} checks differ: " + "; ".join(check.name for check in failed))
        sys.exit(1)
    print(f"\nAll {len(checks)} checks agree.")
    return 0


__all__ = ["Check", "add_arguments", "format_checks", "main", "verify_model", "verify_run"]
