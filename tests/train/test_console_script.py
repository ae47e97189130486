"""`emovlm-kd <command>`, the console script setup.py declares: the same commands as `python -m train`, from any
directory, also one holding a `train.py` of the user's own (which shadows the package for `python -m train`).

The script is installed by `pip install -e .` (`make test` installs the package fresh); in an older environment,
reinstall with `.venv/bin/python -m pip install --no-deps -e .`.
"""

import importlib
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "emovlm-kd"
SHADOW = 'print("the user\'s own train.py ran"); raise SystemExit(3)\n'


@pytest.fixture
def user_dir(tmp_path):
    """A user's project folder with a `train.py` of its own."""
    (tmp_path / "train.py").write_text(SHADOW)
    return tmp_path


def run(command, cwd):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"},
                          timeout=120)


def test_setup_py_declares_the_console_script():
    assert "entry_points={\"console_scripts\": [\"emovlm-kd=train.__main__:main\"]}" in (ROOT / "setup.py").read_text()
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "emovlm-kd"]
    assert script.value == "train.__main__:main"
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: reinstall with `{sys.executable} -m pip install --no-deps -e .`"


def test_console_script_runs_from_a_folder_with_its_own_train_py(user_dir):
    shadowed = run([sys.executable, "-m", "train", "--help"], user_dir)
    assert shadowed.returncode == 3 and "own train.py ran" in shadowed.stdout  # what the script avoids
    result = run([str(SCRIPT), "--help"], user_dir)
    assert result.returncode == 0, result.stderr
    for command in ("pipeline", "predict", "push", "push-space", "report"):
        assert command in result.stdout
    space_help = run([str(SCRIPT), "push-space", "--help"], user_dir)
    assert space_help.returncode == 0 and "--model" in space_help.stdout and "--dry-run" in space_help.stdout


def test_console_script_passes_on_the_exit_status(user_dir):
    # `main` returns 2 for `recipe` without --config; the script must exit with it, not 0.
    missing = run([str(SCRIPT), "recipe"], user_dir)
    assert missing.returncode == 2 and "--config is required" in missing.stderr
    # A tool's user error (sys.exit with a message) is status 1 with that message, without a traceback.
    push = run([str(SCRIPT), "push", "--run-dir", str(user_dir / "no-run"), "--variant", "custom", "--repo-id",
                "me/x", "--dry-run", str(user_dir / "out")], user_dir)
    assert push.returncode == 1 and "No Hub-ready folder" in push.stderr and "Traceback" not in push.stderr


# ---- the command table (train/__main__.py), in this process: the console script above runs the installed package ----


def test_every_command_is_one_entry_of_the_table_with_add_arguments_and_main(capsys):
    from train import STAGES
    from train.__main__ import COMMANDS, parse_args

    assert set(STAGES) | {"pipeline", "recipe", "evaluate-model", "demo", "tiny", "predict", "push"} <= set(COMMANDS)
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.main), name
        assert not hasattr(module, "run"), f"{module_name}.run: a command's entry is main(args)"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for name in COMMANDS:
        assert f"    {name} " in listed, name
    assert parse_args(["gate", "--config", "r.yaml", "--force"]).force
    assert parse_args(["tiny", "--output-dir", "x"]).backbone == "qwen2_vl"


def test_evaluate_model_is_its_own_command_and_evaluate_model_says_it_is_an_alias(tmp_path, capsys):
    from train.__main__ import main

    not_a_model = tmp_path / "weights.txt"
    not_a_model.write_text("not a model")
    common = ["--model", str(not_a_model), "--data", "imagefolder", "--root", str(tmp_path), "--output-dir",
              str(tmp_path / "out")]
    assert main(["evaluate-model", *common]) == 2
    error = capsys.readouterr().err
    assert "weights.txt is a file" in error and "alias" not in error
    assert main(["evaluate", *common]) == 2
    error = capsys.readouterr().err
    assert "`python -m train evaluate --model` is an alias of `python -m train evaluate-model`" in error
    assert "weights.txt is a file" in error
    assert main(["evaluate", *common, "--config", "recipe.yaml"]) == 2
    assert "not both" in capsys.readouterr().err
