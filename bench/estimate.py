"""Hardware estimate of a recipe: the work of every stage in counted FLOPs, hours on a named GPU at a stated MFU, and
GPU memory for weights, trainable states and activations. ESTIMATES, not measurements.

    python -m bench.estimate --recipe train/recipes/qwen2-vl-7b/emoset.yaml                 # H100, MFU 0.3
    python -m bench.estimate --recipe train/recipes/qwen3-vl-8b/fi.yaml --gpu L4 --mfu 0.25 --num-gpus 4
    python -m bench.estimate --recipe RECIPE --instruction-cache runs/x/answers.jsonl --json

What is counted, and from what:

- The model: the base VLM built on the meta device (no memory, no download) from its published config
  (`bench/architectures.py`) or from the recipe's local folder; the teacher likewise (ViT-B/16-384). FLOPs are 2 per
  multiply-add of every Linear (and the patch embedding) over the rows it sees, plus the attention products; norms,
  activations, rotary embeddings and softmax are not counted (as in `bench/flops.py`, which the counts agree with).
- Images: every image at the recipe's pixel bound `model.max_pixels`, i.e. `max_pixels / (patch * merge)^2` merged
  visual tokens (1,337 for 1024x1024 at Qwen2-VL's 14-pixel patches): an upper bound, real images of other aspect
  ratios or smaller sizes give fewer.
- Text: the real Qwen2-VL tokenizer (`train/infra/qwen_tokenizer.py`, offline) on the recipe's prompts in the chat
  template; generated answers' lengths from `--instruction-cache` (the median tokens per kind of the cached answers)
  or `--answer-tokens` (default 160: the generation prompt asks for at most 120 words).
- Data: the published split sizes of the named data sets (`DATASETS`; Flickr and Instagram approximate: the votes
  file decides), or `--images TRAIN VALIDATION TEST`.
- Stage 1 (QLoRA, frozen base): per instruction row the vision tower forward (frozen, no backward), the language
  model forward, its backward to the activations (about one forward: no weight gradients for frozen weights), a
  recomputed forward of the decoder layers when `activation_checkpointing` (formerly `gradient_checkpointing`) is on, and the LoRA adapters (forward,
  both gradients); `lm_head` over every position (the loss is computed on the assistant tokens of every row's
  logits). Each epoch's evaluation (validation loss and the label accuracy on `eval_max_images`) is added.
- Feature caches: the fused model's forward (vision tower + one label-scoring pass over prompt and every label's
  tokens under the tree mask, counted dense) over every split, and the teacher's forward over every split.
- Teacher: full fine-tuning, 3 forwards' worth per training image and epoch, one forward per validation image and epoch.
- Stages 2 and 3: the head and the gate on cached tensors (negligible, shown for completeness; the gate's L-BFGS is
  counted at its upper bound of 20 evaluations per call).
- Instruction answers: from an API endpoint, no GPU work; from the local VLM, prefill plus one decode step per token
  (memory-bound: its hours at the stated MFU are optimistic).

Hours = FLOPs / (GPU bf16 dense peak x MFU x GPUs). MFU (`--mfu`, default 0.3) absorbs everything not counted:
4-bit dequantisation, elementwise work, padding, data loading, kernel efficiency; measure it on the GPU
(`bench.gpu_check`) and pass it back here. Memory is per GPU (DDP: every GPU holds the model) at the recipe's
per-device batch size, with the formulas stated in `memory_estimates`.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Published bf16 dense (no sparsity) tensor-core peaks in TFLOP/s and memory in GB, from the vendors' data sheets.
GPUS = {
    "H200": (989.4, 141),
    "H100": (989.4, 80),       # SXM
    "H100-PCIe": (756.5, 80),
    "A100-80GB": (312.0, 80),
    "A100-40GB": (312.0, 40),
    "L40S": (362.1, 48),
    "A10": (125.0, 24),
    "L4": (121.0, 24),
    "RTX-4090": (165.2, 24),   # bf16 with float32 accumulation
}

# (train, validation, test) images of the named data sets: EmoSet-118K's official splits; the others split 80/5/15 by
# the loaders (train/infra/data.py) from their published sizes (Flickr and Instagram: images with a majority vote,
# approximate).
DATASETS = {
    "emoset": ((94_481, 5_905, 17_716), "EmoSet-118K official splits"),
    "fi": (23_308, "FI, 23,308 images, split 80/5/15"),
    "emotion6": (1_980, "Emotion6, 1,980 images, split 80/5/15"),
    "flickr": (60_729, "Flickr (Katsurai & Satoh), about 60,729 voted images, split 80/5/15"),
    "instagram": (42_856, "Instagram (Katsurai & Satoh), about 42,856 voted images, split 80/5/15"),
}
DEFAULT_ANSWER_TOKENS = 160
NF4_BYTES_PER_PARAM = 0.5 + (1 + 4 / 256) / 64  # 4-bit values + 8-bit absmax per 64 (double quant: fp32 per 256)
CUDA_CONTEXT_GB = 1.0  # CUDA context, cuBLAS workspaces and allocator slack, a stated round figure


def split_sizes(kind: str, override: list[int] | None) -> tuple[tuple[int, int, int], str]:
    if override:
        return tuple(override), "given (--images)"
    if kind not in DATASETS:
        raise SystemExit(f"No published size for data set kind {kind!r}: pass --images TRAIN VALIDATION TEST.")
    sizes, source = DATASETS[kind]
    if isinstance(sizes, int):
        validation, test = round(sizes * 0.05), round(sizes * 0.15)
        sizes = (sizes - validation - test, validation, test)
    return sizes, source


# ---- the models -----------------------------------------------------------------------------------------------


def vlm_config(name_or_path: str):
    """The VLM's config: a local folder's `config.json`, else the published config of a known base model."""
    from transformers import AutoConfig

    from bench.architectures import VLMS

    if Path(name_or_path, "config.json").is_file():
        return AutoConfig.from_pretrained(name_or_path)
    if name_or_path not in VLMS:
        raise SystemExit(f"Unknown base VLM {name_or_path!r}: known are {sorted(VLMS)}; or give a local folder with "
                         "its config.json.")
    values = dict(VLMS[name_or_path])
    return AutoConfig.for_model(values.pop("model_type"), **values)


@dataclass
class LinearShape:
    name: str
    role: str  # patch_embed, vision, merger, text, lm_head
    n_in: int
    n_out: int
    full_precision: bool  # kept out of 4-bit quantisation (lm_head, mergers, patch embedding)


@dataclass
class ModelShape:
    """What the FLOP and memory counts need of a VLM, read from a meta-device instance."""

    config: object
    linears: list[LinearShape]
    params: dict[str, int]
    patch: int
    merge: int
    vision_width: int
    vision_depth: int
    full_attention_blocks: int
    window_patches: int | None
    hidden: int
    intermediate: int
    kv_width: int
    attention_width: int
    layers: int
    vocab: int

    def linear_flops(self, rows: dict[str, int], only=None) -> int:
        return sum(2 * rows.get(lin.role, 0) * lin.n_in * lin.n_out for lin in self.linears
                   if only is None or lin.role in only)


def _role(name: str) -> str:
    if name.endswith("lm_head") or name == "lm_head":
        return "lm_head"
    if "visual" in name:
        if "patch_embed" in name:
            return "patch_embed"
        return "merger" if "merger" in name else "vision"
    return "text"


def model_shape(config) -> ModelShape:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        vlm = AutoModelForImageTextToText.from_config(config)
    linears, params = [], {"vision": 0, "merger": 0, "text": 0, "embeddings": 0, "lm_head": 0, "other": 0}
    for name, module in vlm.named_modules():
        if isinstance(module, nn.Linear):
            role = _role(name)
            linears.append(LinearShape(name, role, module.in_features, module.out_features,
                                       role in ("lm_head", "merger")))
        elif isinstance(module, (nn.Conv3d, nn.Conv2d)) and "patch_embed" in name:
            fan_in = module.weight[0].numel()
            linears.append(LinearShape(name, "patch_embed", fan_in, module.out_channels, True))
    seen = set()
    for name, param in vlm.named_parameters():
        if id(param) in seen:  # tied embeddings counted once
            continue
        seen.add(id(param))
        role = _role(name.rsplit(".", 1)[0])
        key = "embeddings" if "embed_tokens" in name else ("vision" if role == "patch_embed" else role)
        params[key if key in params else "other"] += param.numel()
    params["total"] = sum(params.values())
    text = config.get_text_config()
    vision = config.vision_config
    width = getattr(vision, "embed_dim", None) or vision.hidden_size
    depth = vision.depth
    full_blocks = getattr(vision, "fullatt_block_indexes", None)
    window = getattr(vision, "window_size", None)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(
        config=config, linears=linears, params=params, patch=vision.patch_size, merge=vision.spatial_merge_size,
        vision_width=width, vision_depth=depth,
        full_attention_blocks=len(full_blocks) if full_blocks is not None else depth,
        window_patches=(window // vision.patch_size) ** 2 if window and full_blocks is not None else None,
        hidden=text.hidden_size, intermediate=text.intermediate_size,
        kv_width=text.num_key_value_heads * head_dim, attention_width=text.num_attention_heads * head_dim,
        layers=text.num_hidden_layers, vocab=text.vocab_size,
    )


def visual_tokens(shape: ModelShape, max_pixels: int) -> int:
    """Merged visual tokens of one image at the pixel bound (an upper bound over aspect ratios)."""
    return max_pixels // (shape.patch * shape.merge) ** 2


def vision_forward_flops(shape: ModelShape, merged_tokens: int, images: int = 1) -> int:
    patches = merged_tokens * shape.merge**2
    linear = shape.linear_flops({"patch_embed": patches, "vision": patches, "merger": merged_tokens})
    window_blocks = shape.vision_depth - shape.full_attention_blocks
    attention = shape.full_attention_blocks * 4 * patches * patches * shape.vision_width
    if window_blocks:
        attention += window_blocks * 4 * patches * min(shape.window_patches, patches) * shape.vision_width
    return images * (linear + attention)


def text_forward_flops(shape: ModelShape, length: int, lm_rows: int, causal: bool) -> dict[str, int]:
    """One sequence of `length` positions through the decoder layers, and `lm_head` over `lm_rows` of them."""
    linear = shape.linear_flops({"text": length}, only=("text",))
    # QK^T and AV: 2 x L^2 x width multiply-adds, halved by causal kernels that skip the masked half.
    attention = shape.layers * (2 if causal else 4) * length * length * shape.attention_width
    return {"layers": linear + attention, "lm_head": shape.linear_flops({"lm_head": lm_rows}, only=("lm_head",))}


def vit_shape(name: str) -> dict:
    from bench.architectures import TEACHERS

    if Path(name, "config.json").is_file():
        return json.loads(Path(name, "config.json").read_text())
    if name not in TEACHERS:
        raise SystemExit(f"Unknown teacher {name!r}: known are {sorted(TEACHERS)}; or give a local folder.")
    return TEACHERS[name]


def vit_forward_flops(c: dict, num_labels: int) -> tuple[int, int]:
    """FLOPs of one image through the ViT classifier, and its parameters."""
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    tokens = (c["image_size"] // c["patch_size"]) ** 2 + 1
    per_layer = 2 * tokens * (4 * h * h + 2 * h * inter) + 4 * tokens * tokens * h
    patch = 2 * (tokens - 1) * 3 * c["patch_size"] ** 2 * h
    params = layers * (4 * h * h + 2 * h * inter) + 3 * c["patch_size"] ** 2 * h + tokens * h + h * num_labels
    return patch + layers * per_layer + 2 * h * num_labels, params


# ---- text lengths --------------------------------------------------------------------------------------------


@dataclass
class TextLengths:
    prompt: dict[str, int]  # text tokens of each kind's chat (template included), image tokens excluded
    answer: dict[str, int]  # answer tokens per kind (with the end-of-turn tokens)
    scoring_prompt: int  # text tokens of the classification prompt (before + after the image)
    continuations: list[int]  # tokens of each label's continuation
    source: dict[str, str] = field(default_factory=dict)


def text_lengths(recipe, labels: list[str], answer_tokens: int, cache: str | None) -> TextLengths:
    from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDImageProcessor, EmoVLMKDProcessor
    tokenizer = _tokenizer()
    prompts = {key: getattr(recipe.model, f"{key}_prompt", None) for key in ("categorical", "conversation",
                                                                           "reasoning")}
    config = EmoVLMKDConfig.from_label_set(labels, categorical_prompt=prompts["categorical"],
                                           conversation_prompt=prompts["conversation"],
                                           reasoning_prompt=prompts["reasoning"])
    processor = EmoVLMKDProcessor.from_config(EmoVLMKDImageProcessor(), tokenizer, config,
                                              chat_template=tokenizer.chat_template)
    processor.prepare_config(config)
    ids = config.prompt_token_ids
    measured = answer_lengths(cache, tokenizer) if cache else {}
    prompt, answer, source = {}, {}, {}
    for kind in ("categorical", "conversation", "reasoning"):
        messages = getattr(processor, f"{kind}_messages")()
        chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        chat = chat["input_ids"] if isinstance(chat, dict) else chat
        prompt[kind] = len(chat) - 1  # the one image placeholder is counted with the visual tokens
        if kind == "categorical":
            answer[kind] = len(tokenizer(processor.format_answer(labels[0]))["input_ids"]) + 2
            source[kind] = "the label's answer"
        else:
            answer[kind] = measured.get(kind, answer_tokens) + 2  # + <|im_end|> and the newline
            source[kind] = "instruction cache (median)" if kind in measured else f"default {answer_tokens}"
    return TextLengths(prompt, answer, len(ids["before_image"]) + len(ids["after_image"]),
                       [len(c) for c in ids["label_continuations"]], source)


@functools.cache
def _tokenizer():
    from train.infra.qwen_tokenizer import build_qwen2_vl_tokenizer

    return build_qwen2_vl_tokenizer(Path(__file__).parent / ".cache" / "qwen2-vl-tokenizer")


def answer_lengths(path: str, tokenizer) -> dict[str, int]:
    """Median tokens of the cached answers per kind (`train/stages/instructions.py`'s JSONL cache)."""
    lengths: dict[str, list[int]] = {}
    with open(path) as handle:
        for line in handle:
            record = json.loads(line) if line.strip() else {}
            if isinstance(record.get("answer"), str) and record.get("kind"):
                lengths.setdefault(record["kind"], []).append(len(tokenizer(record["answer"])["input_ids"]))
    return {kind: int(statistics.median(values)) for kind, values in lengths.items()}


def _number(value):
    """Epoch counts as the recipe meant them: 5, not 5.0."""
    return int(value) if float(value).is_integer() else value


# ---- the estimate --------------------------------------------------------------------------------------------


def load(recipe_path: str, overrides=()):
    """The recipe as the pipeline reads it. On a machine without a GPU the stages' `bf16` flags are switched off
    for parsing only (transformers refuses them there); the estimate assumes bf16 compute throughout."""
    from train.infra.recipe import load_recipe

    overrides = list(overrides)
    if not torch.cuda.is_available():
        overrides += ["sft.bf16=false", "teacher.bf16=false"]
    return load_recipe(recipe_path, overrides)


def estimate(recipe_path: str, gpu: str = "H100", mfu: float = 0.3, num_gpus: int = 1, images=None,
             answer_tokens: int = DEFAULT_ANSWER_TOKENS, instruction_cache: str | None = None,
             overrides=()) -> dict:
    if gpu not in GPUS:
        raise SystemExit(f"Unknown GPU {gpu!r}; known: {', '.join(GPUS)}.")
    if not 0 < mfu <= 1:
        raise SystemExit(f"--mfu must be in (0, 1], got {mfu}.")
    from modeling_emovlm_kd import resolve_label_set

    recipe = load(recipe_path, overrides)
    labels = resolve_label_set(recipe.labels)
    if recipe.base_models.tiny:
        from train.infra.tiny import build_tiny_tokenizer, tiny_vlm_config

        config = tiny_vlm_config(build_tiny_tokenizer(labels))
        teacher = {"image_size": 56, "patch_size": 7, "hidden_size": 64, "num_hidden_layers": 2,
                   "intermediate_size": 128}
    else:
        config = vlm_config(recipe.base_models.vlm)
        teacher = vit_shape(recipe.base_models.teacher)
    shape = model_shape(config)
    (train, validation, test), data_source = split_sizes(recipe.data.kind, images)
    max_pixels = recipe.model.max_pixels or 12_845_056  # Qwen2-VL's processor default when the recipe leaves it
    n_img = visual_tokens(shape, max_pixels)
    text = text_lengths(recipe, labels, answer_tokens, instruction_cache)
    sft = recipe.sft
    kinds = list(sft.instruction_kinds)
    checkpointing = bool(sft.activation_checkpointing)

    vision_one = vision_forward_flops(shape, n_img)
    lora_modules = [lin for lin in shape.linears if lin.role == "text"
                    and lin.name.rsplit(".", 1)[-1] in set(sft.lora_target_modules or ())] if sft.use_peft else []
    r = sft.lora_r if sft.use_peft else 0

    def sft_row(kind: str) -> int:
        length = text.prompt[kind] + n_img + text.answer[kind]
        forward = text_forward_flops(shape, length, lm_rows=length, causal=True)
        lora = sum(2 * length * r * (lin.n_in + lin.n_out) for lin in lora_modules)
        # forward + gradient to the activations (+ recomputed forward); lm_head is not checkpointed; LoRA: forward,
        # both gradients (+ recompute).
        return (vision_one + forward["layers"] * (2 + checkpointing) + forward["lm_head"] * 2
                + lora * (3 + checkpointing))

    score_length = text.scoring_prompt + n_img + sum(text.continuations)
    score_rows = 1 + sum(c - 1 for c in text.continuations)
    scoring = text_forward_flops(shape, score_length, score_rows, causal=False)
    fused_one = vision_one + scoring["layers"] + scoring["lm_head"]
    vit_one, vit_params = vit_forward_flops(teacher, len(labels))

    stages = []

    def add(stage, flops, work, note=""):
        stages.append({"stage": stage, "work": work, "flops": int(flops), "note": note})

    generator = recipe.instructions.generator
    generated = [k for k in kinds if k != "categorical"]
    if generator == "local" and generated:
        per = 0
        for kind in generated:
            prefill = text_forward_flops(shape, text.prompt[kind] + n_img, 1, causal=True)
            answer = text.answer[kind]
            decode = (shape.linear_flops({"text": answer}, only=("text",))
                      + shape.linear_flops({"lm_head": answer}, only=("lm_head",))
                      + shape.layers * sum(4 * (text.prompt[kind] + n_img + k) * shape.attention_width
                                           for k in range(answer)))
            per += vision_one + prefill["layers"] + prefill["lm_head"] + decode
        add("instructions", train * per, f"{train:,} images x {len(generated)} answers by the local VLM",
            "decoding is memory-bound: hours at this MFU are optimistic")
    else:
        add("instructions", 0, f"{train * len(generated):,} answers from {generator!r}" if generated else "none",
            "API requests, no GPU work" if generated else "")
    epochs = _number(sft.num_train_epochs)
    rows = {kind: train for kind in kinds}
    sft_epoch = sum(sft_row(kind) * rows[kind] for kind in kinds)
    evaluation = 0
    if str(getattr(sft, "eval_strategy", "no")).lower().endswith("epoch"):
        # Validation loss and label accuracy on the same (seeded subset of) validation images.
        eval_images = min(validation, getattr(sft, "eval_max_images", None) or validation)
        eval_loss = sum(vision_one + sum(text_forward_flops(shape, text.prompt[k] + n_img + text.answer[k],
                                                            text.prompt[k] + n_img + text.answer[k], True).values())
                        for k in kinds)
        evaluation = eval_images * (eval_loss + fused_one)
    lengths = {k: text.prompt[k] + n_img + text.answer[k] for k in kinds}
    add("stage 1 (QLoRA)" if sft.load_in_4bit else "stage 1 (LoRA)" if sft.use_peft else "stage 1",
        epochs * (sft_epoch + evaluation),
        f"{epochs} epochs x {train:,} images x {len(kinds)} rows ({', '.join(f'{k} {v:,}' for k, v in lengths.items())}"
        f" tokens); gradient checkpointing {'on' if checkpointing else 'off'}",
        f"+ per-epoch evaluation {evaluation / 1e12:,.0f} TFLOP" if evaluation else "")
    teacher_cfg = recipe.teacher
    add("teacher", teacher_cfg.num_train_epochs * (3 * vit_one * train + vit_one * validation),
        f"{_number(teacher_cfg.num_train_epochs)} epochs x {train:,} images, full fine-tuning ({vit_params / 1e6:.0f} M)")
    total_images = train + validation + test
    add("feature caches", total_images * (fused_one + vit_one),
        f"{total_images:,} images: fused forward ({score_length:,} positions, {score_rows} scored rows) + teacher")
    feature_dim = shape.hidden
    head_dims = [feature_dim, *recipe.model.head_hidden_dims, len(labels)]
    head = sum(2 * a * b for a, b in zip(head_dims, head_dims[1:]))
    add("stage 2 (distillation head)", recipe.distill.num_train_epochs * 3 * head * train,
        f"{_number(recipe.distill.num_train_epochs)} epochs on cached features")
    gate = 2 * (2 * len(labels)) * len(labels) * 8  # up to a few Linear layers of width 2C
    add("stage 3 (gate)", recipe.gate.num_train_epochs * 20 * 3 * gate * train,
        f"at most {_number(recipe.gate.num_train_epochs)} L-BFGS calls x 20 evaluations on cached tensors")
    peak = GPUS[gpu][0] * 1e12
    for row in stages:
        row["tflop"] = row["flops"] / 1e12
        row["hours"] = row["flops"] / (peak * mfu * num_gpus) / 3600
    total = sum(row["flops"] for row in stages)
    memory = memory_estimates(shape, recipe, text, n_img, score_length, vit_params, teacher, len(labels))
    return {
        "estimate": True,
        "recipe": str(recipe_path),
        "base_model": "tiny" if recipe.base_models.tiny else recipe.base_models.vlm,
        "parameters": shape.params,
        "gpu": {"name": gpu, "bf16_dense_tflops": GPUS[gpu][0], "memory_gb": GPUS[gpu][1], "count": num_gpus},
        "mfu": mfu,
        "data": {"kind": recipe.data.kind, "train": train, "validation": validation, "test": test,
                 "source": data_source},
        "tokens": {"max_pixels": max_pixels, "visual_tokens_per_image": n_img, "prompt": text.prompt,
                   "answer": text.answer, "answer_source": text.source, "scoring_positions": score_length,
                   "scoring_rows": score_rows},
        "per_image_flops": {"vision_forward": vision_one, "fused_forward": fused_one, "teacher_forward": vit_one,
                            **{f"stage1_row_{k}": sft_row(k) for k in kinds}},
        "stages": stages,
        "total": {"flops": total, "tflop": total / 1e12, "hours": total / (peak * mfu * num_gpus) / 3600},
        "memory": memory,
    }


def memory_estimates(shape: ModelShape, recipe, text: TextLengths, n_img: int, score_length: int, vit_params: int,
                     teacher: dict, num_labels: int) -> list[dict]:
    """GPU memory per device, GB (1e9 bytes), for the stages that hold the VLM.

    - weights: quantised Linears at NF4's `NF4_BYTES_PER_PARAM` (0.52 bytes/parameter with double quantisation),
      everything else (embeddings, `lm_head`, mergers, norms, biases) in bf16; or all of it in bf16.
    - LoRA: float32 adapters with float32 gradients and AdamW's two moments: 16 bytes per parameter.
    - activations (bf16), per sequence of L positions and batch b, per decoder layer: the layer's input, the
      normalised inputs of attention and MLP, q/k/v and the attention output, and the MLP's gate, up, activation
      and product: `b L (8 h + 4 h_kv + 8 I)` bytes; gradient checkpointing keeps only each layer's input
      (`2 b L h`) plus one layer's full set while it is recomputed. The logits: bf16, their float32 copy for the
      loss and its gradient: `10 b L V` bytes. The frozen vision tower keeps nothing for the backward; its largest
      transient (MLP input, hidden and output of all patches) is `2 P (2 w + m)` bytes.
    - teacher: full fine-tuning under bf16 autocast: float32 weights, gradients and two AdamW moments (16 bytes per
      parameter); activations `b T layers (10 h + 4 I)` bytes for T tokens.
    - feature caches (no gradients): one layer's transient working set `2 b L (2 h + 3 I)`, the tree mask
      `2 b L^2` and the scoring logits (at most 256 MiB per chunk, `_SCORING_CHUNK_BYTES_GPU`).
    - plus `CUDA_CONTEXT_GB` of context and allocator slack.
    """
    sft = recipe.sft
    quantised = sum(lin.n_in * lin.n_out for lin in shape.linears if not lin.full_precision
                    and lin.role in ("vision", "text"))
    everything = shape.params["total"]
    weights_bf16 = 2 * everything / 1e9
    weights_4bit = (quantised * NF4_BYTES_PER_PARAM + 2 * (everything - quantised)) / 1e9
    lora = 0
    if sft.use_peft:
        targets = set(sft.lora_target_modules or ())
        lora = sum(sft.lora_r * (lin.n_in + lin.n_out) for lin in shape.linears
                   if lin.role == "text" and lin.name.rsplit(".", 1)[-1] in targets)
    b = sft.per_device_train_batch_size
    length = max(text.prompt[k] + n_img + text.answer[k] for k in sft.instruction_kinds)
    h, kv, inter, layers, vocab = shape.hidden, shape.kv_width, shape.intermediate, shape.layers, shape.vocab
    per_layer = b * length * (8 * h + 4 * kv + 8 * inter)
    logits = 10 * b * length * vocab
    patches = n_img * shape.merge**2
    mlp_width = max((lin.n_out for lin in shape.linears if lin.role == "vision"), default=shape.vision_width)
    vision_transient = 2 * b * patches * (2 * shape.vision_width + mlp_width)
    rows = []
    for checkpointing in (True, False):
        kept = (2 * b * length * h * layers + per_layer) if checkpointing else per_layer * layers
        activations = (kept + logits + vision_transient) / 1e9
        weights = weights_4bit if sft.load_in_4bit else weights_bf16
        rows.append({"stage": "stage 1", "gradient_checkpointing": checkpointing, "batch": b,
                     "sequence": length, "weights_gb": weights, "weights": "4-bit NF4" if sft.load_in_4bit else "bf16",
                     "trainable_states_gb": 16 * lora / 1e9, "trainable_parameters": lora,
                     "activations_gb": activations,
                     "total_gb": weights + 16 * lora / 1e9 + activations + CUDA_CONTEXT_GB,
                     "recipe_setting": checkpointing == bool(sft.activation_checkpointing)})
    fb = recipe.model.feature_batch_size
    weights = weights_4bit if recipe.model.load_in_4bit else weights_bf16
    transient = (2 * fb * score_length * (2 * h + 3 * inter) + 2 * fb * score_length**2 + 256 * 2**20
                 + 2 * fb * patches * (2 * shape.vision_width + mlp_width)) / 1e9
    rows.append({"stage": "feature caches", "gradient_checkpointing": None, "batch": fb, "sequence": score_length,
                 "weights_gb": weights, "weights": "4-bit NF4" if recipe.model.load_in_4bit else "bf16",
                 "trainable_states_gb": 0.0, "trainable_parameters": 0, "activations_gb": transient,
                 "total_gb": weights + transient + CUDA_CONTEXT_GB, "recipe_setting": True})
    tb = recipe.teacher.per_device_train_batch_size
    tokens = (teacher["image_size"] // teacher["patch_size"]) ** 2 + 1
    vit_act = tb * tokens * teacher["num_hidden_layers"] * (10 * teacher["hidden_size"]
                                                            + 4 * teacher["intermediate_size"]) / 1e9
    # Trainer's bf16 is autocast: float32 weights, float32 gradients and AdamW moments.
    rows.append({"stage": "teacher", "gradient_checkpointing": False, "batch": tb, "sequence": tokens,
                 "weights_gb": 4 * vit_params / 1e9, "weights": "float32, bf16 autocast",
                 "trainable_states_gb": 12 * vit_params / 1e9, "trainable_parameters": vit_params,
                 "activations_gb": vit_act, "total_gb": 16 * vit_params / 1e9 + vit_act + CUDA_CONTEXT_GB,
                 "recipe_setting": True})
    return rows


# ---- output --------------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    gpu = result["gpu"]
    lines = [f"ESTIMATE for {result['recipe']} ({result['base_model']}, {result['parameters']['total'] / 1e9:.2f} B "
             f"parameters), {gpu['count']} x {gpu['name']} ({gpu['bf16_dense_tflops']:g} TFLOP/s bf16 dense, "
             f"{gpu['memory_gb']} GB) at MFU {result['mfu']:g}",
             f"data: {result['data']['train']:,} / {result['data']['validation']:,} / {result['data']['test']:,} "
             f"images ({result['data']['source']}); {result['tokens']['visual_tokens_per_image']:,} visual tokens per "
             f"image (max_pixels {result['tokens']['max_pixels']:,}); answers: "
             + ", ".join(f"{k} {v}" for k, v in result["tokens"]["answer_source"].items()), "",
             "| stage | work | TFLOP | hours | note |", "|---|---|---:|---:|---|"]
    for row in result["stages"]:
        lines.append(f"| {row['stage']} | {row['work']} | {row['tflop']:,.0f} | {row['hours']:,.2f} | {row['note']} |")
    lines.append(f"| **total** | | {result['total']['tflop']:,.0f} | {result['total']['hours']:,.1f} | |")
    lines += ["", "| memory per GPU (GB) | batch x positions | weights | trainable states | activations | total | "
              f"fits {gpu['memory_gb']} GB |", "|---|---|---:|---:|---:|---:|---|"]
    for row in result["memory"]:
        stage = row["stage"]
        if row["gradient_checkpointing"] is not None and stage == "stage 1":
            stage += f" (checkpointing {'on' if row['gradient_checkpointing'] else 'off'}"
            stage += ", the recipe's)" if row["recipe_setting"] else ")"
        lines.append(f"| {stage} | {row['batch']} x {row['sequence']:,} | {row['weights_gb']:.1f} ({row['weights']}) | "
                     f"{row['trainable_states_gb']:.2f} | {row['activations_gb']:.1f} | {row['total_gb']:.1f} | "
                     f"{'yes' if row['total_gb'] <= gpu['memory_gb'] else 'no'} |")
    return "\n".join(lines)


def summary_table(results: dict[str, dict[str, dict]], gpus: list[str]) -> str:
    """One row per recipe: total work, hours per GPU kind, stage-1 and feature-cache memory per GPU."""
    first = next(iter(next(iter(results.values())).values()))
    header = (["recipe", "parameters", "visual tokens", "total PFLOP", "stage 1 share"]
              + [f"hours, 1x {gpu}" for gpu in gpus]
              + ["stage 1 GB (ckpt on / off)", "feature caches GB"])
    lines = [f"ESTIMATES at MFU {first['mfu']:g} (bf16 dense peaks; hours on one GPU of each kind)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header)))
             + "|"]
    for recipe, by_gpu in results.items():
        result = by_gpu[gpus[0]]
        memory = {(row["stage"], row["gradient_checkpointing"]): row["total_gb"] for row in result["memory"]}
        stage1 = result["stages"][1]["flops"] / result["total"]["flops"]
        cells = [recipe, f"{result['parameters']['total'] / 1e9:.2f} B",
                 f"{result['tokens']['visual_tokens_per_image']:,}", f"{result['total']['tflop'] / 1e3:,.0f}",
                 f"{stage1:.0%}"] + [f"{by_gpu[gpu]['total']['hours']:,.0f}" for gpu in gpus]
        cells += [f"{memory[('stage 1', True)]:.1f} / {memory[('stage 1', False)]:.1f}",
                  f"{memory[('feature caches', None)]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, nargs="+",
                        help="Recipe YAML (train/recipes/...); several give one summary row each.")
    parser.add_argument("--gpu", default=["H100"], nargs="+", choices=sorted(GPUS),
                        help="GPU whose bf16 dense peak is used; several give one hours column each.")
    parser.add_argument("--mfu", type=float, default=0.3, help="Model FLOP utilisation assumed (0-1].")
    parser.add_argument("--num-gpus", type=int, default=1, help="Data-parallel GPUs (hours divide by it).")
    parser.add_argument("--images", type=int, nargs=3, metavar=("TRAIN", "VALIDATION", "TEST"),
                        help="Images per split (default: the named data set's published sizes).")
    parser.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                        help="Tokens of a generated conversation/reasoning answer when no cache is given.")
    parser.add_argument("--instruction-cache", help="Answer cache JSONL: median answer lengths per kind.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Recipe override, as `python -m train pipeline` takes them.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    parser.add_argument("--output", help="Also write the JSON here.")
    args = parser.parse_args(argv)
    if args.num_gpus < 1:
        parser.error("--num-gpus must be at least 1")
    results = {recipe: {gpu: estimate(recipe, gpu, args.mfu, args.num_gpus, args.images, args.answer_tokens,
                                      args.instruction_cache, args.overrides) for gpu in args.gpu}
               for recipe in args.recipe}
    single = len(args.recipe) == 1 and len(args.gpu) == 1
    payload = results[args.recipe[0]][args.gpu[0]] if single else {"estimate": True, "results": results}
    text = json.dumps(payload, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text if args.json else format_table(payload) if single else summary_table(results, args.gpu))
    return payload


if __name__ == "__main__":
    main()
