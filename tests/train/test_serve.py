"""`emovlm-kd serve` (`train/commands/serve.py`): the real server, started as users start it, classified through
huggingface_hub's real `InferenceClient`.

Each server is `python -m train serve --model <tiny checkpoint> --port 0` in a subprocess on 127.0.0.1. Batching is
checked from the server's own counters (`GET /health`), never from timings: the batching server waits up to a minute
for a batch to fill, so a batch of 4 forms exactly when 4 images have arrived, and a full queue is provoked by
holding a batch open, not by racing the model.
"""

import base64
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import random_images
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
MAX_IMAGES = 4
MAX_NEW_TOKENS = 8
MAX_REQUEST_BYTES = 200 * 1024


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start_server(checkpoint: Path, workdir: Path, *flags: str):
    """`python -m train serve` on a free port; returns (base URL, process) once `/health` answers."""
    log = workdir / "serve.log"
    sink = open(log, "w")  # noqa: SIM115 - the process writes to it until the fixture stops it
    process = subprocess.Popen([sys.executable, "-m", "train", "serve", "--model", str(checkpoint), "--host",
                                "127.0.0.1", "--port", "0", "--log-level", "warning", *flags],
                               stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if url is None:
            line = next((line for line in log.read_text().splitlines() if line.startswith("Serving ")), None)
            url = line.split(" on ", 1)[1].split()[0] if line else None
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return url, process, sink
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    process.kill()
    pytest.fail(f"serve did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop_server(process, sink) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    sink.close()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """A server with a short batching wait, for single requests and limits."""
    url, process, sink = start_server(
        tiny_checkpoint, tmp_path_factory.mktemp("serve"), "--max-batch-size", "4", "--max-wait-ms", "5",
        "--max-images", str(MAX_IMAGES), "--max-new-tokens", str(MAX_NEW_TOKENS),
        "--max-request-bytes", f"{MAX_REQUEST_BYTES // 1024}kb")
    yield url
    assert process.poll() is None, "the server died during the tests"
    stop_server(process, sink)


@pytest.fixture(scope="module")
def batching_server(tiny_checkpoint, tmp_path_factory):
    """A server whose batches wait up to a minute to fill: 4 images make a batch, and a batch of fewer stays open."""
    url, process, sink = start_server(
        tiny_checkpoint, tmp_path_factory.mktemp("serve-batching"), "--max-batch-size", "4", "--max-wait-ms",
        "60000", "--max-queue", "4", "--max-images", "4")
    yield url
    assert process.poll() is None, "the server died during the tests"
    stop_server(process, sink)


@pytest.fixture
def online(monkeypatch):
    """`InferenceClient` refuses every request under HF_HUB_OFFLINE (conftest sets it); these go to 127.0.0.1."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    """The checkpoint's front door, in this process: what the server must answer."""
    from transformers import pipeline

    return pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [png(image) for image in random_images(4, seed=7)]


def same(answer, expected, k=None) -> None:
    """A server answer (parsed elements or dicts) equals the front door's answer for the image alone."""
    as_dict = [e if isinstance(e, dict) else dict(e.items()) for e in answer]
    expected = expected[:k] if k else expected
    assert [e["label"] for e in as_dict] == [e["label"] for e in expected]
    assert [e["score"] for e in as_dict] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert as_dict[0]["vlm"]["label"] == expected[0]["vlm"]["label"]
    assert as_dict[0]["head"]["label"] == expected[0]["head"]["label"]
    assert as_dict[0]["branch_weights"]["vlm"] == pytest.approx(expected[0]["branch_weights"]["vlm"], abs=1e-5)


def health(url: str) -> dict:
    response = httpx.get(url + "/health", timeout=10)
    assert response.status_code == 200
    return response.json()


def test_inference_client_classifies_through_the_server(server, online, classifier, images, tmp_path):
    """Raw bytes without parameters, base64 JSON with `top_k` and `function_to_apply` (what the client sends for
    each), and a file the client reads itself: the task's elements with every branch as extra attributes."""
    client = InferenceClient(base_url=server)
    same(client.image_classification(images[0]), classifier(images[0]))
    same(client.image_classification(images[1], top_k=3), classifier(images[1], top_k=3))
    sigmoid = client.image_classification(images[1], top_k=2, function_to_apply="sigmoid")
    same(sigmoid, classifier(images[1], top_k=2, function_to_apply="sigmoid"))
    photo = tmp_path / "photo.png"
    photo.write_bytes(images[2])
    answer = client.image_classification(str(photo), top_k=8)
    same(answer, classifier(images[2], top_k=8))
    assert answer[0].vlm_score == pytest.approx(classifier(images[2])[0]["vlm_score"], abs=1e-5)
    assert sum(answer[0].branch_weights.values()) == pytest.approx(1.0)


def test_health_reports_the_model_and_the_limits(server, tiny_checkpoint):
    state = health(server)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert state["status"] == "ok"
    assert state["labels"] == [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    assert state["limits"] == {"max_batch_size": 4, "max_wait_ms": 5, "max_queue": 64,
                               "max_request_bytes": MAX_REQUEST_BYTES, "max_images": MAX_IMAGES,
                               "max_new_tokens": MAX_NEW_TOKENS}


def test_concurrent_requests_are_batched_and_a_bad_image_fails_alone(batching_server, online, classifier, images):
    """Four clients at once, one sending a file that is not an image: the server classifies the four in one
    pipeline call (its counters say so), the three images get their own answers and the bad one a 400 naming it."""
    before = health(batching_server)["counters"]
    sent = [images[0], b"GIF89a this is not an image", images[1], images[2]]
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        try:
            results[i] = InferenceClient(base_url=batching_server, timeout=120).image_classification(sent[i], top_k=3)
        except Exception as error:  # noqa: BLE001 - kept and checked below
            results[i] = error

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(sent))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    after = health(batching_server)["counters"]
    assert after["batches"] - before["batches"] == 1, after
    assert after["batch_sizes"].get("4", 0) - before["batch_sizes"].get("4", 0) == 1, after
    assert after["largest_batch"] == 4
    for i in (0, 2, 3):
        same(results[i], classifier(sent[i], top_k=3), k=3)
    error = results[1]
    assert isinstance(error, HfHubHTTPError) and error.response.status_code == 400, error
    assert "inputs: Cannot read image data" in str(error)


def test_a_full_queue_answers_503_at_once_and_the_held_batch_completes(batching_server, classifier, images):
    """The queue holds at most `--max-queue` images accepted and not answered: with 3 waiting in an open batch, a
    request of 2 more is refused at once with 503 and a reason; one more image fills the batch and all are answered."""
    before = health(batching_server)["counters"]
    held: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: held.update(r=httpx.post(
        batching_server, json={"inputs": [b64(image) for image in images[:3]], "parameters": {"top_k": 2}},
        timeout=120)))
    first.start()
    deadline = time.monotonic() + 60
    while health(batching_server)["queue"]["pending"] < 3:  # accepted, its batch open (waiting for a 4th image)
        assert time.monotonic() < deadline and first.is_alive(), "the first request was not queued"
        time.sleep(0.1)
    refused = httpx.post(batching_server, json={"inputs": [b64(images[3]), b64(images[0])]}, timeout=30)
    assert refused.status_code == 503, refused.text
    assert "busy" in refused.json()["error"] and "--max-queue" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"
    last = httpx.post(batching_server, content=images[3], timeout=120)  # the 4th image: the batch runs
    first.join(timeout=120)
    assert last.status_code == 200 and held["r"].status_code == 200, (last.text, held["r"].text)
    same(last.json(), classifier(images[3]))
    for answer, image in zip(held["r"].json(), images[:3]):
        same(answer, classifier(image, top_k=2), k=2)
    after = health(batching_server)
    assert after["counters"]["refused_busy"] - before["refused_busy"] == 1
    assert after["counters"]["batch_sizes"]["4"] - before["batch_sizes"].get("4", 0) == 1
    assert after["queue"]["pending"] == 0


def test_requests_over_the_limits_get_413(server, online, images):
    """A body over `--max-request-bytes` (declared, or streamed without a length) and a request of more images than
    `--max-images` are refused with 413 and what to do; the server keeps serving."""
    noise = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)))
    assert len(noise) > MAX_REQUEST_BYTES
    with pytest.raises(HfHubHTTPError) as caught:
        InferenceClient(base_url=server).image_classification(noise)
    assert caught.value.response.status_code == 413
    assert f"limit of {MAX_REQUEST_BYTES} bytes" in str(caught.value)
    chunks = (noise[i : i + 65536] for i in range(0, len(noise), 65536))  # no Content-Length: chunked
    streamed = httpx.post(server, content=chunks, headers={"content-type": "image/png"}, timeout=30)
    assert streamed.status_code == 413, streamed.text
    too_many = httpx.post(server, json={"inputs": [b64(images[0])] * (MAX_IMAGES + 1)}, timeout=30)
    assert too_many.status_code == 413 and f"at most {MAX_IMAGES}" in too_many.json()["error"]
    assert httpx.post(server, content=images[0], timeout=30).status_code == 200
    assert health(server)["counters"]["refused_too_large"] >= 3


def test_lists_get_per_image_errors_and_bad_requests_one_line(server, classifier, images, tmp_path):
    """The handler's request format: a list answers per image (a bad one gets its own error entry); a path on the
    server is never opened (an image there, a missing file and /etc/passwd answer alike); parameters are checked."""
    on_disk = tmp_path / "on-server.png"
    on_disk.write_bytes(images[0])
    listed = httpx.post(server, json={"inputs": [b64(images[0]), b64(b"not an image"), b64(images[1])],
                                      "parameters": {"top_k": 2}}, timeout=60)
    assert listed.status_code == 200, listed.text
    first, bad, last = listed.json()
    same(first, classifier(images[0], top_k=2), k=2)
    same(last, classifier(images[1], top_k=2), k=2)
    assert bad[0]["label"] is None and bad[0]["error"].startswith("inputs[1]: ")
    errors = []
    for path in (str(on_disk), "/etc/passwd", str(tmp_path / "missing.png")):
        response = httpx.post(server, json={"inputs": path}, timeout=30)
        assert response.status_code == 400
        errors.append(response.json()["error"])
    assert len(set(errors)) == 1 and "never opens a path" in errors[0]
    for body, message in (({"inputs": b64(images[0]), "parameters": {"topk": 3}}, "parameters.topk"),
                          ({"inputs": b64(images[0]), "parameters": {"function_to_apply": "relu"}},
                           "parameters.function_to_apply"),
                          ({"inputs": []}, "empty list"), ({"image": b64(images[0])}, '{"inputs"')):
        response = httpx.post(server, json=body, timeout=30)
        assert response.status_code == 400 and message in response.json()["error"], response.text
    broken = httpx.post(server, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]


def test_explain_adds_the_reasoning_answer_bounded_by_the_servers_cap(server, classifier, images):
    response = httpx.post(server, json={"inputs": b64(images[0]),
                                        "parameters": {"explain": True, "max_new_tokens": 4, "top_k": 2}}, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    same(answer, classifier(images[0], top_k=2), k=2)
    assert isinstance(answer[0]["explanation"], str) and 1 <= answer[0]["explanation_tokens"] <= 4
    too_long = httpx.post(server, json={"inputs": b64(images[0]),
                                        "parameters": {"explain": True, "max_new_tokens": MAX_NEW_TOKENS + 1}})
    assert too_long.status_code == 400 and f"from 1 to {MAX_NEW_TOKENS}" in too_long.json()["error"]


def test_settings_that_cannot_work_and_a_missing_model_are_one_line_errors(tiny_checkpoint, tmp_path):
    import argparse

    from train.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        serve.main(parser.parse_args(["--model", str(tiny_checkpoint), "--max-queue", "2", "--max-images", "4"]))
    assert str(exited.value).startswith("train serve: --max-queue (2) must be at least --max-images (4)")
    with pytest.raises(SystemExit) as exited:
        serve.main(parser.parse_args(["--model", str(tmp_path / "no-such-model")]))
    assert str(exited.value).startswith("train serve: ") and "\n" not in str(exited.value)
    assert serve.byte_size("20mb") == 20 * 2**20 and serve.byte_size("512kb") == 512 * 1024
    assert serve.byte_size("1000") == 1000
    for bad in ("0", "lots", "-5mb"):
        with pytest.raises(argparse.ArgumentTypeError):
            serve.byte_size(bad)


def test_connections_over_the_cap_get_503(tiny_checkpoint, tmp_path):
    """`--max-connections` bounds the open connections (and so the upload bytes held at once): with two uploads in
    flight under a cap of 3, a request on a third connection is answered 503 before any body is read (uvicorn
    counts the connection asking), and the server serves again once the uploads end."""
    import socket

    url, process, sink = start_server(tiny_checkpoint, tmp_path, "--max-connections", "3")
    try:
        host, port = url.removeprefix("http://").split(":")
        held = []
        for _ in range(2):  # uploads whose bodies never finish arriving, each accepted while under the cap
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
                         + b"\x89PNG")
            held.append(sock)
            time.sleep(0.5)
        refused = httpx.get(url + "/health", timeout=30)
        assert refused.status_code == 503, refused.text
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(url + "/health", timeout=30).status_code != 200:
            time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=30).status_code == 200
    finally:
        stop_server(process, sink)
