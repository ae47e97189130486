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
    from train.__main__ import commands, parse_args

    table = commands()
    assert list(table)[:len(STAGES) + 1] == ["pipeline", *STAGES]
    assert {"recipe", "evaluate-model", "demo", "tiny", "predict", "push", "push-space", "verify"} <= set(table)
    for name, (module_name, _) in table.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.main), name
        assert not hasattr(module, "run"), f"{module_name}.run: a command's entry is main(args)"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for name in table:
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


@pytest.mark.parametrize("revision", [None, "0123456789abcdef0123456789abcdef01234567"])
def test_push_space_dry_run_offline_is_one_line(tmp_path, revision):
    # The dry run still asks the Hub for the model's commit and config: offline, say so in one line.
    command = [sys.executable, "-m", "train", "push-space", "--model", "me/emovlm-kd-demo", "--space", "me/app",
               "--dry-run", str(tmp_path / "space")] + (["--model-revision", revision] if revision else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("push-space: error:") and "me/emovlm-kd-demo" in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "space").exists()


def declared_requirements() -> dict[str, set[str]]:
    """setup.py's requirement names: {"base": {...}, "train": {...}, ...}, read without running setup()."""
    import ast
    import re

    values = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("INSTALL_REQUIRES", "EXTRAS"):
            values[target.id] = ast.literal_eval(node.value)
        elif isinstance(target, ast.Subscript) and getattr(target.value, "id", None) == "EXTRAS":  # EXTRAS["dev"] = ...
            expression = compile(ast.Expression(node.value), "setup.py", "eval")
            values["EXTRAS"][ast.literal_eval(target.slice)] = eval(expression, {"EXTRAS": values["EXTRAS"]})

    def names(requirements):
        return {re.split(r"[<>=!~\[ ;]", requirement)[0].lower().replace("_", "-") for requirement in requirements}

    return {"base": names(values["INSTALL_REQUIRES"]), **{extra: names(r) for extra, r in values["EXTRAS"].items()}}


def imported_distributions(paths) -> set[str]:
    """The distributions (lower-case names) whose modules the files under `paths` import."""
    import ast
    from importlib.metadata import packages_distributions

    modules = set()
    for path in paths:
        for file in [path] if path.suffix == ".py" else path.rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    modules.add(node.module.split(".")[0])
    own = {"train", "modeling_emovlm_kd", "bench", "conftest", "hub_server", "__future__"}
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m not in own and not m.startswith("test")}
    distributions = packages_distributions()
    missing = sorted(m for m in third_party if m not in distributions)
    assert not missing, f"imported but not installed here: {missing}"
    return {distributions[m][0].lower().replace("_", "-") for m in third_party}


def test_every_imported_package_is_declared():
    declared = declared_requirements()
    assert {"base", "train", "tracking", "app", "serve", "test", "dev"} <= set(declared)
    code = imported_distributions([ROOT / "train", ROOT / "modeling_emovlm_kd", ROOT / "app.py"])
    undeclared = code - declared["base"] - declared["train"] - declared["app"] - declared["serve"]
    assert not undeclared, f"imported by the project but not in setup.py: {sorted(undeclared)}"
    tests = imported_distributions([ROOT / "tests", ROOT / "bench", ROOT / "docs"])
    assert not tests - set().union(*declared.values()), sorted(tests - set().union(*declared.values()))
    # The model package (the Hub payload) and what a trained model's user runs need only the base install.
    assert imported_distributions([ROOT / "modeling_emovlm_kd"]) <= declared["base"]
    for extra in ("train", "tracking", "app", "serve", "test"):
        assert declared[extra] <= declared["dev"], extra


def test_the_supported_pythons_are_declared():
    text = (ROOT / "setup.py").read_text()
    assert 'python_requires=">=3.11"' in text and sys.version_info >= (3, 11)
