# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""Stage-1 instruction data: categorical, conversation and reasoning turns for every image.

Categorical answers come from the label (`{'emotion': 'awe'}`). Conversation and reasoning answers are written by a
vision-language model that is *told* the label but asked not to name it, so that the descriptions explain the
emotion without leaking the class word. Those answers are expensive (one API call each), so they are cached in a
JSONL file keyed by the image's content hash and the kind: an interrupted run resumes where it stopped, duplicates
of an image are asked for once, and failures are reported rather than dropped silently.

    from train.stages.instructions import OpenAIChatGenerator, build_instruction_dataset

    generator = OpenAIChatGenerator(base_url="https://api.openai.com/v1", model="gpt-4o-mini")
    train_set, summary = build_instruction_dataset(
        dataset, processor, generator=generator, cache_path="runs/emoset/answers.jsonl", return_summary=True
    )
    # train_set has `images`, `messages`, `kind` and `label` columns, ready for TRL's SFTTrainer.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from datasets import ClassLabel, Dataset, Features, List, Value, concatenate_datasets
from datasets import Image as ImageFeature
from PIL import Image
from tqdm.auto import tqdm

from modeling_emovlm_kd.processing_emovlm_kd import load_image
from train.configs.sft_config import KINDS
from train.infra.records import RecordStore
from train.infra.secrets import redact_logger, redact_text, redact_url

logger = logging.getLogger(__name__)

GENERATED_KINDS = ("conversation", "reasoning")

# What the answer-writing model is asked, per kind. It is given the label so that the description is consistent
# with the ground truth, and told not to write that label (as the authors' template says: "Do not include the correct
# emotion category in your response"), so that the student learns to *see* the emotion, not to copy it. Only the
# label is hidden: the reasoning may name the feelings the image's elements evoke (the paper's example speaks of
# "peace" and "warmth"; the authors' of "tension", "anxiety or fear"), which is what the reasoning teaches.
_GENERATION_TASKS = {
    "conversation": (
        "This image evokes the emotion '{label}'. Describe the key elements of the image that convey this feeling: "
        "the subjects and their expressions or postures, the setting, the colours, the light and the composition."
    ),
    "reasoning": (
        "This image evokes the emotion '{label}'. Describe step by step the process of inferring the emotion from the "
        "image: which elements you notice first, what each of them suggests, and how together they lead to the "
        "feeling."
    ),
}
_DO_NOT_MENTION = (
    "Do not write the word '{label}' (the correct emotion category) in your answer; you may name the feelings that "
    "elements of the image evoke, as long as the answer does not give the category away. Answer in plain prose, in "
    "at most {words} words."
)

# Chat messages as an Arrow type. Image parts are bare `{"type": "image"}` placeholders (their `text` reads back as
# None): TRL's vision collator fills every part of type "image" that has no "image" key from the `images` column.
MESSAGES_FEATURE = List(
    {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
)


class AnswerGenerationError(RuntimeError):
    """An answer could not be generated (after retries, where retrying made sense)."""


def generation_prompt(kind: str, label: str, max_words: int = 120) -> str:
    """The instruction given to the answer-writing model: it names `label` and asks the model not to write it (other
    feelings may be named). Answers that name the label anyway are counted (`GenerationSummary.answers_naming_label`)
    and logged."""
    if kind not in _GENERATION_TASKS:
        raise ValueError(f"No generation prompt for kind {kind!r}; expected one of {GENERATED_KINDS}.")
    return f"{_GENERATION_TASKS[kind].format(label=label)} {_DO_NOT_MENTION.format(label=label, words=max_words)}"


def mentions_label(answer: str, label: str) -> bool:
    """Whether `answer` names `label` as a word (case-insensitive) despite being asked not to."""
    return re.search(rf"\b{re.escape(label)}\b", answer, flags=re.IGNORECASE) is not None


def image_key(image: Image.Image) -> str:
    """SHA-256 of an image's decoded pixels, mode and size: identical pictures share a key whatever their file."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    if image.mode in ("P", "PA"):  # the same palette indices are different pictures under different palettes
        digest.update(bytes(image.getpalette() or []))
    digest.update(image.tobytes())
    return digest.hexdigest()


def encode_data_url(image: Image.Image, max_size: int | None = 1024, quality: int = 90) -> str:
    """An RGB JPEG `data:` URL of `image`, downscaled so its longer side is at most `max_size` (saves tokens)."""
    image = load_image(image)
    if max_size is not None and max(image.size) > max_size:
        image = image.copy()
        image.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- answer generators ---------------------------------------------------------------------------------------------


@runtime_checkable
class AnswerGenerator(Protocol):
    """Writes the assistant answer of one conversation or reasoning instruction for an image and its label."""

    def generate(self, image: Image.Image, kind: str, label: str) -> str: ...


class RateLimiter:
    """At most `per_minute` request starts per minute, spaced evenly (`period / per_minute` seconds apart) across all
    threads that share it, so no window of the server's sees a burst. `per_minute=None`: no limit."""

    def __init__(self, per_minute: float | None, period: float = 60.0):
        if per_minute is not None and per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, got {per_minute}.")
        self.interval = period / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class OpenAIChatGenerator:
    r"""
    Answers from any OpenAI-compatible `/chat/completions` endpoint that accepts images (OpenAI, vLLM, TGI, ...),
    through the `openai` SDK (`openai.OpenAI`; in the `train` extra).

    Retries and timeouts are the SDK's: connection errors, timeouts, HTTP 408, 409, 429 and 5xx are retried
    `max_retries` times with exponential backoff (0.5 s doubling up to 8 s, with jitter) or the server's
    `Retry-After`; other 4xx errors are not, since repeating a bad request cannot fix it. A 200 whose body is not a
    completion with text (not JSON, no choices, an empty answer) is retried the same way: a response hook of the
    SDK's HTTP client reports it as a decoding error. Every attempt, retries included, waits for the
    `requests_per_minute` limiter (the SDK has none). Calls are independent, so one instance may serve several
    threads, which share the limit. `HF_HUB_OFFLINE` is about the Hub and does not apply: the SDK has its own client.

    Credentials inside `base_url` are used as given: user info (`https://user:password@host/v1`, sent as basic
    auth) and query values (`?api-key=...`, sent with every request). They are redacted (`train.infra.secrets`) in
    every log line and error message, the HTTP client's request log included.

    Args:
        base_url (`str`, *optional*): API root such as `https://api.openai.com/v1` (`/v1` is appended when the path
            does not end with it); defaults to `$EMOVLM_OPENAI_BASE_URL`.
        model (`str`, *optional*): model name; defaults to `$EMOVLM_OPENAI_MODEL`.
        api_key (`str`, *optional*): bearer token; defaults to `$OPENAI_API_KEY`, else the placeholder `EMPTY`
            (local servers need none).
        timeout (`float`): seconds per HTTP request.
        max_retries (`int`): retries after the first attempt.
        temperature (`float`), max_tokens (`int`): sampling settings sent with every request.
        max_image_size (`int`, *optional*): longer image side sent to the endpoint, in pixels.
        requests_per_minute (`float`, *optional*): at most this many requests (attempts) per minute, evenly spaced.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 4,
        temperature: float = 0.2,
        max_tokens: int = 512,
        max_image_size: int | None = 1024,
        requests_per_minute: float | None = None,
        backoff: float | None = None,
    ):
        import openai

        if backoff is not None:
            raise ValueError("backoff is not an option any more: the openai SDK retries with its own exponential "
                             "backoff (0.5 s doubling up to 8 s, with jitter) or the server's Retry-After. Leave "
                             "instructions.backoff out of the recipe.")
        base_url = base_url or os.environ.get("EMOVLM_OPENAI_BASE_URL")
        model = model or os.environ.get("EMOVLM_OPENAI_MODEL")
        if not base_url:
            raise ValueError("No endpoint: pass `base_url=` or set EMOVLM_OPENAI_BASE_URL (e.g. https://api.openai.com/v1).")
        if not model:
            raise ValueError("No model: pass `model=` or set EMOVLM_OPENAI_MODEL.")
        root, query = _endpoint_root(base_url)
        # What messages show: the request URL with its credentials redacted.
        self.url = redact_url(root + "/chat/completions" + (f"?{query}" if query else ""))
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_image_size = max_image_size
        self.limiter = RateLimiter(requests_per_minute)
        for logger_name in ("httpx2", "httpx", "openai", "openai._base_client"):  # each logs request URLs
            redact_logger(logger_name)
        http_client = openai.DefaultHttpxClient(
            event_hooks={"request": [lambda request: self.limiter.acquire()], "response": [_check_completion]})
        self.client = openai.OpenAI(
            base_url=root, api_key=self.api_key or "EMPTY", timeout=timeout, max_retries=max_retries,
            default_query=dict(parse_qsl(query, keep_blank_values=True)) or None, http_client=http_client)

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    def request_body(self, image: Image.Image, kind: str, label: str) -> dict[str, Any]:
        """The request's arguments: the prompt and the image as a base64 JPEG data URL."""
        content = [
            {"type": "image_url", "image_url": {"url": encode_data_url(image, self.max_image_size)}},
            {"type": "text", "text": generation_prompt(kind, label)},
        ]
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def generate(self, image: Image.Image, kind: str, label: str) -> str:
        import httpx2
        import openai

        try:
            completion = self.client.chat.completions.create(**self.request_body(image, kind, label))
        except openai.APIStatusError as err:
            attempts = _attempts(err.response.request)
            detail = redact_text(_error_detail(err))
            if attempts == 1 and self.max_retries > 0:  # the SDK does not retry this status
                raise AnswerGenerationError(f"{self.url} answered HTTP {err.status_code} (not retried): "
                                            f"{detail}") from None
            raise AnswerGenerationError(f"{self.url} failed after {_plural(attempts, 'attempt')}; last error: "
                                        f"HTTP {err.status_code}: {detail}") from None
        except openai.APIConnectionError as err:  # refused, reset, timed out, or a malformed body (the hook)
            cause = err.__cause__
            if isinstance(err, openai.APITimeoutError):
                what = f"timed out after {self.timeout} s"
            elif isinstance(cause, httpx2.DecodingError):
                what = str(cause)
            else:
                what = redact_text(f"connection error: {type(cause or err).__name__}: {cause or err}")
            raise AnswerGenerationError(f"{self.url} failed after {_plural(_attempts(err.request), 'attempt')}; "
                                        f"last error: {what}") from None
        return _answer_text(completion.model_dump())


def _endpoint_root(base_url: str) -> tuple[str, str]:
    """(API root ending in `/v1`, query string) of a configured endpoint; the query is sent with every request."""
    parts = urlsplit(base_url.strip())
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit(parts._replace(path=path, query="", fragment="")), parts.query


def _attempts(request) -> int:
    """How many attempts the SDK made, from the retry count it sends with each request."""
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, TypeError, ValueError):
        return 1


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _error_detail(err, limit: int = 300) -> str:
    try:
        return err.response.text[:limit] or str(err)[:limit]
    except Exception:  # noqa: BLE001 - a streamed or closed body
        return str(err)[:limit]


def _answer_text(completion: Any) -> str:
    """The first choice's text of a completion (a JSON object); `ValueError` when there is none."""
    try:
        content = completion["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"no answer in the response ({type(err).__name__}): {str(completion)[:200]}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"empty answer in the response: {str(completion)[:200]}")
    return content.strip()


def _check_completion(response) -> None:
    """Response hook of the SDK's HTTP client: a 200 that is not a completion with text raises
    `httpx2.DecodingError`, which the SDK retries as it retries a dropped connection."""
    import httpx2

    if response.status_code != 200:
        return  # the SDK handles (and retries) error statuses itself
    response.read()
    try:
        _answer_text(json.loads(response.content))
    except ValueError as err:  # not JSON (JSONDecodeError is a ValueError), or no answer in it
        raise httpx2.DecodingError(f"malformed response: {err}", request=response.request) from None


class LocalVLMGenerator:
    """
    Answers from a local Qwen2-VL, Qwen2.5-VL or Qwen3-VL with greedy decoding, so runs are repeatable.

    Args:
        model_path_or_model (`str`, `os.PathLike` or a VLM such as `Qwen2VLForConditionalGeneration`): a checkpoint
            (loaded with `AutoModelForImageTextToText`, whatever its family) or a model.
        processor: a Qwen2-VL processor (e.g. `EmoVLMKDProcessor`) with the model's chat template.
        max_new_tokens (`int`): length limit of an answer.
    """

    def __init__(self, model_path_or_model, processor, max_new_tokens: int = 128, batch_size: int | None = None):
        import torch

        if isinstance(model_path_or_model, (str, os.PathLike)):
            from transformers import AutoModelForImageTextToText

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model_path_or_model = AutoModelForImageTextToText.from_pretrained(model_path_or_model).to(device)
        self.model = model_path_or_model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        # Batched generation pays off on a GPU; on CPU one image at a time is as fast and needs no padding.
        self.batch_size = batch_size or (8 if self.model.device.type == "cuda" else 1)

    @property
    def name(self) -> str:
        return f"local:{getattr(self.model.config, '_name_or_path', '') or type(self.model).__name__}"

    def generate(self, image: Image.Image, kind: str, label: str) -> str:
        return self.generate_batch([image], [kind], [label])[0]

    def generate_batch(self, images: Sequence[Image.Image], kinds: Sequence[str], labels: Sequence[str]) -> list[str]:
        """Answers for several images in one left-padded `generate` call (greedy, so each equals its own call's)."""
        import torch

        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": generation_prompt(k, lab)}]}],
                add_generation_prompt=True, tokenize=False,
            )
            for k, lab in zip(kinds, labels)
        ]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens start at the same column
        try:
            inputs = self.processor(images=[load_image(i) for i in images], text=texts, padding=True,
                                    return_tensors="pt").to(self.model.device)
        finally:
            tokenizer.padding_side = side
        with torch.no_grad():
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ---- the answer cache ----------------------------------------------------------------------------------------------


def failures_path(cache_path: str | os.PathLike) -> Path:
    """Where the failures of the latest generation run are written, next to the cache."""
    return Path(f"{os.fspath(cache_path)}.failures.jsonl")


class AnswerCache:
    """
    Append-only JSONL of generated answers, one record per (image key, kind), in a `train.infra.records.RecordStore`.

    Every record is written, flushed and fsynced as soon as it exists, so killing a run loses at most the answers
    in flight. A partially written last line (the kill came mid-write) is ignored on read and cut off before the
    next append, so the new record starts on a line of its own. When a key appears twice, the later record wins.
    """

    def __init__(self, path: str | os.PathLike):
        self.store = RecordStore(path, validate=_is_answer, ensure_ascii=False)
        self.path = self.store.path
        self.records = {(record["key"], record["kind"]): record for record in self.store.read()}
        self.skipped_lines = self.store.skipped_lines

    def get(self, key: str, kind: str) -> dict[str, Any] | None:
        return self.records.get((key, kind))

    def __contains__(self, key_kind: tuple[str, str]) -> bool:
        return key_kind in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        self.store.append([record])
        self.records[(record["key"], record["kind"])] = record


def _is_answer(record: dict[str, Any]) -> bool:
    return all(isinstance(record.get(f), str) for f in ("key", "kind", "answer"))


# ---- generation ----------------------------------------------------------------------------------------------------


@dataclass
class GenerationSummary:
    """What a generation run did. `failures` lists `{"key", "kind", "label", "index", "error"}` per failed answer."""

    cached: int = 0
    generated: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    answers_naming_label: int = 0
    failures_path: Path | None = None
    rows: int = 0
    rows_left_out: int = 0

    @property
    def num_failed(self) -> int:
        return len(self.failures)


def image_keys(dataset: Dataset, image_column: str = "image", show_progress: bool = True) -> list[str]:
    """The `image_key` of every row, in order."""
    images = dataset.select_columns([image_column])
    return [
        image_key(row[image_column])
        for row in tqdm(images, desc="Hashing images", unit="image", disable=not show_progress)
    ]


def generate_answers(
    dataset: Dataset,
    generator: AnswerGenerator,
    cache_path: str | os.PathLike,
    kinds: Sequence[str] = GENERATED_KINDS,
    label_names: Sequence[str] | None = None,
    num_workers: int = 1,
    max_consecutive_failures: int | None = 10,
    show_progress: bool = True,
    keys: Sequence[str] | None = None,
) -> GenerationSummary:
    """
    Fill the cache at `cache_path` with the conversation/reasoning answers of every image of `dataset`.

    Answers already cached are not asked for again, and identical images are asked for once (the first row's label
    is used). Failed answers (after the generator's retries) are logged, listed in the summary and written to
    `<cache_path>.failures.jsonl`, which describes the latest run only. After `max_consecutive_failures` failures in
    a row the run stops with an `AnswerGenerationError`, since the endpoint is then most likely down or misconfigured;
    everything generated so far stays cached. `num_workers > 1` sends that many requests at a time (remote
    generators only: a local model is not thread-safe; a generator with `generate_batch` and `batch_size > 1`, the
    local model on a GPU, answers that many images per call instead). A progress bar shows the rate and the ETA.
    """
    kinds = _check_kinds(kinds, allowed=GENERATED_KINDS)
    label_names = _label_names(dataset, label_names)
    keys = list(keys) if keys is not None else image_keys(dataset, show_progress=show_progress)
    cache = AnswerCache(cache_path)
    summary = GenerationSummary(failures_path=failures_path(cache_path))
    summary.failures_path.parent.mkdir(parents=True, exist_ok=True)
    summary.failures_path.unlink(missing_ok=True)
    failures = RecordStore(summary.failures_path, ensure_ascii=False)
    pending, summary.cached = _plan(keys, kinds, cache)
    labels = list(dataset["label"]) if pending else []
    name = getattr(generator, "name", type(generator).__name__)

    consecutive_failures = 0
    progress = tqdm(total=len(pending), desc="Generating answers", unit="answer", disable=not show_progress)

    def submit(pool: ThreadPoolExecutor | None, task: tuple[str, str, int]) -> Future:
        key, kind, index = task
        image, label = dataset[index]["image"], label_names[labels[index]]
        if pool is None:  # run inline, keeping exceptions inside a Future like the threaded path
            future: Future = Future()
            try:
                future.set_result(generator.generate(image, kind, label))
            except Exception as err:  # noqa: BLE001 - any per-image error becomes a reported failure
                future.set_exception(err)
            return future
        return pool.submit(generator.generate, image, kind, label)

    def on_done(task: tuple[str, str, int], future: Future) -> None:
        nonlocal consecutive_failures
        key, kind, index = task
        label = label_names[labels[index]]
        error = future.exception()
        answer = future.result() if error is None else None
        if error is None and (not isinstance(answer, str) or not answer.strip()):
            error = AnswerGenerationError(f"empty answer: {answer!r}")
        if error is None:
            cache.append({"key": key, "kind": kind, "label": label, "answer": answer.strip(), "generator": name})
            summary.generated += 1
            summary.answers_naming_label += mentions_label(answer, label)
            consecutive_failures = 0
        else:
            failure = {"key": key, "kind": kind, "label": label, "index": index, "error": f"{type(error).__name__}: {error}"}
            summary.failures.append(failure)
            failures.append([failure])
            logger.warning("No %s answer for row %d (image %s): %s", kind, index, key[:12], failure["error"])
            consecutive_failures += 1
        progress.update(1)
        progress.set_postfix(failed=summary.num_failed)
        if max_consecutive_failures is not None and consecutive_failures >= max_consecutive_failures:
            raise AnswerGenerationError(
                f"{consecutive_failures} answers failed in a row (last: {failure['error']}); stopping. "
                f"{len(cache)} answers are cached in {cache.path} and failures listed in {summary.failures_path}: "
                "fix the endpoint and rerun to resume."
            )

    batch_size = getattr(generator, "batch_size", 1) if hasattr(generator, "generate_batch") else 1
    try:
        if batch_size > 1:
            _run_batched(pending, dataset, labels, label_names, generator, on_done, batch_size)
        else:
            _run(pending, submit, on_done, num_workers)
    finally:
        progress.close()
    _log_summary(summary, cache.path)
    return summary


def _plan(keys: Sequence[str], kinds: Sequence[str], cache: AnswerCache) -> tuple[list[tuple[str, str, int]], int]:
    """The `(key, kind, first row index)` answers still to generate, in data set order, and the number cached."""
    first_rows: dict[tuple[str, str], int] = {}
    for index, key in enumerate(keys):
        for kind in kinds:
            first_rows.setdefault((key, kind), index)
    pending = [(key, kind, index) for (key, kind), index in first_rows.items() if (key, kind) not in cache]
    return pending, len(first_rows) - len(pending)


def _run(
    tasks: Iterable[tuple[str, str, int]],
    submit: Callable[[ThreadPoolExecutor | None, tuple[str, str, int]], Future],
    on_done: Callable[[tuple[str, str, int], Future], None],
    num_workers: int,
) -> None:
    """Run tasks inline or on a thread pool; results are handled (and written) on this thread, in completion order."""
    tasks = iter(tasks)
    if num_workers <= 1:
        for task in tasks:
            on_done(task, submit(None, task))
        return
    pool = ThreadPoolExecutor(num_workers)
    try:
        # A bounded window keeps only a few decoded images in memory, however large the data set.
        in_flight = {submit(pool, task): task for task in islice(tasks, 2 * num_workers)}
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(in_flight.pop(future), future)
                for task in islice(tasks, 1):
                    in_flight[submit(pool, task)] = task
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_batched(tasks, dataset, labels, label_names, generator, on_done, batch_size: int) -> None:
    """A local model's answers, `batch_size` at a time; a failed batch fails each of its answers."""
    tasks = iter(tasks)
    while batch := list(islice(tasks, batch_size)):
        rows = [dataset[index] for _, _, index in batch]
        futures = [Future() for _ in batch]
        try:
            answers = generator.generate_batch([row["image"] for row in rows], [kind for _, kind, _ in batch],
                                               [label_names[labels[index]] for _, _, index in batch])
            for future, answer in zip(futures, answers, strict=True):
                future.set_result(answer)
        except Exception as err:  # noqa: BLE001 - becomes a reported failure of each answer
            for future in futures:
                if not future.done():
                    future.set_exception(err)
        for task, future in zip(batch, futures):
            on_done(task, future)


def _log_summary(summary: GenerationSummary, cache_path: Path) -> None:
    logger.info(
        "Answers: %d cached, %d generated, %d failed (cache: %s).",
        summary.cached, summary.generated, summary.num_failed, cache_path,
    )
    if summary.answers_naming_label:
        logger.warning("%d generated answers name their label despite the prompt.", summary.answers_naming_label)
    if summary.failures:
        logger.warning(
            "%d answers failed after retries; they are listed in %s. Rerun to retry them.",
            summary.num_failed, summary.failures_path,
        )


# ---- the instruction data set --------------------------------------------------------------------------------------


def build_instruction_dataset(
    dataset: Dataset,
    processor,
    kinds: Sequence[str] = KINDS,
    generator: AnswerGenerator | None = None,
    cache_path: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    num_workers: int = 1,
    max_consecutive_failures: int | None = 10,
    show_progress: bool = True,
    return_summary: bool = False,
    skip_missing: bool = False,
) -> Dataset | tuple[Dataset, GenerationSummary]:
    """
    The stage-1 instruction data of `dataset` (columns `image`: PIL, `label`: int `ClassLabel`).

    Returns a data set with columns `images` (a list of one image), `messages` (user: image placeholder + prompt;
    assistant: answer, as `EmoVLMKDProcessor` builds them), `kind` and `label`: one row per image and kind, in the
    data set's order. This is the format TRL's `SFTTrainer` trains on directly.

    Categorical rows need no model. Conversation and reasoning answers are generated with `generator` through the
    cache at `cache_path` (see `generate_answers`); with `generator=None` they are read from the cache alone, and
    a missing one is an error unless `skip_missing=True` (the other ranks of a distributed run, which read what the
    main process generated and must leave out the same rows). Rows whose answer failed are left out, with a logged
    count; `return_summary=True` also returns the `GenerationSummary` that lists them.
    """
    kinds = _check_kinds(kinds, allowed=KINDS)
    label_names = _label_names(dataset, label_names)
    generated_kinds = [kind for kind in kinds if kind in GENERATED_KINDS]
    summary = GenerationSummary()
    cache = None
    if generated_kinds:
        if cache_path is None:
            raise ValueError(f"Kinds {generated_kinds} need `cache_path=` (the JSONL file of generated answers).")
        keys = image_keys(dataset, show_progress=show_progress)
        if generator is not None:
            summary = generate_answers(
                dataset,
                generator,
                cache_path,
                kinds=generated_kinds,
                label_names=label_names,
                num_workers=num_workers,
                max_consecutive_failures=max_consecutive_failures,
                show_progress=show_progress,
                keys=keys,
            )
        cache = AnswerCache(cache_path)
        missing = sum((key, kind) not in cache for key in set(keys) for kind in generated_kinds)
        if generator is None and missing and not skip_missing:
            raise ValueError(f"{missing} answers are missing from {cache_path} and no `generator` was given.")

    rows: dict[str, list] = {"index": [], "messages": [], "kind": [], "label": []}
    for index, label_id in enumerate(list(dataset["label"])):
        label = label_names[label_id]
        for kind in kinds:
            if kind == "categorical":
                messages = processor.categorical_messages(None, label)
            else:
                record = cache.get(keys[index], kind)
                if record is None:  # failed in this run: reported by generate_answers, counted below
                    summary.rows_left_out += 1
                    continue
                messages = getattr(processor, f"{kind}_messages")(None, record["answer"])
            rows["index"].append(index)
            rows["messages"].append(_with_image_placeholders(messages))
            rows["kind"].append(kind)
            rows["label"].append(label_id)
    summary.rows = len(rows["kind"])
    if summary.rows_left_out:
        logger.warning(
            "Left out %d of %d instruction rows whose answers could not be generated (listed in %s).",
            summary.rows_left_out, summary.rows + summary.rows_left_out, summary.failures_path,
        )

    label_feature = dataset.features["label"]
    if not isinstance(label_feature, ClassLabel):
        label_feature = ClassLabel(names=list(label_names))
    features = Features({"messages": MESSAGES_FEATURE, "kind": Value("string"), "label": label_feature})
    if not rows["index"]:  # `map` and `concatenate_datasets` would drop the columns of an empty data set
        features = Features({"images": List(ImageFeature()), **features})
        instructions = Dataset.from_dict({name: [] for name in features}, features=features)
    else:
        table = Dataset.from_dict({name: rows[name] for name in features}, features=features)
        instructions = concatenate_datasets([_image_lists(dataset, rows["index"]), table], axis=1)
    return (instructions, summary) if return_summary else instructions


def _with_image_placeholders(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The processor's messages with each image part reduced to `{"type": "image"}`; images live in `images`."""
    return [
        {
            "role": message["role"],
            "content": [{"type": "image"} if part["type"] == "image" else dict(part) for part in message["content"]],
        }
        for message in messages
    ]


def _image_lists(dataset: Dataset, indices: list[int]) -> Dataset:
    """An `images` column holding `[dataset[i]["image"]]` for each of `indices`, without decoding stored images."""
    source = dataset.select_columns(["image"])
    stored = isinstance(source.features["image"], ImageFeature)
    if stored:  # copy the encoded bytes as they are instead of decoding and re-encoding every image
        source = source.cast_column("image", ImageFeature(decode=False))
    images = source.select(indices).map(
        lambda batch: {"images": [[image] for image in batch["image"]]},
        batched=True,
        remove_columns=["image"],
        features=Features({"images": List(ImageFeature(decode=not stored))}),
        desc="Attaching images",
    )
    return images.cast_column("images", List(ImageFeature())) if stored else images


def _check_kinds(kinds: Sequence[str], allowed: Sequence[str]) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [kind for kind in kinds if kind not in allowed]
    if unknown or not kinds:
        raise ValueError(f"Unknown or no instruction kinds {unknown or kinds}; choose among {tuple(allowed)}.")
    return kinds


def _label_names(dataset: Dataset, label_names: Sequence[str] | None) -> list[str]:
    if label_names is not None:
        return list(label_names)
    feature = dataset.features.get("label")
    if not isinstance(feature, ClassLabel):
        raise ValueError("The `label` column is not a `ClassLabel`; pass `label_names=`.")
    return list(feature.names)


def answer_generator(context):
    """The recipe's answer generator (`instructions.generator`), or None for `none`."""
    spec = context.recipe.instructions
    if spec.generator == "openai":
        return OpenAIChatGenerator(**spec.generator_kwargs())
    if spec.generator == "local":
        return LocalVLMGenerator(context.base_models["vlm"], context.processor(), **spec.generator_kwargs())
    return None


def run(context) -> dict:
    """Stage `instructions`: the conversation/reasoning answers stage 1 trains on, generated before any training.

    Only the main process works (concurrent, rate-limited, retried, resumable through the answer cache). The other
    ranks do not wait in a collective, which would time out after `timeout` (30 min by default) over an hours-long
    generation: they poll for this stage's marker file (`stage_done.json`, or `stage_failed.json` when the main
    process failed), then meet the main process at the barrier of the marker, which is reached at once.
    Categorical-only kinds, or `generator: none`, need no endpoint: the stage is done at once (with `none`, stage 1
    reads whatever the cache holds and stops if answers are missing)."""
    spec, provenance = context.recipe.instructions, context.provenance
    kinds = [k for k in context.recipe.sft.instruction_kinds if k in GENERATED_KINDS]
    provenance.clear_failed("instructions")
    if not context.state.is_main_process:
        provenance.wait_for_marker("instructions")
        return {}
    try:
        if not kinds or spec.generator == "none":
            return {}
        _, summary = build_instruction_dataset(
            context.data["train"], context.processor(), kinds=kinds, generator=answer_generator(context),
            cache_path=context.answers_cache, num_workers=spec.workers(), return_summary=True)
    except BaseException as err:
        provenance.mark_failed("instructions", err)
        raise
    return {"cached": summary.cached, "generated": summary.generated, "failed": summary.num_failed,
            "answers_naming_label": summary.answers_naming_label, "failures": str(summary.failures_path)}


__all__ = [
    "answer_generator",
    "run",
    "GENERATED_KINDS",
    "KINDS",
    "MESSAGES_FEATURE",
    "AnswerCache",
    "AnswerGenerationError",
    "AnswerGenerator",
    "GenerationSummary",
    "LocalVLMGenerator",
    "OpenAIChatGenerator",
    "RateLimiter",
    "build_instruction_dataset",
    "encode_data_url",
    "failures_path",
    "generate_answers",
    "generation_prompt",
    "image_key",
    "image_keys",
    "mentions_label",
]
