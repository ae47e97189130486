"""`python -m train evaluate --model M --data KIND`: any EmoVLM-KD export or stock VLM on any data set.

The numbers in results.json are checked against metrics computed here, by hand, from the model's own outputs on
each test image (one image per forward pass, in file order, not the command's batches or cache).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS
from hub_server import FakeHubServer
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

import train.commands.evaluate_model as evaluate_model_module
from train.__main__ import parse_args
from train.commands.evaluate_model import EvaluationError, evaluate_model
from train.commands.publish import HubFolder, PublishError, load_evaluations, load_variants, push
from train.infra.assemble import assemble, save_hub_folder
from train.infra.tiny import build_tiny_base_models

ROOT = Path(__file__).resolve().parents[2]
WRITE_TOKEN = "hf_alice_write"


@pytest.fixture(scope="module")
def colour_base(tmp_path_factory):
    """Tiny random Qwen2-VL and ViT whose tokenizer knows the colour labels."""
    return build_tiny_base_models(tmp_path_factory.mktemp("colour-base"), LABELS)


@pytest.fixture(scope="module")
def colour_export(colour_base, tmp_path_factory):
    """An exported EmoVLM-KD folder for the colour labels (random head and gate), as `final/` is."""
    torch.manual_seed(1)
    model, processor = assemble(colour_base["vlm"], LABELS, head_hidden_dims=[16])
    return save_hub_folder(model, processor, tmp_path_factory.mktemp("export") / "emovlm-kd-colours")


def split_images(colour_folder, split="test"):
    """(path, label index) of every image of a split, walked here rather than by the data loader."""
    return [(path, LABELS.index(label)) for label in LABELS
            for path in sorted((colour_folder / split / label).glob("*.png"))]


def metrics_by_hand(predictions, references, num_labels):
    predictions, references = np.asarray(predictions), np.asarray(references)
    per_class, f1 = [], []
    for c in range(num_labels):
        tp = np.sum((predictions == c) & (references == c))
        fp, fn = np.sum((predictions == c) & (references != c)), np.sum((predictions != c) & (references == c))
        per_class.append(tp / np.sum(references == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(predictions == references)), "macro_f1": float(np.mean(f1)),
            "per_class_accuracy": [float(x) for x in per_class]}


def assert_results_match(results, outputs, references):
    for branch, logits in outputs.items():
        expected = metrics_by_hand(torch.stack(logits).argmax(-1).tolist(), references, len(LABELS))
        got = results["branches"][branch]
        assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12), branch
        assert got["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-12), branch
        assert got["per_class_accuracy"] == pytest.approx(expected["per_class_accuracy"], abs=1e-12), branch


def cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "train", "evaluate", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def export_evaluation(colour_export, colour_folder, tmp_path_factory):
    """`python -m train evaluate --model <export> --data imagefolder` in a fresh process."""
    output_dir = tmp_path_factory.mktemp("eval-export") / "out"
    result = cli("--model", colour_export, "--data", "imagefolder", "--root", colour_folder, "--output-dir",
                 output_dir, "--batch-size", 4)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir, result


def test_export_results_equal_the_models_own_outputs(export_evaluation, colour_export, colour_folder):
    output_dir, result = export_evaluation
    results = json.loads((output_dir / "results.json").read_text())
    assert list(results["branches"]) == ["vlm", "head", "fused"]
    assert results["labels"] == LABELS and results["split"] == "test"
    model = AutoModelForImageClassification.from_pretrained(colour_export, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(colour_export, trust_remote_code=True)
    outputs, references = {"vlm": [], "head": [], "fused": []}, []
    with torch.inference_mode():
        for path, label in split_images(colour_folder):
            out = model(**processor([Image.open(path)], return_tensors="pt"))
            for branch, logits in (("vlm", out.vlm_logits), ("head", out.head_logits), ("fused", out.logits)):
                outputs[branch].append(logits[0].float())
            references.append(label)
    assert results["num_examples"] == len(references) == 18
    assert_results_match(results, outputs, references)
    assert (output_dir / "confusion_matrix.png").stat().st_size > 0
    assert "EmoVLM-KD (fused)" in result.stdout


def test_results_describe_what_was_evaluated_without_local_paths(export_evaluation, colour_export, colour_folder):
    output_dir, _ = export_evaluation
    text = (output_dir / "results.json").read_text()
    evaluated = json.loads(text)["evaluated"]
    assert evaluated["model"] == {"name": colour_export.name, "kind": "emovlm-kd"}
    assert evaluated["data"] == {"kind": "imagefolder", "root_name": colour_folder.name}
    assert evaluated["split"] == "test" and evaluated["num_examples"] == 18
    assert evaluated["computed_with"] == {"dtype": "float32", "device": "cpu", "batch_size": 4}
    for local in (str(colour_export), str(colour_folder), str(output_dir), tempfile.gettempdir()):
        assert local not in text


def test_stock_vlm_is_scored_zero_shot_on_its_vlm_branch_only(colour_base, colour_folder, tmp_path):
    results = evaluate_model(str(colour_base["vlm"]), {"kind": "imagefolder", "root": str(colour_folder)},
                             tmp_path / "out", labels=",".join(LABELS).split(","), batch_size=5)
    assert list(results["branches"]) == ["vlm"]
    assert results["evaluated"]["model"] == {"name": "vlm", "kind": "zero-shot"}
    # The same wrapping as the command (assemble: the paper's categorical prompt, these labels), image by image.
    model, processor = assemble(colour_base["vlm"], LABELS)
    model.eval()
    outputs, references = {"vlm": []}, []
    with torch.inference_mode():
        for path, label in split_images(colour_folder):
            out = model(**processor.image_processor([Image.open(path)], return_tensors="pt"))
            outputs["vlm"].append(out.vlm_logits[0].float())
            references.append(label)
    assert_results_match(results, outputs, references)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["branches"] == results["branches"]


def test_stock_vlm_on_an_image_folder_needs_labels(colour_base, colour_folder, tmp_path):
    result = cli("--model", colour_base["vlm"], "--data", "imagefolder", "--root", colour_folder, "--output-dir",
                 tmp_path / "out")
    assert result.returncode == 2 and "needs --labels" in result.stderr and "Traceback" not in result.stderr


def test_resume_after_interruption_does_not_recompute_finished_images(colour_export, colour_folder, tmp_path,
                                                                      monkeypatch, export_evaluation):
    scored, score_batch, interrupt = [], evaluate_model_module.score_batch, [True]

    def counting(model, image_processor, images):
        if interrupt[0] and len(scored) == 5:
            raise KeyboardInterrupt  # killed in the third chunk of 4 images
        scored.append(len(images))
        return score_batch(model, image_processor, images)

    monkeypatch.setattr(evaluate_model_module, "score_batch", counting)
    data = {"kind": "imagefolder", "root": str(colour_folder)}
    kwargs = {"batch_size": 2, "cache_every": 4}
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(str(colour_export), data, tmp_path / "out", **kwargs)
    assert sum(scored) == 10 and not (tmp_path / "out" / "results.json").exists()
    assert len(list((tmp_path / "out" / "cache").glob("rows-*.safetensors"))) == 2  # two finished chunks
    scored.clear()
    interrupt[0] = False
    resumed = evaluate_model(str(colour_export), data, tmp_path / "out", **kwargs)
    assert sum(scored) == 18 - 8  # only the images after the two cached chunks
    fresh = json.loads((export_evaluation[0] / "results.json").read_text())
    assert resumed["branches"] == fresh["branches"]  # the same predictions as one uninterrupted run
    scored.clear()
    evaluate_model(str(colour_export), data, tmp_path / "out", **kwargs)
    assert scored == []  # everything cached
    evaluate_model(str(colour_export), data, tmp_path / "out", **kwargs, force=True)
    assert sum(scored) == 18


def test_label_mismatch_names_both_label_sets(tiny_checkpoint, colour_export, colour_folder, tmp_path):
    # The Mikels-8 model on the colour folder: the data's labels are not the model's.
    result = cli("--model", tiny_checkpoint, "--data", "imagefolder", "--root", colour_folder, "--output-dir",
                 tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'blue'" in result.stderr and "the model's labels are ['amusement'" in result.stderr
    with pytest.raises(EvaluationError, match=r"--labels \['red', 'blue', 'green'\] differ from the labels of the "
                                              r"model emovlm-kd-colours: \['red', 'green', 'blue'\]"):
        evaluate_model(str(colour_export), {"kind": "imagefolder", "root": str(colour_folder)}, tmp_path / "x",
                       labels=["red", "blue", "green"])
    assert not (tmp_path / "out").exists()


def test_bad_options_are_clear_errors(colour_export, colour_folder, tmp_path):
    wrong_option = cli("--model", colour_export, "--data", "imagefolder", "--root", colour_folder, "--label-file",
                       "votes.txt", "--output-dir", tmp_path / "out")
    assert wrong_option.returncode == 2 and "data.label_file is not an option of data kind 'imagefolder'" in (
        wrong_option.stderr)
    missing = cli("--model", tmp_path / "nothing-here", "--data", "imagefolder", "--root", colour_folder,
                  "--output-dir", tmp_path / "out")
    assert missing.returncode == 2 and "nothing-here" in missing.stderr and "Traceback" not in missing.stderr
    both = cli("--model", colour_export, "--config", "recipe.yaml", "--data", "imagefolder", "--output-dir", tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr


def test_evaluate_with_a_config_is_still_the_runs_stage():
    args = parse_args(["evaluate", "--config", "recipe.yaml"])
    assert args.config == "recipe.yaml" and args.model is None


def fake_results(path, labels, kind="emovlm-kd", split="test", data=None, accuracy=0.5, macro_f1=0.25):
    branches = {"vlm": {"accuracy": 0.1, "macro_f1": 0.1}}
    if kind == "emovlm-kd":
        branches["fused"] = {"accuracy": accuracy, "macro_f1": macro_f1}
    path.write_text(json.dumps({"labels": labels, "split": split, "branches": branches, "evaluated": {
        "model": {"name": "m", "kind": kind}, "data": data or {"kind": "emotion6", "root_name": "Emotion6"}}}))
    return path


def test_push_refuses_results_of_another_model(colour_export, tmp_path):
    folder, variants = HubFolder.load(colour_export), load_variants()
    with pytest.raises(PublishError, match="zero-shot results of m, not of an EmoVLM-KD model"):
        load_evaluations([fake_results(tmp_path / "a.json", LABELS, kind="zero-shot")], folder, variants)
    with pytest.raises(PublishError, match=r"is for labels \['a', 'b', 'c'\], but the model predicts"):
        load_evaluations([fake_results(tmp_path / "b.json", ["a", "b", "c"])], folder, variants)
    twice = [fake_results(tmp_path / "c.json", LABELS), fake_results(tmp_path / "d.json", LABELS)]
    with pytest.raises(PublishError, match=r"both results on Emotion6 \[test\]"):
        load_evaluations(twice, folder, variants)
    (tmp_path / "run.json").write_text(json.dumps({"labels": LABELS, "branches": {}}))
    with pytest.raises(PublishError, match="has no `evaluated` description"):
        load_evaluations([tmp_path / "run.json"], folder, variants)


def test_push_adds_one_model_index_entry_per_data_set_and_split(export_evaluation, colour_export, colour_folder,
                                                              tmp_path):
    """Push the export with two evaluations (test and validation split) to the Hub test server."""
    validation = tmp_path / "validation"
    done = cli("--model", colour_export, "--data", "imagefolder", "--root", colour_folder, "--split", "validation",
               "--output-dir", validation)
    assert done.returncode == 0, done.stderr[-4000:]
    files = [export_evaluation[0] / "results.json", validation / "results.json"]
    measured = [json.loads(path.read_text()) for path in files]
    dry = push(colour_export, "custom", "emo-org/colours", dry_run=tmp_path / "dry", eval_results_files=files)
    with FakeHubServer(tokens={WRITE_TOKEN: ("alice", "write")}, organisations={"alice": ["emo-org"]}) as hub:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                    "HF_TOKEN": WRITE_TOKEN, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(ROOT)})
        pushed = subprocess.run(
            [sys.executable, "-m", "train", "push", "--run-dir", str(colour_export), "--variant", "custom",
             "--repo-id", "emo-org/colours", "--eval-results", str(files[0]), "--eval-results", str(files[1])],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert pushed.returncode == 0, pushed.stderr[-4000:]
        card = ModelCard(hub.file_content("emo-org/colours", "README.md").decode())
        uploaded = {path: hub.file_content("emo-org/colours", f"evaluations/{colour_folder.name}-{path}.json")
                    for path in ("test", "validation")}
        # The pushed model evaluated from the Hub, pinned to its commit: the same numbers as the local folder.
        commit = hub.commits("emo-org/colours")[0].oid
        from_hub = subprocess.run(
            [sys.executable, "-m", "train", "evaluate", "--model", "emo-org/colours", "--revision", commit, "--data",
             "imagefolder", "--root", str(colour_folder), "--output-dir", str(tmp_path / "from-hub")],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert from_hub.returncode == 0, from_hub.stderr[-4000:]
    hub_results = json.loads((tmp_path / "from-hub" / "results.json").read_text())
    assert hub_results["branches"] == measured[0]["branches"]
    assert hub_results["evaluated"]["model"] == {"name": "emo-org/colours", "revision": commit, "commit": commit,
                                                 "kind": "emovlm-kd"}
    entries = [(r.dataset_name, r.dataset_type, r.dataset_split, r.metric_type, r.metric_value)
               for r in card.data.eval_results]
    expected = [(colour_folder.name, colour_folder.name, results["split"], metric, results["branches"]["fused"][key])
                for results in measured for metric, key in (("accuracy", "accuracy"), ("f1", "macro_f1"))]
    assert entries == expected
    assert (Path(dry) / "README.md").read_text() == str(card)
    assert json.loads(uploaded["validation"]) == measured[1] and json.loads(uploaded["test"]) == measured[0]



def test_hub_kind_takes_load_dataset_options_as_yaml(export_evaluation, colour_export, colour_folder, tmp_path):
    # `datasets`' own imagefolder builder through `--data hub`: its ClassLabel names (sorted: blue, green, red) are
    # mapped onto the model's label order by name.
    from train.__main__ import main

    code = main(["evaluate", "--model", str(colour_export), "--data", "hub", "--name-or-path", "imagefolder",
                 "--load-kwargs", f"{{data_dir: '{colour_folder}'}}", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["evaluated"]["data"] == {"kind": "hub", "name_or_path": "imagefolder", "load_kwargs": {}}
    assert results["branches"] == json.loads((export_evaluation[0] / "results.json").read_text())["branches"]


def test_console_script_has_the_evaluate_command(tmp_path):
    script = Path(sys.executable).parent / "emovlm-kd"
    result = subprocess.run([str(script), "evaluate", "--help"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--revision", "--data", "--split", "--root", "--config"):
        assert option in result.stdout


# ---- whatever data a user has: one split, none of the others needed ------------------------------------------------


def evaluate_main(*args) -> int:
    from train.__main__ import main

    return main(["evaluate-model", *map(str, args)])


def read_results(output_dir):
    return json.loads((Path(output_dir) / "results.json").read_text())


def test_a_flat_folder_is_evaluated_whole(export_evaluation, colour_export, colour_folder, tmp_path):
    """A `<label>/<image>` folder (the colour test images): all of it, or a split file's cut with zero shares."""
    flat = tmp_path / "flat"
    shutil.copytree(colour_folder / "test", flat)
    expected = read_results(export_evaluation[0])["branches"]
    assert evaluate_main("--model", colour_export, "--data", "imagefolder", "--root", flat,
                         "--output-dir", tmp_path / "all") == 0
    results = read_results(tmp_path / "all")
    assert (results["split"], results["num_examples"], results["branches"]) == ("all", 18, expected)
    assert evaluate_main("--model", colour_export, "--data", "imagefolder", "--root", flat, "--split-file",
                         tmp_path / "split.json", "--fractions", "[0,0,1]", "--output-dir", tmp_path / "cut") == 0
    results = read_results(tmp_path / "cut")
    assert (results["split"], results["num_examples"], results["branches"]) == ("test", 18, expected)


def write_csv(path, folder):
    """`image,label` rows of every image under `folder/<label>/`."""
    rows = [f"{image},{image.parent.name}" for label in LABELS for image in sorted((folder / label).glob("*.png"))]
    path.write_text("image,label\n" + "\n".join(rows) + "\n")
    return path


def test_test_only_folders_and_csv_files_with_the_splits_they_have(export_evaluation, colour_export, colour_folder,
                                                                   tmp_path, capsys):
    expected = read_results(export_evaluation[0])["branches"]
    only_test = tmp_path / "only-test"
    shutil.copytree(colour_folder / "test", only_test / "test")
    csv = {split: str(write_csv(tmp_path / f"{split}.csv", colour_folder / split)) for split in ("train", "test")}
    hub_csv = ("--data", "hub", "--name-or-path", "csv", "--load-kwargs", json.dumps({"data_files": csv}))
    for name, data in (("folder", ("--data", "imagefolder", "--root", only_test)),
                       ("hub-folder", ("--data", "hub", "--name-or-path", "imagefolder", "--load-kwargs",
                                       json.dumps({"data_dir": str(only_test)}))),
                       ("csv", hub_csv)):
        assert evaluate_main("--model", colour_export, *data, "--output-dir", tmp_path / name) == 0, name
        results = read_results(tmp_path / name)
        assert (results["split"], results["num_examples"], results["branches"]) == ("test", 18, expected), name
    assert evaluate_main("--model", colour_export, *hub_csv, "--split", "train", "--output-dir", tmp_path / "tr") == 0
    assert read_results(tmp_path / "tr")["num_examples"] == 36
    capsys.readouterr()
    assert evaluate_main("--model", colour_export, *hub_csv, "--split", "validation", "--output-dir",
                         tmp_path / "va") == 2
    error = capsys.readouterr().err
    assert "no validation split; its splits are ['train', 'test']" in error and error.count("\n") == 1


def test_a_missing_data_root_is_a_one_line_error(colour_export, tmp_path, capsys):
    assert evaluate_main("--model", colour_export, "--data", "emoset", "--root", tmp_path / "missing",
                         "--output-dir", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and str(tmp_path / "missing") in error
    assert not (tmp_path / "out").exists()
