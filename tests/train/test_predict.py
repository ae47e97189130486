import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from train.commands.predict import Predictor, predict_files, read_rows


def write_images(folder, count, side, seed=0, prefix=""):
    """`count` random RGB PNGs named in sorted order; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_images(tmp_path_factory.mktemp("images"), 11, 30, prefix="img_")
    (root / "img_0003b.jpg").write_text("a text file named .jpg")
    (root / "img_0007b.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor(str(tiny_checkpoint), top_k=2)


def paths_of(folder):
    return sorted(str(p) for p in folder.iterdir())


def test_bad_files_are_reported_and_the_run_goes_on(predictor, folder, tmp_path):
    output = tmp_path / "preds.jsonl"
    summary = predict_files(predictor, paths_of(folder), output, batch_size=4, show_progress=False)
    assert (summary.total, summary.predicted, summary.failed) == (13, 11, 2)
    rows = read_rows(output)
    assert [r["path"] for r in rows] == paths_of(folder)
    failed = {os.path.basename(r["path"]): r["error"] for r in rows if r["error"]}
    assert set(failed) == {"img_0003b.jpg", "img_0007b.png"} and all("Cannot read" in e for e in failed.values())
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in predictor.labels.values() and len(r["top_k"]) == 2 for r in good)


def test_dataloader_workers_give_exactly_the_rows_of_the_main_process(predictor, folder, tmp_path):
    """Decoding and preprocessing in 2 DataLoader workers: the same rows, bad files' errors included, in order."""
    images = write_images(tmp_path / "images", 9, 30, seed=5)
    Image.new("RGB", (20000, 2), (1, 2, 3)).save(images / "0004_thin.png")  # refused in loading: one error row
    paths = paths_of(folder) + paths_of(images)
    summaries = {workers: predict_files(predictor, paths, tmp_path / f"w{workers}.jsonl", batch_size=4,
                                        show_progress=False, num_workers=workers) for workers in (0, 2)}
    serial, parallel = read_rows(tmp_path / "w0.jsonl"), read_rows(tmp_path / "w2.jsonl")
    assert [r["path"] for r in parallel] == paths and parallel == serial
    assert (summaries[2].predicted, summaries[2].failed) == (summaries[0].predicted, summaries[0].failed) == (20, 3)
    assert summaries[2].errors == summaries[0].errors


def test_batched_predictions_equal_one_at_a_time(predictor, folder, tmp_path):
    paths = paths_of(folder)
    predict_files(predictor, paths, tmp_path / "b8.jsonl", batch_size=8, show_progress=False)
    predict_files(predictor, paths, tmp_path / "b1.jsonl", batch_size=1, show_progress=False)
    for a, b in zip(read_rows(tmp_path / "b8.jsonl"), read_rows(tmp_path / "b1.jsonl")):
        assert a.get("label") == b.get("label") and a.get("score") == pytest.approx(b.get("score"), abs=1e-5)


def test_resume_after_a_kill_neither_duplicates_nor_loses_rows(predictor, folder, tmp_path):
    paths = paths_of(folder)
    output = tmp_path / "preds.jsonl"
    predict_files(predictor, paths[:5], output, batch_size=2, show_progress=False)
    with open(output, "a") as handle:  # a write cut short by SIGKILL
        handle.write('{"path": "' + paths[5] + '", "label": "aw')
    summary = predict_files(predictor, paths, output, batch_size=2, show_progress=False)
    assert summary.resumed == 5 and summary.predicted + summary.failed == 8
    assert [r["path"] for r in read_rows(output)] == paths


def test_csv_output(predictor, folder, tmp_path):
    output = tmp_path / "preds.csv"
    predict_files(predictor, paths_of(folder), output, batch_size=4, show_progress=False)
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 13 and sum(bool(r["error"]) for r in rows) == 2


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_rows_from_disjoint_shards(tiny_checkpoint, folder, tmp_path):
    single, double = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["-m", "train", "predict", "--model", str(tiny_checkpoint), "--input", str(folder), "--batch-size", "3"]
    subprocess.run([sys.executable, *common, "--output", str(single)], check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, *common, "--output", str(double)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [line for line in result.stdout.splitlines() if line.startswith("Rank ")]
    assert sorted(line[:8] for line in shards) == ["Rank 0/2", "Rank 1/2"]
    assert sum(int(line.split("shard of ")[1].split()[0]) for line in shards) == 13
    one, two = read_rows(single), read_rows(double)
    assert [r["path"] for r in two] == [r["path"] for r in one]
    for a, b in zip(one, two):
        assert a.get("label") == b.get("label") and a.get("error") == b.get("error")
    assert not list(tmp_path.glob("two.jsonl.part*"))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from train.commands.predict import Predictor, predict_files
    predictor = Predictor(sys.argv[1])
    paths = sorted(str(p) for p in Path(sys.argv[2]).iterdir())
    out = Path(sys.argv[3])
    predict_files(predictor, paths[:200], out, batch_size=8, show_progress=False)
    after_200 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    predict_files(predictor, paths, out, batch_size=8, show_progress=False)
    after_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(after_200, after_all)
    """
)


@pytest.mark.slow
def test_memory_stays_flat_over_2000_images(tiny_checkpoint, tmp_path):
    images = write_images(tmp_path / "many", 2000, 16)
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tiny_checkpoint), str(images),
                             str(tmp_path / "p.jsonl")], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    after_200, after_all = map(int, result.stdout.split())
    assert after_all <= after_200 * 1.10, (after_200, after_all)
    assert sum(1 for _ in open(tmp_path / "p.jsonl")) == 2000
    assert json.loads(open(tmp_path / "p.jsonl").readline())["label"]


@pytest.mark.slow
def test_sigkill_half_way_then_rerun_gives_every_row_once(tiny_checkpoint, tmp_path):
    import signal
    import time

    images = write_images(tmp_path / "images", 240, 16, seed=1)
    output = tmp_path / "preds.jsonl"
    command = [sys.executable, "-m", "train", "predict", "--model", str(tiny_checkpoint), "--input", str(images),
               "--output", str(output), "--batch-size", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not output.exists() or output.stat().st_size < 5000):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(read_rows(output))
    assert 0 < written < 240, "the kill must land half-way"
    subprocess.run(command, env=env, check=True, capture_output=True)
    rows = read_rows(output)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.iterdir())
    assert len({r["path"] for r in rows}) == 240


# ---- a bad image in a batch, resumable CSV, flags, skipped files, locks, memory ----------------------------------


def test_an_image_the_model_cannot_take_gets_one_error_row_and_a_rerun_resumes(predictor, tmp_path):
    """A 20000x2 PNG (aspect ratio over Qwen2-VL's limit of 200) used to fail its whole batch, on every rerun."""
    images = write_images(tmp_path / "images", 5, 30)
    Image.new("RGB", (20000, 2), (1, 2, 3)).save(images / "0002_thin.png")  # 204 bytes
    paths = paths_of(images)
    output = tmp_path / "preds.jsonl"
    summary = predict_files(predictor, paths, output, batch_size=8, show_progress=False)
    assert (summary.predicted, summary.failed) == (5, 1)
    rows = read_rows(output)
    assert [r["path"] for r in rows] == paths
    (bad,) = [r for r in rows if r["error"]]
    assert bad["path"].endswith("0002_thin.png") and "0002_thin.png" in bad["error"] and "aspect ratio" in bad["error"]
    rerun = predict_files(predictor, paths, output, batch_size=8, show_progress=False)
    assert (rerun.resumed, rerun.predicted, rerun.failed) == (6, 0, 0) and len(read_rows(output)) == 6


def test_a_failing_batch_is_retried_one_image_at_a_time(tiny_checkpoint, tmp_path):
    """Without resizing, the 20000x2 image passes loading and fails in the processor: only its row has the error."""
    unresized = shutil.copytree(tiny_checkpoint, tmp_path / "no-resize")
    config = json.loads((unresized / "processor_config.json").read_text())
    config["image_processor"]["do_resize"] = False
    (unresized / "processor_config.json").write_text(json.dumps(config))
    predictor = Predictor(str(unresized))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # already at a size the model takes (a multiple of 28)
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    Image.new("RGB", (20000, 2)).save(images / "1_thin.png")
    rows = predictor.predict(paths_of(images))
    errors = {os.path.basename(r["path"]): r["error"] for r in rows if r["error"]}
    assert list(errors) == ["1_thin.png"] and "1_thin.png" in errors["1_thin.png"]
    assert sum(1 for r in rows if r.get("label")) == 3


LINE_BREAKS = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_file_names_with_line_separators_resume_without_duplicates(predictor, tmp_path, suffix):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i, separator in enumerate(LINE_BREAKS):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:02d} one{separator}two, \"three\".png")
    paths = paths_of(images)
    assert len(paths) == len(LINE_BREAKS)
    output = tmp_path / f"preds{suffix}"
    predict_files(predictor, paths[:4], output, batch_size=2, show_progress=False)
    with open(output, "a", newline="") as handle:  # a row cut short by SIGKILL, inside its quoted path
        handle.write('"' + paths[4][:-6] if suffix == ".csv" else '{"path": "x')
    assert [r["path"] for r in read_rows(output)] == paths[:4]
    summary = predict_files(predictor, paths, output, batch_size=2, show_progress=False)
    assert summary.resumed == 4 and summary.predicted == len(paths) - 4
    assert [r["path"] for r in read_rows(output)] == paths


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--top-k", "0"), ("--top-k", "-1"),
                                        ("--batch-size", "many"), ("--num-workers", "-1")])
def test_non_positive_counts_are_argparse_errors(flag, value, capsys, tmp_path):
    from train.__main__ import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(["predict", "--model", "m", "--input", str(tmp_path), "--output", "o.jsonl", flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_svg_and_broken_or_looping_symlinks_are_reported_as_skipped(tiny_checkpoint, tmp_path):
    from train.commands.predict import run_predict

    images = write_images(tmp_path / "images", 2, 20)
    (images / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (images / "notes.txt").write_text("not an image")
    os.symlink(images / "gone.png", images / "broken.png")
    os.symlink(images / "loop.png", images / "loop.png")
    os.symlink(images / "0000.png", images / "link.png")  # a good symlink is classified
    summary = run_predict(str(tiny_checkpoint), str(images), tmp_path / "p.jsonl", show_progress=False)
    assert summary.skipped == {
        "broken_symlink": [str(images / "broken.png")],
        "unsupported_image_format": [str(images / "drawing.svg")],
        "symlink_loop": [str(images / "loop.png")],
        "non_image_file": [str(images / "notes.txt")],
    }
    assert (summary.total, summary.predicted, summary.failed) == (3, 3, 0)
    assert "4 files skipped" in str(summary)


def predict_command(checkpoint, images, output):
    return [sys.executable, "-m", "train", "predict", "--model", str(checkpoint), "--input", str(images),
            "--output", str(output), "--batch-size", "2"]


@pytest.mark.slow
def test_a_second_predict_into_the_same_output_fails_at_once_and_a_killed_holder_does_not_block(tiny_checkpoint,
                                                                                                 tmp_path):
    import signal
    import time

    images = write_images(tmp_path / "images", 120, 16, seed=2)
    output = tmp_path / "preds.jsonl"
    pid_file = tmp_path / "preds.jsonl.lock.pid"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    holder = subprocess.Popen(predict_command(tiny_checkpoint, images, output), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not pid_file.exists() and holder.poll() is None:
            time.sleep(0.005)
        # Freeze the holder while it holds the lock: the second run meets a held lock however fast the first is.
        holder.send_signal(signal.SIGSTOP)
        assert holder.poll() is None and json.loads(pid_file.read_text())["pid"] == holder.pid
        second = subprocess.run(predict_command(tiny_checkpoint, images, output), env=env, capture_output=True,
                                text=True)
        assert second.returncode == 1
        assert f"PID {holder.pid}" in second.stderr and f"{output}.lock" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    written = len(read_rows(output))
    assert written < 120  # the holder was killed before it finished
    third = subprocess.run(predict_command(tiny_checkpoint, images, output), env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-3000:]
    rows = read_rows(output)
    assert sorted(r["path"] for r in rows) == paths_of(images) and len(rows) == 120
    assert not pid_file.exists()


BIG_PNG_SCRIPT = textwrap.dedent(
    """
    import sys
    from train.commands.predict import Predictor

    def peak():  # MiB; VmHWM is this process's own peak (ru_maxrss would start at the forking parent's RSS)
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) // 1024

    predictor = Predictor(sys.argv[1])
    model = peak()
    one = predictor.predict(sys.argv[2:3])
    after_one = peak()
    three = predictor.predict(sys.argv[2:])
    after_three = peak()
    assert all(row.get("label") for row in one + three), one + three
    print(after_one - model, after_three - model, model)
    """
)


@pytest.mark.slow
def test_peak_memory_of_12000_pixel_square_pngs_stays_under_1_gb_above_the_model(tiny_checkpoint, tmp_path):
    """432 MB each once decoded; the old code peaked 2.4 GB above the model for one and 5.4 GB for a batch of three."""
    big = tmp_path / "big.png"
    Image.new("RGB", (12000, 12000), (90, 120, 200)).save(big, compress_level=1)
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", BIG_PNG_SCRIPT, str(tiny_checkpoint),
                             *[str(big)] * 3], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    one, three, model = map(int, result.stdout.split())
    print(f"peak RSS above the model ({model} MiB): one 12000x12000 PNG {one} MiB, a batch of three {three} MiB")
    assert one < 1024 and three < 1024, (one, three)


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"load_in_4bit": True}, {"device_map": "auto"}])
def test_predict_loads_the_model_as_users_load_it(tiny_checkpoint, folder, tmp_path, options):
    """`--dtype`, `--load-in-4bit` and `--device-map`: the head and gate stay float32, labels agree with float32."""
    def _predict(predictor, output):
        predict_files(predictor, paths_of(folder), output, batch_size=4, show_progress=False)
        return output

    reference = {r["path"]: r["label"] for r in read_rows(_predict(Predictor(str(tiny_checkpoint)),
                                                                   tmp_path / "fp32.jsonl")) if not r.get("error")}
    predictor = Predictor(str(tiny_checkpoint), **options)
    for module in (predictor.model.distillation_head, predictor.model.gate):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    if "dtype" in options:
        assert predictor.model.vlm.get_input_embeddings().weight.dtype == torch.bfloat16
    rows = [r for r in read_rows(_predict(predictor, tmp_path / "other.jsonl")) if not r.get("error")]
    assert rows and sum(reference[r["path"]] == r["label"] for r in rows) >= len(rows) // 2


def test_predict_flags_reach_the_loader(tmp_path):
    from train.__main__ import parse_args

    args = parse_args(["predict", "--model", "org/name", "--input", "x", "--output", "y.jsonl", "--revision", "abc123",
                       "--dtype", "bfloat16", "--device-map", "auto", "--load-in-4bit"])
    assert (args.revision, args.dtype, args.device_map, args.load_in_4bit) == ("abc123", "bfloat16", "auto", True)
    from train.commands.predict import loading_kwargs

    kwargs = loading_kwargs("cpu", args.revision, args.dtype, args.device_map, args.load_in_4bit)
    assert kwargs["revision"] == "abc123" and kwargs["dtype"] == torch.bfloat16 and kwargs["device_map"] == "auto"
    assert kwargs["quantization_config"].load_in_4bit


def test_explain_adds_the_reasoning_answer_and_changes_no_label(tiny_checkpoint, predictor, folder, tmp_path):
    """`predict --explain`: each row also holds the VLM's reasoning answer (bounded by --max-new-tokens), the labels
    are those of a run without it, bad files keep their error rows, and a CSV started without the column is not
    appended to with it."""
    from train.__main__ import parse_args

    args = parse_args(["predict", "--model", "m", "--input", "x", "--output", "y.csv", "--explain",
                       "--max-new-tokens", "6"])
    assert (args.explain, args.max_new_tokens) == (True, 6)
    paths = paths_of(folder)[:6]
    predict_files(predictor, paths, tmp_path / "plain.jsonl", batch_size=3, show_progress=False)
    plain = read_rows(tmp_path / "plain.jsonl")
    explaining = Predictor(str(tiny_checkpoint), top_k=2, explain=True, max_new_tokens=6)
    predict_files(explaining, paths, tmp_path / "why.jsonl", batch_size=3, show_progress=False)
    rows = read_rows(tmp_path / "why.jsonl")
    assert [r["path"] for r in rows] == [r["path"] for r in plain]
    for with_text, without in zip(rows, plain):
        if without["error"]:
            assert with_text["error"] and "explanation" not in with_text
            continue
        assert (with_text["label"], with_text["vlm_label"], with_text["head_label"]) == (
            without["label"], without["vlm_label"], without["head_label"])
        assert isinstance(with_text["explanation"], str) and "explanation" not in without
    predict_files(explaining, paths[:2], tmp_path / "why.csv", batch_size=2, show_progress=False)
    with open(tmp_path / "why.csv", newline="") as handle:
        assert next(csv.reader(handle))[-1] == "explanation"
    from train.commands.predict import PredictionsFileError

    predict_files(predictor, paths[:2], tmp_path / "plain.csv", batch_size=2, show_progress=False)
    with pytest.raises(PredictionsFileError, match="explanation"):
        predict_files(explaining, paths, tmp_path / "plain.csv", batch_size=2, show_progress=False)


def test_a_checkpoint_exported_before_the_front_door_is_refused_in_one_line(tiny_checkpoint, folder, tmp_path):
    from train.__main__ import main

    old = shutil.copytree(tiny_checkpoint, tmp_path / "old-export")
    (old / "pipeline_emovlm_kd.py").write_text(  # what earlier exports shipped: the stock pipeline's answer
        "from transformers import ImageClassificationPipeline\n\n\n"
        "class EmoVLMKDImageClassificationPipeline(ImageClassificationPipeline):\n    pass\n")
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--model", str(old), "--input", str(folder), "--output", str(tmp_path / "p.jsonl")])
    assert "export it again" in str(exited.value) and str(old) in str(exited.value)
    assert not (tmp_path / "p.jsonl").exists() or not read_rows(tmp_path / "p.jsonl")


# ---- the output is a predictions file of this tool, locked by its real path ------------------------------------


def test_an_output_that_is_not_a_predictions_file_is_refused_and_left_untouched(tiny_checkpoint, folder, tmp_path):
    from train.commands.predict import PredictionsFileError, run_predict

    targets = {"model.safetensors": (tiny_checkpoint / "model.safetensors").read_bytes(),
               "config.json": (tiny_checkpoint / "config.json").read_bytes(),
               "photo.png": (folder / "img_0000.png").read_bytes(),
               "notes.jsonl": b'{"note": "mine"}\n',
               "table.csv": b"name,score\nx,1\n",
               "preds.csv": b'{"path": "a.png", "label": "awe"}\n'}  # JSONL rows in a .csv file: not ours either
    for name, content in targets.items():
        target = tmp_path / name
        target.write_bytes(content)
        with pytest.raises(PredictionsFileError, match=rf"{target} exists and is not a predictions file"):
            run_predict(str(tiny_checkpoint), str(folder), target, show_progress=False)
        assert target.read_bytes() == content, name
        assert not (tmp_path / f"{name}.lock").exists()  # refused before anything was written beside it
    with pytest.raises(PredictionsFileError, match=r"is a folder"):
        run_predict(str(tiny_checkpoint), str(folder), tmp_path, show_progress=False)
    result = subprocess.run([sys.executable, "-m", "train", "predict", "--model", str(tiny_checkpoint), "--input",
                             str(folder), "--output", str(tmp_path / "config.json")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not a predictions file" in result.stderr


def test_predictions_files_of_this_tool_are_recognised_and_resumed(predictor, folder, tmp_path):
    from train.commands.predict import is_predictions_file

    paths = paths_of(folder)
    for name in ("preds.jsonl", "preds.csv", "preds.txt"):
        output = tmp_path / name
        predict_files(predictor, paths[:3], output, show_progress=False)
        assert is_predictions_file(output), name
        summary = predict_files(predictor, paths, output, show_progress=False)  # resumed, not refused
        assert summary.resumed == 3 and len(read_rows(output)) == len(paths)
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"path": "/x/a.png", "err')  # the first row of a run killed mid-write
    assert is_predictions_file(torn)
    (tmp_path / "empty.jsonl").write_text("")
    assert is_predictions_file(tmp_path / "empty.jsonl")


def test_the_output_lock_holds_through_a_symlinked_name(tiny_checkpoint, folder, tmp_path):
    from train.commands.predict import output_lock, run_predict
    from train.infra.locks import LockedError

    real, link = tmp_path / "preds.jsonl", tmp_path / "alias.jsonl"
    link.symlink_to(real.name)
    with output_lock(real), pytest.raises(LockedError, match=r"Predictions file .*preds\.jsonl is in use"):
        run_predict(str(tiny_checkpoint), str(folder), link, show_progress=False)
    assert not real.exists()
    summary = run_predict(str(tiny_checkpoint), str(folder), link, show_progress=False)
    assert summary.predicted == 11 and link.is_symlink()  # the rows went into the file the link names
    assert len(read_rows(real)) == 13
    with output_lock(link), pytest.raises(LockedError):  # and the other way round
        run_predict(str(tiny_checkpoint), str(folder), real, show_progress=False)
