"""All stages in order, from a YAML recipe: base models -> instruction answers -> stage 1 (SFT) -> teacher -> feature caches -> stage 2
(distillation) -> stage 3 (gate) -> evaluation -> Hub-ready folder.

The recipe is validated as a whole before anything runs (`train/infra/recipe.py`). A finished stage leaves
`<output_dir>/<stage>/stage_done.json` with the settings it used and the stages it read (`train/infra/provenance.py`): on
rerun it is skipped if neither changed, and rerun (with everything downstream) if either did. An interrupted stage
resumes from its last `Trainer` checkpoint when its settings are unchanged. One process at a time works on a run
folder (`<output_dir>/.lock`). Runs under `torchrun`/`accelerate launch` too: `Trainer` stages use all processes,
the other stages run on the main process while the others wait.

    python -m train pipeline --config recipes/tiny/demo.yaml
    python -m train pipeline --config recipes/qwen2-vl-7b/emoset.yaml --set sft.per_device_train_batch_size=2
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    set_seed,
)

from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDDistillationHead
from modeling_emovlm_kd.fusion import gate_from_config, head_from_config
from train import STAGES
from train.infra.assemble import assemble, load_processor, save_hub_folder
from train.infra.evaluation import evaluate_branches, format_table, plot_confusion_matrices
from train.infra.files import weights_sha256, write_json_atomic
from train.infra.locks import exclusive
from train.infra.provenance import DONE, STAGE_INPUTS, STARTED, changed_keys, new_marker, read_marker, stage_settings
from train.infra.recipe import ModelSection, Recipe, load_recipe, public_recipe, save_recipe, validate_recipe
from train.infra.run import Run
from train.infra.tiny import build_tiny_base_models
from train.stages.distill import DistillationConfig, train_distillation
from train.stages.features import (
    cache_fingerprint,
    cached,
    compute_teacher_logits,
    compute_vlm_features,
    model_fingerprint,
)
from train.stages.gate import GateConfig, train_gate
from train.stages.instructions import LocalVLMGenerator, OpenAIChatGenerator
from train.stages.sft import SFTStageConfig, train_sft
from train.stages.teacher import TeacherConfig, train_teacher
from train.stages.trainer_utils import last_complete_checkpoint

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FAILED = "stage_failed.json"


class StageError(RuntimeError):
    """A stage cannot run: what it needs is missing or out of date."""


class Pipeline:
    """The stages of one run, sharing its validated recipe, output folder, data and label set."""

    def __init__(self, recipe: Recipe | dict):
        self.spec = recipe if isinstance(recipe, Recipe) else validate_recipe(recipe)
        self.recipe = self.spec.raw
        self.output_dir = self.spec.output_dir
        self.seed = self.spec.seed
        self.folder = Run(self.spec)  # the run folder's layout; `read()` opens its artefacts
        self.labels = self.folder.labels
        self.state = PartialState(cpu=not torch.cuda.is_available())

    # ---- shared pieces ---------------------------------------------------------------------------------

    def read(self) -> Run:
        """A reader of the run folder as it is now (`train/infra/run.py`): one per stage, so that a stage reads what the
        stages before it have just written, each file once."""
        return Run(self.spec)

    def stage_dir(self, stage: str) -> Path:
        return self.folder.stage_dir(stage)

    def is_done(self, stage: str) -> bool:
        return self.folder.is_done(stage)

    # ---- provenance ------------------------------------------------------------------------------------

    def settings(self, stage: str) -> dict:
        return stage_settings(self.recipe, stage)

    def current_inputs(self, stage: str) -> dict[str, str | None]:
        """The `provenance` of each stage `stage` reads, as their markers say now."""
        return {up: (read_marker(self.stage_dir(up)) or {}).get("provenance") for up in STAGE_INPUTS[stage]}

    def stale_reason(self, stage: str) -> str | None:
        """Why `stage` must (re)run, or None when its marker matches the recipe and its inputs."""
        marker = read_marker(self.stage_dir(stage))
        if marker is None:
            return "it has not finished"
        if "settings" not in marker:
            return "it was recorded without its settings (an older version of this project)"
        changes = changed_keys(marker["settings"], self.settings(stage))
        if changes:
            return "its settings changed: " + "; ".join(changes)
        recorded = marker.get("inputs") or {}
        for up, provenance in self.current_inputs(stage).items():
            if provenance is None or recorded.get(up) != provenance:
                return f"its input stage {up!r} was rerun or changed"
        return None

    def check_inputs_fresh(self, stage: str) -> None:
        """Raise `StageError` unless every stage upstream of `stage` is finished and up to date."""
        for up in STAGE_INPUTS[stage]:
            self.check_inputs_fresh(up)
            reason = self.stale_reason(up)
            if reason:
                raise StageError(
                    f"Stage {stage!r} reads stage {up!r}, which is out of date in {self.output_dir}: {reason}. "
                    f"Run `python -m train {up}` (and what follows) or the whole pipeline first."
                )

    def mark_done(self, stage: str, **info) -> None:
        if self.state.is_main_process:
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            marker = new_marker(stage, self.settings(stage), self.current_inputs(stage), **info)
            write_json_atomic(marker, self.stage_dir(stage) / DONE)
            (self.stage_dir(stage) / STARTED).unlink(missing_ok=True)
        self.state.wait_for_everyone()

    def start_stage(self, stage: str) -> None:
        """Clear what must not be reused, then record what this execution of the stage is computed from.

        A finished stage that reruns starts afresh (its old checkpoints hold the old settings' result); so does an
        interrupted one whose settings or inputs have changed since. An interrupted one with the same settings and
        inputs keeps its checkpoints and resumes."""
        stage_dir = self.stage_dir(stage)
        started = {"settings": self.settings(stage), "inputs": self.current_inputs(stage)}
        previous = read_marker(stage_dir, STARTED)
        fresh_start = self.is_done(stage) or (
            stage_dir.exists() and (previous is None or {k: previous.get(k) for k in started} != started))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            if fresh_start and stage_dir.exists():
                shutil.rmtree(stage_dir)
            write_json_atomic(started, stage_dir / STARTED)
        self.state.wait_for_everyone()

    def require(self, stage: str) -> Path:
        return self.folder.require(stage)

    @cached_property
    def data(self):
        """The recipe's data set (`Run.data`), loaded once per pipeline."""
        return self.folder.data

    @property
    def base_models(self) -> dict[str, str]:
        models = self.spec.sections["base_models"]
        if models.tiny:
            root = self.require("base")
            return {"vlm": str(root / "vlm"), "teacher": str(root / "teacher")}
        return {"vlm": models.vlm, "teacher": models.teacher}

    def stage_args(self, stage: str, config_class, **fixed):
        """The stage's `TrainingArguments` from its recipe section. A tracker (`report_to`) names the stage's run
        `<run>/<stage>` (`run_name`, unless the recipe sets one; `<run>` is the run folder's name); W&B also groups a
        run's stages (`WANDB_RUN_GROUP`, unless set). TensorBoard writes under `<output_dir>/<stage>/runs/`."""
        values = {"seed": self.seed, "run_name": f"{self.output_dir.name}/{stage}", **self.recipe.get(stage, {}),
                  **fixed}
        args = config_class(output_dir=str(self.stage_dir(stage)), **values)
        if "wandb" in args.report_to:
            os.environ.setdefault("WANDB_RUN_GROUP", self.output_dir.name)
        return args

    def model_kwargs(self) -> dict:
        """The fused model's config options the recipe sets."""
        return self.folder.model_kwargs()

    def processor_kwargs(self) -> dict:
        """The prompts and resolution bounds the recipe sets (`train.infra.assemble.load_processor`'s options)."""
        return self.spec.sections["model"].processor_kwargs(self.recipe.get("model") or {})

    def check_labels(self) -> None:
        """The checks that need the base VLM's tokenizer (labels that tokenize apart after the prompt), at the start
        of a run instead of at the stage that first scores labels."""
        vlm = self.base_models["vlm"]
        processor = load_processor(vlm, self.labels, **self.processor_kwargs())
        try:
            processor.prompt_token_ids()
        except ValueError as err:
            raise StageError(f"{self.spec.source}: labels {self.labels} cannot be scored with {vlm}'s tokenizer: "
                             f"{err}") from err

    def resume(self, stage: str):
        return last_complete_checkpoint(self.stage_dir(stage))

    # ---- stages ----------------------------------------------------------------------------------------

    def run_base(self) -> None:
        """Tiny offline base models (only for recipes with `base_models.tiny: true`)."""
        if self.spec.sections["base_models"].tiny and self.state.is_main_process:
            build_tiny_base_models(self.stage_dir("base"), self.labels, seed=self.seed)
        self.mark_done("base")

    @property
    def answers_cache(self) -> Path:
        # Outside the stage's folder: a rerun of the stage (new settings) keeps the answers already paid for.
        return self.output_dir / "answers.jsonl"

    def run_instructions(self) -> None:
        """The conversation/reasoning answers stage 1 trains on, generated before any training starts.

        Only the main process works (concurrent, rate-limited, retried, resumable through the answer cache). The
        other ranks do not wait in a collective, which would time out after `timeout` (30 min by default) over an
        hours-long generation: they poll for this stage's marker file (`stage_done.json`, or `stage_failed.json`
        when the main process failed), then meet the main process at the barrier of `mark_done`, which is reached
        at once. Categorical-only kinds, or `generator: none`, need no endpoint: the stage is done at once (with
        `none`, stage 1 reads whatever the cache holds and stops if answers are missing)."""
        from train.stages.instructions import GENERATED_KINDS, build_instruction_dataset

        spec = self.spec.sections["instructions"]
        kinds = [k for k in self.spec.sections["sft"].instruction_kinds if k in GENERATED_KINDS]
        info = {}
        if self.state.is_main_process:  # a failure of an earlier attempt must not stop the waiting ranks
            (self.stage_dir("instructions") / FAILED).unlink(missing_ok=True)
        self.state.wait_for_everyone()  # instant: every rank is here; the long wait below is no collective
        if self.state.is_main_process:
            try:
                if kinds and spec.generator != "none":
                    processor = load_processor(self.base_models["vlm"], self.labels, **self.processor_kwargs())
                    _, summary = build_instruction_dataset(
                        self.data["train"], processor, kinds=kinds, generator=self.answer_generator(),
                        cache_path=self.answers_cache, num_workers=spec.workers(), return_summary=True)
                    info = {"cached": summary.cached, "generated": summary.generated, "failed": summary.num_failed,
                            "answers_naming_label": summary.answers_naming_label,
                            "failures": str(summary.failures_path)}
            except BaseException as err:
                write_json_atomic({"error": f"{type(err).__name__}: {err}"}, self.stage_dir("instructions") / FAILED)
                raise
        else:
            self._wait_for_marker("instructions")
        self.mark_done("instructions", **info)

    def _wait_for_marker(self, stage: str, poll: float = 2.0) -> None:
        """Wait, without any collective, until the main process has finished (or failed) `stage`."""
        stage_dir = self.stage_dir(stage)
        while not (stage_dir / DONE).exists():
            failed = read_marker(stage_dir, FAILED)
            if failed is not None:
                raise StageError(f"Stage {stage!r} failed on the main process: {failed.get('error')}")
            time.sleep(poll)

    def run_sft(self) -> None:
        set_seed(self.seed)
        args = self.stage_args("sft", SFTStageConfig, model_name_or_path=self.base_models["vlm"])
        # The answers come from stage `instructions` (already run): every rank reads the same cache and leaves out
        # the same failed rows. The recipe's prompts, the ones the caches and the export score after (unset: the
        # paper's wording), and its resolution bounds, saved with the merged model's processor for every later stage.
        generated = self.spec.sections["instructions"].generator != "none"  # none: every answer must be cached
        train_sft(self.data, self.labels, args, answers_cache=self.answers_cache,
                  resume_from_checkpoint=self.resume("sft"), skip_missing=generated, **self.processor_kwargs())
        self.mark_done("sft")

    def answer_generator(self):
        spec = self.spec.sections["instructions"]
        if spec.generator == "openai":
            return OpenAIChatGenerator(**spec.generator_kwargs())
        if spec.generator == "local":
            processor = load_processor(self.base_models["vlm"], self.labels, **self.processor_kwargs())
            return LocalVLMGenerator(self.base_models["vlm"], processor, **spec.generator_kwargs())
        return None

    def run_teacher(self) -> None:
        set_seed(self.seed)
        args = self.stage_args("teacher", TeacherConfig, teacher_model_name_or_path=self.base_models["teacher"])
        trainer = train_teacher(self.data, self.labels, args, resume_from_checkpoint=self.resume("teacher"))
        self.mark_done("teacher", best_validation_accuracy=trainer.state.best_metric)

    def feature_path(self, split: str) -> Path:
        return self.folder.feature_path(split)

    def run_features(self) -> None:
        """Pooled visual features, VLM label scores and teacher logits of every split, computed once.

        Under several processes each rank computes a contiguous shard (`split_between_processes`), the shards are
        gathered in rank order (`gather_object`) and the main process stores the cache atomically.
        """
        merged, teacher_dir = self.require("sft") / "merged", self.require("teacher")
        options: ModelSection = self.spec.sections["model"]
        device_map = {"": self.state.device} if torch.cuda.is_available() else None
        model, processor = assemble(merged, self.labels, load_in_4bit=options.load_in_4bit, dtype=options.dtype,
                                    device_map=device_map, **{**self.model_kwargs(), **self.processor_kwargs()})
        teacher = AutoModelForImageClassification.from_pretrained(teacher_dir)
        teacher.to(model.vlm.get_input_embeddings().weight.device)
        teacher_processor = AutoImageProcessor.from_pretrained(teacher_dir)
        batch_size, workers = options.feature_batch_size, options.preprocess_workers
        vlm_key, teacher_key = model_fingerprint(merged), model_fingerprint(teacher_dir)
        for split in SPLITS:
            dataset = self.data[split]
            fingerprint = cache_fingerprint(vlm_key, teacher_key, dataset, model.config.pooling)

            def build(dataset=dataset):
                # Every rank runs this (or none: they all find the same stored cache), so the gather is collective.
                with self.state.split_between_processes(dataset) as shard:
                    vlm = compute_vlm_features(model, processor.image_processor, shard, batch_size, workers)
                    teacher_out = compute_teacher_logits(teacher, teacher_processor, shard, batch_size * 4, workers)
                if not torch.equal(vlm["labels"], teacher_out["labels"]):
                    raise RuntimeError("VLM and teacher passes saw the data in different orders.")
                part = {**vlm, "teacher_logits": teacher_out["teacher_logits"]}
                if self.state.num_processes == 1:
                    return part
                parts = gather_object([part])
                return {key: torch.cat([p[key] for p in parts]) for key in part}

            cached(self.feature_path(split), fingerprint, build, store=self.state.is_main_process)
            self.state.wait_for_everyone()
        self.mark_done("features")

    def new_head(self, config: EmoVLMKDConfig, seed: int | None = None) -> EmoVLMKDDistillationHead:
        """Stage 2's head before training: the config's, initialised as the model's, seeded by the stage's seed
        (`distill.seed`, the run's seed unless the recipe sets it)."""
        torch.manual_seed(self.seed if seed is None else seed)
        return head_from_config(config)

    def run_distill(self) -> None:
        run = self.read()
        args = self.stage_args("distill", DistillationConfig)
        set_seed(args.seed)
        head, trainer = train_distillation(self.new_head(run.fused_config, args.seed), run.features("train"),
                                           run.features("validation"), args,
                                           resume_from_checkpoint=self.resume("distill"))
        if self.state.is_main_process:
            save_file(head.state_dict(), self.stage_dir("distill") / "head.safetensors")
        self.mark_done("distill", best_validation_accuracy=trainer.state.best_metric)

    def run_gate(self) -> None:
        run = self.read()
        config = run.fused_config
        # The stage's seed (`gate.seed`, the run's unless the recipe sets it) seeds the gate's initial weights too:
        # the seed spread and the ablations vary it per child run.
        args = self.stage_args("gate", GateConfig)
        set_seed(args.seed)
        gate = gate_from_config(config)
        gate, trainer = train_gate(gate, config.gate_vlm_signal, run.gate_inputs("train"),
                                   run.gate_inputs("validation"), args, resume_from_checkpoint=self.resume("gate"),
                                   head_signal=config.gate_head_signal)
        if self.state.is_main_process:
            save_file(gate.state_dict(), self.stage_dir("gate") / "gate.safetensors")
        self.mark_done("gate", best_validation_accuracy=trainer.state.best_metric)

    def run_evaluate(self) -> None:
        if self.state.is_main_process:
            run = self.read()
            results = {}
            for split in ("validation", "test"):
                results[split] = evaluate_branches(*run.branch_logits(split), self.labels)
            results["test"]["split"] = "test"
            results["test"]["validation"] = results["validation"]["branches"]
            # What may leave the machine (results.json goes into `final/`, the report and the model card).
            results["test"]["recipe"] = public_recipe(self.recipe, self.output_dir)
            results["test"]["parameters"] = run.parameter_counts()
            # How the numbers were computed: the exported model runs its VLM in this dtype (4-bit: load it so).
            options: ModelSection = self.spec.sections["model"]
            results["test"]["computed_with"] = {"dtype": options.dtype, "load_in_4bit": options.load_in_4bit}
            write_json_atomic(results["test"], self.stage_dir("evaluate") / "results.json")
            plot_confusion_matrices(results["test"], self.stage_dir("evaluate") / "confusion_matrix.png")
        self.mark_done("evaluate")

    def run_export(self) -> None:
        """The fused model with the trained head and gate, as a Hub-ready folder with results and figures."""
        info = {}
        if self.state.is_main_process:
            # The VLM in the dtype the feature caches were computed in (results.json's numbers are this model's);
            # the head and the gate stay float32 (`_keep_in_fp32_modules_strict`).
            options: ModelSection = self.spec.sections["model"]
            model, processor = assemble(self.require("sft") / "merged", self.labels, dtype=options.dtype,
                                        **{**self.model_kwargs(), **self.processor_kwargs()})
            run = self.read()
            model.distillation_head.load_state_dict(run.trained_head.state_dict())
            model.gate.load_state_dict(run.trained_gate.state_dict())
            final = save_hub_folder(model, processor, self.output_dir / "final",
                                    max_shard_size=options.export_max_shard_size)
            for name in ("results.json", "confusion_matrix.png"):
                shutil.copy2(self.require("evaluate") / name, final / name)
            info["weights_sha256"] = weights_sha256(final)  # what `python -m train verify` checks final/ against
        self.mark_done("export", folder=str(self.output_dir / "final"), **info)

    # ---- driver ----------------------------------------------------------------------------------------

    def lock(self):
        """The run folder's lock, one per process of a `torchrun` job (two jobs on one folder fail at once)."""
        rank = self.state.process_index
        return exclusive(self.output_dir / (".lock" if rank == 0 else f".lock.rank{rank}"),
                         f"Run folder {self.output_dir}")

    def run(self, stages=STAGES, force: bool = False) -> dict:
        """Run `stages` in order, skipping each that is up to date (unless `force`).

        Given all stages (the pipeline), a stage reruns when its settings or an input changed. Given a subset (a
        single-stage command), the stages it reads must already be finished and up to date."""
        with ExitStack() as stack:
            stack.enter_context(self.lock())
            if self.state.is_main_process:
                save_recipe(self.spec, self.output_dir / "recipe.yaml")
            checked = False
            for stage in stages:
                if stage != "base" and not checked:
                    self.check_labels()
                    checked = True
                self.check_inputs_fresh(stage)  # in a whole pipeline, the stages before have just been brought up to date
                reason = self.stale_reason(stage)
                if reason is None and not force:
                    logger.info("Stage %s already finished; skipping.", stage)
                    continue
                logger.info("Stage %s runs: %s.", stage, reason or "--force")
                self.start_stage(stage)
                getattr(self, f"run_{stage}")()
        return self.folder.results()


def child_pipeline(parent: Recipe, folder: Path, overrides: dict[str, dict], shared: Sequence[str],
                   where: str) -> Pipeline:
    """The pipeline of `parent` with recipe `overrides` (section -> values) in a child run folder `folder` that links
    the parent's `shared` stages (symbolic links): the child runs the other stages itself, on the parent's caches,
    with provenance and resume like any run. Used by the seed spread and the ablations."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in shared:
        link, target = folder / stage, parent.output_dir / stage
        if link.is_symlink() or link.exists():
            if link.is_symlink() and os.readlink(link) == os.path.relpath(target, folder):
                continue
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            else:
                link.unlink()
        if target.exists():
            link.symlink_to(os.path.relpath(target, folder), target_is_directory=True)
    recipe = copy.deepcopy(parent.raw)
    recipe["output_dir"] = str(folder)
    for section, values in overrides.items():
        recipe[section] = {**(recipe.get(section) or {}), **values}
    return Pipeline(validate_recipe(recipe, where=where))


def print_results(results: dict) -> None:
    if results:
        print(f"\nHeld-out {results['split']} split ({results['num_examples']} images):\n")
        print(format_table(results))


__all__ = ["STAGES", "Pipeline", "StageError", "child_pipeline", "load_recipe", "print_results"]
