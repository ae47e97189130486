"""A run folder loses nothing and runs nothing silently wrong: a mistyped data root, a folder that is not a run, a
stage run before its inputs, a refused command, changed data under the same recipe, a parent run the spread's recipe
did not make. Most tests work on a finished run made of markers alone (`fake_finished_run`): what they check is
decided before any stage trains."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_recipe

from train.infra.provenance import DONE, Provenance, StageError, is_run_folder
from train.infra.recipe import RecipeError, load_recipe, save_recipe
from train.stages.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("base", "instructions", "sft", "teacher", "features", "distill", "gate", "evaluate", "export")
DATA_STAGES = ("instructions", "sft", "teacher", "features")


class MainProcess:
    """The process state of a one-process run (what `Provenance` asks of accelerate's `PartialState`)."""

    is_main_process = True
    process_index = 0

    def wait_for_everyone(self):
        pass


def cli(command, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "train", command, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def one_line_error(result) -> str:
    """The command's error: exactly one line, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture
def data(colour_folder, tmp_path):
    """A private copy of the colour images (a test may change it)."""
    return Path(shutil.copytree(colour_folder, tmp_path / "data"))


def fake_finished_run(tmp_path, data, *overrides):
    """A run whose every stage is marked finished (with a sentinel file standing for its weights), as the pipeline
    marks them; returns (run folder, recipe path)."""
    recipe_path = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "run")
    recipe = load_recipe(recipe_path, overrides)
    provenance = Provenance(recipe, MainProcess())
    for stage in STAGES:
        (recipe.output_dir / stage).mkdir(parents=True)
        (recipe.output_dir / stage / "weights.bin").write_bytes(b"trained " + stage.encode())
        provenance.mark_done(stage)
    save_recipe(recipe, recipe.output_dir / "recipe.yaml")
    return recipe.output_dir, recipe_path


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes and permissions, but the run folder's lock: the empty file the OS
    lock is taken on (`train/infra/locks.py`; its PID file goes with the holder)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def stale(recipe_path, *overrides) -> dict:
    provenance = Provenance(load_recipe(recipe_path, overrides), MainProcess())
    return {stage: provenance.stale_reason(stage) for stage in STAGES}


# ---- nothing lost -----------------------------------------------------------------------------------------------


def test_a_missing_data_root_on_a_finished_run_deletes_nothing(tmp_path, data):
    run, recipe = fake_finished_run(tmp_path, data)
    before = snapshot(run)
    typo = tmp_path / "dta"
    for command in ("pipeline", "sft"):
        result = cli(command, "--config", str(recipe), "--set", f"data.root={typo}")
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"data.root: {typo} does not exist" in one_line_error(result)
        assert snapshot(run) == before
    # Data that is here but wrong (an unknown class folder) is found before any stage folder goes, too.
    (data / "train" / "purple").mkdir()
    with pytest.raises(RecipeError, match=r"recipe\.yaml: data: Unknown label 'purple'"):
        Pipeline(load_recipe(recipe)).run()
    assert snapshot(run) == before


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, data):
    recipe = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "run")
    mine = tmp_path / "my-project"
    for name in ("notes.txt", "base/keep.txt", "features/keep.txt", "evaluate/keep.txt", "final/model.safetensors"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(name)
    before = snapshot(mine)
    result = cli("base", "--config", str(recipe), "--output-dir", str(mine))
    assert result.returncode == 1
    line = one_line_error(result)
    assert f"{mine} is not empty and is not a run folder" in line and "--output-dir" in line
    assert snapshot(mine) == before and sorted(os.listdir(mine)) == ["base", "evaluate", "features", "final",
                                                                      "notes.txt"]
    # An empty folder is fine, and once a run has used it, it is a run folder.
    empty = tmp_path / "empty"
    empty.mkdir()
    Pipeline(load_recipe(recipe, output_dir=str(empty))).run(stages=["base"])
    assert (empty / "recipe.yaml").is_file() and (empty / "base" / DONE).is_file() and is_run_folder(empty)
    (empty / "notes.txt").write_text("mine")
    Pipeline(load_recipe(recipe, output_dir=str(empty))).run(stages=["base"])
    assert not is_run_folder(mine)


def test_a_stage_run_before_its_inputs_is_one_line_naming_the_stage_to_run_first(tmp_path, data):
    recipe = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "run")
    result = cli("sft", "--config", str(recipe))
    assert result.returncode == 1
    line = one_line_error(result)
    assert "Stage 'sft' needs stage 'base', which has not finished" in line and "run `python -m train base`" in line
    for stage in ("evaluate", "export", "features", "gate"):
        with pytest.raises(StageError, match=rf"Stage '{stage}' needs stage 'base', which has not finished in .*: "
                                             r"run `python -m train base` \(and the stages after it\)"):
            Pipeline(load_recipe(recipe)).run(stages=[stage])
    assert not (tmp_path / "run").exists()  # refused: nothing created
    Pipeline(load_recipe(recipe)).run(stages=["base"])
    with pytest.raises(StageError, match=r"Stage 'evaluate' needs stage 'instructions', which has not finished"):
        Pipeline(load_recipe(recipe)).run(stages=["evaluate"])


def test_a_refused_command_changes_nothing_in_the_run_folder(tmp_path, data):
    run, recipe = fake_finished_run(tmp_path, data)
    before = snapshot(run)
    result = cli("export", "--config", str(recipe), "--set", "distill.alpha=0.25")
    assert result.returncode == 1
    assert "Stage 'export' reads stage 'distill', which is out of date" in one_line_error(result)
    assert snapshot(run) == before  # recipe.yaml included: the command did not run


# ---- the data's fingerprint -------------------------------------------------------------------------------------


def test_changed_data_under_the_same_recipe_reruns_exactly_the_stages_that_read_it(tmp_path, data, colour_folder):
    run, recipe = fake_finished_run(tmp_path, data)
    assert stale(recipe) == dict.fromkeys(STAGES)
    markers = {stage: json.loads((run / stage / DONE).read_text()) for stage in STAGES}
    assert set(markers["sft"]["data"]) == {"train", "validation"} and markers["sft"]["data"]["train"]["rows"] == 36
    assert "data" not in markers["distill"]
    # An image removed from the test split: only the caches read the test split.
    (data / "test" / "red" / "0.png").unlink()
    reasons = stale(recipe)
    assert reasons["features"] == "its data changed: the test split's images or labels (18 -> 17 images)"
    assert [stage for stage, reason in reasons.items() if reason] == ["features"]
    # Labels swapped in the training split: every stage that reads it.
    (data / "train" / "red").rename(data / "train" / "swap")
    (data / "train" / "green").rename(data / "train" / "red")
    (data / "train" / "swap").rename(data / "train" / "green")
    reasons = stale(recipe)
    assert [stage for stage, reason in reasons.items() if reason] == list(DATA_STAGES)
    assert reasons["sft"] == "its data changed: the train split's images or labels (36 images)"
    # A stage that reads a stale one refuses to run on it, naming why.
    provenance = Provenance(load_recipe(recipe), MainProcess())
    with pytest.raises(StageError, match=r"Stage 'sft' reads stage 'instructions', which is out of date in .*: "
                                         r"its data changed: the train split's images or labels \(36 images\)\. "
                                         r"Run `python -m train instructions`"):
        provenance.check_inputs_fresh("distill")  # the first stage to rerun is named
    result = cli("distill", "--config", str(recipe))
    assert result.returncode == 1 and "its data changed" in one_line_error(result)
    # Put back as they were (same names, sizes and modification times): up to date again.
    (data / "train" / "red").rename(data / "train" / "swap")
    (data / "train" / "green").rename(data / "train" / "red")
    (data / "train" / "swap").rename(data / "train" / "green")
    shutil.copy2(colour_folder / "test" / "red" / "0.png", data / "test" / "red" / "0.png")
    assert stale(recipe) == dict.fromkeys(STAGES)
    # An image rewritten in place is a change.
    image = data / "validation" / "blue" / "2.png"
    image.write_bytes(image.read_bytes() + b"\0")
    assert [stage for stage, reason in stale(recipe).items() if reason] == ["sft", "teacher", "features"]


def test_a_stage_recorded_without_a_data_fingerprint_is_kept_while_its_data_is_unchanged(tmp_path, data, caplog):
    """Markers of an older version carry no fingerprint. Such a stage is reused (and given the fingerprint) when no
    file or folder of its data changed after it finished (their status-change times, which copying or touching
    cannot set back), and rerun otherwise: never silently reused on changed data, never rerun for nothing."""
    run, recipe = fake_finished_run(tmp_path, data)
    for stage in DATA_STAGES:
        marker = json.loads((run / stage / DONE).read_text())
        del marker["data"]
        (run / stage / DONE).write_text(json.dumps(marker))
    assert stale(recipe) == dict.fromkeys(STAGES)
    with caplog.at_level("INFO"):
        Pipeline(load_recipe(recipe)).run(stages=["distill"])
    assert "Stage distill already finished; skipping." in caplog.text
    for stage in DATA_STAGES:
        assert f"Stage {stage}: recorded the fingerprint of its data" in caplog.text
        assert "data" in json.loads((run / stage / DONE).read_text())
    # Stripped again, then a file changes after the stages finished: they rerun.
    for stage in DATA_STAGES:
        marker = json.loads((run / stage / DONE).read_text())
        del marker["data"]
        (run / stage / DONE).write_text(json.dumps(marker))
    time.sleep(0.05)
    (data / "validation" / "green" / "1.png").chmod(0o600)
    reasons = stale(recipe)
    assert [stage for stage, reason in reasons.items() if reason] == list(DATA_STAGES)
    assert reasons["sft"].startswith("it was recorded without a fingerprint of its data (an older version of this "
                                     "project), and its data changed after it finished: ")
    assert "validation/green" in reasons["sft"]


def test_a_hub_data_sets_fingerprint_is_its_own_and_repeats_across_processes(tmp_path):
    """Images stored in the data set (no file to look at): the `datasets` fingerprint of what was loaded."""
    from datasets import ClassLabel, Dataset, Features, Image

    from train.infra.data import load_hub_dataset
    from train.infra.provenance import data_fingerprint

    def write(labels):
        rows = {"image": [{"bytes": (ROOT / "train" / "demo_data" / "fashion_mnist_sample" / "test" / "bag"
                                     / name).read_bytes(), "path": None}
                          for name in sorted(os.listdir(ROOT / "train" / "demo_data" / "fashion_mnist_sample" /
                                                        "test" / "bag"))[:4]],
                "label": labels}
        features = Features({"image": Image(), "label": ClassLabel(names=["negative", "positive"])})
        for split in ("train", "validation", "test"):
            Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))

    def fingerprint_in_a_fresh_process() -> str:
        code = ("import json, sys; from train.infra.data import load_hub_dataset; "
                "from train.infra.provenance import data_fingerprint; "
                f"d = load_hub_dataset('parquet', 'binary', data_files={{s: '{tmp_path}/' + s + '.parquet' "
                "for s in ('train', 'validation', 'test')}); print(json.dumps(data_fingerprint(d)))")
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def fingerprint_here() -> dict:
        files = {s: f"{tmp_path}/{s}.parquet" for s in ("train", "validation", "test")}
        return data_fingerprint(load_hub_dataset("parquet", "binary", data_files=files))

    write([0, 1, 0, 1])
    first = fingerprint_in_a_fresh_process()
    assert first == fingerprint_in_a_fresh_process() == fingerprint_here() and first["train"]["rows"] == 4
    write([1, 0, 0, 1])
    assert fingerprint_here()["train"] != first["train"]


# ---- the spread reads a parent run made with its recipe --------------------------------------------------------


def test_the_spread_refuses_a_parent_run_its_recipe_did_not_make(tmp_path, data):
    from train.commands.spread import seed_spread

    run, recipe = fake_finished_run(tmp_path, data)
    with pytest.raises(StageError, match=r"was not made with this recipe: stage 'distill': its settings changed: "
                                         r"distill\.alpha: \(unset\) -> 0\.25"):
        seed_spread(load_recipe(recipe, ["distill.alpha=0.25"]), seeds=2)
    assert not (run / "seeds").exists()
    result = cli("spread", "--config", str(recipe), "--set", "distill.alpha=0.25", "--seeds", "2")
    assert result.returncode == 1 and "was not made with this recipe" in one_line_error(result)
    assert not (run / "seeds").exists()


# ---- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_stage_reruns_when_its_data_changes(tmp_path, data):
    recipe = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "run")
    run = tmp_path / "run"
    for command in ("base", "teacher"):
        result = cli(command, "--config", str(recipe))
        assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((run / "teacher" / DONE).read_text())
    again = cli("teacher", "--config", str(recipe))
    assert "Stage teacher already finished; skipping." in again.stderr
    for image in sorted((data / "train" / "blue").glob("*.png"))[:6]:
        image.unlink()
    rerun = cli("teacher", "--config", str(recipe))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Stage teacher runs: its data changed: the train split's images or labels (36 -> 30 images)." in \
        rerun.stderr
    second = json.loads((run / "teacher" / DONE).read_text())
    assert second["provenance"] != first["provenance"] and second["data"]["train"]["rows"] == 30

