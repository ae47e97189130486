import pytest

from modeling_emovlm_kd import LABEL_SETS, EmoVLMKDConfig, resolve_label_set


def test_named_label_sets_keep_their_published_order():
    assert resolve_label_set("emoset") == resolve_label_set("fi") == LABEL_SETS["mikels8"]
    assert resolve_label_set("mikels8")[:2] == ["amusement", "awe"]
    assert resolve_label_set("emotion6") == ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
    assert resolve_label_set("flickr") == resolve_label_set("instagram") == ["negative", "positive"]


def test_custom_label_list_keeps_given_order():
    config = EmoVLMKDConfig.from_label_set(["zebra", "apple", "mango"])
    assert config.labels == ["zebra", "apple", "mango"]
    assert config.label2id == {"zebra": 0, "apple": 1, "mango": 2}
    assert config.label_set == "custom"
    assert "apple, mango, and zebra" in config.categorical_prompt  # listed alphabetically, as the paper does


@pytest.mark.parametrize("bad", ["nope", ["only-one"], ["a", "a"]])
def test_bad_label_sets_are_rejected(bad):
    with pytest.raises(ValueError):
        resolve_label_set(bad)


@pytest.mark.parametrize("field,value", [("gate_type", "attention"), ("gate_vlm_signal", "logits"), ("pooling", "cls"),
                                         ("gate_head_signal", "softmax"), ("gate_num_experts", 0)])
def test_unknown_options_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        EmoVLMKDConfig.from_label_set("binary", **{field: value})


def test_config_round_trip_keeps_sub_config_and_labels(tmp_path):
    config = EmoVLMKDConfig.from_label_set("emotion6", head_hidden_dims=[256, 128], gate_type="moe")
    config.save_pretrained(tmp_path)
    loaded = EmoVLMKDConfig.from_pretrained(tmp_path)
    assert loaded.labels == config.labels
    assert loaded.head_hidden_dims == [256, 128]
    assert loaded.gate_type == "moe"
    assert loaded.vlm_config.model_type == "qwen2_vl"
    assert loaded.feature_dim == config.vlm_config.text_config.hidden_size


def test_gate_defaults_follow_the_paper_and_the_released_moe():
    config = EmoVLMKDConfig.from_label_set("binary")
    assert config.gate_head_signal == "probs"  # the paper: the head's probabilities
    assert config.gate_num_experts == 3  # the authors' MoEGate


def test_gate_head_signal_round_trips(tmp_path):
    EmoVLMKDConfig.from_label_set("binary", gate_head_signal="logits").save_pretrained(tmp_path)
    assert EmoVLMKDConfig.from_pretrained(tmp_path).gate_head_signal == "logits"
