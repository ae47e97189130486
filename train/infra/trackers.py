"""The trackers a stage's `report_to` names, checked when a recipe is validated.

transformers checks a tracker only when `Trainer` starts (and for TensorBoard then asks for tensorboardX); a run
would stop at stage 1 after the earlier stages ran. `check_report_to` asks transformers' own availability checks
up front and names what to install in one line (TensorBoard: the `tracking` extra).

    check_report_to(["tensorboard"], "sft.report_to")   # ValueError: sft.report_to: tensorboard is not installed: ...
"""

from __future__ import annotations

from collections.abc import Sequence

# tracker -> (transformers' availability check in `transformers.integrations.integration_utils`, what to install).
TRACKERS = {
    "tensorboard": ("is_tensorboard_available", 'pip install "emovlm-kd[tracking]" (TensorBoard)'),
    "wandb": ("is_wandb_available", "pip install wandb"),
    "trackio": ("is_trackio_available", "pip install trackio"),
    "mlflow": ("is_mlflow_available", "pip install mlflow"),
    "comet_ml": ("is_comet_available", "pip install comet_ml"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "neptune": ("is_neptune_available", "pip install neptune"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
    "swanlab": ("is_swanlab_available", "pip install swanlab"),
    "codecarbon": ("is_codecarbon_available", "pip install codecarbon"),
    "dagshub": ("is_dagshub_available", "pip install dagshub mlflow"),
    "azure_ml": ("is_azureml_available", "pip install azureml-core"),
    "flyte": ("is_flytekit_available", "pip install flytekit"),
    "kubeflow": ("is_kubeflow_available", "pip install kubeflow"),
}


def check_report_to(report_to: str | Sequence[str] | None, key: str) -> None:
    """Raise `ValueError("<key>: ...")`, one line, unless every tracker `report_to` names (a `TrainingArguments`
    value: a name, a list, `"none"` or `"all"`) is one transformers knows and is installed. `"all"` takes whatever
    is installed, so it needs nothing."""
    from transformers.integrations import integration_utils

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = integration_utils.INTEGRATION_TO_CALLBACK
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in known:
            raise ValueError(f"{key}: {name!r} is not a tracker transformers knows; use one of "
                             f"{', '.join(sorted(known))}, or none.")
        check, install = TRACKERS.get(name, (None, None))
        available = getattr(integration_utils, check, None) if check else None
        if available is not None and not available():
            raise ValueError(f"{key}: {name} is not installed: {install}.")


__all__ = ["TRACKERS", "check_report_to"]
