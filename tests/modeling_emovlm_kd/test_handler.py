"""`handler.py`, the Inference Endpoints custom handler: loaded as an endpoint loads it, from an exported folder.

The folder is the exported tiny checkpoint plus `handler.py`, as `python -m train push` uploads them. A fresh
process with only that folder on `sys.path` imports `EndpointHandler` from it (the project's packages are not
importable there), builds it with the folder's path and calls it with bytes, base64 and a path.
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
        answers.append({"ok": handler(request)})
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


def call_endpoint(folder: Path, requests: list[dict], tmp_path: Path) -> dict:
    # -I: no PYTHONPATH, no current directory on sys.path, so the project's packages cannot shadow the folder's code
    # (the editable install's finder could still find them: the script reports whatever got imported).
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", ENDPOINT_SCRIPT, str(folder)], input=json.dumps(requests),
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("REPORT ", 1)[1])


def test_endpoint_handler_answers_bytes_base64_and_paths(endpoint_folder, tmp_path):
    images = random_images(2, seed=3)
    raw = [png_bytes(image) for image in images]
    encoded = [base64.b64encode(data).decode() for data in raw]
    path = tmp_path / "on-endpoint-disk.png"
    path.write_bytes(raw[1])
    requests = [
        {"inputs": raw[0].decode("latin-1"), "bytes": True, "parameters": {"top_k": 3}},
        {"inputs": encoded[0], "parameters": {"top_k": 3}},
        {"inputs": f"data:image/png;base64,{encoded[1]}", "parameters": {"top_k": None}},
        {"inputs": [encoded[0], str(path)]},
        {"inputs": "https://example.com/photo.jpg"},
        {"inputs": "not base64 and not a file!"},
        {"inputs": base64.b64encode(b"plain text, not an image").decode()},
        {"inputs": encoded[0], "parameters": {"top_k": 0}},
    ]
    report = call_endpoint(endpoint_folder, requests, tmp_path)
    assert report["project_modules"] == [], "handler.py must import nothing from the project"
    assert report["model_module"].startswith("transformers_modules."), "the folder's own remote code"

    # What the handler must return, computed here with the same checkpoint.
    model = AutoModelForImageClassification.from_pretrained(endpoint_folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(endpoint_folder, trust_remote_code=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with torch.no_grad():
        output = model(**processor(images, return_tensors="pt"))
    expected = []
    for i in range(len(images)):
        fused, vlm, head = (logits[i].softmax(-1) for logits in (output.logits, output.vlm_logits, output.head_logits))
        order = fused.argsort(descending=True).tolist()
        expected.append({"fused": [(labels[j], float(fused[j])) for j in order],
                         "vlm": labels[int(vlm.argmax())], "vlm_score": float(vlm.max()),
                         "head": labels[int(head.argmax())], "head_score": float(head.max())})

    def check(answer, want, k):
        assert [item["label"] for item in answer["fused"]] == [label for label, _ in want["fused"][:k]]
        assert [item["score"] for item in answer["fused"]] == pytest.approx([s for _, s in want["fused"][:k]],
                                                                             abs=1e-5)
        assert answer["vlm"]["label"] == want["vlm"] and answer["head"]["label"] == want["head"]
        assert answer["vlm"]["score"] == pytest.approx(want["vlm_score"], abs=1e-5)
        assert answer["head"]["score"] == pytest.approx(want["head_score"], abs=1e-5)

    answers = report["answers"]
    check(answers[0]["ok"], expected[0], 3)  # raw bytes
    check(answers[1]["ok"], expected[0], 3)  # base64
    check(answers[2]["ok"], expected[1], len(labels))  # data URI, top_k null: every label
    both = answers[3]["ok"]
    assert isinstance(both, list) and len(both) == 2
    check(both[0], expected[0], 5)  # the default top_k
    check(both[1], expected[1], 5)  # a file on the endpoint's disk
    assert "is a URL" in answers[4]["error"] and "does not download" in answers[4]["error"]
    assert "neither base64-encoded image data nor an existing file" in answers[5]["error"]
    assert answers[6]["error"].startswith("Cannot read image file inputs")  # names the input, not a temp file
    assert "top_k must be a whole number" in answers[7]["error"]
