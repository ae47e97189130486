"""`handler.py`, the Inference Endpoints custom handler: loaded as an endpoint loads it, from an exported folder.

The folder is the exported tiny checkpoint plus `handler.py`, as `python -m train push` uploads them. A fresh
process with only that folder on `sys.path` imports `EndpointHandler` from it (the project's packages are not
importable there), builds it with the folder's path and calls it with bytes, base64, data URIs and strings that
are not images. It answers in the image-classification task format (parsed here with huggingface_hub's own output
type, as `InferenceClient.image_classification` parses it), never opens a path on the server, caps the images per
request and gives a bad image of a list its own error entry.
"""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_images
from huggingface_hub import ImageClassificationOutputElement
from transformers import AutoImageProcessor, AutoModelForImageClassification

HANDLER = Path(__file__).resolve().parents[2] / "modeling_emovlm_kd" / "handler.py"

ENDPOINT_SCRIPT = r'''
import json, sys

folder, requests = sys.argv[1], json.loads(sys.stdin.read())
sys.path.insert(0, folder)
from handler import EndpointHandler  # noqa: E402

handler = EndpointHandler(folder)
answers = []
for request in requests:
    if request.get("bytes"):
        request["inputs"] = request["inputs"].encode("latin-1")
    try:
        answers.append({"ok": json.dumps(handler(request))})  # what the endpoint sends back, as JSON
    except ValueError as error:
        answers.append({"error": str(error)})
imported = sorted(name for name in sys.modules
                  if name.split(".")[0] in ("train", "modeling_emovlm_kd", "tests", "conftest"))
print("REPORT " + json.dumps({"answers": answers, "project_modules": imported,
                              "model_module": type(handler.model).__module__}))
'''


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def endpoint_folder(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("endpoint") / "repository"
    shutil.copytree(tiny_checkpoint, folder)
    shutil.copy2(HANDLER, folder / "handler.py")
    return folder


def call_endpoint(folder: Path, requests: list[dict], tmp_path: Path, **env_vars) -> dict:
    # -I: no PYTHONPATH, no current directory on sys.path, so the project's packages cannot shadow the folder's code
    # (the editable install's finder could still find them: the script reports whatever got imported).
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", **env_vars}
    result = subprocess.run([sys.executable, "-I", "-c", ENDPOINT_SCRIPT, str(folder)], input=json.dumps(requests),
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("REPORT ", 1)[1])


MAX_IMAGES = 3  # the endpoint's cap on images per request in these tests (EMOVLM_MAX_IMAGES)


@pytest.fixture(scope="module")
def images():
    return random_images(3, seed=3)


@pytest.fixture(scope="module")
def served(endpoint_folder, images, tmp_path_factory):
    """Every request of this file, answered by one endpoint process (loading the model once)."""
    tmp_path = tmp_path_factory.mktemp("served")
    raw = [png_bytes(image) for image in images]
    encoded = [base64.b64encode(data).decode() for data in raw]
    on_disk = tmp_path / "on-endpoint-disk.png"
    on_disk.write_bytes(raw[1])
    requests = {
        "bytes": {"inputs": raw[0].decode("latin-1"), "bytes": True, "parameters": {"top_k": 3}},
        "base64": {"inputs": encoded[0], "parameters": {"top_k": 3}},
        "data_uri": {"inputs": f"data:image/png;base64,{encoded[1]}", "parameters": {"top_k": None}},
        "list": {"inputs": [encoded[0], encoded[1]]},
        "url": {"inputs": "https://example.com/photo.jpg"},
        "not_base64": {"inputs": "not base64 and not a file!"},
        "text_bytes": {"inputs": base64.b64encode(b"plain text, not an image").decode()},
        "top_k_0": {"inputs": encoded[0], "parameters": {"top_k": 0}},
        # Paths on the server's disk: an existing image, a system file and a missing one answer alike.
        "image_path": {"inputs": str(on_disk)},
        "etc_passwd": {"inputs": "/etc/passwd"},
        "missing_path": {"inputs": str(tmp_path / "no-such-file.png")},
        "paths_in_a_list": {"inputs": [encoded[0], str(on_disk)]},
        "one_bad_of_three": {"inputs": [encoded[0], base64.b64encode(b"GIF89a broken").decode(), encoded[2]],
                             "parameters": {"top_k": 2}},
        "too_many": {"inputs": [encoded[0]] * (MAX_IMAGES + 1)},
        "at_the_cap": {"inputs": [encoded[0]] * MAX_IMAGES, "parameters": {"top_k": 1}},
        "explain": {"inputs": encoded[2], "parameters": {"top_k": 2, "explain": True, "max_new_tokens": 4}},
        "explain_too_long": {"inputs": encoded[2], "parameters": {"explain": True, "max_new_tokens": 100000}},
        "unknown_parameter": {"inputs": encoded[0], "parameters": {"topk": 3}},
    }
    report = call_endpoint(endpoint_folder, list(requests.values()), tmp_path,
                           EMOVLM_MAX_IMAGES=str(MAX_IMAGES), EMOVLM_MAX_NEW_TOKENS="16")
    answers = {}
    for name, answer in zip(requests, report.pop("answers")):
        answers[name] = {"ok": json.loads(answer["ok"]), "json": answer["ok"]} if "ok" in answer else answer
    return answers, report


@pytest.fixture(scope="module")
def expected(endpoint_folder, images):
    """What the handler must return, computed here with the same checkpoint: per image, every label by fused
    probability with its VLM and head probabilities, and each branch's own label."""
    model = AutoModelForImageClassification.from_pretrained(endpoint_folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(endpoint_folder, trust_remote_code=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with torch.no_grad():
        output = model(**processor(images, return_tensors="pt"))
    wanted = []
    for i in range(len(images)):
        fused, vlm, head = (logits[i].softmax(-1) for logits in (output.logits, output.vlm_logits, output.head_logits))
        order = fused.argsort(descending=True).tolist()
        wanted.append({"fused": [(labels[j], float(fused[j])) for j in order],
                       "vlm": labels[int(vlm.argmax())], "vlm_score": float(vlm.max()),
                       "head": labels[int(head.argmax())], "head_score": float(head.max()),
                       "branch_weights": output.branch_weights[i].tolist()})
    return wanted, labels


def check(answer, want, k):
    """An answer for one image: the task's list of {label, score}, best first, with each branch as extra keys."""
    assert [item["label"] for item in answer] == [label for label, _ in want["fused"][:k]]
    assert [item["score"] for item in answer] == pytest.approx([s for _, s in want["fused"][:k]], abs=1e-5)
    top = answer[0]
    assert top["vlm"]["label"] == want["vlm"] and top["head"]["label"] == want["head"]
    assert top["vlm"]["score"] == pytest.approx(want["vlm_score"], abs=1e-5)
    assert top["head"]["score"] == pytest.approx(want["head_score"], abs=1e-5)
    assert [top["branch_weights"]["vlm"], top["branch_weights"]["head"]] == pytest.approx(want["branch_weights"],
                                                                                          abs=1e-5)


def test_endpoint_handler_answers_bytes_base64_and_data_uris_in_the_task_format(served, expected):
    answers, report = served
    wanted, labels = expected
    assert report["project_modules"] == [], "handler.py must import nothing from the project"
    assert report["model_module"].startswith("transformers_modules."), "the folder's own remote code"
    check(answers["bytes"]["ok"], wanted[0], 3)  # raw bytes
    check(answers["base64"]["ok"], wanted[0], 3)  # base64
    check(answers["data_uri"]["ok"], wanted[1], len(labels))  # data URI, top_k null: every label
    both = answers["list"]["ok"]
    assert isinstance(both, list) and len(both) == 2
    check(both[0], wanted[0], 5)  # the default top_k
    check(both[1], wanted[1], 5)
    assert "is a URL" in answers["url"]["error"] and "does not download" in answers["url"]["error"]
    assert "not base64-encoded image data" in answers["not_base64"]["error"]
    assert answers["text_bytes"]["error"].startswith("inputs: Cannot read image data")  # names the input
    assert "top_k must be a whole number" in answers["top_k_0"]["error"]
    assert "topk" in answers["unknown_parameter"]["error"] and "top_k" in answers["unknown_parameter"]["error"]


def test_the_answer_parses_as_huggingface_hub_image_classification_output(served, expected):
    """`InferenceClient.image_classification` parses the response body with `parse_obj_as_list`: a single image's
    answer parses to elements, a list's to a list of element lists; extra keys become attributes."""
    answers, _ = served
    wanted, _ = expected
    parsed = ImageClassificationOutputElement.parse_obj_as_list(answers["base64"]["json"].encode())
    assert all(isinstance(element, ImageClassificationOutputElement) for element in parsed)
    assert [(p.label, p.score) for p in parsed] == [(e["label"], e["score"]) for e in answers["base64"]["ok"]]
    assert parsed[0].vlm["label"] == wanted[0]["vlm"] and parsed[0].head["label"] == wanted[0]["head"]
    assert parsed[0].branch_weights["vlm"] + parsed[0].branch_weights["head"] == pytest.approx(1.0)
    listed = ImageClassificationOutputElement.parse_obj_as_list(answers["list"]["json"].encode())
    assert [[p.label for p in image] for image in listed] == [[label for label, _ in w["fused"][:5]]
                                                              for w in wanted[:2]]


def test_a_path_on_the_server_is_never_opened_and_its_existence_is_not_revealed(served):
    """A string is base64 (or a data URI) or nothing: an image file, `/etc/passwd` and a missing file on the
    server's disk get the same answer, so the endpoint is no oracle of which files exist."""
    answers, _ = served
    errors = {name: answers[name].get("error") for name in ("image_path", "etc_passwd", "missing_path")}
    assert all(errors.values()), errors  # the image on disk is not classified either
    assert len(set(errors.values())) == 1, errors
    assert "never opens a path" in errors["image_path"]
    (entry,) = answers["paths_in_a_list"]["ok"][1]
    assert entry["label"] is None and entry["error"] == "inputs[1] " + errors["image_path"].removeprefix("inputs ")


def test_a_bad_image_of_a_list_gets_its_own_error_entry(served, expected):
    answers, _ = served
    wanted, _ = expected
    first, bad, third = answers["one_bad_of_three"]["ok"]
    check(first, wanted[0], 2)
    check(third, wanted[2], 2)
    assert len(bad) == 1 and bad[0]["label"] is None and bad[0]["score"] is None
    assert bad[0]["error"].startswith("inputs[1]: Cannot read image data")


def test_images_per_request_are_capped(served):
    answers, _ = served
    error = answers["too_many"]["error"]
    assert f"{MAX_IMAGES + 1} images" in error and f"at most {MAX_IMAGES}" in error and "EMOVLM_MAX_IMAGES" in error
    assert len(answers["at_the_cap"]["ok"]) == MAX_IMAGES


def test_explain_is_a_parameter_bounded_by_the_endpoint(served, expected):
    answers, _ = served
    wanted, _ = expected
    answer = answers["explain"]["ok"]
    check(answer, wanted[2], 2)  # the label and scores are those without explaining
    assert isinstance(answer[0]["explanation"], str) and 1 <= answer[0]["explanation_tokens"] <= 4
    error = answers["explain_too_long"]["error"]
    assert "max_new_tokens" in error and "16" in error and "EMOVLM_MAX_NEW_TOKENS" in error


def test_the_cap_is_a_constructor_argument_too(endpoint_folder, tmp_path):
    script = (f"import sys; sys.path.insert(0, {str(endpoint_folder)!r})\n"
              "from handler import EndpointHandler\n"
              f"handler = EndpointHandler({str(endpoint_folder)!r}, max_images=1)\n"
              "try:\n    handler({'inputs': [b'x', b'y']})\nexcept ValueError as error:\n    print('REPORT', error)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert "REPORT inputs holds 2 images" in result.stdout and "at most 1" in result.stdout, result.stderr[-3000:]
