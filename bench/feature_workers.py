"""Feature-cache build with image decoding and preprocessing in `DataLoader` workers vs in the main process.

`train.stages.features.compute_vlm_features(..., num_workers=W)` (the recipe's `model.preprocess_workers`) over a
`datasets.Dataset` of JPEG-encoded photos (decoded on access, as the real data sets are), resized by the image
processor to the benchmark's `max_pixels`. Cases, interleaved: `workers0` (today's behaviour), `workersW` for each
`--workers`, and `preprocess_only` (decode + preprocess every image in the main process, no model: how much work
there is to overlap). The JSON records whether every case's cache equals the in-process one exactly.

    python -m bench.feature_workers --threads 1
"""

from __future__ import annotations

import argparse
import io
import statistics

import datasets
import torch

from bench import common
from train.stages.features import compute_vlm_features


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, "feature_workers.json")
    parser.add_argument("--num-images", type=int, default=None, help="Images in the data set (default 12).")
    parser.add_argument("--batch-size", type=int, default=4, help="Images per forward (feature_batch_size).")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="Worker counts to compare with 0.")
    parser.add_argument("--photo-side", type=int, default=None, help="Side of the encoded photos (default 1024).")
    parser.add_argument("--reps", type=int, default=None)
    return parser.parse_args(argv)


def jpeg_dataset(n: int, side: int, seed: int) -> datasets.Dataset:
    encoded = []
    for image in common.random_images(n, (side, side * 3 // 4), seed=seed):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": encoded, "label": list(range(n))}, features=features)


def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    reps = args.reps or (1 if args.tiny else 2)
    num_images = args.num_images or (4 if args.tiny else 12)
    side = args.photo_side or (128 if args.tiny else 1024)
    shape = common.make_shape("tiny" if args.tiny else "mid", args.text_layers, args.vision_depth)
    common.log(f"Building the {shape.name} models ...")
    bm = common.build_models(shape, dtype=args.dtype, device=args.device, seed=args.seed)
    dataset = jpeg_dataset(num_images, side, args.seed)
    results = {}

    def build(workers):
        def run():
            results[workers] = compute_vlm_features(bm.model, bm.image_processor, dataset, args.batch_size, workers)
        return run

    def preprocess_only():
        for start in range(0, len(dataset), args.batch_size):
            bm.image_processor(dataset[start : start + args.batch_size]["image"], return_tensors="pt")

    cases = {"preprocess_only": preprocess_only, "workers0": build(0)}
    cases.update({f"workers{w}": build(w) for w in args.workers if w})
    # No untimed warm-up: starting the workers is part of what a build costs.
    times = common.interleaved_timings(cases, reps=reps, warmup=0, device=bm.device, log=common.log)
    inline = results[0]
    rows = []
    for name, seconds in times.items():
        workers = None if name == "preprocess_only" else int(name.removeprefix("workers"))
        row = {"case": name, "workers": workers, "latency": common.summarize(seconds),
               "images_per_s": num_images / statistics.median(seconds)}
        if workers is not None:
            row["speedup_over_workers0"] = statistics.median(times["workers0"]) / statistics.median(seconds)
            row["speedup_per_rep"] = [a / b for a, b in zip(times["workers0"], seconds)]
            row["cache_equals_workers0"] = all(torch.equal(inline[k], results[workers][k]) for k in inline)
        rows.append(row)
    table = common.markdown_table(
        [{**r, "median_s": r["latency"]["median_s"]} for r in rows],
        [("case", "case"), ("median_s", "s per build"), ("images_per_s", "images/s"),
         ("speedup_over_workers0", "x faster than 0 workers"), ("cache_equals_workers0", "cache identical")])
    description = {**bm.describe(), "num_images": num_images, "batch_size": args.batch_size, "photo": [side, side * 3 // 4],
                   "reps": reps}
    print(f"\nFeature-cache build ({description['shape']}, {description['dtype']}, {num_images} JPEG photos "
          f"{side}x{side * 3 // 4}, batch {args.batch_size}):\n\n{table}")
    ratios = {f"workers{r['workers']}_speedup_over_workers0": r["speedup_over_workers0"] for r in rows
              if r["workers"]}
    ratios["preprocess_share_of_workers0_build"] = (statistics.median(times["preprocess_only"])
                                                    / statistics.median(times["workers0"]))
    common.write_json(args.output, {"benchmark": "feature_workers", "config": description, "settings": vars(args),
                             "results": rows, "ratios": ratios, "table_markdown": table})


if __name__ == "__main__":
    main()
