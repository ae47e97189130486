"""A run's commands, all read from its recipe: the whole pipeline, one stage, or the recipe alone.

    python -m train pipeline --config RECIPE.yaml [--set sft.num_train_epochs=2 --set seed=1 ...] [--force]
    python -m train {base,instructions,sft,teacher,features,distill,gate,evaluate,export} --config RECIPE.yaml [--force]
    python -m train recipe --config RECIPE.yaml [--set ...] [--check-data]  # validate; `recipe --help`: every field

Everything is validated before any stage runs or anything is deleted. A stage reruns when its recipe settings or the
stages it reads changed; `--force` reruns it anyway. `python -m train evaluate --model M --data KIND ...` is an alias
of `python -m train evaluate-model` (any model on any data set, outside a run), kept so that no command line breaks.
"""

from __future__ import annotations

import argparse
import sys

SET_HELP = "Override a recipe value (YAML); repeat the flag or list several, all apply in order."
ALIAS_NOTE = ("note: `python -m train evaluate --model` is an alias of `python -m train evaluate-model`, the command "
              "that scores any model.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `pipeline`, of each stage's command and of `recipe` (the parser's default `command`)."""
    command = parser.get_default("command")
    parser.add_argument("--config", required=command not in ("recipe", "evaluate"),
                        help="YAML recipe (see train/recipes/).")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=SET_HELP)
    if command == "evaluate":
        # `evaluate --model M`: the alias of `evaluate-model`, whose arguments include --output-dir and --force.
        from train.commands import evaluate_model

        evaluate_model.add_arguments(parser)
        parser.epilog = ("With --config: the run's evaluation stage; --output-dir overrides the recipe's output_dir "
                         "and --force reruns the stage. With --model: " + ALIAS_NOTE.removeprefix("note: "))
        return parser
    parser.add_argument("--output-dir", help="Override the recipe's output_dir.")
    if command == "recipe":
        parser.add_argument("--check-data", action="store_true",
                            help="Also require the data to be on this machine (by default a data root that is not "
                                 "here is reported and not checked; one that is here is always checked).")
        from train.infra.recipe import recipe_help

        parser.epilog = recipe_help()
        return parser
    parser.add_argument("--force", action="store_true", help="Rerun even when finished and up to date.")
    parser.epilog = ("Stages rerun when their recipe settings or the stages they read changed (see "
                     "`python -m train recipe --help` for every recipe field).")
    return parser


def evaluate_alias(args: argparse.Namespace) -> int:
    """`evaluate --model M ...`: said to be the alias it is, then run as `evaluate-model`."""
    if args.config:
        print("error: evaluate takes --config RECIPE (a run's stage) or --model M (any model), not both.",
              file=sys.stderr)
        return 2
    if not args.model:
        print("error: evaluate needs --config RECIPE, or use evaluate-model --model M --data KIND --output-dir DIR.",
              file=sys.stderr)
        return 2
    print(ALIAS_NOTE, file=sys.stderr)
    from train.commands import evaluate_model

    return evaluate_model.main(args)


def main(args: argparse.Namespace) -> int | None:
    """Validate the recipe, then print it (`recipe`) or run the stage(s); user errors are one line, status 1 or 2."""
    if args.command == "evaluate" and (args.model or not args.config):
        return evaluate_alias(args)
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
    return None


__all__ = ["add_arguments", "main"]
