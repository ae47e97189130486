"""Stage 2 (distillation) and stage 3 (gate) epochs on cached features vs recomputing them every epoch.

    python -m bench.training
    python -m bench.training --tiny

Timed, on the same frozen models and the same images:

- cache build (once): `compute_vlm_features` (one fused pass per batch: pooled visual features + label scores) and
  `compute_teacher_logits`, written through `train.stages.features.cached` (safetensors, atomic).
- cached epochs: the project's stage-2 `DistillationTrainer` on `DistillationStudent` over the cached tensors (an
  epoch timed from `on_epoch_begin` to `on_epoch_end`, median over epochs, so the Trainer's one-time setup is left
  out), and stage 3 as the pipeline runs it: `train.stages.gate.train_gate` (full-batch L-BFGS in a `Trainer` subclass, one
  L-BFGS call per epoch, up to convergence) on the cached label scores and head logits, the gate fed the config's
  `gate_head_signal`; timed as a whole (setup and final evaluation included) and per L-BFGS call.
- recomputing, ours: every epoch, the fused model's features (and label scores, for stage 3) and the teacher's
  logits recomputed in batches, then the same head / gate updates.
- recomputing, official-style (the authors' code): batch size 1; stage 2 runs the separate fp32 vision tower copy
  and the teacher for every image, stage 3 greedy `generate()` + parse (the VLM's label) and the vision copy + frozen
  head for every image, every epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from bench.common import (
    add_common_arguments,
    build_models,
    default_image_size,
    log,
    make_shape,
    markdown_table,
    random_images,
    setup,
    synchronize,
    write_json,
)
from modeling_emovlm_kd import EmoVLMKDDistillationHead, EmoVLMKDFusion
from modeling_emovlm_kd.fusion import gate_from_config, head_from_config
from modeling_emovlm_kd.modeling_emovlm_kd import pool_visual_tokens
from train.configs.gate_config import GateConfig
from train.infra.run import head_logits
from train.stages.distill import (
    DistillationConfig,
    DistillationStudent,
    DistillationTrainer,
    distillation_loss,
)
from train.stages.features import cached, compute_teacher_logits, compute_vlm_features
from train.stages.gate import train_gate
from train.stages.trainer_utils import FeatureDataset


class EpochTimer(TrainerCallback):
    def __init__(self):
        self.seconds, self._start = [], None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def trainer_arguments(config_class, output_dir: Path, epochs: int, batch_size: int, device, seed: int):
    return config_class(
        output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        eval_strategy="no", save_strategy="no", load_best_model_at_end=False, logging_strategy="no",
        disable_tqdm=True, report_to="none", use_cpu=device.type == "cpu", seed=seed, dataloader_num_workers=0,
    )


def new_head(bm, seed: int) -> EmoVLMKDDistillationHead:
    torch.manual_seed(seed)
    return head_from_config(bm.model.config).to(bm.device)


def new_fusion(bm, seed: int) -> EmoVLMKDFusion:
    """A new gate (seeded) as the model package builds it, without a head (the benches pass its logits)."""
    config = bm.model.config
    torch.manual_seed(seed)
    return EmoVLMKDFusion(None, gate_from_config(config), config.gate_vlm_signal, config.gate_head_signal).to(bm.device)


def cached_stage2_epochs(bm, cache, epochs, batch_size, workdir, seed) -> list[float]:
    timer = EpochTimer()
    keys = ("visual_features", "teacher_logits", "labels")
    trainer = DistillationTrainer(
        model=DistillationStudent(new_head(bm, seed)),
        args=trainer_arguments(DistillationConfig, workdir / "distill", epochs, batch_size, bm.device, seed),
        train_dataset=FeatureDataset(**{k: cache[k] for k in keys}), callbacks=[timer],
    )
    trainer.train()
    return timer.seconds


def cached_stage3(bm, cache, epochs, workdir, seed) -> dict:
    """Stage 3 as `train.stages.pipeline` runs it: `train_gate` (full-batch L-BFGS, at most `epochs` L-BFGS calls, fewer
    when it converges) on the cached tensors, validated on the same rows (only the timing matters here)."""
    config = bm.model.config
    gate = new_fusion(bm, seed).gate
    keys = ("vlm_logits", "head_logits", "labels")
    rows = {k: cache[k] for k in keys}
    args = GateConfig(output_dir=str(workdir / "gate"), num_train_epochs=epochs, save_strategy="no",
                      logging_strategy="no", disable_tqdm=True, report_to="none", use_cpu=bm.device.type == "cpu",
                      seed=seed, dataloader_num_workers=0)
    synchronize(bm.device)
    start = time.perf_counter()
    _, trainer = train_gate(gate, config.gate_vlm_signal, rows, rows, args, head_signal=config.gate_head_signal)
    synchronize(bm.device)
    seconds = time.perf_counter() - start
    calls = max(int(trainer.state.global_step), 1)
    return {"train_gate_s": seconds, "lbfgs_calls": calls, "converged": bool(trainer.converged),
            "per_lbfgs_call_s": seconds / calls, "head_signal": config.gate_head_signal}


def _batches(dataset, batch_size):
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        yield rows["image"], torch.tensor(rows["label"], device=None)


def _fused_features(bm, inputs) -> torch.Tensor:
    tokens = bm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    return pool_visual_tokens(tokens, bm.model.config.pooling).float()


def _timed_epoch(bm, module, batches, loss_of) -> float:
    """Seconds of one epoch of AdamW (lr 1e-3) updates of `module`, reading and preparing each batch included;
    `loss_of(images, labels)` computes a batch's loss (labels already on the device)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    synchronize(bm.device)
    start = time.perf_counter()
    for images, labels in batches:
        loss_of(images, labels.to(bm.device)).backward()
        optimizer.step()
        optimizer.zero_grad()
    synchronize(bm.device)
    return time.perf_counter() - start


def _stage2_epoch_recomputing(bm, dataset, batch_size, seed, features_of) -> float:
    """One stage-2 epoch that recomputes the head's features (`features_of`) and the teacher's logits per batch."""
    head = new_head(bm, seed).train()

    def loss_of(images, labels):
        with torch.no_grad():
            inputs = bm.image_processor(images, return_tensors="pt").to(bm.device)
            features = features_of(bm, inputs)
            teacher_inputs = bm.teacher_processor(images, return_tensors="pt")
            teacher = bm.teacher(pixel_values=teacher_inputs["pixel_values"].to(bm.device, bm.dtype)).logits.float()
        return distillation_loss(head(features), teacher, labels)[0]

    return _timed_epoch(bm, head, _batches(dataset, batch_size), loss_of)


def recompute_stage2_epoch(bm, dataset, batch_size, seed) -> float:
    """Ours without caches: fused-model features + teacher logits for every batch, then the head's update."""
    return _stage2_epoch_recomputing(bm, dataset, batch_size, seed, _fused_features)


def recompute_stage3_epoch(bm, dataset, batch_size, head, seed) -> float:
    """Ours without caches: the fused scorer's label scores + frozen head logits for every batch, then the gate's
    update."""
    fusion = new_fusion(bm, seed)

    def loss_of(images, labels):
        with torch.no_grad():
            inputs = bm.image_processor(images, return_tensors="pt").to(bm.device)
            image_features = bm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            features = pool_visual_tokens(image_features.pooler_output, bm.model.config.pooling).float()
            scores = bm.model.score_labels(image_features, inputs["image_grid_thw"]).float()
            logits = head(features)
        fused = fusion(scores, head_logits=logits, output_branch_weights=False).logits
        return torch.nn.functional.cross_entropy(fused, labels)

    return _timed_epoch(bm, fusion.gate, _batches(dataset, batch_size), loss_of)


def _vision_copy_features(bm, inputs) -> torch.Tensor:
    merged = bm.vision_copy()(inputs["pixel_values"].float(), grid_thw=inputs["image_grid_thw"]).pooler_output
    merge = bm.model.config.vlm_config.vision_config.spatial_merge_size
    sizes = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    return pool_visual_tokens(torch.split(merged, sizes), bm.model.config.pooling)


def official_stage2_epoch(bm, dataset, seed) -> float:
    """The authors' stage 2: batch size 1, the fp32 vision copy and the teacher run for every image every epoch."""
    return _stage2_epoch_recomputing(bm, dataset, 1, seed, _vision_copy_features)


def official_stage3_epoch(bm, dataset, head, max_new_tokens, seed) -> tuple[float, list[int]]:
    """The authors' stage 3: batch size 1, greedy generation + parsing (the VLM's label) and the vision copy + frozen
    head for every image, every epoch; then the gate's update on the one-hot label."""
    processor, model = bm.processor, bm.model
    fusion = new_fusion(bm, seed)
    prompt = processor.apply_chat_template(processor.categorical_messages(), add_generation_prompt=True,
                                           tokenize=False)
    vocab = len(processor.tokenizer)
    generated_tokens = []

    def loss_of(images, labels):
        with torch.no_grad():
            inputs = processor(text=[prompt], images=images, return_tensors="pt").to(bm.device)
            generated = model.vlm.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                           pad_token_id=processor.tokenizer.pad_token_id)
            new_tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()
            generated_tokens.append(len(new_tokens))
            label = processor.parse_answer(processor.tokenizer.decode([t for t in new_tokens if t < vocab],
                                                                      skip_special_tokens=True))
            one_hot = torch.zeros(1, model.config.num_labels, device=bm.device)
            if label is not None:
                one_hot[0, model.config.label2id[label]] = 1.0
            logits = head(_vision_copy_features(bm, inputs).float())
        # The authors feed the parsed label's one-hot, all zeros when the answer does not parse: the gate gets that
        # row as it is, and the head's side as the model's fusion prepares it.
        _, head_signal = fusion.gate_inputs(one_hot, logits)
        return torch.nn.functional.cross_entropy(fusion.gate(one_hot, head_signal), labels)

    return _timed_epoch(bm, fusion.gate, _batches(dataset, 1), loss_of), generated_tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "training.json")
    parser.add_argument("--num-images", type=int, default=None, help="Training images (default 16, tiny 8).")
    parser.add_argument("--epochs", type=int, default=5, help="Cached epochs per stage (median reported).")
    parser.add_argument("--feature-batch-size", type=int, default=8, help="Batch size of feature computation.")
    parser.add_argument("--train-batch-size", type=int, default=64, help="Stage 2/3 batch size (recipe default).")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Official-style stage-3 generation length.")
    parser.add_argument("--no-official", action="store_true", help="Skip the official-style recomputation.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    shape = make_shape("tiny" if args.tiny else "mid", args.text_layers, args.vision_depth)
    log(f"Building the {shape.name} models ...")
    bm = build_models(shape, dtype=args.dtype, device=args.device, seed=args.seed)
    num_images = args.num_images or (8 if args.tiny else 16)
    side = default_image_size(shape)[0]
    labels = [i % bm.model.config.num_labels for i in range(num_images)]
    dataset = Dataset.from_dict({"image": random_images(num_images, (side, side), seed=args.seed), "label": labels})
    bm.vision_copy()
    # Warm up every path once (first calls allocate and pick kernels).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm = dataset.select(range(min(2, num_images)))
        compute_vlm_features(bm.model, bm.image_processor, warm, args.feature_batch_size)
        compute_teacher_logits(bm.teacher, bm.teacher_processor, warm, args.feature_batch_size)

    results = {}
    with tempfile.TemporaryDirectory(prefix="emovlm-bench-") as tmp:
        workdir = Path(tmp)
        log(f"Building the feature caches for {num_images} images ...")
        synchronize(bm.device)
        start = time.perf_counter()
        vlm_cache = cached(workdir / "vlm.safetensors", "bench",
                           lambda: compute_vlm_features(bm.model, bm.image_processor, dataset,
                                                        args.feature_batch_size))
        teacher_cache = cached(workdir / "teacher.safetensors", "bench",
                               lambda: compute_teacher_logits(bm.teacher, bm.teacher_processor, dataset,
                                                              args.feature_batch_size))
        synchronize(bm.device)
        results["cache_build_s"] = time.perf_counter() - start
        head = new_head(bm, args.seed).eval()
        cache = {**vlm_cache, "teacher_logits": teacher_cache["teacher_logits"],
                 "head_logits": head_logits(head, vlm_cache["visual_features"].to(bm.device)).cpu()}
        cache = {k: v.to(bm.device) if bm.device.type != "cpu" else v for k, v in cache.items()}

        log(f"Cached epochs ({args.epochs} per stage) ...")
        stage2 = cached_stage2_epochs(bm, cache, args.epochs, args.train_batch_size, workdir, args.seed)
        stage3 = cached_stage3(bm, cache, args.epochs, workdir, args.seed)
    results["stage2_cached_epoch_s"] = {"median": statistics.median(stage2), "all": stage2}
    # A stage-3 "epoch" is one full-batch L-BFGS call (train_gate's whole run divided by its calls).
    results["stage3_cached_epoch_s"] = {"median": stage3["per_lbfgs_call_s"], "all": [stage3["per_lbfgs_call_s"]]}
    results["stage3_train_gate"] = stage3

    log("One epoch of each stage recomputing features (ours, batched) ...")
    results["stage2_recompute_epoch_s"] = recompute_stage2_epoch(bm, dataset, args.feature_batch_size, args.seed)
    results["stage3_recompute_epoch_s"] = recompute_stage3_epoch(bm, dataset, args.feature_batch_size, head,
                                                                 args.seed)
    if not args.no_official:
        log(f"One epoch of each stage the authors' way (batch 1, generate max_new_tokens={args.max_new_tokens}) ...")
        results["stage2_official_epoch_s"] = official_stage2_epoch(bm, dataset, args.seed)
        seconds, tokens = official_stage3_epoch(bm, dataset, head, args.max_new_tokens, args.seed)
        results["stage3_official_epoch_s"] = seconds
        results["stage3_official_generated_tokens"] = tokens

    ratios = {}
    rows = []
    for stage in ("stage2", "stage3"):
        cached_s = results[f"{stage}_cached_epoch_s"]["median"]
        row = {"stage": stage.replace("stage", "stage "), "cached_ms": 1000 * cached_s,
               "recompute_s": results[f"{stage}_recompute_epoch_s"]}
        ratios[f"{stage}_recompute_over_cached"] = results[f"{stage}_recompute_epoch_s"] / cached_s
        row["speedup"] = ratios[f"{stage}_recompute_over_cached"]
        if f"{stage}_official_epoch_s" in results:
            row["official_s"] = results[f"{stage}_official_epoch_s"]
            ratios[f"{stage}_official_over_cached"] = results[f"{stage}_official_epoch_s"] / cached_s
            row["official_speedup"] = ratios[f"{stage}_official_over_cached"]
        rows.append(row)
    ratios["cache_build_over_cached_stage2_epoch"] = results["cache_build_s"] / results["stage2_cached_epoch_s"][
        "median"]
    table = markdown_table(rows, [
        ("stage", "stage"), ("cached_ms", "cached epoch, ms"), ("recompute_s", "recompute (ours, batched), s"),
        ("speedup", "cached is x faster"), ("official_s", "recompute (official, batch 1), s"),
        ("official_speedup", "cached is x faster than official"),
    ])
    described = bm.describe()
    print(f"\nTraining epochs ({described['shape']}, {described['dtype']}, {described['device']}, {num_images} images "
          f"of {side}x{side}; one-time cache build {results['cache_build_s']:.2f} s):\n")
    print(table)
    payload = {
        "benchmark": "training",
        "config": described,
        "settings": {"num_images": num_images, "image_size": [side, side], "epochs": args.epochs,
                     "feature_batch_size": args.feature_batch_size, "train_batch_size": args.train_batch_size,
                     "max_new_tokens": args.max_new_tokens},
        "results": results,
        "ratios": ratios,
        "table_markdown": table,
    }
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
