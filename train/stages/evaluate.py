"""Stage `evaluate`: every branch (VLM, head, teacher, fused) on the validation and test splits, from the feature
caches and the trained head and gate, into `evaluate/results.json` with a confusion-matrix figure.

    python -m train evaluate --config recipes/tiny/demo.yaml
"""

from __future__ import annotations

from train.infra.evaluation import evaluate_branches, plot_confusion_matrices, validation_in_sample
from train.infra.files import write_json_atomic
from train.infra.provenance import read_marker


def run(context) -> None:
    if not context.state.is_main_process:
        return
    run, recipe = context.read(), context.recipe
    results = {split: evaluate_branches(*run.branch_logits(split), context.labels) for split in ("validation", "test")}
    test = results["test"]
    test["split"] = "test"
    test["validation"] = results["validation"]["branches"]
    # A gate fitted on the validation split makes the fused model's validation numbers in-sample: say so.
    if in_sample := validation_in_sample(read_marker(context.stage_dir("gate"))):
        test["validation_in_sample"] = in_sample
    # What may leave the machine (results.json goes into `final/`, the report and the model card).
    test["recipe"] = recipe.public()
    test["parameters"] = run.parameter_counts()
    # How the numbers were computed: the exported model runs its VLM in this dtype (4-bit: load it so).
    test["computed_with"] = {"dtype": recipe.model.dtype, "load_in_4bit": recipe.model.load_in_4bit}
    write_json_atomic(test, context.stage_dir("evaluate") / "results.json")
    plot_confusion_matrices(test, context.stage_dir("evaluate") / "confusion_matrix.png")


__all__ = ["run"]
