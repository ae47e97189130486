"""The spread of a run's numbers over seeds: stages 2 and 3 retrained with other seeds on the run's own caches.

A single run's accuracy is one draw; the head's and the gate's initialisation and data order move it. For each extra
seed, a child run `<run>/seeds/seed-<s>/` shares the parent's base models, stage 1, teacher and feature caches
(symbolic links) and runs the pipeline's own `distill`, `gate` and `evaluate` stages with `distill.seed` and
`gate.seed` set to `s`: one training path, with provenance and resume like any run. The VLM and teacher branches
do not depend on these seeds and are reported as they are.

    python -m train spread --config RECIPE.yaml --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics

from train import STAGES
from train.commands.arguments import positive_int
from train.infra.evaluation import branch_name, markdown_table
from train.infra.locks import LockedError
from train.infra.recipe import Recipe, RecipeError, load_recipe
from train.infra.run import Run, read_results
from train.stages.pipeline import Pipeline, StageError, child_pipeline

SEEDED_STAGES = ("distill", "gate", "evaluate")
SHARED_STAGES = STAGES[: STAGES.index(SEEDED_STAGES[0])]  # everything the seeded stages read, upstream


def child_run(parent: Recipe, seed: int) -> Pipeline:
    """The pipeline of `parent` with stages 2-3 seeded by `seed`, in a child folder that links the shared stages."""
    return child_pipeline(parent, parent.output_dir / "seeds" / f"seed-{seed}",
                          {stage: {"seed": seed} for stage in ("distill", "gate")}, SHARED_STAGES,
                          where=f"{parent.source} (seed {seed})")


def seed_spread(parent: Recipe, seeds: int = 3) -> dict:
    """Test-split accuracy and macro-F1 of every branch over the run's seed and `seeds - 1` more: per seed, mean and
    sample standard deviation. The parent run must be finished and made with `parent` (its recorded settings, inputs
    and data are the recipe's: its own seed's results are read, not retrained); otherwise `StageError`, and nothing
    is written."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}.")
    runs = {parent.seed: Pipeline(parent)}
    runs[parent.seed].provenance.check_made_with(STAGES[: STAGES.index("evaluate") + 1])
    for seed in range(parent.seed + 1, parent.seed + seeds):
        child = child_run(parent, seed)
        child.run(stages=SEEDED_STAGES)
        runs[seed] = child
    per_seed = {}
    for seed, child in runs.items():
        results = read_results(child.output_dir)
        if not results:
            raise FileNotFoundError(f"{child.output_dir} has no results.json: finish the run first.")
        per_seed[seed] = {branch: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
                          for branch, m in results["branches"].items()}
    branches = next(iter(per_seed.values()))
    summary = {}
    for branch in branches:
        summary[branch] = {}
        for metric in ("accuracy", "macro_f1"):
            values = [per_seed[s][branch][metric] for s in per_seed]
            summary[branch][metric] = {"mean": statistics.fmean(values),
                                       "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    table = {"seeds": list(per_seed), "per_seed": per_seed, "summary": summary,
             "num_examples": read_results(parent.output_dir)["num_examples"],
             "vlm_type": Run(parent).fused_config.vlm_config.model_type}
    path = parent.output_dir / "seeds" / "spread.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
    return table


def format_spread(table: dict, single: dict) -> str:
    """Markdown: each branch's single-run accuracy beside its mean ± std over the seeds."""
    seeds = table["seeds"]
    rows = []
    for branch, summary in table["summary"].items():
        acc, f1 = summary["accuracy"], summary["macro_f1"]
        fixed = " (fixed: not seeded here)" if branch in ("vlm", "teacher") else ""
        rows.append((branch_name(branch, table["vlm_type"]), f"{single['branches'][branch]['accuracy']:.4f}",
                     f"{acc['mean']:.4f} ± {acc['std']:.4f}{fixed}", f"{f1['mean']:.4f} ± {f1['std']:.4f}"))
    return markdown_table(["branch", f"this run (seed {seeds[0]})", f"accuracy over seeds {', '.join(map(str, seeds))}",
                           "macro-F1 over seeds"], rows)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="The finished run's YAML recipe.")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="The overrides the run was made with.")
    parser.add_argument("--output-dir", help="The run folder, if not the recipe's output_dir.")
    parser.add_argument("--seeds", type=positive_int, default=3, help="Seeds in all, the run's own included.")
    return parser


def main(args: argparse.Namespace) -> None:
    """`python -m train spread`: retrain stages 2-3 over the seeds and print the table."""
    try:
        parent = load_recipe(args.config, args.set, output_dir=args.output_dir)
        table = seed_spread(parent, args.seeds)
    except (RecipeError, StageError, LockedError) as err:
        raise SystemExit(f"error: {err}") from None
    print(format_spread(table, read_results(parent.output_dir)))


__all__ = ["add_arguments", "child_run", "format_spread", "main", "seed_spread"]
