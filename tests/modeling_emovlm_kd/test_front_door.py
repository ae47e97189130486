"""The one inference front door: `pipeline("image-classification", model=..., trust_remote_code=True)` of an exported
folder, whose class (`pipeline_emovlm_kd.py`) ships with the checkpoint.

It answers in the task's standard format (a list of `{label, score}` per image, best first, `top_k` long) with each
branch's numbers as extra keys, batches images of any sizes exactly as it classifies them one at a time, and turns a
bad image into an error entry instead of failing its batch. `train predict`, the app and `handler.py` all call it
(`tests/test_app.py::test_every_door_gives_the_same_answers`).
"""

import json

import numpy as np
import pytest
import torch
from conftest import random_images
from huggingface_hub import ImageClassificationOutputElement
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

# Sizes whose patch grids all differ (the tiny processor's 14-pixel patches, 2x2 merging): (4, 4), (4, 8), (14, 4),
# (6, 6), (2, 22).
MIXED_SIZES = [(28, 28), (56, 112), (200, 60), (90, 90), (30, 300)]
# float32 throughout: the same products in another order (a batch pads the prompts differently) agree to ~1e-6.
FP32 = 1e-5


def assert_same_answer(a, b):
    """Two answers for one image: the same labels in the same order, the same numbers within float32 rounding."""
    assert [e["label"] for e in a] == [e["label"] for e in b]
    for x, y in zip(a, b):
        for key in ("score", "vlm_score", "head_score", "vlm_log_likelihood"):
            assert x[key] == pytest.approx(y[key], abs=FP32), key
    assert (a[0]["vlm"]["label"], a[0]["head"]["label"]) == (b[0]["vlm"]["label"], b[0]["head"]["label"])
    assert a[0]["branch_weights"]["vlm"] == pytest.approx(b[0]["branch_weights"]["vlm"], abs=FP32)


def mixed_images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in MIXED_SIZES]


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    return pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The model's own outputs, one image at a time, as a user computes them without the pipeline."""
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)

    def outputs(image):
        with torch.no_grad():
            return model(**processor(image, return_tensors="pt"))

    return model, outputs


def test_the_answer_is_the_task_format_with_each_branch_as_extra_keys(classifier, reference):
    model, outputs = reference
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    images = random_images(3, seed=4)
    answers = classifier(images, top_k=3)
    assert len(answers) == 3
    for image, answer in zip(images, answers):
        out = outputs(image)
        fused, vlm, head = (x[0].softmax(-1) for x in (out.logits, out.vlm_logits, out.head_logits))
        order = sorted(range(len(labels)), key=lambda i: -float(fused[i]))[:3]
        assert [element["label"] for element in answer] == [labels[i] for i in order]
        for element, i in zip(answer, order):
            assert element["score"] == pytest.approx(float(fused[i]), abs=FP32)
            assert element["vlm_score"] == pytest.approx(float(vlm[i]), abs=FP32)
            assert element["head_score"] == pytest.approx(float(head[i]), abs=FP32)
            assert element["vlm_log_likelihood"] == pytest.approx(float(out.vlm_logits[0, i]), abs=FP32)
        top = answer[0]
        assert top["vlm"]["label"] == labels[int(vlm.argmax())]
        assert top["vlm"]["score"] == pytest.approx(float(vlm.max()), abs=FP32)
        assert top["head"]["label"] == labels[int(head.argmax())]
        assert top["head"]["score"] == pytest.approx(float(head.max()), abs=FP32)
        weights = out.branch_weights[0]
        assert [top["branch_weights"]["vlm"], top["branch_weights"]["head"]] == pytest.approx(weights.tolist(),
                                                                                              abs=FP32)
        assert "error" not in top and all(set(e) >= {"label", "score"} for e in answer)
    single = classifier(images[0], top_k=2)  # one image: one list, as the stock pipeline answers
    assert [e["label"] for e in single] == [e["label"] for e in answers[0][:2]]
    parsed = ImageClassificationOutputElement.parse_obj_as_list(json.dumps(single).encode())
    assert [(p.label, p.score) for p in parsed] == [(e["label"], e["score"]) for e in single]
    assert parsed[0].vlm == single[0]["vlm"] and parsed[0].branch_weights == single[0]["branch_weights"]
    assert len(classifier(images[0], top_k=100)) == len(labels)  # top_k is capped at the number of labels
    with pytest.raises(ValueError, match="top_k"):
        classifier(images[0], top_k=0)


@pytest.mark.parametrize("batch_size", [2, 4])
def test_batches_of_differently_sized_images_equal_one_at_a_time(classifier, tmp_path, batch_size):
    images = mixed_images()
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    grids = {tuple(classifier.image_processor(image, return_tensors="pt")["image_grid_thw"][0].tolist())
             for image in images}
    assert len(grids) == len(images), "the test needs images whose patch grids differ"
    for inputs in (images, paths):
        alone = [classifier(item, top_k=8) for item in inputs]
        together = classifier(inputs, batch_size=batch_size, top_k=8)
        for a, b in zip(alone, together):
            assert_same_answer(a, b)


def test_a_bad_image_is_an_error_entry_and_its_batch_goes_on(classifier, tiny_checkpoint, tmp_path):
    good = mixed_images(seed=1)[:3]
    for i, image in enumerate(good):
        image.save(tmp_path / f"good{i}.png")
    text, empty, thin = tmp_path / "notes.png", tmp_path / "empty.jpg", tmp_path / "thin.png"
    text.write_text("not an image")
    empty.write_bytes(b"")
    Image.new("RGB", (20000, 2), (1, 2, 3)).save(thin)  # aspect ratio over Qwen2-VL's limit of 200
    missing = tmp_path / "missing.png"
    inputs = [str(tmp_path / "good0.png"), str(text), good[1], str(missing), str(empty), str(thin),
              str(tmp_path / "good2.png")]
    answers = classifier(inputs, batch_size=3, top_k=2)
    assert len(answers) == len(inputs)
    bad = {1: "notes.png", 3: "missing.png", 4: "empty.jpg", 5: "thin.png"}
    for i, answer in enumerate(answers):
        if i in bad:
            assert len(answer) == 1 and answer[0]["label"] is None and answer[0]["score"] is None, answer
            assert bad[i] in answer[0]["error"], answer  # the message names the file
            continue
        assert_same_answer(answer, classifier(inputs[i], top_k=2))  # as alone: the bad ones changed nothing
    # A lone bad image is an entry too, and images over the processor's pixel limit are refused before decoding.
    (entry,) = classifier(str(text))
    assert entry["label"] is None and "notes.png" in entry["error"]
    strict = AutoImageProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    strict.max_image_pixels = 10_000
    small = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True, image_processor=strict)
    big = Image.new("RGB", (200, 100))
    answers = small([big, good[0]], batch_size=2)
    assert answers[0][0]["label"] is None and "max_image_pixels" in answers[0][0]["error"]
    assert answers[1][0]["label"] is not None


def test_image_bytes_are_decoded_by_the_checkpoint_processor(classifier, tmp_path):
    image = mixed_images(seed=2)[1]
    image.save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert_same_answer(classifier(data, top_k=3), classifier(str(tmp_path / "a.png"), top_k=3))
    (entry,) = classifier(b"plain text, not an image")
    assert entry["label"] is None and "Cannot read image data" in entry["error"]
