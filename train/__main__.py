"""Command line: `python -m train <command> ...`.

    python -m train demo [--output-dir runs/demo]                 # the whole pipeline on the bundled sample
    python -m train pipeline --config RECIPE.yaml [--set sft.num_train_epochs=2 --set seed=1 ...]
    python -m train recipe --config RECIPE.yaml [--set ...]       # validate a recipe; `recipe --help`: every field
    python -m train {base,sft,teacher,features,distill,gate,evaluate,export} --config RECIPE.yaml
    python -m train evaluate --model MODEL_OR_REPO --data KIND [--root DIR ...] [--split test] --output-dir DIR
    python -m train report --run runs/demo                         # the paper's tables and figures for a run
    python -m train ablate --run runs/demo --what all              # depth, alpha and gate ablations
    python -m train spread --config RECIPE.yaml --seeds 3         # stages 2-3 over 3 seeds: mean and std
    python -m train predict --model runs/demo/final --input photos/ --output predictions.jsonl
    python -m train push --run-dir RUN --variant {emoset,fi,emotion6,flickr,instagram,custom} --repo-id ORG/NAME
        [--private] [--revision BRANCH] [--eval-results RESULTS_JSON ...] [--dry-run DIR]
    python -m train tiny --output-dir runs/tiny-base --labels mikels8
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from train.infra import stage_table
from train.infra.quiet import quiet_known_warnings

# Commands with their own module, imported only when that command runs, so that e.g. `push` starts in a second
# instead of loading the whole training stack: (module, one-line help).
TOOLS = {
    "predict": ("train.commands.predict", "classify a folder of images into JSONL/CSV"),
    "ablate": ("train.commands.ablate", "depth / alpha / gate ablations on a run's caches"),
    "spread": ("train.commands.spread", "stages 2-3 over several seeds on a run's caches: mean and std of every branch"),
    "report": ("train.commands.report", "a run's Markdown report with the paper's figures"),
    "push": ("train.commands.publish", "upload a run's Hub-ready folder with its model card"),
    "push-space": ("train.commands.space", "publish the demo app as a Space, pinned to a pushed model's current commit"),
}
DEMO_RECIPE = Path(__file__).parent / "recipes" / "tiny" / "demo.yaml"
DEMO_DATA = Path(__file__).parent / "demo_data" / "fashion_mnist_sample"
DEMO_SEEDS = 3


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    set_help = "Override a recipe value (YAML); repeat the flag or list several, all apply in order."
    help_text = {"pipeline": "all stages", **{stage.name: f"stage {stage.name} only: {stage.help}"
                                              for stage in stage_table.stages()},
                 "recipe": "validate a recipe and print it; --help lists every field"}
    for name in help_text:
        sub = commands.add_parser(name, help=help_text[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", required=name not in ("recipe", "evaluate"), help="YAML recipe (see train/recipes/).")
        sub.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=set_help)
        sub.add_argument("--output-dir", help="Override the recipe's output_dir.")
        if name == "recipe":
            sub.add_argument("--check-data", action="store_true",
                             help="Also require the data to be on this machine (by default a data root that is not "
                                  "here is reported and not checked; one that is here is always checked).")
            if argv[:1] == ["recipe"]:
                from train.infra.recipe import recipe_help

                sub.epilog = recipe_help()
            continue
        sub.add_argument("--force", action="store_true",
                         help="Rerun the stage(s) even when finished and up to date." if name == "pipeline" else
                         "Rerun the stage even when it is finished and up to date.")
        sub.epilog = ("Stages rerun when their recipe settings or the stages they read changed (see "
                      "`python -m train recipe --help` for every recipe field).")
        if name == "evaluate" and argv[:1] == ["evaluate"]:
            # `evaluate --model M --data KIND`: any model on any data set, outside a run (train/commands/evaluate_model.py).
            from train.commands.evaluate_model import add_arguments

            add_arguments(sub)
    demo = commands.add_parser("demo", help="the whole pipeline offline on the bundled sample")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=set_help)
    for name, (module_name, help_text) in TOOLS.items():
        sub = commands.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if argv[:1] == [name]:
            module = importlib.import_module(module_name)
            sub.description = module.__doc__
            module.add_arguments(sub)
    tiny = commands.add_parser("tiny", help="build tiny offline base models")
    tiny.add_argument("--output-dir", required=True)
    tiny.add_argument("--labels", default="mikels8", help="A label set name or a comma-separated list.")
    tiny.add_argument("--backbone", default="qwen2_vl",
                      help="VLM family (model_type) of the tiny model: a key of modeling_emovlm_kd/backbones.py.")
    return parser.parse_args(argv)


def run_demo(output_dir: str, overrides: list[str]) -> None:
    from transformers import pipeline as hf_pipeline

    from train.infra.recipe import read_recipe, validate_recipe
    from train.stages.pipeline import Pipeline, print_results

    recipe = read_recipe(DEMO_RECIPE, overrides)
    recipe["output_dir"] = output_dir
    recipe["data"]["root"] = str(DEMO_DATA)
    recipe = validate_recipe(recipe, where=str(DEMO_RECIPE))
    results = Pipeline(recipe).run()
    print_results(results)
    from train.commands.spread import format_spread, seed_spread

    # One run is one draw of the head's and the gate's seeds; bf16 kernels also differ between CPUs. The spread over
    # seeds (stages 2-3 retrained on the same caches) says how much of a difference between branches is noise.
    print(f"\nThe same, with stages 2-3 retrained over {DEMO_SEEDS} seeds on the same caches (mean ± sample std):\n")
    print(format_spread(seed_spread(recipe, DEMO_SEEDS), results))
    final = Path(output_dir) / "final"
    print(f"\nHub-ready model folder: {final}\n\npipeline('image-classification') on a few held-out images:")
    classifier = hf_pipeline("image-classification", model=str(final), trust_remote_code=True)
    samples = [sorted((DEMO_DATA / "test" / label).glob("*.png"))[0] for label in recipe.labels[:5]]
    for path, prediction in zip(samples, classifier([str(p) for p in samples], batch_size=5, top_k=1)):
        print(f"  {path.parent.name:>10} / {path.name}: {prediction[0]['label']} ({prediction[0]['score']:.2f})")
    from train.commands.report import write_report

    print(f"\nReport with the paper's tables and figures for this run: {write_report(output_dir)}")


def main(argv=None) -> None:
    quiet_known_warnings()  # known-harmless library messages, by message (train/infra/quiet.py)
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        import torch

        if not torch.cuda.is_available():
            # Under torchrun on a CPU-only machine, accelerate and Trainer only form a (gloo) process group when
            # told to use the CPU; otherwise every process would silently train and write alone.
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in TOOLS:
        result = importlib.import_module(TOOLS[args.command][0]).run(args)
        # `predict` reports bad files in its output and fails only when no image could be classified.
        return 1 if args.command == "predict" and result.failed and not result.predicted else 0
    if args.command == "demo":
        run_demo(args.output_dir, args.set)
        return
    if args.command == "tiny":
        from train.infra.tiny import build_tiny_base_models

        labels = args.labels.split(",") if "," in args.labels else args.labels
        from modeling_emovlm_kd import resolve_label_set
        from modeling_emovlm_kd.backbones import get_backbone

        try:
            get_backbone(args.backbone)
        except ValueError as err:
            raise SystemExit(f"error: --backbone: {err}") from None
        paths = build_tiny_base_models(args.output_dir, resolve_label_set(labels), model_type=args.backbone)
        print("\n".join(f"{name}: {path}" for name, path in paths.items()))
        return
    if args.command == "evaluate" and (getattr(args, "model", None) or not args.config):
        if args.config:
            print("error: evaluate takes --config RECIPE (a run's stage) or --model M (any model), not both.",
                  file=sys.stderr)
            return 2
        if not getattr(args, "model", None):
            print("error: evaluate needs --config RECIPE or --model M --data KIND --output-dir DIR.", file=sys.stderr)
            return 2
        from train.commands.evaluate_model import run

        return run(args)
    from train.infra.recipe import RecipeError, load_recipe

    try:
        # Everything is validated before any stage runs or anything is deleted.
        recipe = load_recipe(args.config, args.set, output_dir=args.output_dir) if args.config else None
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "recipe":
        if recipe is None:
            print("error: --config is required to validate a recipe (see --help for every field).", file=sys.stderr)
            return 2
        import yaml

        try:
            note = recipe.check_data(required=args.check_data)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if note:
            print(f"note: {note}", file=sys.stderr)
        print(f"# {args.config}: valid. As stored in results.json (secrets and local paths removed):")
        print(yaml.safe_dump(recipe.public(), sort_keys=False), end="")
        return 0
    from train.infra.locks import LockedError
    from train.stages.pipeline import Pipeline, RunFolderError, StageError, print_results

    pipeline = Pipeline(recipe)
    try:
        if args.command == "pipeline":
            print_results(pipeline.run(force=args.force))
        else:
            pipeline.run(stages=[args.command], force=args.force)
    except RecipeError as err:  # the data or this machine, found before any stage ran
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (StageError, LockedError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
