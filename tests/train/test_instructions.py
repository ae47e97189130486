# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""Tests of the stage-1 instruction data: prompts, the OpenAI-compatible client, the answer cache and resumption.

The endpoint is `FakeChatServer`, a test double of `/v1/chat/completions` started on 127.0.0.1 by each test; the
local model is the tiny random Qwen2-VL of `train.infra.tiny.build_tiny_vlm` (the `tiny_base` fixture).
"""

import base64
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoTokenizer

from modeling_emovlm_kd import LABEL_SETS, EmoVLMKDImageProcessor, EmoVLMKDProcessor
from modeling_emovlm_kd.configuration_emovlm_kd import (
    DEFAULT_CONVERSATION_PROMPT,
    DEFAULT_REASONING_PROMPT,
    default_categorical_prompt,
)
from train.stages.instructions import (
    AnswerCache,
    AnswerGenerationError,
    AnswerGenerator,
    LocalVLMGenerator,
    OpenAIChatGenerator,
    build_instruction_dataset,
    failures_path,
    generation_prompt,
    image_key,
)

LABELS = LABEL_SETS["mikels8"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


class FakeChatServer:
    """An OpenAI-compatible `/v1/chat/completions` test double with canned answers and scripted failures.

    Args:
        fail_first: statuses (or "malformed") answered to the first requests, in order, before any success.
        max_successes: after this many successful answers every request gets HTTP 500 (the endpoint "dies").
        fail_label: requests whose prompt names this label always get HTTP 500.
    """

    def __init__(self, fail_first=(), max_successes=None, fail_label=None, delay=0.0):
        self.fail_first = list(fail_first)
        self.max_successes = max_successes
        self.fail_label = fail_label
        self.delay = delay  # seconds before each answer (a slow model)
        self.bodies, self.headers, self.queries, self.successes = [], [], [], 0
        self.arrivals, self.in_flight, self.max_in_flight = [], 0, 0  # server-side timing and concurrency
        self.answered: dict[tuple[str, str], int] = {}  # successful answers per (image data URL, prompt)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return len(self.bodies)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, body: dict) -> tuple[int, bytes]:
        with self.lock:
            self.arrivals.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:  # (tests patch time.sleep to record backoffs)
                time.sleep(self.delay)
            status, payload = self._respond(body)
        finally:
            with self.lock:
                self.in_flight -= 1
        if status == 200:
            with self.lock:
                pair = (body["messages"][0]["content"][0]["image_url"]["url"], body["messages"][0]["content"][1]["text"])
                self.answered[pair] = self.answered.get(pair, 0) + 1
        return status, payload

    def _respond(self, body: dict) -> tuple[int, bytes]:
        with self.lock:
            self.bodies.append(body)
            if self.fail_first:
                status = self.fail_first.pop(0)
                return (200, b"{not json") if status == "malformed" else (status, b'{"error": "scripted"}')
            prompt = body["messages"][0]["content"][1]["text"]
            dead = self.max_successes is not None and self.successes >= self.max_successes
            if dead or (self.fail_label and f"'{self.fail_label}'" in prompt):
                return 500, b'{"error": "down"}'
            self.successes += 1
            answer = f"Canned answer {self.successes}: soft light and open faces."
            return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.headers.append({name.lower(): value for name, value in self.headers.items()})
                path, _, query = self.path.partition("?")
                server.queries.append(query)
                status, payload = server.respond(body) if path == "/v1/chat/completions" else (404, b"{}")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep pytest output clean
                pass

        return Handler


@pytest.fixture(autouse=True)
def _no_proxy_or_endpoint_env(monkeypatch):
    # urllib would route 127.0.0.1 through a configured proxy; the endpoint variables would change defaults.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("EMOVLM_OPENAI_BASE_URL", "EMOVLM_OPENAI_MODEL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_server():
    servers = []

    def make(**kwargs) -> FakeChatServer:
        servers.append(FakeChatServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def tiny_vlm(tiny_base):
    """The tiny random Qwen2-VL of `tests/conftest.py` (Mikels-8 labels), built once per session."""
    return tiny_base["vlm"]


@pytest.fixture(scope="module")
def processor(tiny_vlm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm)
    return EmoVLMKDProcessor(
        image_processor=EmoVLMKDImageProcessor.from_pretrained(tiny_vlm),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        labels=LABELS,
        categorical_prompt=default_categorical_prompt(LABELS),
    )


def make_dataset(colours, labels) -> Dataset:
    images = [Image.new("RGB", (32, 24), colour) for colour in colours]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS)})
    return Dataset.from_dict({"image": images, "label": [LABELS.index(label) for label in labels]}, features=features)


def generator_for(server: FakeChatServer, **kwargs) -> OpenAIChatGenerator:
    kwargs = {"max_retries": 1, "timeout": 5, **kwargs}
    return OpenAIChatGenerator(base_url=server.base_url, model="fake-vlm", api_key="sk-test", **kwargs)


def build(dataset, processor, generator, cache_path, **kwargs):
    return build_instruction_dataset(
        dataset, processor, generator=generator, cache_path=cache_path, show_progress=False, return_summary=True,
        **kwargs,
    )


def requested_pairs(server: FakeChatServer, start: int = 0) -> list[tuple[str, str]]:
    """(image data URL, prompt) of each request since `start`."""
    return [
        (body["messages"][0]["content"][0]["image_url"]["url"], body["messages"][0]["content"][1]["text"])
        for body in server.bodies[start:]
    ]


# ---- prompts and keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conversation", "reasoning"])
def test_generation_prompt_names_the_label_and_hides_only_the_label(kind):
    prompt = generation_prompt(kind, "awe")
    assert "'awe'" in prompt
    assert "Do not write the word 'awe'" in prompt
    assert ("step by step" in prompt) == (kind == "reasoning")
    # As in the authors' template, only the correct category is hidden: the reasoning may name feelings.
    assert "any emotion" not in prompt and "synonym" not in prompt
    assert "may name the feelings" in prompt


def test_answers_that_name_their_label_are_counted_and_other_feelings_are_not(processor, tmp_path):
    class Writer:
        name = "writer"

        def generate(self, image, kind, label):
            if label == "awe":
                return "The peaks fill the viewer with awe."
            return "The quiet harbour suggests peace and warmth."

    dataset = make_dataset(COLOURS[:2], ["awe", "contentment"])
    instructions, summary = build(dataset, processor, Writer(), tmp_path / "answers.jsonl", kinds=("reasoning",))
    assert summary.generated == 2 and summary.answers_naming_label == 1
    assert len(instructions) == 2


def test_generation_prompt_rejects_categorical():
    with pytest.raises(ValueError, match="No generation prompt"):
        generation_prompt("categorical", "awe")


def test_image_key_depends_on_pixels_not_on_the_file():
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert image_key(Image.open(io.BytesIO(buffer.getvalue()))) == image_key(image)
    assert image_key(Image.new("RGB", (8, 8), (10, 20, 31))) != image_key(image)
    assert image_key(Image.new("RGB", (8, 4), (10, 20, 30))) != image_key(image)
    assert image_key(image.convert("L")) != image_key(image.convert("L").convert("RGB"))


# ---- the instruction data set --------------------------------------------------------------------------------------


def test_categorical_rows_come_from_the_template_without_a_server(processor):
    dataset = make_dataset(COLOURS[:2], ["awe", "fear"])
    instructions = build_instruction_dataset(dataset, processor, kinds=("categorical",), show_progress=False)

    assert instructions.column_names == ["images", "messages", "kind", "label"]
    assert instructions["kind"] == ["categorical", "categorical"]
    assert instructions["label"] == [LABELS.index("awe"), LABELS.index("fear")]
    row = instructions[1]
    assert len(row["images"]) == 1 and row["images"][0].size == (32, 24)
    user, assistant = row["messages"]
    assert user["content"][0]["type"] == "image" and "image" not in user["content"][0]
    assert user["content"][1] == {"type": "text", "text": processor.categorical_prompt}
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": "{'emotion': 'fear'}"}]}


def test_rows_feed_trl_vision_collator(processor, make_server, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    server = make_server()
    instructions, summary = build(make_dataset(COLOURS[:1], ["awe"]), processor, generator_for(server),
                                  tmp_path / "answers.jsonl")
    assert instructions["kind"] == ["categorical", "conversation", "reasoning"]
    assert [m[0]["content"][1]["text"] for m in instructions["messages"]][1:] == [DEFAULT_CONVERSATION_PROMPT, DEFAULT_REASONING_PROMPT]
    assert summary.generated == 2 and summary.rows == 3

    # `apply_chat_template` passes one list of images per sample; the processor must take that nesting.
    batch = DataCollatorForVisionLanguageModeling(processor)([instructions[i] for i in range(3)])
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert batch["image_grid_thw"].shape == (3, 3)
    assert (batch["input_ids"] == image_token).any(dim=1).all()
    assert batch["labels"].shape == batch["input_ids"].shape
    assert "{'emotion': 'awe'}" in processor.tokenizer.decode(batch["input_ids"][0])


def test_request_carries_the_image_as_a_data_url_and_a_label_prompt(make_server):
    server = make_server()
    generator = generator_for(server)
    assert isinstance(generator, AnswerGenerator)

    answer = generator.generate(Image.new("RGB", (40, 30), (250, 10, 10)), "reasoning", "amusement")

    assert answer == "Canned answer 1: soft light and open faces."
    body = server.bodies[0]
    assert body["model"] == "fake-vlm" and body["max_tokens"] == 512
    image_part, text_part = body["messages"][0]["content"]
    prefix = "data:image/jpeg;base64,"
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith(prefix)
    sent = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"][len(prefix) :])))
    assert sent.format == "JPEG" and sent.size == (40, 30)
    assert text_part == {"type": "text", "text": generation_prompt("reasoning", "amusement")}
    assert "'amusement'" in text_part["text"] and "Do not write the word 'amusement'" in text_part["text"]
    assert server.headers[0]["authorization"] == "Bearer sk-test"


def test_identical_images_are_requested_once(processor, make_server, tmp_path):
    server = make_server()
    dataset = make_dataset([COLOURS[0], COLOURS[1], COLOURS[0]], ["awe", "fear", "awe"])
    cache_path = tmp_path / "answers.jsonl"

    instructions, summary = build(dataset, processor, generator_for(server), cache_path, kinds=("conversation",))

    assert server.requests == 2 and summary.generated == 2
    answers = [m[1]["content"][0]["text"] for m in instructions["messages"]]
    assert len(answers) == 3 and answers[0] == answers[2] != answers[1]
    assert len(cache_path.read_text().splitlines()) == 2

    _, summary = build(dataset, processor, generator_for(server), cache_path, kinds=("conversation",))
    assert server.requests == 2 and summary.cached == 2 and summary.generated == 0


def test_interrupted_run_resumes_with_only_the_missing_answers(processor, make_server, tmp_path):
    server = make_server()
    dataset = make_dataset(COLOURS[:4], ["awe", "fear", "anger", "sadness"])
    cache_path = tmp_path / "answers.jsonl"

    class KilledAfter:  # the process is killed (Ctrl-C) while the 4th answer is being generated
        def __init__(self, inner, calls):
            self.inner, self.calls = inner, calls

        def generate(self, image, kind, label):
            if self.calls == 0:
                raise KeyboardInterrupt
            self.calls -= 1
            return self.inner.generate(image, kind, label)

    with pytest.raises(KeyboardInterrupt):
        build(dataset, processor, KilledAfter(generator_for(server), 3), cache_path)
    assert len(AnswerCache(cache_path)) == 3
    first_run = requested_pairs(server)

    instructions, summary = build(dataset, processor, generator_for(server), cache_path)

    second_run = requested_pairs(server, start=3)
    assert len(second_run) == 5 and not set(first_run) & set(second_run)
    assert summary.cached == 3 and summary.generated == 5 and summary.num_failed == 0
    assert len(instructions) == 12 and summary.rows_left_out == 0


def test_resume_after_the_endpoint_dies(processor, make_server, tmp_path):
    dying = make_server(max_successes=2)
    dataset = make_dataset(COLOURS[:3], ["awe", "fear", "anger"])
    cache_path = tmp_path / "answers.jsonl"

    instructions, summary = build(dataset, processor, generator_for(dying), cache_path, kinds=("conversation",))
    assert summary.generated == 2 and summary.num_failed == 1 and len(instructions) == 2
    assert len(failures_path(cache_path).read_text().splitlines()) == 1

    healthy = make_server()
    instructions, summary = build(dataset, processor, generator_for(healthy), cache_path, kinds=("conversation",))
    assert healthy.requests == 1 and summary.cached == 2 and summary.generated == 1
    assert requested_pairs(healthy)[0][1] == generation_prompt("conversation", "anger")
    assert len(instructions) == 3 and summary.num_failed == 0
    assert not failures_path(cache_path).exists()  # the failures file describes the latest run


def test_parallel_workers_cache_every_answer(processor, make_server, tmp_path):
    server = make_server()
    dataset = make_dataset(COLOURS, LABELS[:6])
    instructions, summary = build(
        dataset, processor, generator_for(server), tmp_path / "answers.jsonl", kinds=("reasoning",), num_workers=3
    )
    assert server.requests == 6 and summary.generated == 6 and len(instructions) == 6
    assert len(AnswerCache(tmp_path / "answers.jsonl")) == 6


# ---- retries and failures ------------------------------------------------------------------------------------------


def test_transient_errors_are_retried_with_exponential_backoff(make_server, monkeypatch):
    import train.stages.instructions

    server = make_server(fail_first=[500, 429, "malformed"])
    waits = []
    monkeypatch.setattr(train.stages.instructions.time, "sleep", waits.append)
    answer = generator_for(server, max_retries=3).generate(Image.new("RGB", (8, 8)), "reasoning", "awe")
    assert answer.startswith("Canned answer") and server.requests == 4
    # The openai SDK's backoff: 0.5 s doubling at each retry, less up to 25 % jitter (no Retry-After was sent).
    assert len(waits) == 3
    for retry, wait in enumerate(waits):
        assert 0.75 * 0.5 * 2**retry <= wait <= 0.5 * 2**retry


def test_exhausted_retries_raise_a_clear_error(make_server):
    server = make_server(fail_first=[503, 503, 503])
    with pytest.raises(AnswerGenerationError, match="failed after 3 attempts.*HTTP 503"):
        generator_for(server, max_retries=2).generate(Image.new("RGB", (8, 8)), "reasoning", "awe")
    assert server.requests == 3


def test_client_errors_are_not_retried(make_server):
    server = make_server(fail_first=[400])
    with pytest.raises(AnswerGenerationError, match="HTTP 400 \\(not retried\\)"):
        generator_for(server, max_retries=3).generate(Image.new("RGB", (8, 8)), "conversation", "awe")
    assert server.requests == 1


def test_connection_errors_are_retried():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    generator = OpenAIChatGenerator(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2)
    with pytest.raises(AnswerGenerationError, match="failed after 3 attempts.*connection error"):
        generator.generate(Image.new("RGB", (8, 8)), "conversation", "awe")


def test_persistent_failures_are_reported_and_left_out(processor, make_server, tmp_path, caplog):
    server = make_server(fail_label="fear")
    dataset = make_dataset(COLOURS[:3], ["awe", "fear", "sadness"])
    cache_path = tmp_path / "answers.jsonl"

    instructions, summary = build(dataset, processor, generator_for(server), cache_path)

    fear_key = image_key(dataset[1]["image"])
    assert summary.num_failed == 2 and summary.generated == 4
    assert {(f["key"], f["kind"], f["label"], f["index"]) for f in summary.failures} == {
        (fear_key, "conversation", "fear", 1),
        (fear_key, "reasoning", "fear", 1),
    }
    assert all("HTTP 500" in failure["error"] for failure in summary.failures)
    written = [json.loads(line) for line in failures_path(cache_path).read_text().splitlines()]
    assert written == summary.failures and summary.failures_path == failures_path(cache_path)
    assert len(instructions) == 7 and summary.rows == 7 and summary.rows_left_out == 2
    assert "Left out 2 of 9 instruction rows" in caplog.text
    fear_rows = [kind for kind, label in zip(instructions["kind"], instructions["label"]) if label == 6]
    assert fear_rows == ["categorical"]
    # Another rank of a distributed run reads the same cache and leaves out the same rows.
    reread, _ = build(dataset, processor, None, cache_path, skip_missing=True)
    assert reread["kind"] == instructions["kind"] and reread["label"] == instructions["label"]


def test_a_dead_endpoint_stops_the_run(processor, make_server, tmp_path):
    server = make_server(max_successes=0)
    dataset = make_dataset(COLOURS[:4], ["awe", "fear", "anger", "sadness"])
    with pytest.raises(AnswerGenerationError, match="2 answers failed in a row"):
        build(dataset, processor, generator_for(server), tmp_path / "answers.jsonl", max_consecutive_failures=2)
    assert len(failures_path(tmp_path / "answers.jsonl").read_text().splitlines()) == 2


def test_all_answers_failing_gives_an_empty_typed_data_set(processor, make_server, tmp_path):
    server = make_server(max_successes=0)
    dataset = make_dataset(COLOURS[:2], ["awe", "fear"])
    instructions, summary = build(
        dataset, processor, generator_for(server), tmp_path / "answers.jsonl", kinds=("conversation",),
        max_consecutive_failures=None,
    )
    assert len(instructions) == 0 and summary.rows_left_out == 2 and summary.num_failed == 2
    assert instructions.column_names == ["images", "messages", "kind", "label"]


def test_missing_answers_without_a_generator_are_an_error(processor, tmp_path):
    with pytest.raises(ValueError, match="2 answers are missing"):
        build(make_dataset(COLOURS[:1], ["awe"]), processor, None, tmp_path / "answers.jsonl")


# ---- the cache file ------------------------------------------------------------------------------------------------


def test_truncated_last_line_is_ignored_and_regenerated(processor, make_server, tmp_path):
    server = make_server()
    dataset = make_dataset(COLOURS[:2], ["awe", "fear"])
    cache_path = tmp_path / "answers.jsonl"
    build(dataset, processor, generator_for(server), cache_path, kinds=("conversation",))
    data = cache_path.read_bytes()
    cache_path.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 40])  # kill in the middle of line 2

    cache = AnswerCache(cache_path)
    assert len(cache) == 1 and cache.skipped_lines == 1

    instructions, summary = build(dataset, processor, generator_for(server), cache_path, kinds=("conversation",))
    assert server.requests == 3 and summary.cached == 1 and summary.generated == 1
    assert len(instructions) == 2
    lines = cache_path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["kind"] == "conversation" for line in lines)


# ---- configuration and the local generator -------------------------------------------------------------------------


def test_openai_generator_reads_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="EMOVLM_OPENAI_BASE_URL"):
        OpenAIChatGenerator(model="m")
    monkeypatch.setenv("EMOVLM_OPENAI_BASE_URL", "http://127.0.0.1:1/v1/")
    monkeypatch.setenv("EMOVLM_OPENAI_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    generator = OpenAIChatGenerator()
    assert generator.url == "http://127.0.0.1:1/v1/chat/completions"
    assert (generator.model, generator.api_key, generator.name) == ("env-model", "sk-env", "openai:env-model")


def test_local_vlm_generator_answers_greedily(tiny_vlm, processor):
    generator = LocalVLMGenerator(str(tiny_vlm), processor, max_new_tokens=4)
    image = Image.new("RGB", (64, 48), (120, 60, 30))
    answer = generator.generate(image, "conversation", "awe")
    assert isinstance(answer, str)
    assert generator.generate(image, "conversation", "awe") == answer


# ---- at scale: concurrency, the rate limit, resumption ---------------------------------------------------------------


def many_images(n: int) -> Dataset:
    images = [Image.new("RGB", (16, 16), (i % 256, (i // 256) * 40, 90)) for i in range(n)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS)})
    return Dataset.from_dict({"image": images, "label": [i % len(LABELS) for i in range(n)]}, features=features)


def test_workers_are_concurrently_in_flight(processor, make_server, tmp_path):
    server = make_server(delay=0.05)
    _, summary = build(many_images(32), processor, generator_for(server), tmp_path / "a.jsonl",
                       kinds=("conversation",), num_workers=8)
    assert summary.generated == 32 and server.requests == 32
    assert server.max_in_flight == 8  # as many as the workers, never more
    assert set(server.answered.values()) == {1}


def test_requests_per_minute_is_respected_in_every_window(processor, make_server, tmp_path):
    per_minute = 600  # 10 a second, evenly spaced: any 1 s window sees at most 10 (+1 at its closed ends)
    server = make_server(delay=0.05)
    _, summary = build(many_images(24), processor, generator_for(server, requests_per_minute=per_minute),
                       tmp_path / "a.jsonl", kinds=("reasoning",), num_workers=8)
    assert summary.generated == 24
    arrivals = sorted(server.arrivals)
    busiest = max(sum(start <= t < start + 1.0 for t in arrivals) for start in arrivals)
    assert busiest <= per_minute // 60 + 1
    # Without the limit the same 8 workers put far more than that into one second.
    unlimited = make_server(delay=0.05)
    build(many_images(24), processor, generator_for(unlimited), tmp_path / "b.jsonl", kinds=("reasoning",),
          num_workers=8)
    fast = sorted(unlimited.arrivals)
    assert max(sum(start <= t < start + 1.0 for t in fast) for start in fast) > per_minute // 60 + 1


def test_resume_after_failures_requests_nothing_twice_and_lists_every_failure(processor, make_server, tmp_path):
    dataset, cache_path = many_images(30), tmp_path / "a.jsonl"
    dying = make_server(delay=0.05, max_successes=20)
    with pytest.raises(AnswerGenerationError, match="in a row"):
        build(dataset, processor, generator_for(dying, max_retries=0), cache_path, kinds=("conversation",),
              num_workers=4, max_consecutive_failures=5)
    cached = AnswerCache(cache_path)
    failed = [json.loads(line) for line in failures_path(cache_path).read_text().splitlines()]
    assert len(cached) == 20 and len(failed) >= 5  # every failure of the run is listed
    healthy = make_server(delay=0.05)
    instructions, summary = build(dataset, processor, generator_for(healthy), cache_path, kinds=("conversation",),
                                  num_workers=4)
    assert summary.cached == 20 and summary.generated == 10 and healthy.requests == 10 and len(instructions) == 30
    # No answer was given twice across both runs: the resumed run asked only for what the first did not get.
    both = {**dying.answered}
    for pair, count in healthy.answered.items():
        both[pair] = both.get(pair, 0) + count
    assert len(both) == 30 and set(both.values()) == {1}


def test_local_vlm_generator_batches_with_left_padding(tiny_vlm, processor):
    generator = LocalVLMGenerator(str(tiny_vlm), processor, max_new_tokens=4, batch_size=3)
    images = [Image.new("RGB", (64, 48), (120, 60, 30)), Image.new("RGB", (48, 64), (10, 200, 30))]
    batched = generator.generate_batch(images, ["conversation", "reasoning"], ["awe", "contentment"])
    assert batched == [generator.generate(images[0], "conversation", "awe"),
                       generator.generate(images[1], "reasoning", "contentment")]


# ---- the `instructions` stage of the pipeline ----------------------------------------------------------------------


def stage_recipe(tmp_path, tiny_base, server_url, kinds, **instructions):
    from test_sft import LABELS as SFT_LABELS
    from test_sft import write_image_folder

    return {
        "output_dir": str(tmp_path / "run"), "labels": SFT_LABELS,
        "data": {"kind": "imagefolder", "root": str(write_image_folder(tmp_path / "images"))},
        "base_models": {"vlm": str(tiny_base["vlm"])},
        "instructions": {"generator": "openai", "base_url": server_url, "model": "fake-vlm", "api_key": "sk-test",
                         **instructions},
        "sft": {"instruction_kinds": kinds},
    }


def test_instructions_stage_generates_before_sft_with_the_recipes_workers(tiny_base, make_server, tmp_path):
    from train import STAGES
    from train.infra import stage_table
    from train.infra.provenance import stage_settings
    from train.stages.pipeline import Pipeline

    assert STAGES.index("instructions") < STAGES.index("sft") and "instructions" in stage_table.get("sft").reads
    server = make_server(delay=0.05)
    recipe = stage_recipe(tmp_path, tiny_base, server.base_url, ["categorical", "conversation"], num_workers=4,
                          requests_per_minute=6000)
    pipeline = Pipeline(recipe)
    pipeline.run_stage("instructions")
    marker = json.loads((pipeline.stage_dir("instructions") / "stage_done.json").read_text())
    assert marker["generated"] == 8 and marker["failed"] == 0 and server.requests == 8
    assert server.max_in_flight == 4
    assert len(AnswerCache(pipeline.output_dir / "answers.jsonl")) == 8
    settings = stage_settings(pipeline.recipe.as_set, "instructions")
    assert settings["sft.instruction_kinds"] == ["categorical", "conversation"]
    assert not {"instructions.api_key", "instructions.num_workers", "instructions.requests_per_minute"} & set(settings)
    assert not any(key.startswith("instructions.") for key in stage_settings(pipeline.recipe.as_set, "sft"))


def test_categorical_only_instructions_stage_contacts_no_endpoint(tiny_base, make_server, tmp_path):
    from train.stages.pipeline import Pipeline

    server = make_server()
    pipeline = Pipeline(stage_recipe(tmp_path, tiny_base, server.base_url, ["categorical"]))
    pipeline.run_stage("instructions")
    assert pipeline.is_done("instructions") and server.requests == 0


# ---- the client: a maintained SDK, no patched library, no credentials in logs ------------------------------------


def test_the_hub_stays_offline_for_everything_but_the_endpoint(make_server):
    """Answers reach a local endpoint under HF_HUB_OFFLINE=1 without touching huggingface_hub's HTTP session: the
    Hub's own client still refuses every request offline, the endpoint's origin included."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import get_session

    server = make_server()
    answer = generator_for(server).generate(Image.new("RGB", (8, 8)), "reasoning", "awe")
    assert answer.startswith("Canned answer") and server.requests == 1
    with pytest.raises(OfflineModeIsEnabled):
        get_session().get(server.base_url + "/models")


def test_a_slow_endpoint_times_out_and_is_retried(make_server):
    server = make_server(delay=1.0)
    with pytest.raises(AnswerGenerationError, match="failed after 2 attempts.*timed out"):
        generator_for(server, timeout=0.2, max_retries=1).generate(Image.new("RGB", (8, 8)), "reasoning", "awe")
    assert len(server.arrivals) == 2  # (recorded on arrival; a body is recorded after the server's delay)


def test_credentials_in_the_base_url_reach_the_server_but_never_a_log(processor, make_server, tmp_path, caplog):
    """`https://user:pass@host/v1?api-key=...`: basic auth and the query are sent, and redacted in every log line."""
    server = make_server(fail_first=[500, 400])
    url = server.base_url.replace("http://", "http://alice:hunter2-pass@") + "?api-key=sk-query-secret&tier=a"
    generator = OpenAIChatGenerator(base_url=url, model="fake-vlm", api_key="sk-header-secret", max_retries=1,
                                    timeout=5)
    with caplog.at_level(logging.DEBUG):
        _, summary = build(make_dataset(COLOURS[:2], ["awe", "fear"]), processor, generator,
                           tmp_path / "answers.jsonl", kinds=("conversation",))
    assert summary.generated == 1 and summary.num_failed == 1
    assert server.queries[0] == "api-key=sk-query-secret&tier=a"
    assert server.headers[0]["authorization"] == "Basic " + base64.b64encode(b"alice:hunter2-pass").decode()
    logged = caplog.text + json.dumps(summary.failures) + failures_path(tmp_path / "answers.jsonl").read_text()
    assert "HTTP 400" in logged and "127.0.0.1" in logged  # the failures are logged, and say where
    for secret in ("hunter2-pass", "alice", "sk-query-secret", "sk-header-secret"):
        assert secret not in logged
    assert secret not in generator.url and "api-key=***" in generator.url
