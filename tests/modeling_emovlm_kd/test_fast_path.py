"""The fast path (`modeling_emovlm_kd/fast_path.py`: the patch embedding as a matrix product) gives the stock
modules' outputs, applies at call time (a VLM assigned after construction, 4-bit, remote code) and leaves nothing
behind on the modules."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import random_images
from torch import nn
from transformers import AutoModelForImageClassification, AutoModelForImageTextToText, BitsAndBytesConfig

from modeling_emovlm_kd import EmoVLMKDImageProcessor, fast_path
from train.infra.assemble import assemble

OUTPUTS = ("logits", "vlm_logits", "head_logits", "visual_features")


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the fast patch product (of the local package)."""
    calls = []
    original = fast_path._patch_product_forward

    def counting(self, x):
        calls.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(fast_path, "_patch_product_forward", counting)
    return calls


def _outputs(model, inputs, module=fast_path, stock=False):
    with torch.no_grad():
        if stock:
            with module.stock():
                out = model(**inputs)
        else:
            out = model(**inputs)
    return {name: getattr(out, name) for name in OUTPUTS}


def _assert_close(fast, stock, rtol=1e-5):
    """Float32 computations that differ in the order of their sums agree to about 1e-5 of the values' scale (the
    label scores are log-likelihoods near -13, the features near 0.1): the tolerance is relative to each tensor's
    largest magnitude, not an absolute number fitted to one tensor."""
    for name in OUTPUTS:
        assert fast[name].shape == stock[name].shape, name
        atol = rtol * max(1.0, float(stock[name].abs().max()))
        torch.testing.assert_close(fast[name], stock[name], atol=atol, rtol=0, msg=name)


def test_patch_product_equals_the_convolution_and_falls_back_otherwise():
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 16, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True).double()
    assert fast_path.conv_is_patch_product(conv)
    x = torch.randn(10, 3, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(fast_path._patch_product_forward(conv, x), conv(x), atol=1e-12, rtol=0)
    # An input larger than one kernel (several windows) goes to the stock kernel, result unchanged.
    big = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fast_path._patch_product_forward(conv, big), conv(big), atol=0, rtol=0)
    assert not fast_path.conv_is_patch_product(nn.Conv3d(3, 4, 2, stride=2, padding=1))
    assert not fast_path.conv_is_patch_product(nn.Conv3d(3, 4, 3, stride=2))
    assert not fast_path.conv_is_patch_product(nn.Conv3d(4, 4, 2, stride=2, groups=2))
    assert not fast_path.conv_is_patch_product(nn.Linear(3, 4))


def test_fused_forward_matches_the_stock_modules_in_float32(tiny_base, counted):
    torch.manual_seed(0)
    # `assemble` builds the wrapper on the meta device and assigns the loaded VLM afterwards.
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])
    model = model.float().eval()
    inputs = processor.image_processor(random_images(5, seed=1), return_tensors="pt")
    stock = _outputs(model, inputs, stock=True)
    assert not counted  # the stock run used the unmodified Conv3d
    fast = _outputs(model, inputs)
    assert counted and all(shape[1:] == (3, 2, 14, 14) or len(shape) == 5 for shape in counted)
    _assert_close(fast, stock)
    # The override lives only for the call: nothing is left on the module (copies and save_pretrained see stock).
    (conv,) = fast_path.patch_convolutions(model.vlm)
    assert "forward" not in conv.__dict__
    # The stock vision tower itself, called without the wrapper, gives the same merged tokens.
    with torch.no_grad():
        reference = model.vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                       return_dict=True).pooler_output
        ours = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fast_path_applies_to_a_vlm_assigned_after_construction(tiny_base, counted):
    torch.manual_seed(0)
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])
    model.eval()
    inputs = processor.image_processor(random_images(2, seed=2), return_tensors="pt")
    _outputs(model, inputs)
    before = len(counted)
    assert before
    model.vlm = AutoModelForImageTextToText.from_pretrained(tiny_base["vlm"]).eval()
    stock = _outputs(model, inputs, stock=True)
    fast = _outputs(model, inputs)
    assert len(counted) > before
    _assert_close(fast, stock)


# bfloat16's unit roundoff: round-to-nearest to 8 significant bits errs by at most 2^-8 of the value.
BF16_UNIT_ROUNDOFF = 2.0**-8


def _load_4bit(checkpoint, bf16_kernel: bool | None = None):
    """The tiny checkpoint with its VLM in NF4 (float32 compute dtype), on the CPU. `bf16_kernel=False` turns off
    bitsandbytes' AVX512-BF16 kernel, so every 4-bit layer dequantises its weights and multiplies in float32, as on
    a CPU without AVX512-BF16; `None` keeps the library's choice for this CPU."""
    import bitsandbytes as bnb

    # The local package's class, so that the counted fast path is the one it runs.
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = EmoVLMKDForImageClassification.from_pretrained(checkpoint, quantization_config=config,
                                                           device_map="cpu").eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if bf16_kernel is not None:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = bf16_kernel
    return model, layers


def _bf16_kernel_bound(model, layers, reference: dict) -> dict[str, float]:
    """How far bitsandbytes' bf16 CPU kernel may move each output from the float32-dequantised computation.

    On a CPU with AVX512-BF16, `Linear4bit` in eval packs its weights and runs `gemv_4bit` in bfloat16: the layer's
    input, the NF4 block scales (absmax) and its output are each rounded to bf16, three roundings of at most
    `BF16_UNIT_ROUNDOFF` relative error per 4-bit layer. To first order, through blocks that normalise their input
    (LayerNorm/RMSNorm before every attention and MLP), the errors of `n` such layers add up to at most
    `3 * n * BF16_UNIT_ROUNDOFF` of the tensor's scale (its largest magnitude in the float32 result). The visual
    features and the head's logits pass the vision tower's 4-bit layers; the label scores and the fused logits all
    of them. No bf16 kernel on this CPU (AVX2 only): 0, the float32 path."""
    bf16 = [layer for layer in layers if layer.support_avx512bf16_for_cpu]
    if not bf16:
        return dict.fromkeys(OUTPUTS, 0.0)
    chosen = set(bf16)
    visual = sum(1 for m in model.vlm.model.visual.modules() if m in chosen)
    counts = {"visual_features": visual, "head_logits": visual, "vlm_logits": len(bf16), "logits": len(bf16)}
    return {name: 3 * counts[name] * BF16_UNIT_ROUNDOFF * float(reference[name].abs().max()) for name in OUTPUTS}


def test_fast_path_with_a_4bit_vlm(tiny_checkpoint, counted):
    """The fast path in a 4-bit model gives the stock modules' outputs: exactly as in float32 where the 4-bit layers
    compute in float32, and within bf16 rounding where bitsandbytes' CPU kernel computes in bf16 (AVX512-BF16)."""
    pytest.importorskip("bitsandbytes")
    inputs = EmoVLMKDImageProcessor.from_pretrained(tiny_checkpoint)(random_images(3, seed=4), return_tensors="pt")
    # Dequantised NF4 weights, float32 products (every CPU without AVX512-BF16 runs this): the fast path only
    # reorders the patch embedding's float32 sums, so the float32 tolerance holds, and every top-1 is the same.
    model, _ = _load_4bit(tiny_checkpoint, bf16_kernel=False)
    (conv,) = fast_path.patch_convolutions(model.vlm)
    assert type(conv) is nn.Conv3d  # bitsandbytes leaves the patch embedding unquantized
    stock32 = _outputs(model, inputs, stock=True)
    fast32 = _outputs(model, inputs)
    assert counted
    _assert_close(fast32, stock32)
    for name in OUTPUTS:
        assert torch.equal(fast32[name].argmax(-1), stock32[name].argmax(-1)), name
    # The library's kernel for this CPU (bf16 on AVX512-BF16): each path is within `bound` of the float32 result
    # above, so the two are within 2 * bound (+ the float32 tolerance) of each other; a top-1 is the same wherever
    # the float32 result's margin between its best and second-best entry exceeds that.
    model, layers = _load_4bit(tiny_checkpoint)
    calls = len(counted)
    stock = _outputs(model, inputs, stock=True)
    fast = _outputs(model, inputs)
    assert len(counted) > calls
    bound = _bf16_kernel_bound(model, layers, stock32)
    for name in OUTPUTS:
        tolerance = 2 * bound[name] + 1e-5 * max(1.0, float(stock32[name].abs().max()))
        assert fast[name].shape == stock[name].shape, name
        torch.testing.assert_close(fast[name], stock[name], atol=tolerance, rtol=0, msg=name)
        if name in ("logits", "vlm_logits", "head_logits"):
            top2 = stock32[name].topk(2, dim=-1).values
            decided = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
            assert torch.equal(fast[name].argmax(-1)[decided], stock[name].argmax(-1)[decided]), name


def test_saved_checkpoint_ships_the_fast_path_and_its_remote_code_runs_it(tiny_checkpoint):
    # save_pretrained copies the modeling file's relative imports: the checkpoint carries the fast path.
    shipped = tiny_checkpoint / "fast_path.py"
    assert shipped.read_bytes() == Path(fast_path.__file__).read_bytes()
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    remote = sys.modules[sys.modules[type(model).__module__]._fast_path_applied.__module__]
    assert remote.patch_convolutions(model.vlm)
    inputs = EmoVLMKDImageProcessor.from_pretrained(tiny_checkpoint)(random_images(3, seed=5), return_tensors="pt")
    _assert_close(_outputs(model, inputs, module=remote), _outputs(model, inputs, module=remote, stock=True))


def test_a_model_on_the_meta_device_builds_and_finds_its_patch_embedding(tiny_checkpoint):
    from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDForImageClassification

    config = EmoVLMKDConfig.from_pretrained(tiny_checkpoint)
    with torch.device("meta"):
        model = EmoVLMKDForImageClassification(config)
    (conv,) = fast_path.patch_convolutions(model.vlm)
    assert conv.weight.is_meta and "forward" not in conv.__dict__  # nothing is patched at construction
    with fast_path.applied(model.vlm):
        x = torch.empty(4, *conv.weight.shape[1:], device="meta")
        assert conv(x).shape == (4, conv.out_channels, 1, 1, 1)
    assert "forward" not in conv.__dict__


def _label_scores_one_by_one(model, image_processor, images):
    """Reference label scores from the unmodified Qwen2-VL modules: for every image and label, one plain causal
    forward of `prompt + label` (batch 1, no padding, no tree mask, no memoized inputs, fast path off), summing the
    log-probabilities of the label's tokens."""
    ids, config = model.config.prompt_token_ids, model.config.vlm_config
    merge = config.vision_config.spatial_merge_size
    scores = torch.zeros(len(images), model.config.num_labels)
    with torch.no_grad(), fast_path.stock():
        for i, image in enumerate(images):
            inputs = image_processor([image], return_tensors="pt")
            n = int(inputs["image_grid_thw"].prod()) // merge**2
            prompt = ids["before_image"] + [config.image_token_id] * n + ids["after_image"]
            for j, continuation in enumerate(ids["label_continuations"]):
                input_ids = torch.tensor([prompt + continuation])
                logits = model.vlm(input_ids=input_ids, pixel_values=inputs["pixel_values"],
                                   image_grid_thw=inputs["image_grid_thw"],
                                   mm_token_type_ids=(input_ids == config.image_token_id).int(), use_cache=False).logits
                logprobs = logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
                scores[i, j] = logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum()
    return scores


def test_fused_logits_equal_label_by_label_scoring_with_the_stock_modules_in_float32(tiny_base):
    """The batched tree-masked scoring with memoized inputs, the fast patch product and the head and gate give the
    logits of the plain computation: each label scored on its own by the unmodified Qwen2-VL modules."""
    torch.manual_seed(0)
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])
    model = model.float().eval()
    # Images of different sizes: different numbers of visual tokens, so the prompts are left-padded in the batch.
    images = random_images(4, seed=6)
    inputs = processor.image_processor(images, return_tensors="pt")
    reference = _label_scores_one_by_one(model, processor.image_processor, images)
    with torch.no_grad(), fast_path.stock():
        stock_tokens = model.vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                          return_dict=True).pooler_output
    visual = torch.stack([tokens.mean(0) for tokens in stock_tokens])
    with torch.no_grad():
        expected_logits = model.fuse(reference, model.distillation_head(visual))
    for attempt in range(2):  # the second call reuses the memoized prompt, mask and positions
        with torch.inference_mode():
            out = model(**inputs)
        torch.testing.assert_close(out.vlm_logits, reference, atol=1e-5, rtol=0, msg=f"vlm_logits, call {attempt}")
        torch.testing.assert_close(out.visual_features, visual, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=0, msg=f"logits, call {attempt}")


def test_label_scoring_inputs_are_built_once_per_batch_shape(tiny_base, monkeypatch):
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])
    model = model.float().eval()
    built = []
    original = type(model)._classification_inputs

    def counting(self, grid):
        built.append(grid.tolist())
        return original(self, grid)

    monkeypatch.setattr(type(model), "_classification_inputs", counting)
    square = processor.image_processor(random_images(2, seed=8), return_tensors="pt")
    other = processor.image_processor(random_images(2, seed=9, sizes=((56, 56), (100, 30))), return_tensors="pt")
    with torch.inference_mode():
        first = model(**square).vlm_logits
        again = model(**square).vlm_logits
        assert len(built) == 1  # same image grids: prompt ids, mask and positions reused
        model(**other)
        assert len(built) == 2  # other grids: built anew
    with torch.no_grad():  # outside inference mode the memo's inference tensors are not reused
        outside = model(**square).vlm_logits
    assert len(built) == 3
    assert torch.equal(first, again) and torch.equal(first, outside)
