"""Stage `export`: the fused model with the trained head and gate, as a Hub-ready folder `final/` with its results
and figures.

    python -m train export --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

import shutil

from train.infra.assemble import assemble, save_hub_folder
from train.infra.files import weights_sha256


def run(context) -> dict:
    final = context.output_dir / "final"
    info = {"folder": str(final)}
    if context.state.is_main_process:
        # The VLM in the dtype the feature caches were computed in (results.json's numbers are this model's); the
        # head and the gate stay float32 (`_keep_in_fp32_modules_strict`).
        recipe = context.recipe
        model, processor = assemble(context.require("sft") / "merged", context.labels, dtype=recipe.model.dtype,
                                    **{**recipe.model_kwargs(), **recipe.processor_kwargs()})
        run = context.read()
        model.distillation_head.load_state_dict(run.trained_head.state_dict())
        model.gate.load_state_dict(run.trained_gate.state_dict())
        save_hub_folder(model, processor, final, max_shard_size=recipe.model.export_max_shard_size)
        for name in ("results.json", "confusion_matrix.png"):
            shutil.copy2(context.require("evaluate") / name, final / name)
        info["weights_sha256"] = weights_sha256(final)  # what `python -m train verify` checks final/ against
    return info


__all__ = ["run"]
