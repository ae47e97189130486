"""The performance code of label scoring and the fast path (issue 23 item 4): the chunked log-normaliser, the MLPs
with in-place activations and the vision rotary embedding give the stock computation's numbers, in float32 to
rounding and in bfloat16 within bounds derived from bfloat16's precision, and leave nothing behind.

bfloat16 keeps 8 significant bits: rounding a value `x` to it moves it by at most half a unit in the last place,
`2**-9 * |x|` relative (a unit in the last place is at most `2**-8 * |x|`, at least `2**-9 * |x|`). Two roundings of
the same float32-accumulated dot product summed in different orders differ by at most one unit, `2**-8 * |x|`.
"""

import importlib
import threading

import pytest
import torch
from conftest import random_images
from torch import nn
from transformers import AutoModelForImageTextToText

from modeling_emovlm_kd import fast_path
from modeling_emovlm_kd.modeling_emovlm_kd import label_token_log_probs
from train.infra.assemble import assemble
from train.infra.tiny import build_tiny_vlm

BF16_ULP = 2.0**-8  # largest unit in the last place of a bfloat16 value, relative to the value
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _reference_log_probs(hidden, lm_head, row, tokens):
    """The stock computation: `lm_head` over every row, float32 `log_softmax`, the tokens picked."""
    logits = lm_head(hidden).float()
    return logits.log_softmax(-1)[:, row, torch.tensor(tokens)], logits


def _head_and_inputs(dtype, bias, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(64, 1000, bias=bias).to(dtype)
    nn.init.normal_(head.weight, std=0.5)
    hidden = torch.randn(3, 5, 64).to(dtype)
    # Tokens at both ends of the vocabulary and at the chunk boundaries of the small chunks used below (256 rows).
    tokens = [0, 255, 256, 511, 999, 700, 3, 256]
    row = torch.tensor([0, 1, 1, 2, 3, 4, 4, 0])
    return head, hidden, row, tokens


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4 * 3 * 5 * 256, 4 << 20])  # four vocabulary slices, or one
def test_chunked_normaliser_equals_log_softmax_in_float32(bias, chunk_bytes):
    head, hidden, row, tokens = _head_and_inputs(torch.float32, bias)
    reference, _ = _reference_log_probs(hidden, head, row, tokens)
    with torch.no_grad():
        ours = label_token_log_probs(hidden, head, row, tokens, chunk_bytes=chunk_bytes)
    assert ours.dtype == torch.float32 and ours.shape == (3, len(tokens))
    torch.testing.assert_close(ours, reference.detach(), atol=1e-5, rtol=0)


def test_a_head_that_is_not_a_plain_linear_runs_whole():
    """A hooked (or quantized, or wrapped) head is called as a module, then the same float32 normaliser."""
    head, hidden, row, tokens = _head_and_inputs(torch.float32, bias=False)
    calls = []
    head.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    reference, _ = _reference_log_probs(hidden, head, row, tokens)
    calls.clear()
    with torch.no_grad():
        ours = label_token_log_probs(hidden, head, row, tokens, chunk_bytes=4 * 3 * 5 * 256)
    assert calls == [(3, 5, 1000)]
    torch.testing.assert_close(ours, reference.detach(), atol=1e-5, rtol=0)


def test_chunked_normaliser_in_bfloat16_within_one_unit_of_the_logits():
    """Each logit is a bfloat16 rounding of the same float32-accumulated dot product as `lm_head`'s: the two differ
    by at most one unit, so the token's logit and the log-normaliser (a soft maximum of the logits) each move by at
    most `2**-8 * max|logit|`, and the log-probability by at most twice that."""
    head, hidden, row, tokens = _head_and_inputs(torch.bfloat16, bias=False, seed=1)
    with torch.no_grad():
        reference, logits = _reference_log_probs(hidden, head, row, tokens)
        ours = label_token_log_probs(hidden, head, row, tokens, chunk_bytes=4 * 3 * 5 * 256)
    bound = 2 * BF16_ULP * logits.abs().max().item() + 1e-5
    assert logits.abs().max().item() > 10  # logits large enough for the bound to mean something
    torch.testing.assert_close(ours, reference, atol=bound, rtol=0)
    assert (ours <= 1e-6).all()  # each token's logit is read from the slice its normaliser saw: log p <= 0


# ---- the model's label scores ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    torch.manual_seed(0)
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])
    return model.eval(), processor


def _scores_and_logits(model, features, grid):
    """Stock label scores, and the largest |logit| of the rows they read."""
    with torch.no_grad(), fast_path.stock():
        scores = model.score_labels(features, grid)
        inputs = dict(model._scoring_inputs(grid, model.vlm.dtype))
        inputs.pop("row")
        logits = model.vlm(**inputs, image_grid_thw=grid, mm_encoder_outputs={"image": features},
                           use_cache=False).logits
    return scores, logits.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_scores_equal_the_stock_computation(tiny_model, dtype):
    """`score_labels` on the same visual features, fast path on vs off (the stock modules, `lm_head` over the kept
    rows, the whole-vocabulary float32 normaliser): float32 to rounding; bfloat16 within `2 * 2**-8 * max|logit|` per
    token of each label (the in-place MLPs are bit-identical, only the logits' summation order differs)."""
    model, processor = tiny_model
    model = model.to(dtype)
    try:
        inputs = processor.image_processor(random_images(4, seed=11), return_tensors="pt")
        grid = inputs["image_grid_thw"]
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"].to(dtype), grid)
            fast = model.score_labels(features, grid)
        stock, largest = _scores_and_logits(model, features, grid)
        if dtype == torch.float32:
            torch.testing.assert_close(fast, stock, atol=1e-5, rtol=0)
        else:
            tokens = torch.tensor([len(c) for c in model.config.prompt_token_ids["label_continuations"]])
            bound = 2 * BF16_ULP * largest * tokens.float() + 1e-5
            assert ((fast - stock).abs() <= bound).all(), ((fast - stock).abs(), bound)
            margin = stock.topk(2, -1).values
            decided = (margin[:, 0] - margin[:, 1]) > 2 * bound.max()
            assert torch.equal(fast.argmax(-1)[decided], stock.argmax(-1)[decided])
    finally:
        model.float()


def test_bfloat16_forward_gives_the_stock_labels(tiny_model):
    """The whole bfloat16 forward, fast path on vs off. Besides the scoring tail, the patch embedding runs as a matrix
    product (each output at most one bfloat16 unit apart), and that difference passes through every layer: label
    scores agree within four units of the largest logit per token (twice the scoring tail's bound), the fused logits
    within four units of the largest one, and the labels agree wherever the stock scores' top two are further apart
    than twice that."""
    model, processor = tiny_model
    model = model.to(torch.bfloat16)
    try:
        inputs = processor.image_processor(random_images(16, seed=12), return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            fast = model(**inputs)
            with fast_path.stock():
                stock = model(**inputs)
                features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        _, largest = _scores_and_logits(model, features, inputs["image_grid_thw"])
        tokens = torch.tensor([len(c) for c in model.config.prompt_token_ids["label_continuations"]])
        tolerances = {"vlm_logits": 4 * BF16_ULP * largest * tokens.float() + 1e-5,
                      "logits": torch.full((len(tokens),), 4 * BF16_ULP * stock.logits.float().abs().max().item())}
        for name, tolerance in tolerances.items():
            ours, theirs = getattr(fast, name).float(), getattr(stock, name).float()
            assert ((ours - theirs).abs() <= tolerance).all(), (name, (ours - theirs).abs().max(), tolerance)
            top = theirs.topk(2, -1).values
            decided = (top[:, 0] - top[:, 1]) > 2 * tolerance.max()
            assert decided.any(), name  # the label check below is not vacuous
            assert torch.equal(ours.argmax(-1)[decided], theirs.argmax(-1)[decided]), name
    finally:
        model.float()


# ---- MLPs with in-place activations ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def family_vlm(request, tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param), ["a", "b"], model_type=request.param)
    return request.param, AutoModelForImageTextToText.from_pretrained(path).eval()


def _mlp_outputs(mlps, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for mlp, _ in mlps:
        width = next(p for p in mlp.parameters() if p.ndim == 2).shape[1]
        x = torch.randn(7, width, generator=generator).to(dtype)
        outputs.append(mlp.to(dtype)(x))
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_mlps_are_bit_identical_to_the_stock_modules(family_vlm, dtype):
    name, vlm = family_vlm
    found = fast_path.mlps(vlm)
    text_layers = len(vlm.model.language_model.layers)
    # Every family's decoder MLPs (SiLU); the vision MLPs of Qwen2-VL (quick-GELU) and Qwen2.5-VL (SiLU). Qwen3-VL's
    # tanh-GELU has no in-place form: its vision MLPs are listed but run stock.
    assert len(found) == text_layers + len(vlm.model.visual.blocks)
    try:
        with torch.no_grad():
            stock = _mlp_outputs(found, dtype)
            with fast_path.applied(vlm):
                assert all("forward" in mlp.__dict__ for mlp, _ in found)
                fast = _mlp_outputs(found, dtype)
        for a, b in zip(fast, stock):
            assert torch.equal(a, b), name
        assert not any("forward" in mlp.__dict__ for mlp, _ in found)  # nothing left on the modules
    finally:
        vlm.float()


def test_inplace_mlps_step_aside_with_gradients_or_hooks(family_vlm):
    _, vlm = family_vlm
    mlp = next(m for m, forward in fast_path.mlps(vlm) if forward is fast_path._gated_mlp_forward)
    x = torch.randn(5, mlp.gate_proj.in_features, requires_grad=True)
    stock = mlp(x)
    (stock_grad,) = torch.autograd.grad(stock.sum(), x)
    with fast_path.applied(vlm):
        ours = mlp(x)  # with gradients: the stock forward, so backward works
        (grad,) = torch.autograd.grad(ours.sum(), x)
        # A hook that keeps `gate_proj`'s output must see it unchanged (the in-place activation would overwrite it).
        kept = []
        handle = mlp.gate_proj.register_forward_hook(lambda module, args, output: kept.append(output))
        with torch.no_grad():
            mlp(x)
        handle.remove()
    assert torch.equal(ours, stock) and torch.equal(grad, stock_grad)
    with torch.no_grad():
        torch.testing.assert_close(kept[0], mlp.gate_proj(x), atol=0, rtol=0)


# ---- the vision rotary embedding --------------------------------------------------------------------------------


@pytest.mark.parametrize("module_name", fast_path._ROTARY_MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rotary_is_bit_identical_to_each_familys_function(module_name, dtype):
    stock = importlib.import_module(module_name).apply_rotary_pos_emb_vision
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(50, 3, 4, 16, generator=generator).to(dtype)
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)  # strided views, as the attention passes them
    freqs = torch.randn(50, 8, generator=generator) * 10
    emb = torch.cat([freqs, freqs], -1)
    expected = stock(q, k, emb.cos(), emb.sin())
    ours = fast_path.rotary_vision(q, k, emb.cos(), emb.sin())
    for a, b in zip(ours, expected):
        assert a.dtype == dtype and torch.equal(a, b)
    # General cos/sin (halves not equal) too: rotate_half's halves are written out, not assumed equal.
    cos, sin = torch.randn(50, 16, generator=generator), torch.randn(50, 16, generator=generator)
    for a, b in zip(fast_path.rotary_vision(q, k, cos, sin), stock(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_vision_rotary_is_swapped_in_only_during_calls(family_vlm):
    name, vlm = family_vlm
    module = importlib.import_module(type(vlm.model.visual).__module__)
    stock = module.apply_rotary_pos_emb_vision
    entered, release = threading.Event(), threading.Event()

    def other_call():
        with fast_path.applied(vlm):
            entered.set()
            release.wait(30)

    other = threading.Thread(target=other_call)
    with fast_path.applied(vlm):
        swapped = module.apply_rotary_pos_emb_vision
        assert swapped is not stock and swapped.stock is stock
        with fast_path.applied(vlm):  # nested: restored once, by the outer call
            assert module.apply_rotary_pos_emb_vision is swapped
        assert module.apply_rotary_pos_emb_vision is swapped
        other.start()
        assert entered.wait(30)
    assert module.apply_rotary_pos_emb_vision is swapped  # another thread's call is still running
    release.set()
    other.join()
    assert module.apply_rotary_pos_emb_vision is stock
    with fast_path.stock(), fast_path.applied(vlm):
        assert module.apply_rotary_pos_emb_vision is stock  # fast path off: nothing swapped
    # The same replacement object every time (a compiler's guards on the global hold from call to call).
    with fast_path.applied(vlm):
        assert module.apply_rotary_pos_emb_vision is swapped


# ---- compiled layers ----------------------------------------------------------------------------------------------


def test_compiled_layers_keep_the_scores_and_the_fast_path_steps_aside(tiny_base):
    """`compile_layers` (dynamo with its `eager` backend here: inductor's compile time is measured by
    `bench.inference --compile`, not in the tests): same label scores; the in-place MLPs and the rotary replacement
    are not applied to compiled blocks; a second call of the same shape compiles nothing new."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64])
    model = model.float().eval()
    inputs = processor.image_processor(random_images(3, seed=13), return_tensors="pt")
    with torch.no_grad():
        eager = model(**inputs)
    torch._dynamo.reset()
    try:
        layers = fast_path.compile_layers(model.vlm, backend="eager", dynamic=False)
        assert layers == len(model.vlm.model.visual.blocks) + len(model.vlm.model.language_model.layers)
        assert fast_path.mlps(model.vlm) == []
        with torch.no_grad():
            first = model(**inputs)
            graphs = counters["stats"]["unique_graphs"]
            second = model(**inputs)
        assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
        for out in (first, second):
            torch.testing.assert_close(out.vlm_logits, eager.vlm_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=0)
    finally:
        torch._dynamo.reset()
