"""What the distillation head and the gate add to the VLM: parameters (at the real 7B and 2B shapes, from their
configs) and latency (measured on the benchmark model, next to the VLM alone and the fused model).

    python -m bench.overhead
    python -m bench.overhead --tiny
"""

from __future__ import annotations

import argparse

import torch

from bench.architectures import QWEN2_VL_2B, QWEN2_VL_7B
from bench.common import (
    add_common_arguments,
    build_models,
    count_parameters,
    default_image_size,
    fused_predict,
    head_and_gate,
    interleaved_timings,
    log,
    make_shape,
    markdown_table,
    random_images,
    setup,
    summarize,
    vlm_only_predict,
    write_json,
)
from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDForImageClassification


def parameter_shares(vlm_config: dict, label_set: str = "mikels8", head_hidden_dims=(1024,)) -> dict:
    """Parameters of the VLM, head and gate of a full-size model, counted on the meta device (no memory)."""
    config = EmoVLMKDConfig.from_label_set(label_set, vlm_config=vlm_config, head_hidden_dims=list(head_hidden_dims))
    with torch.device("meta"):
        model = EmoVLMKDForImageClassification(config)
    vlm, head, gate = (count_parameters(m) for m in (model.vlm, model.distillation_head, model.gate))
    return {"vlm": vlm, "distillation_head": head, "gate": gate, "head_and_gate": head + gate,
            "head_and_gate_over_vlm_pct": 100 * (head + gate) / vlm,
            "head_and_gate_of_total_pct": 100 * (head + gate) / (vlm + head + gate),
            "feature_dim": config.feature_dim, "num_labels": config.num_labels}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "overhead.json")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=None, help="Timed repetitions (default 3, tiny 2).")
    parser.add_argument("--inner", type=int, default=200, help="Head + gate calls per timed repetition.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    reps = args.reps or (2 if args.tiny else 3)
    params = {"qwen2_vl_7b": parameter_shares(QWEN2_VL_7B), "qwen2_vl_2b": parameter_shares(QWEN2_VL_2B)}
    shape = make_shape("tiny" if args.tiny else "mid", args.text_layers, args.vision_depth)
    log(f"Building the {shape.name} models ...")
    bm = build_models(shape, dtype=args.dtype, device=args.device, seed=args.seed)
    described = bm.describe()
    p = described["parameters"]
    params[f"bench_{shape.name}"] = {
        "vlm": p["vlm"], "distillation_head": p["distillation_head"], "gate": p["gate"],
        "head_and_gate": p["distillation_head"] + p["gate"],
        "head_and_gate_over_vlm_pct": 100 * (p["distillation_head"] + p["gate"]) / p["vlm"],
        "head_and_gate_of_total_pct": 100 * (p["distillation_head"] + p["gate"]) / (p["vlm"] + p["distillation_head"]
                                                                                 + p["gate"]),
    }

    side = default_image_size(shape)[0]
    batch_sizes = sorted(set(args.batch_sizes))
    images = random_images(max(batch_sizes), (side, side), seed=args.seed)
    cases = {}
    for b in batch_sizes:
        batch = images[:b]
        with torch.inference_mode():
            inputs = bm.image_processor(batch, return_tensors="pt").to(bm.device)
            features = bm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            tokens = tuple(t.clone() for t in features.pooler_output)
            scores = bm.model.score_labels(features, inputs["image_grid_thw"])

        def head_gate_loop(tokens=tokens, scores=scores):
            for _ in range(args.inner):
                head_and_gate(bm, tokens, scores)

        cases[f"fused@{b}"] = lambda batch=batch: fused_predict(bm, batch)
        cases[f"vlm_only@{b}"] = lambda batch=batch: vlm_only_predict(bm, batch)
        cases[f"head_and_gate@{b}"] = head_gate_loop
    log(f"Timing {len(cases)} cases x {reps} interleaved repetitions ...")
    times = interleaved_timings(cases, reps=reps, warmup=1, device=bm.device, log=log)

    rows = []
    for b in batch_sizes:
        fused, vlm = summarize(times[f"fused@{b}"]), summarize(times[f"vlm_only@{b}"])
        head = summarize([t / args.inner for t in times[f"head_and_gate@{b}"]])
        differences = [f - v for f, v in zip(times[f"fused@{b}"], times[f"vlm_only@{b}"])]
        rows.append({
            "batch_size": b,
            "fused_ms": 1000 * fused["median_s"], "vlm_only_ms": 1000 * vlm["median_s"],
            "head_and_gate_ms": 1000 * head["median_s"],
            "head_and_gate_of_fused_pct": 100 * head["median_s"] / fused["median_s"],
            "fused_minus_vlm_only_ms": {"median": 1000 * summarize(differences)["median_s"],
                                        "min": 1000 * min(differences), "max": 1000 * max(differences)},
            "fused": fused, "vlm_only": vlm, "head_and_gate": head,
        })

    param_table = markdown_table(
        [{"model": name, **values} for name, values in params.items()],
        [("model", "model"), ("vlm", "VLM params"), ("distillation_head", "head"), ("gate", "gate"),
         ("head_and_gate_of_total_pct", "head + gate, % of all")],
    )
    latency_table = markdown_table(
        [dict(r, difference=r["fused_minus_vlm_only_ms"]["median"]) for r in rows],
        [("batch_size", "batch"), ("vlm_only_ms", "VLM alone, ms / batch"), ("fused_ms", "fused, ms / batch"),
         ("head_and_gate_ms", "head + gate, ms / batch"), ("head_and_gate_of_fused_pct", "head + gate, % of fused"),
         ("difference", "fused - VLM alone (noisy), ms")],
    )
    print("\nParameters (full-size shapes counted from their configs on the meta device):\n")
    print(param_table)
    print(f"\nLatency ({described['shape']}, {described['dtype']}, {described['device']}, {side}x{side} images, "
          f"{reps} interleaved repetitions, median; head + gate timed over {args.inner} calls):\n")
    print(latency_table)
    payload = {
        "benchmark": "overhead",
        "config": described,
        "settings": {"batch_sizes": batch_sizes, "reps": reps, "inner": args.inner, "image_size": [side, side]},
        "parameters": params,
        "latency": rows,
        "ratios": {
            "head_and_gate_of_total_params_pct@7b": params["qwen2_vl_7b"]["head_and_gate_of_total_pct"],
            "head_and_gate_over_vlm_params_pct@7b": params["qwen2_vl_7b"]["head_and_gate_over_vlm_pct"],
            **{f"head_and_gate_of_fused_latency_pct@{r['batch_size']}": r["head_and_gate_of_fused_pct"] for r in rows},
        },
        "table_markdown": param_table + "\n\n" + latency_table,
    }
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
