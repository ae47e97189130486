"""`bench.pipeline_run`, the timing of the real pipeline shared by `bench.gpu_check` and `bench.real_shape`: nested
peaks stay exact across counter resets, the Trainer observer is attached only through `report_to` and only while
the check runs, and a phase whose build failed is skipped, not crashed into."""

import pytest
import torch
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_reporting_integration_callbacks

from bench.pipeline_run import OBSERVER, PIPELINE_NEEDS, Meter, Phases, TrainerObserver, observing
from train.infra.trackers import check_report_to


class CountingMeter(Meter):
    """A `Meter` over a memory counter with CUDA's semantics (a peak since the last reset), driven by the test."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.current = self.peak = 0.0

    def allocate(self, gib: float) -> None:
        self.current += gib
        self.peak = max(self.peak, self.current)

    def _read(self):
        return self.peak, self.current

    def _reset(self):
        self.peak = self.current


def test_nested_measurements_keep_their_peaks_across_resets():
    meter = CountingMeter()
    outer = meter.begin("phase")
    meter.allocate(1)
    meter.allocate(-1)
    inner = meter.begin("stage")  # resets the counter: the phase's peak so far is folded in first
    meter.allocate(3)
    meter.allocate(-3)
    meter.split("before_train")  # resets again
    meter.allocate(2)
    meter.allocate(-2)
    stage = meter.end(inner, last_part="train")
    meter.allocate(0.5)
    phase = meter.end(outer)
    assert stage["peak_memory_gib"] == 3
    assert {part: row["peak_memory_gib"] for part, row in stage["parts"].items()} == {"before_train": 3, "train": 2}
    assert sum(row["seconds"] for row in stage["parts"].values()) == pytest.approx(stage["seconds"], rel=1e-9)
    assert phase["peak_memory_gib"] == 3  # the stage's peak, although the counter was reset inside the phase
    assert phase["memory_before_gib"] == 0 and phase["memory_after_gib"] == 0.5
    assert "parts" not in phase and meter.frames == []


def test_the_observer_is_a_tracker_only_while_the_check_runs():
    observer = TrainerObserver(Meter(torch.device("cpu")))
    with observing(observer):
        assert get_reporting_integration_callbacks([OBSERVER]) == [observer]
        check_report_to([OBSERVER], "sft.report_to")  # a recipe naming it validates
    assert OBSERVER not in INTEGRATION_TO_CALLBACK
    with pytest.raises(ValueError, match=OBSERVER):
        check_report_to([OBSERVER], "sft.report_to")


def test_a_failed_build_skips_the_stage_phases_without_a_pipeline():
    phases = Phases(torch.device("cpu"), PIPELINE_NEEDS, time_limit=3600)

    def broken():
        raise OSError("disk full (simulated)")

    phases.run("build", broken)
    phases.stage_phase(None, "instructions")
    phases.run("teacher", lambda: pytest.fail("teacher needs build"))
    assert phases.rows["build"]["status"] == "fail" and phases.rows["build"]["error"] == "OSError: disk full (simulated)"
    assert phases.rows["instructions"] == {"phase": "instructions", "status": "skipped", "error": "needs build"}
    assert phases.rows["teacher"]["status"] == "skipped"
