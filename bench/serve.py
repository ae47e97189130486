"""`emovlm-kd serve` under load: images/s at 1 and 8 concurrent clients, measured in one run.

    python -m bench.serve --threads 1                                   # the tiny checkpoint, 1 and 8 clients
    python -m bench.serve --model runs/demo/final --requests 400        # any EmoVLM-KD folder or Hub repo id

Starts `python -m train serve --model M --port 0` in a subprocess (torch threads: `--threads`, via
OMP_NUM_THREADS), then, for each concurrency level, sends `--requests` one-image requests from that many client
threads, each with its own `huggingface_hub.InferenceClient` posting raw PNG bytes (what `image_classification`
sends). The levels alternate over `--rounds` (so drift of a shared machine hits each alike), after `--warmup`
untimed requests. Reported per level: images/s (requests answered / wall time of the phase), latency quartiles,
and the batch sizes the server formed (the difference of its `/health` counters around the phase, not a timing).
Without `--model` the checkpoint is the test suite's tiny one (random heads): a measure of the server's overhead
and batching, not of a real model's speed. Clients and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from bench import common

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="EmoVLM-KD folder or Hub repo id (default: a tiny checkpoint built here).")
    parser.add_argument("--tiny", action="store_true", help="Smoke run: few requests, one round.")
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "serve.json"), help="JSON result path.")
    parser.add_argument("--threads", type=int, default=None, help="The server's torch threads (OMP_NUM_THREADS).")
    parser.add_argument("--device", default=None, help="The server's --device (default: its own choice).")
    parser.add_argument("--dtype", default="auto", help="The server's --dtype.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="Client threads per level.")
    parser.add_argument("--requests", type=int, default=None, help="Requests per level and round (default 160).")
    parser.add_argument("--rounds", type=int, default=None, help="Alternations of the levels (default 2).")
    parser.add_argument("--warmup", type=int, default=8, help="Untimed requests before the first level.")
    parser.add_argument("--side", type=int, default=224, help="Width and height of the PNGs sent.")
    parser.add_argument("--distinct-images", type=int, default=32, help="Different random images, sent in turn.")
    parser.add_argument("--max-batch-size", type=int, default=8, help="The server's --max-batch-size.")
    parser.add_argument("--max-wait-ms", type=int, default=10, help="The server's --max-wait-ms.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def tiny_checkpoint(folder: Path) -> Path:
    """The test suite's tiny EmoVLM-KD export (random heads), as `bench.predict_workers` builds it."""
    from modeling_emovlm_kd import LABEL_SETS
    from train.infra.assemble import assemble, save_hub_folder
    from train.infra.tiny import build_tiny_base_models

    torch.manual_seed(0)
    base = build_tiny_base_models(folder / "base", LABEL_SETS["mikels8"])
    model, processor = assemble(base["vlm"], "mikels8", head_hidden_dims=[64])
    return Path(save_hub_folder(model, processor, folder / "export"))


def png_images(n: int, side: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


class Server:
    """`python -m train serve` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, model: str, args, log: Path):
        flags = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
                 "--max-queue", str(max(64, 2 * max(args.concurrency))), "--dtype", args.dtype, "--log-level",
                 "warning", *(["--device", args.device] if args.device else [])]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        self.log, self.sink = log, open(log, "w")  # noqa: SIM115 - written by the server until stop()
        self.process = subprocess.Popen([sys.executable, "-m", "train", "serve", "--model", model, "--port", "0",
                                         *flags], stdout=self.sink, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.url = self._wait()

    def _wait(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench.serve: the server exited:\n{self.log.read_text()[-3000:]}")
            if url is None:
                line = next((x for x in self.log.read_text().splitlines() if x.startswith("Serving ")), None)
                url = line.split(" on ", 1)[1].split()[0] if line else None
            if url is not None:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"bench.serve: the server did not start:\n{self.log.read_text()[-3000:]}")

    def counters(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()["counters"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.sink.close()


def phase(url: str, images: list[bytes], requests: int, clients: int) -> dict:
    """`requests` one-image requests from `clients` threads; wall time, latencies, failures."""
    from huggingface_hub import InferenceClient

    latencies, failures, lock = [], [], threading.Lock()
    next_request = iter(range(requests))

    def client() -> None:
        inference = InferenceClient(base_url=url, timeout=300)
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                inference.image_classification(images[i % len(images)], top_k=1)
            except Exception as error:  # noqa: BLE001 - counted and reported
                failures.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "failures": failures}


def batch_sizes(before: dict, after: dict) -> Counter:
    sizes = Counter({int(k): v for k, v in after["batch_sizes"].items()})
    sizes.subtract({int(k): v for k, v in before["batch_sizes"].items()})
    return +sizes


def main(argv=None):
    import huggingface_hub.constants

    args = parse_args(argv)
    common.setup(args)
    # The clients talk to 127.0.0.1 only; huggingface_hub refuses every request under HF_HUB_OFFLINE=1.
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    requests = args.requests or (8 if args.tiny else 160)
    rounds = args.rounds or (1 if args.tiny else 2)
    images = png_images(args.distinct_images, args.side, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_checkpoint(Path(tmp)))
        common.log(f"Starting the server for {args.model or 'the tiny checkpoint'} ...")
        server = Server(model, args, Path(tmp) / "serve.log")
        try:
            phase(server.url, images, args.warmup, 1)
            runs = {c: [] for c in args.concurrency}
            for r in range(rounds):
                for clients in args.concurrency:
                    before = server.counters()
                    result = phase(server.url, images, requests, clients)
                    result["batch_sizes"] = batch_sizes(before, server.counters())
                    runs[clients].append(result)
                    common.log(f"  round {r + 1}/{rounds}, {clients} clients: "
                               f"{len(result['latencies']) / result['seconds']:.1f} images/s")
        finally:
            server.stop()
    rows = []
    for clients, results in runs.items():
        seconds = sum(r["seconds"] for r in results)
        answered = sum(len(r["latencies"]) for r in results)
        latencies = sorted(x for r in results for x in r["latencies"])
        sizes = sum((r["batch_sizes"] for r in results), Counter())
        batches = sum(sizes.values())
        rows.append({
            "concurrency": clients, "requests": requests * rounds, "answered": answered,
            "failed": sum(len(r["failures"]) for r in results),
            "first_failures": [f for r in results for f in r["failures"]][:3],
            "seconds": seconds, "images_per_s": answered / seconds if seconds else 0.0,
            "images_per_s_per_round": [len(r["latencies"]) / r["seconds"] for r in results],
            "latency_ms": {q: 1000 * float(np.percentile(latencies, p)) for q, p in (("p50", 50), ("p90", 90))}
            if latencies else {},
            "mean_batch": sum(size * n for size, n in sizes.items()) / batches if batches else 0.0,
            "batch_sizes": dict(sorted(sizes.items())),
        })
    table = common.markdown_table(
        [{**r, "p50": r["latency_ms"].get("p50"), "p90": r["latency_ms"].get("p90"),
          "largest": max(r["batch_sizes"], default=0)} for r in rows],
        [("concurrency", "clients"), ("images_per_s", "images/s"), ("p50", "latency p50 ms"),
         ("p90", "latency p90 ms"), ("mean_batch", "mean batch"), ("largest", "largest batch"),
         ("failed", "failed")])
    config = {"shape": "tiny" if not args.model else "model", "model": args.model or "tiny checkpoint (random heads)",
              "image_side": args.side, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
              "requests_per_level_and_round": requests, "rounds": rounds, "device": common.device_name(
                  common.resolve_device(args.device or "auto")), "server_threads": args.threads}
    print(f"\n`emovlm-kd serve`, {config['model']}, {args.side}x{args.side} PNGs, one image per request, batches of up "
          f"to {args.max_batch_size} ({args.max_wait_ms} ms wait), {requests} requests x {rounds} rounds per "
          f"level:\n\n{table}")
    by_level = {r["concurrency"]: r["images_per_s"] for r in rows}
    ratios = {f"c{c}_over_c{args.concurrency[0]}": by_level[c] / by_level[args.concurrency[0]]
              for c in args.concurrency[1:] if by_level[args.concurrency[0]]}
    common.write_json(args.output, {"benchmark": "serve", "config": config, "settings": vars(args), "results": rows,
                                    "ratios": ratios, "table_markdown": table})
    return rows


if __name__ == "__main__":
    main()
