"""Answer generation at scale against a local OpenAI-compatible test server that answers after 100 ms.

    HF_HUB_OFFLINE=1 python bench/instructions.py --answers 1000 --workers 1 16

Reports per worker count the wall time, answers/s, the most requests the server had in flight, whether any
(image, prompt) was requested twice, and every failure. The server binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests" / "train")]

from test_instructions import FakeChatServer, many_images  # noqa: E402

from train.stages.instructions import OpenAIChatGenerator, generate_answers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--delay", type=float, default=0.1)
    args = parser.parse_args()
    dataset = many_images(args.answers)
    times = {}
    for workers in args.workers:
        server = FakeChatServer(delay=args.delay)
        try:
            generator = OpenAIChatGenerator(base_url=server.base_url, model="bench", api_key="sk-bench", timeout=30)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = generate_answers(dataset, generator, Path(tmp) / "answers.jsonl", kinds=["conversation"],
                                           num_workers=workers, show_progress=False)
                times[workers] = time.perf_counter() - start
        finally:
            server.close()
        twice = sum(count > 1 for count in server.answered.values())
        print(f"workers={workers:3d}  {times[workers]:7.1f} s  {summary.generated / times[workers]:7.1f} answers/s  "
              f"generated={summary.generated} requests={server.requests} max_in_flight={server.max_in_flight} "
              f"requested_twice={twice} failures={summary.num_failed}")
        for failure in summary.failures:
            print("  failed:", failure)
    if len(times) > 1:
        first, last = args.workers[0], args.workers[-1]
        print(f"speed-up {last} vs {first} workers: {times[first] / times[last]:.1f}x")


if __name__ == "__main__":
    main()
