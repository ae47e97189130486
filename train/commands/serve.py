"""`emovlm-kd serve --model M`: an EmoVLM-KD checkpoint over HTTP, in the image-classification task format.

    emovlm-kd serve --model runs/demo/final --port 8000          # = python -m train serve ...

    from huggingface_hub import InferenceClient
    InferenceClient("http://127.0.0.1:8000").image_classification("photo.jpg", top_k=3)

Routes (FastAPI on uvicorn):

- `POST /`: what `InferenceClient` sends to a URL. The body is the image's raw bytes (any `Content-Type` but JSON),
  or JSON `{"inputs": IMAGE or [IMAGE, ...], "parameters": {...}}` with IMAGE base64 text or a `data:` URI, exactly
  as the Inference Endpoints handler (`handler.py`, shipped with every pushed model) reads it: parameters `top_k`,
  `function_to_apply`, `explain`, `max_new_tokens`; strings are image data only (never a path on the server, never
  a URL to download). The answer is the handler's: one image's list of `{label, score}` (fused, best first) with
  each branch as extra keys, or one such list per image of a list, where an image that cannot be classified gets
  `[{"label": null, "score": null, "error": "inputs[i]: ..."}]` and the others are classified.
- `GET /health`: `{"status": "ok", ...}` with the model, the limits, the queue and the server's counters (requests,
  images, batches, the batch sizes formed).

Dynamic batching: the images of requests that arrive together are classified in one call of the checkpoint's
pipeline (the front door, `pipeline_emovlm_kd.py`), up to `--max-batch-size` images; a batch waits at most
`--max-wait-ms` for more after its first image. Requests with different `function_to_apply`/`explain` settings are
classified in separate calls; `top_k` is cut per request.

Limits, each answered with one line in `{"error": ...}` (what `InferenceClient` shows in its `HfHubHTTPError`):
- a body over `--max-request-bytes` (default 20 MB): 413, before it is read; more than `--max-images` images in
  one request (default `EMOVLM_MAX_IMAGES` or 16): 413;
- more than `--max-queue` images accepted and not yet answered (default 64): 503 with `Retry-After`, at once;
- a malformed request or parameter, or a single image that cannot be classified: 400;
- `explain` with `max_new_tokens` above `--max-new-tokens` (default `EMOVLM_MAX_NEW_TOKENS` or 128): 400.
Decoded images are bounded by the image processor's `max_image_pixels`, as everywhere.
"""

import argparse
import asyncio
import json
import logging
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

from modeling_emovlm_kd.handler import DEFAULT_MAX_IMAGES, DEFAULT_MAX_NEW_TOKENS, EndpointHandler, TooManyImages
from modeling_emovlm_kd.loading_emovlm_kd import DTYPES
from train.commands.arguments import non_negative_int, positive_int
from train.commands.predict import require_front_door

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_WAIT_MS = 10
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_MAX_REQUEST_BYTES = 20 * 2**20
SIZE_UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30}


class RequestError(Exception):
    """A request refused with an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Settings:
    """The server's batching and limits (`emovlm-kd serve --help`)."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def check(self, max_images: int) -> None:
        if self.max_queue < max_images:
            raise ValueError(f"--max-queue ({self.max_queue}) must be at least --max-images ({max_images}): a request "
                             "of max-images images must fit an empty queue.")


@dataclass
class Counters:
    """What the server did since it started, for `/health` (and the tests and the benchmark)."""

    requests: int = 0
    images: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # batches formed, by size
    refused_busy: int = 0
    refused_too_large: int = 0
    refused_bad_request: int = 0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "images": self.images, "batches": sum(self.batch_sizes.values()),
                "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
                "refused_busy": self.refused_busy, "refused_too_large": self.refused_too_large,
                "refused_bad_request": self.refused_bad_request}


@dataclass
class Job:
    """One image waiting for its batch: the pipeline options of its request and where its answer goes."""

    image: object
    options: dict
    answer: asyncio.Future


class Batcher:
    """Dynamic batching of one pipeline: images queued by concurrent requests are classified together.

    One task collects a batch (the first waiting image, then whatever arrives within `max_wait_ms`, up to
    `max_batch_size` images) and runs the pipeline in one worker thread, so the event loop keeps accepting requests
    meanwhile; they form the next batch. At most `max_queue` images are accepted and not yet answered (waiting,
    collected or running); `submit` refuses more at once.
    """

    def __init__(self, classifier, settings: Settings, counters: Counters):
        self.classifier, self.settings, self.counters = classifier, settings, counters
        self.pending = 0  # images accepted and not yet answered

    async def start(self) -> None:
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emovlm-serve")
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: list, options: dict) -> list[list[dict]]:
        """The front door's answer for each image, once its batch has run; `RequestError(503)` when full."""
        if self.pending + len(images) > self.settings.max_queue:
            raise RequestError(503, f"The server is busy: {self.pending} images are waiting or being classified "
                                    f"and it holds at most {self.settings.max_queue} (--max-queue); retry shortly.")
        loop = asyncio.get_running_loop()
        jobs = [Job(image, options, loop.create_future()) for image in images]
        self.pending += len(jobs)
        for job in jobs:
            self.queue.put_nowait(job)
        try:
            return list(await asyncio.gather(*(job.answer for job in jobs)))
        finally:
            for job in jobs:  # a client that went away: its images are skipped, not classified
                job.answer.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch_size:
                if self.queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                    except TimeoutError:
                        break
                else:
                    batch.append(self.queue.get_nowait())
            await self._classify(batch)

    async def _classify(self, batch: list[Job]) -> None:
        """Run the batch's images through the pipeline, one call per distinct set of options."""
        groups: dict[str, list[Job]] = {}
        for job in batch:
            if job.answer.done():  # cancelled: its request is gone
                self.pending -= 1
                continue
            key = json.dumps({k: v for k, v in job.options.items() if k != "top_k"}, sort_keys=True)
            groups.setdefault(key, []).append(job)
        for jobs in groups.values():
            options = {**jobs[0].options, "top_k": max(job.options["top_k"] for job in jobs)}
            images = [job.image for job in jobs]
            self.counters.batch_sizes[len(jobs)] += 1
            try:
                answers = await asyncio.get_running_loop().run_in_executor(
                    self.executor, partial(self.classifier, images, batch_size=len(images), **options))
            except Exception as error:  # noqa: BLE001 - the batch's requests get a 500 naming it, the server goes on
                logger.exception("A batch of %d images failed.", len(jobs))
                for job in jobs:
                    if not job.answer.done():
                        job.answer.set_exception(error)
            else:
                for job, answer in zip(jobs, answers):
                    if not job.answer.done():
                        job.answer.set_result(answer[: job.options["top_k"]])
            finally:
                self.pending -= len(jobs)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (its Content-Length, else
    while it streams in)."""
    length = request.headers.get("content-length")
    too_large = RequestError(413, f"The request body is over this server's limit of {limit} bytes "
                                  "(--max-request-bytes): send a smaller image or fewer images per request.")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def request_data(body: bytes, content_type: str) -> dict:
    """The handler's `{"inputs", "parameters"}` for a body: JSON when sent as JSON, else the raw image bytes (what
    `InferenceClient.image_classification` sends without parameters)."""
    if content_type.split(";")[0].strip().lower() in ("application/json", "text/json"):
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"The body is not valid JSON ({error}).") from None
        if not isinstance(data, dict):
            raise RequestError(400, 'Send {"inputs": <base64 image or data URI, or a list>, "parameters": {...}}.')
        return data
    if not body:
        raise RequestError(400, "The body is empty: send an image's bytes, or JSON {\"inputs\": <base64 image>}.")
    return {"inputs": body}


def build_app(handler: EndpointHandler, settings: Settings, name: str = "model"):
    """The FastAPI application serving `handler`'s checkpoint with `settings` (FastAPI reads the route functions'
    annotations, so this module keeps them evaluated: no `from __future__ import annotations`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    counters = Counters()
    batcher = Batcher(handler.classifier, settings, counters)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="EmoVLM-KD", summary=f"{name}: image classification in the task format", lifespan=lifespan)
    app.state.counters, app.state.batcher = counters, batcher

    @app.get("/health")
    async def health() -> dict:
        """The server is up and its model loaded; its limits, queue and counters."""
        return {"status": "ok", "model": name, "labels": handler.labels,
                "limits": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                           "max_queue": settings.max_queue, "max_request_bytes": settings.max_request_bytes,
                           "max_images": handler.max_images, "max_new_tokens": handler.max_new_tokens},
                "queue": {"pending": batcher.pending, "capacity": settings.max_queue},
                "counters": counters.as_dict()}

    @app.post("/")
    async def classify(request: Request):
        """Image classification: raw image bytes, or JSON `{"inputs": ..., "parameters": {...}}` (module docstring)."""
        counters.requests += 1
        try:
            body = await read_body(request, settings.max_request_bytes)
            try:
                parsed = handler.read(request_data(body, request.headers.get("content-type", "")))
            except TooManyImages as error:
                raise RequestError(413, str(error)) from None
            except ValueError as error:
                raise RequestError(400, str(error)) from None
            if parsed.images:
                parsed.fill(await batcher.submit(list(parsed.images.values()), parsed.options))
                counters.images += len(parsed.images)
            try:
                return parsed.answer()
            except ValueError as error:  # the one image of the request could not be classified
                raise RequestError(400, str(error)) from None
        except RequestError as error:
            counters.refused_busy += error.status == 503
            counters.refused_too_large += error.status == 413
            counters.refused_bad_request += error.status == 400
            headers = {"Retry-After": "1"} if error.status == 503 else None
            return JSONResponse({"error": str(error)}, status_code=error.status, headers=headers)
        except Exception as error:  # noqa: BLE001 - a failed batch: say so, keep serving
            return JSONResponse({"error": f"Classification failed: {type(error).__name__}: {error}"},
                                status_code=500)

    return app


def byte_size(text: str) -> int:
    """argparse type: a byte count or `<n>kb|mb|gb` (binary units, as Gradio's `max_file_size`)."""
    value = text.strip().lower()
    unit = next((u for u in SIZE_UNITS if value.endswith(u)), None)
    try:
        size = int(float(value[: -len(unit)]) * SIZE_UNITS[unit]) if unit else int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 20mb, 512kb or 1000000, got {text!r}")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="EmoVLM-KD folder or Hub repo id (remote code is trusted).")
    parser.add_argument("--revision", help="Branch, tag or commit of a Hub repo (pin a commit).")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="Weights' dtype (auto: bfloat16 on a GPU that has it, else float32).")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the first GPU, else the CPU).")
    parser.add_argument("--device-map", help="accelerate device map, e.g. 'auto'.")
    parser.add_argument("--load-in-4bit", action="store_true", help="The VLM in 4-bit NF4, as predict loads it.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"Address to listen on (default {DEFAULT_HOST}).")
    parser.add_argument("--port", type=non_negative_int, default=DEFAULT_PORT,
                        help=f"Port (default {DEFAULT_PORT}; 0: a free port, printed at start).")
    parser.add_argument("--max-batch-size", type=positive_int, default=DEFAULT_MAX_BATCH_SIZE,
                        help=f"Most images classified in one pipeline call (default {DEFAULT_MAX_BATCH_SIZE}).")
    parser.add_argument("--max-wait-ms", type=non_negative_int, default=DEFAULT_MAX_WAIT_MS,
                        help="How long a batch waits for more images after its first one, in milliseconds "
                             f"(default {DEFAULT_MAX_WAIT_MS}; 0: only what is already waiting).")
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help="Most images accepted and not yet answered; beyond it requests get 503 "
                             f"(default {DEFAULT_MAX_QUEUE}).")
    parser.add_argument("--max-request-bytes", type=byte_size, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="Largest request body, bytes or <n>kb/mb/gb; larger ones get 413 (default 20mb).")
    parser.add_argument("--max-images", type=positive_int, default=None,
                        help=f"Most images in one request; more get 413 (default EMOVLM_MAX_IMAGES or "
                             f"{DEFAULT_MAX_IMAGES}).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="Cap (and default) of an explanation's length with parameters.explain (default "
                             f"EMOVLM_MAX_NEW_TOKENS or {DEFAULT_MAX_NEW_TOKENS}).")
    parser.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                        help="Most open connections, the asking one included; beyond it requests get 503 before their "
                             "body is read (uvicorn's limit_concurrency), so uploads in flight hold at most "
                             f"max-connections x max-request-bytes (default {DEFAULT_MAX_CONNECTIONS}).")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (info: one line per request).")


def main(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise SystemExit(f"train serve needs FastAPI and uvicorn ({error}): pip install 'emovlm-kd[serve]'.") from None

    settings = Settings(args.max_batch_size, args.max_wait_ms, args.max_queue, args.max_request_bytes)
    try:
        handler = EndpointHandler(args.model, device=args.device, max_images=args.max_images,
                                  max_new_tokens=args.max_new_tokens, revision=args.revision, dtype=args.dtype,
                                  device_map=args.device_map, load_in_4bit=args.load_in_4bit)
        settings.check(handler.max_images)
        require_front_door(handler.classifier, args.model)
    except (OSError, ValueError) as error:
        raise SystemExit(f"train serve: {error}") from None
    app = build_app(handler, settings, name=args.model)
    # Bound here so that --port 0 can print the port it got. IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm
    # off (TCP_NODELAY) only on sockets that say they are TCP, and with it on every keep-alive response waited ~40 ms
    # for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        raise SystemExit(f"train serve: cannot listen on {args.host}:{args.port}: {error}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {args.model} on http://{shown}:{port} (POST / in the image-classification format, GET /health; "
          f"batches of up to {settings.max_batch_size} images, {settings.max_wait_ms} ms wait)", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                            limit_concurrency=args.max_connections)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


__all__ = ["Batcher", "Counters", "RequestError", "Settings", "add_arguments", "build_app", "byte_size", "main"]
