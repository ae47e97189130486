"""Stage `base`: tiny random base models built offline (`train/infra/tiny.py`), for recipes with
`base_models.tiny: true`; a run on real base models finishes it at once.

    python -m train base --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

from train.infra.tiny import build_tiny_base_models


def run(context) -> None:
    if context.recipe.base_models.tiny and context.state.is_main_process:
        build_tiny_base_models(context.stage_dir("base"), context.labels, seed=context.seed)


__all__ = ["run"]
