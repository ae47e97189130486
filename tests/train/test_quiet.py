"""Known-harmless library messages are filtered at the project's entry points only, by message
(`train/infra/quiet.py`, called first thing by `python -m train`): importing a library still shows them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

ROOT = Path(__file__).resolve().parents[2]
# The two messages, as bitsandbytes 0.50 (on CPUs with AVX512-BF16, at import) and torch's DataLoader (a pinned
# loader without an accelerator: Trainer's default) print them.
BITSANDBYTES = "Failed to load CPU gemm_4bit_forward from kernels-community"
PIN_MEMORY = "'pin_memory' argument is set as true but no accelerator is found"
needs_no_accelerator = pytest.mark.skipif(torch.accelerator.is_available(),
                                          reason="torch warns about pin_memory only without an accelerator")


def python(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@needs_no_accelerator
def test_the_libraries_themselves_still_show_the_messages():
    result = python("-c", "import bitsandbytes, torch\n"
                          "from bitsandbytes.functional import has_avx512bf16\n"
                          "print(bool(has_avx512bf16()))\n"
                          "next(iter(torch.utils.data.DataLoader([1], pin_memory=True)))")
    assert result.returncode == 0, result.stderr
    assert PIN_MEMORY in result.stderr
    # bitsandbytes looks for the `kernels` package only on CPUs with AVX512-BF16.
    assert (BITSANDBYTES in result.stderr) == (result.stdout.strip() == "True")


def test_only_the_known_messages_are_filtered():
    result = python("-c", """
import logging, warnings
from train.infra.quiet import quiet_known_warnings
quiet_known_warnings()
quiet_known_warnings()  # twice: nothing changes
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
log.warning("another bitsandbytes warning")
warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used.")
warnings.warn("another user warning")
print(len(log.filters))
""")
    assert result.returncode == 0, result.stderr
    assert BITSANDBYTES not in result.stderr and PIN_MEMORY not in result.stderr
    assert "another bitsandbytes warning" in result.stderr and "another user warning" in result.stderr
    assert result.stdout.strip() == "1"


@pytest.mark.slow
@needs_no_accelerator
def test_a_python_m_train_run_shows_neither(colour_folder, tmp_path):
    """Two real stages: `base` imports the training stack (bitsandbytes with it), `teacher` trains with `Trainer`,
    whose pinned DataLoader warns on a CPU machine."""
    recipe = write_recipe(tmp_path / "recipe.yaml", colour_folder, tmp_path / "run")
    for stage in ("base", "teacher"):
        result = python("-m", "train", stage, "--config", str(recipe), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        assert BITSANDBYTES not in result.stderr and PIN_MEMORY not in result.stderr, stage
        assert " INFO " in result.stderr  # the run's own log is still there
