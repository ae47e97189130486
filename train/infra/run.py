"""Reading a run folder: its stage folders, feature caches, fused config, trained head and gate, each branch's
logits, parameter counts and results. The pipeline writes a run; everything that reads one (the pipeline's own
later stages, the report, the ablations, the seed spread, publishing) reads it through `Run`.

A `Run` loads what it is asked for once: the feature caches per split, the stage-1 config, the head and the gate
weights. It reads the folder as it is when first asked, so a stage that rewrites its files is read by a new `Run`
(the pipeline opens one per stage).

    run = open_run("runs/demo")
    logits, labels = run.branch_logits("test")

`find_hub_folder` and `stored_recipe` read no tensors and import neither torch nor the model package (publishing
uses them without either).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import torch

    from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDDistillationHead, EmoVLMKDFusion
    from train.infra.recipe import Recipe

SPLITS = ("train", "validation", "test")
DONE = "stage_done.json"  # = provenance.DONE, the marker of a finished stage
RESULTS = Path("evaluate") / "results.json"
# What a Hub-ready folder needs (publish checks the rest): a config and weights.
HUB_FOLDER_FILES = ("config.json",)
# The ablations a run folder may hold, as `<run>/ablations/<what>.{md,json,png}` (written by `train/commands/ablate.py`).
ABLATION_TITLES = {
    "depth": "Head depth (paper Table 3)",
    "alpha": "Distillation weight α (paper Figure 3)",
    "gate": "Gate variants (paper Table 4)",
    "gate-data": "Rows the gate is fitted on (gate.fit_on: train, the paper's, or validation)",
}
ABLATIONS = tuple(ABLATION_TITLES)


class RunFolderError(FileNotFoundError):
    """A run folder lacks what was asked of it; the message names the file and the command that writes it."""


# ---- light readers (no torch) --------------------------------------------------------------------------------


def stored_recipe(run_dir: str | Path) -> dict | None:
    """The recipe a run stored (`<run>/recipe.yaml`, with its data root and secrets redacted as saved), or None."""
    path = Path(run_dir) / "recipe.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def find_hub_folder(run_dir: str | Path) -> Path | None:
    """The Hub-ready folder of a run: `<run_dir>/final`, or `run_dir` itself when it holds a `config.json`."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "final", run_dir):
        if all((candidate / name).is_file() for name in HUB_FOLDER_FILES):
            return candidate
    return None


def ablation_files(run_dir: str | Path, what: str) -> dict[str, Path]:
    """Where the ablation `what` of a run is (or will be) written: its `md`, `json` and `png`."""
    folder = Path(run_dir) / "ablations"
    return {kind: folder / f"{what}.{kind}" for kind in ("md", "json", "png")}


def ablation_fingerprint(run_dir: str | Path, what: str) -> str | None:
    """The run fingerprint (`Run.fingerprint`) an ablation was computed on, or None when it was not run."""
    path = ablation_files(run_dir, what)["json"]
    return json.loads(path.read_text()).get("run_fingerprint") if path.exists() else None


def read_results(run_dir: str | Path) -> dict:
    """`<run>/evaluate/results.json`, or `{}` before the run was evaluated."""
    path = Path(run_dir) / RESULTS
    return json.loads(path.read_text()) if path.exists() else {}


# ---- the run -------------------------------------------------------------------------------------------------


class Run:
    """One run folder, read through its validated recipe (see the module docstring)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.output_dir = recipe.output_dir
        self.seed = recipe.seed
        self.labels = recipe.labels
        self._features: dict[str, dict[str, torch.Tensor]] = {}
        self._head_logits: dict[str, torch.Tensor] = {}

    # ---- the folder ------------------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / DONE).exists()

    def require(self, stage: str) -> Path:
        if not self.is_done(stage):
            raise RunFolderError(
                f"Stage {stage!r} has not finished in {self.output_dir}; run `python -m train {stage}` "
                "or the whole pipeline first."
            )
        return self.stage_dir(stage)

    def feature_path(self, split: str) -> Path:
        return self.stage_dir("features") / f"{split}.safetensors"

    def model_kwargs(self) -> dict:
        """The fused model's config options the recipe sets."""
        return self.recipe.model_kwargs()

    def results(self) -> dict:
        return read_results(self.output_dir)

    @cached_property
    def data(self):
        """The recipe's data set (`DatasetDict` of train/validation/test), with the recipe's labels checked."""
        from train.infra.data import load_dataset_from_config

        kind, data = self.recipe.data_options()
        dataset = load_dataset_from_config(kind, **data)
        names = dataset["train"].features["label"].names
        if names != self.labels:
            raise ValueError(f"The data set's labels {names} differ from the recipe's {self.labels}.")
        return dataset

    # ---- what the stages wrote, each loaded once ---------------------------------------------------------

    @cached_property
    def fused_config(self) -> EmoVLMKDConfig:
        """The fused model's config: stage 1's VLM config with the recipe's labels and model options."""
        from transformers import AutoConfig

        from modeling_emovlm_kd import EmoVLMKDConfig

        vlm_config = AutoConfig.from_pretrained(self.require("sft") / "merged")
        return EmoVLMKDConfig.from_label_set(self.labels, vlm_config=vlm_config.to_dict(), **self.model_kwargs())

    def features(self, split: str) -> dict[str, torch.Tensor]:
        """The split's feature cache: `visual_features`, `vlm_logits`, `teacher_logits`, `labels`."""
        if split not in self._features:
            from safetensors.torch import load_file

            self.require("features")
            self._features[split] = load_file(self.feature_path(split))
        return self._features[split]

    def _load(self, module, stage: str, name: str):
        from safetensors.torch import load_file

        path = self.require(stage) / name
        try:
            module.load_state_dict(load_file(path))
        except RuntimeError as err:
            raise ValueError(f"{path} does not match the run's config ({err}); rerun `python -m train {stage}`.") \
                from err
        return module.eval()

    @cached_property
    def trained_head(self) -> EmoVLMKDDistillationHead:
        """Stage 2's head (`distill/head.safetensors`), in eval mode."""
        from modeling_emovlm_kd.fusion import head_from_config

        return self._load(head_from_config(self.fused_config, initialise=False), "distill", "head.safetensors")

    @cached_property
    def trained_gate(self) -> torch.nn.Module:
        """Stage 3's gate (`gate/gate.safetensors`), in eval mode."""
        from modeling_emovlm_kd.fusion import gate_from_config

        return self._load(gate_from_config(self.fused_config, initialise=False), "gate", "gate.safetensors")

    @cached_property
    def fusion(self) -> EmoVLMKDFusion:
        """The trained head and gate as the model package's fusion, the one the exported model computes."""
        from modeling_emovlm_kd import EmoVLMKDFusion

        config = self.fused_config
        return EmoVLMKDFusion(self.trained_head, self.trained_gate, config.gate_vlm_signal,
                              config.gate_head_signal).eval()

    def head_logits(self, split: str) -> torch.Tensor:
        """The trained head's logits on a split's cached features (what stage 3 trains the gate on)."""
        if split not in self._head_logits:
            self._head_logits[split] = head_logits(self.trained_head, self.features(split)["visual_features"])
        return self._head_logits[split]

    def gate_inputs(self, split: str) -> dict[str, torch.Tensor]:
        """Stage 3's rows of a split: the VLM's label scores, the trained head's logits, the labels."""
        features = self.features(split)
        return {"vlm_logits": features["vlm_logits"], "labels": features["labels"],
                "head_logits": self.head_logits(split)}

    def fused_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trained fusion's logits on `vlm_logits` and `head_logits`."""
        import torch

        with torch.inference_mode():
            return self.fusion(inputs["vlm_logits"], head_logits=inputs["head_logits"],
                               output_branch_weights=False).logits

    def branch_logits(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The logits of the VLM, the head, the teacher and the fused model on a split, and its labels."""
        inputs = self.gate_inputs(split)
        logits = {"vlm": inputs["vlm_logits"], "head": inputs["head_logits"],
                  "teacher": self.features(split)["teacher_logits"], "fused": self.fused_logits(inputs)}
        return logits, inputs["labels"]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the VLM, the head, the gate and the teacher, counted on the meta device (nothing loaded)."""
        import torch
        from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForImageTextToText

        from modeling_emovlm_kd.fusion import gate_from_config, head_from_config

        config = self.fused_config
        with torch.device("meta"):
            teacher = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(self.require("teacher")))
            vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
            head = head_from_config(config, initialise=False)
            gate = gate_from_config(config, initialise=False)
        return {"vlm": count_parameters(vlm), "head": count_parameters(head), "gate": count_parameters(gate),
                "teacher": count_parameters(teacher)}

    def fingerprint(self) -> str:
        """The files and model options an analysis of the run reads (feature caches, head, gate), so that results
        computed on another state of the run (a rerun stage, other model options) are not taken for this one's."""
        files = sorted((self.output_dir / "features").glob("*.safetensors")) + [
            self.output_dir / "distill" / "head.safetensors"]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
        payload = {"files": stats, "model": self.model_kwargs()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def head_logits(head: EmoVLMKDDistillationHead, visual_features: torch.Tensor, batch_size: int = 4096):
    """The frozen head's logits for cached features, computed once for all of stage 3."""
    import torch

    head.eval()
    with torch.inference_mode():
        return torch.cat([head(chunk) for chunk in visual_features.split(batch_size)])


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of `module`; a tied weight (one tensor in two places) counts once, as `parameters()` yields it."""
    return sum(p.numel() for p in module.parameters())


def open_run(run_dir: str | Path) -> Run:
    """A finished run, from the recipe the run stored (`recipe.yaml`), pointed at `run_dir`.

    The stored `output_dir` may be relative to wherever the run was started; the folder given here wins. A run
    copied without its `recipe.yaml` is opened from the public recipe in its results (enough for the caches).
    """
    from train.infra.recipe import read_recipe, validate_recipe

    run_dir = Path(run_dir)
    results, stored = run_dir / RESULTS, run_dir / "recipe.yaml"
    if not results.exists():
        raise RunFolderError(f"{results} not found: {run_dir} is not a finished run (run the pipeline first).")
    recipe = read_recipe(stored) if stored.exists() else json.loads(results.read_text())["recipe"]
    recipe["output_dir"] = str(run_dir)
    return Run(validate_recipe(recipe, where=str(stored if stored.exists() else results)))


__all__ = ["ABLATIONS", "ABLATION_TITLES", "Run", "RunFolderError", "ablation_files", "ablation_fingerprint",
           "count_parameters", "find_hub_folder", "head_logits", "open_run", "read_results", "stored_recipe"]
