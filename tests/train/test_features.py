import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.infra.assemble import assemble
from train.stages.features import cached, compute_teacher_logits, compute_vlm_features, model_fingerprint


@pytest.fixture(scope="module")
def image_dataset():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28 + 4 * i, 36, 3), dtype=np.uint8)) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]}, features=features)


@torch.no_grad()
def test_cached_features_equal_fresh_model_outputs(tiny_base, image_dataset):
    model, processor = assemble(tiny_base["vlm"], ["a", "b", "c"], head_hidden_dims=[16])
    model.eval()
    cache = compute_vlm_features(model, processor.image_processor, image_dataset, batch_size=4)
    fresh = model(**processor.image_processor(list(image_dataset["image"]), return_tensors="pt"))
    # Batches of 4 against one of 6 (float32 sums in another order): 1e-5 of each tensor's scale.
    for name in ("visual_features", "vlm_logits"):
        atol = 1e-5 * max(1.0, float(getattr(fresh, name).abs().max()))
        torch.testing.assert_close(cache[name], getattr(fresh, name), atol=atol, rtol=0, msg=name)
    assert cache["labels"].tolist() == list(image_dataset["label"])


@torch.no_grad()
def test_preprocessing_in_dataloader_workers_gives_identical_caches(tiny_base, image_dataset, monkeypatch):
    """`num_workers=2` decodes and preprocesses in two worker processes; the caches equal the in-process ones."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model, processor = assemble(tiny_base["vlm"], ["a", "b", "c"], head_hidden_dims=[16])
    model.eval()
    torch.manual_seed(0)
    teacher = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    teacher_processor = ViTImageProcessor(size={"height": 32, "width": 32})
    pids = set()
    image_processor = processor.image_processor
    original = type(image_processor).__call__

    def recording(self, *args, **kwargs):
        pids.add(os.getpid())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(image_processor), "__call__", recording)
    inline = compute_vlm_features(model, image_processor, image_dataset, batch_size=4)
    inline_teacher = compute_teacher_logits(teacher, teacher_processor, image_dataset, batch_size=4)
    assert pids == {os.getpid()}  # 0 workers: today's behaviour, in this process
    pids.clear()
    workers = compute_vlm_features(model, image_processor, image_dataset, batch_size=4, num_workers=2)
    workers_teacher = compute_teacher_logits(teacher, teacher_processor, image_dataset, batch_size=4, num_workers=2)
    assert inline.keys() == workers.keys() and inline_teacher.keys() == workers_teacher.keys()
    for key in inline:
        assert torch.equal(inline[key], workers[key]), key
    for key in inline_teacher:
        assert torch.equal(inline_teacher[key], workers_teacher[key]), key
    assert workers["labels"].tolist() == list(image_dataset["label"])
    assert not pids  # with workers, this process preprocessed nothing (the workers' calls are in their processes)


def test_cache_is_built_once_and_rebuilt_when_stale_or_damaged(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(4.0), "labels": torch.arange(4)}

    path = tmp_path / "train.safetensors"
    first = cached(path, "fp-1", build)
    second = cached(path, "fp-1", build)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
    cached(path, "fp-2", build)  # another model or data set
    assert len(calls) == 2
    path.write_bytes(path.read_bytes()[:-7])  # a half-written file
    cached(path, "fp-2", build)
    assert len(calls) == 3
    assert torch.equal(load_file(path)["x"], torch.arange(4.0))
    assert not list(tmp_path.glob(".*tmp*")), "temporary files must not be left behind"


def test_a_failed_build_leaves_no_cache(tmp_path):
    path = tmp_path / "train.safetensors"

    def broken():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached(path, "fp", broken)
    assert not path.exists()


def test_model_fingerprint_changes_with_the_weights(tiny_base, tmp_path):
    import shutil

    copy = tmp_path / "vlm"
    shutil.copytree(tiny_base["vlm"], copy)
    before = model_fingerprint(copy)
    assert model_fingerprint(tiny_base["vlm"]) == before
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != before
