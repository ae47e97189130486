"""`train.infra.trackers.check_report_to`: a stage's `report_to` names trackers transformers knows and that are
installed, or recipe validation stops with one line naming what to install (not transformers' "install
tensorboardX" when stage 1 starts)."""

import importlib.util

import pytest
from transformers.integrations import integration_utils

from train.infra.trackers import check_report_to


@pytest.fixture
def installed(monkeypatch):
    """Decide which packages `importlib.util.find_spec` (what transformers' availability checks call) finds."""
    find_spec = importlib.util.find_spec
    present: dict[str, bool] = {}

    def fake(name, *args, **kwargs):
        top = name.split(".")[0]
        if top in present:
            return find_spec("json") if present[top] else None  # any real spec stands for "installed"
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    return present


@pytest.mark.parametrize("value", [None, "none", ["none"], [], "all"])
def test_nothing_to_check(value, installed):
    installed.update(tensorboard=False, tensorboardX=False, wandb=False)
    check_report_to(value, "sft.report_to")


def test_a_missing_tracker_names_the_extra_or_the_package(installed):
    installed.update(tensorboard=False, tensorboardX=False, wandb=False, trackio=False)
    with pytest.raises(ValueError) as raised:
        check_report_to("tensorboard", "sft.report_to")
    message = str(raised.value)
    assert message.startswith("sft.report_to: tensorboard is not installed") and "\n" not in message
    assert 'pip install "emovlm-kd[tracking]"' in message
    with pytest.raises(ValueError, match=r"teacher.report_to: wandb is not installed: pip install wandb"):
        check_report_to(["wandb"], "teacher.report_to")
    with pytest.raises(ValueError, match=r"gate.report_to: trackio is not installed: pip install trackio"):
        check_report_to("trackio", "gate.report_to")


def test_installed_trackers_pass(installed):
    installed.update(tensorboard=True, trackio=True)
    check_report_to(["tensorboard", "trackio"], "distill.report_to")
    installed.update(tensorboard=False, tensorboardX=True)  # transformers' TensorBoard callback takes either
    check_report_to("tensorboard", "distill.report_to")


def test_unknown_names_list_the_known_trackers(monkeypatch):
    with pytest.raises(ValueError, match=r"sft.report_to: 'tensorbord' is not a tracker transformers knows.*"
                                         r"tensorboard.*wandb"):
        check_report_to(["tensorbord"], "sft.report_to")
    # A tracker registered with transformers (as tests do with a recording callback) is known, and has no package.
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recording", object)
    check_report_to(["recording"], "sft.report_to")
