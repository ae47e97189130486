"""Shared fixtures: tiny offline models, and a private HF_HOME so remote code never touches the user's cache."""

import os
import tempfile

# Read by huggingface_hub and transformers at import time: set before anything imports them.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="emovlm-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_emovlm_kd import LABEL_SETS  # noqa: E402
from train.assemble import assemble, save_hub_folder  # noqa: E402
from train.tiny import build_tiny_base_models  # noqa: E402

torch.set_num_threads(2)


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
