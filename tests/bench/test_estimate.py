"""`bench.estimate`: counted FLOPs agree with `bench/flops.py`, the base models have their published sizes, every
shipped recipe gives a complete estimate, and the estimate moves as the arithmetic says when its inputs move."""

import json
from pathlib import Path

import pytest

from bench import estimate
from bench.common import make_shape, qwen2_vl_config
from bench.flops import _text_layer_linear, vision_flops
from modeling_emovlm_kd import LABEL_SETS
from train.infra.tiny import build_tiny_tokenizer

RECIPES = Path(__file__).resolve().parents[2] / "train" / "recipes"
# own-data/ recipes read data of unknown size: `--images TRAIN VALIDATION TEST` gives it.
SHIPPED = sorted(p for p in RECIPES.glob("*/*.yaml") if p.parent.name not in ("tiny", "accelerate", "own-data"))
EMOSET_7B = RECIPES / "qwen2-vl-7b" / "emoset.yaml"


def test_counts_agree_with_the_benchmarks_flop_formulas():
    """The generic count (every Linear of a meta-device model over the rows it sees) equals `bench/flops.py`'s
    explicit formulas on Qwen2-VL-2B's widths."""
    shape = make_shape("mid", text_layers=3, vision_depth=2)
    config = qwen2_vl_config(shape, build_tiny_tokenizer(LABEL_SETS["mikels8"]))
    counted = estimate.model_shape(config)
    grid = [(1, 16, 16)]  # 224 x 224: 256 patches, 64 merged tokens
    expected = vision_flops(config.vision_config, grid, config.get_text_config().hidden_size)
    assert estimate.vision_forward_flops(counted, 64) == sum(expected.values())
    text = config.get_text_config()
    length = 165
    ours = estimate.text_forward_flops(counted, length, lm_rows=17, causal=False)
    assert ours["layers"] == text.num_hidden_layers * (_text_layer_linear(text, length)
                                                       + 4 * length * length * text.hidden_size)
    assert ours["lm_head"] == 2 * 17 * text.hidden_size * text.vocab_size
    causal = estimate.text_forward_flops(counted, length, lm_rows=17, causal=True)
    assert causal["layers"] == ours["layers"] - text.num_hidden_layers * 2 * length * length * text.hidden_size


@pytest.mark.parametrize("name,parameters", [
    ("Qwen/Qwen2-VL-7B-Instruct", 8_291_375_616), ("Qwen/Qwen2-VL-2B-Instruct", 2_208_985_600),
    ("Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656), ("Qwen/Qwen3-VL-8B-Instruct", 8_767_123_696)])
def test_base_models_have_their_published_parameter_counts(name, parameters):
    shape = estimate.model_shape(estimate.vlm_config(name))
    assert shape.params["total"] == parameters


def test_every_shipped_recipe_gets_a_complete_estimate():
    assert len(SHIPPED) >= 15
    for path in SHIPPED:
        result = estimate.estimate(str(path))
        assert result["estimate"] is True
        names = [row["stage"] for row in result["stages"]]
        assert names[0] == "instructions" and names[1].startswith("stage 1") and "feature caches" in names
        assert all(row["flops"] > 0 for row in result["stages"][1:]), path
        peak = estimate.GPUS["H100"][0] * 1e12
        for row in result["stages"]:
            assert row["hours"] == pytest.approx(row["flops"] / (peak * 0.3) / 3600)
        assert result["total"]["flops"] == sum(row["flops"] for row in result["stages"])
        # Stage 1 dominates: five QLoRA epochs of three rows per image against one forward per image for the caches.
        stage1 = result["stages"][1]["flops"]
        assert stage1 > 10 * next(r["flops"] for r in result["stages"] if r["stage"] == "feature caches")
        memory = {(row["stage"], row["gradient_checkpointing"]): row for row in result["memory"]}
        on, off = memory[("stage 1", True)], memory[("stage 1", False)]
        assert on["weights"] == "4-bit NF4" and on["activations_gb"] < off["activations_gb"]
        assert memory[("feature caches", None)]["weights_gb"] > 2.5 * on["weights_gb"]  # bf16 vs NF4
        assert result["tokens"]["visual_tokens_per_image"] == 1_048_576 // (28 if "qwen3" not in str(path) else 32) ** 2


def test_estimate_moves_with_its_inputs():
    base = estimate.estimate(str(EMOSET_7B))
    stage1 = base["stages"][1]
    slower = estimate.estimate(str(EMOSET_7B), gpu="L4", mfu=0.15, num_gpus=2)
    assert slower["stages"][1]["flops"] == stage1["flops"]
    ratio = (estimate.GPUS["H100"][0] * 0.3) / (estimate.GPUS["L4"][0] * 0.15 * 2)
    assert slower["stages"][1]["hours"] == pytest.approx(stage1["hours"] * ratio)
    twice = estimate.estimate(str(EMOSET_7B), overrides=["sft.num_train_epochs=10"])
    assert twice["stages"][1]["flops"] == 2 * stage1["flops"]
    # Without activation (gradient) checkpointing the decoder layers are not recomputed: fewer FLOPs.
    plain = estimate.estimate(str(EMOSET_7B), overrides=["sft.activation_checkpointing=false"])
    assert plain["stages"][1]["flops"] < stage1["flops"]
    smaller = estimate.estimate(str(EMOSET_7B), images=[1000, 100, 100], overrides=["model.max_pixels=200704"])
    assert smaller["tokens"]["visual_tokens_per_image"] == 256
    assert smaller["data"]["train"] == 1000 and smaller["stages"][1]["flops"] < stage1["flops"] / 50


def test_answer_lengths_come_from_the_instruction_cache(tmp_path):
    tokenizer = estimate._tokenizer()
    answer = "The warm light on the faces and the open gestures make the scene feel welcoming. " * 4
    tokens = len(tokenizer(answer)["input_ids"])
    cache = tmp_path / "answers.jsonl"
    rows = [{"key": f"k{i}", "kind": kind, "label": "awe", "answer": answer, "generator": "test"}
            for i in range(3) for kind in ("conversation", "reasoning")]
    cache.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = estimate.estimate(str(EMOSET_7B), instruction_cache=str(cache))
    assert result["tokens"]["answer"]["conversation"] == tokens + 2
    assert result["tokens"]["answer_source"]["reasoning"] == "instruction cache (median)"
    default = estimate.estimate(str(EMOSET_7B))
    assert default["tokens"]["answer"]["reasoning"] == estimate.DEFAULT_ANSWER_TOKENS + 2


def test_command_line_table_and_json(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    estimate.main(["--recipe", str(EMOSET_7B), "--gpu", "A100-80GB", "--output", str(out)])
    table = capsys.readouterr().out
    assert table.startswith("ESTIMATE") and "| stage 1 (QLoRA) |" in table and "fits 80 GB" in table
    assert json.loads(out.read_text())["gpu"]["name"] == "A100-80GB"
    estimate.main(["--recipe", str(EMOSET_7B), "--json"])
    assert json.loads(capsys.readouterr().out)["estimate"] is True
    summary = estimate.main(["--recipe", str(EMOSET_7B), str(RECIPES / "qwen3-vl-8b" / "fi.yaml"),
                             "--gpu", "H100", "L4"])
    table = capsys.readouterr().out
    assert "hours, 1x H100 | hours, 1x L4" in table and table.count("train/recipes/") == 2
    assert set(summary["results"]) == {str(EMOSET_7B), str(RECIPES / "qwen3-vl-8b" / "fi.yaml")}
    # The demo recipe's image folder has no published size: a clear error, or the sizes given.
    with pytest.raises(SystemExit, match="--images"):
        estimate.estimate(str(RECIPES / "tiny" / "demo.yaml"))
    tiny = estimate.estimate(str(RECIPES / "tiny" / "demo.yaml"), images=[30, 6, 12])
    assert tiny["base_model"] == "tiny" and tiny["total"]["flops"] > 0
    with pytest.raises(SystemExit, match="Unknown GPU"):
        estimate.estimate(str(EMOSET_7B), gpu="TPU")
    with pytest.raises(SystemExit, match="mfu"):
        estimate.estimate(str(EMOSET_7B), mfu=0)
