"""Write the bundled demo sample: a stratified sample of Fashion-MNIST as an image folder.

No emotion image set can be installed offline, so `make demo` runs on real labelled photos of another kind:
Fashion-MNIST (Zalando SE, Expat licence), from Debian's `dataset-fashion-mnist` package. The sample in
`train/demo_data/fashion_mnist_sample/` was written by:

    apt-get install dataset-fashion-mnist
    python -m train.commands.demo_sample --source /usr/share/datasets/fashion-mnist --output-dir train/demo_data/fashion_mnist_sample
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_LABELS = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"
]
PER_CLASS = {"train": 300, "validation": 50, "test": 100}
NOTICE = """Fashion-MNIST sample for the EmoVLM-KD offline demo.

Source: Fashion-MNIST, https://github.com/zalandoresearch/fashion-mnist (Debian package dataset-fashion-mnist).
Copyright 2017 Zalando SE. Licence: Expat (MIT), reproduced below.
train/ and validation/ are drawn from the Fashion-MNIST training set, test/ from its test set;
{per_class} images per class, seed {seed}.

"""


def read_idx(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return images, labels


def write_sample(source: Path, output_dir: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    train_images, train_labels = read_idx(source / "train-images-idx3-ubyte.gz", source / "train-labels-idx1-ubyte.gz")
    test_images, test_labels = read_idx(source / "t10k-images-idx3-ubyte.gz", source / "t10k-labels-idx1-ubyte.gz")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    for class_id, name in enumerate(FASHION_MNIST_LABELS):
        train_ids = rng.permutation(np.flatnonzero(train_labels == class_id))
        test_ids = rng.permutation(np.flatnonzero(test_labels == class_id))
        picks = {
            "train": (train_images, train_ids[: PER_CLASS["train"]]),
            "validation": (train_images, train_ids[PER_CLASS["train"] : PER_CLASS["train"] + PER_CLASS["validation"]]),
            "test": (test_images, test_ids[: PER_CLASS["test"]]),
        }
        for split, (images, ids) in picks.items():
            folder = output_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                Image.fromarray(images[i], mode="L").save(folder / f"{split}_{i:05d}.png", optimize=True)
    licence = Path("/usr/share/doc/dataset-fashion-mnist/copyright").read_text()
    (output_dir / "LICENSE").write_text(NOTICE.format(per_class=PER_CLASS, seed=seed) + licence)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parents[1] / "demo_data/fashion_mnist_sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_sample(args.source, args.output_dir, args.seed)


if __name__ == "__main__":
    main()
