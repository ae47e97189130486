"""`train predict` with and without DataLoader workers: images/s on the tiny export, same rows.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python -m bench.predict_workers --images 300 --workers 0 2

Builds the tiny offline base models and an EmoVLM-KD export from them (random heads), writes `--images` random JPEGs
of `--side` pixels, then classifies them with `predict_files` once per worker count (after one warm-up batch) and
prints images/s. The rows of every worker count are checked to equal those of the first. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling_emovlm_kd import LABEL_SETS
from train.commands.predict import Predictor, predict_files, read_rows
from train.infra.assemble import assemble, save_hub_folder
from train.infra.tiny import build_tiny_base_models


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--side", type=int, default=256, help="Width and height of the JPEGs.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        base = build_tiny_base_models(tmp / "base", LABEL_SETS["mikels8"])
        model, processor = assemble(base["vlm"], "mikels8", head_hidden_dims=[64])
        export = save_hub_folder(model, processor, tmp / "export")
        images = tmp / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{i:05d}.jpg", quality=90)
        paths = sorted(str(p) for p in images.iterdir())
        predictor = Predictor(str(export))
        predictor.predict(paths[: args.batch_size])  # warm-up
        results, reference = {}, None
        for workers in args.workers:
            output = tmp / f"w{workers}.jsonl"
            start = time.perf_counter()
            predict_files(predictor, paths, output, batch_size=args.batch_size, show_progress=False,
                          num_workers=workers)
            seconds = time.perf_counter() - start
            rows = read_rows(output)
            reference = reference or rows
            results[workers] = {"seconds": round(seconds, 2), "images_per_s": round(len(paths) / seconds, 1),
                                "rows_equal_first": rows == reference}
            print(f"num_workers={workers}: {len(paths)} images in {seconds:.2f} s = {len(paths) / seconds:.1f} "
                  f"images/s (rows equal to the first run's: {rows == reference})", flush=True)
    print(json.dumps({"images": args.images, "side": args.side, "batch_size": args.batch_size,
                      "torch_threads": torch.get_num_threads(), "results": results}))
    return results


if __name__ == "__main__":
    main()
