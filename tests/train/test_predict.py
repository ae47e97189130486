import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from train.predict import Predictor, predict_files, read_rows


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
    from train.predict import Predictor, predict_files
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
