"""Tiny offline base models: a random Qwen2-VL (or Qwen2.5-VL, Qwen3-VL) and a ViT teacher built from configs.

    python -m train tiny --output-dir runs/tiny-base --labels mikels8 [--backbone qwen2_5_vl]
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--labels", default="mikels8", help="A label set name or a comma-separated list.")
    parser.add_argument("--backbone", default="qwen2_vl",
                        help="VLM family (model_type) of the tiny model: a key of modeling_emovlm_kd/backbones.py.")
    return parser


def main(args: argparse.Namespace) -> None:
    from modeling_emovlm_kd import resolve_label_set
    from modeling_emovlm_kd.backbones import get_backbone
    from train.infra.tiny import build_tiny_base_models

    try:
        get_backbone(args.backbone)
    except ValueError as err:
        raise SystemExit(f"error: --backbone: {err}") from None
    labels = args.labels.split(",") if "," in args.labels else args.labels
    paths = build_tiny_base_models(args.output_dir, resolve_label_set(labels), model_type=args.backbone)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))


__all__ = ["add_arguments", "main"]
