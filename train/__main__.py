"""Command line: `python -m train <command> ...` (or `emovlm-kd <command> ...`, the same from any folder).

    python -m train demo [--output-dir runs/demo]                 # the whole pipeline on the bundled sample
    python -m train pipeline --config RECIPE.yaml [--set sft.num_train_epochs=2 --set seed=1 ...]
    python -m train recipe --config RECIPE.yaml [--set ...]       # validate a recipe; `recipe --help`: every field
    python -m train {base,instructions,sft,teacher,features,distill,gate,evaluate,export} --config RECIPE.yaml
    python -m train evaluate-model --model MODEL_OR_REPO --data KIND [--root DIR ...] [--split test] --output-dir DIR
    python -m train report --run runs/demo                         # the paper's tables and figures for a run
    python -m train ablate --run runs/demo --what all              # depth, alpha, gate and gate-data ablations
    python -m train spread --config RECIPE.yaml --seeds 3         # stages 2-3 over 3 seeds: mean and std
    python -m train predict --model runs/demo/final --input photos/ --output predictions.jsonl
    python -m train push --run-dir RUN --variant {emoset,fi,emotion6,flickr,instagram,custom} --repo-id ORG/NAME
        [--private] [--revision BRANCH] [--eval-results RESULTS_JSON ...] [--dry-run DIR]
    python -m train push-space --model ORG/NAME --space ORG/NAME-demo
    python -m train serve --model runs/demo/final --port 8000    # HTTP, for huggingface_hub's InferenceClient
    python -m train tiny --output-dir runs/tiny-base --labels mikels8
    python -m train verify runs/demo                               # recompute what the run records; exit 1 if any differs
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from train.infra import stage_table
from train.infra.quiet import quiet_known_warnings

# Every command, name -> (module, one-line help). The module has `add_arguments(parser)` and `main(args)` (returning
# the exit status, None for 0) and is imported only when its command runs, so that e.g. `push` starts in a second
# instead of loading the whole training stack. A command's parser has its name as the default of `command`.
# The stages' own commands (`python -m train sft ...`) are the stage table's, read when the command line is parsed.
COMMANDS = {
    "pipeline": ("train.commands.stages", "all stages"),
    "recipe": ("train.commands.stages", "validate a recipe and print it; --help lists every field"),
    "evaluate-model": ("train.commands.evaluate_model", "score any model on any data set, outside a run"),
    "demo": ("train.commands.demo", "the whole pipeline offline on the bundled sample"),
    "predict": ("train.commands.predict", "classify a folder of images into JSONL/CSV"),
    "ablate": ("train.commands.ablate", "depth / alpha / gate ablations on a run's caches"),
    "spread": ("train.commands.spread", "stages 2-3 over several seeds on a run's caches: mean and std of every branch"),
    "report": ("train.commands.report", "a run's Markdown report with the paper's figures"),
    "push": ("train.commands.publish", "upload a run's Hub-ready folder with its model card"),
    "push-space": ("train.commands.space", "publish the demo app as a Space, pinned to a pushed model's current commit"),
    "verify": ("train.commands.verify", "recompute what a run (or a published model) records from its saved files"),
    "serve": ("train.commands.serve", "serve a model over HTTP in the image-classification format, batching requests"),
    "tiny": ("train.commands.tiny", "build tiny offline base models"),
}


def commands() -> dict[str, tuple[str, str]]:
    """`COMMANDS` with one command per stage of the stage table, after `pipeline`."""
    stages = {stage.name: ("train.commands.stages", f"stage {stage.name} only: {stage.help}")
              for stage in stage_table.stages()}
    return {"pipeline": COMMANDS["pipeline"], **stages, **COMMANDS}


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in commands().items():
        sub = subparsers.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(command=name)
        if argv[:1] == [name]:
            module = importlib.import_module(module_name)
            sub.description = module.__doc__
            module.add_arguments(sub)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    quiet_known_warnings()  # known-harmless library messages, by message (train/infra/quiet.py)
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        import torch

        if not torch.cuda.is_available():
            # Under torchrun on a CPU-only machine, accelerate and Trainer only form a (gloo) process group when
            # told to use the CPU; otherwise every process would silently train and write alone.
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return importlib.import_module(commands()[args.command][0]).main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
