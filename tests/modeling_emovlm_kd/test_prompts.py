# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""The three instructions of EmoVLM-KD: the paper's wording as defaults, one source (the config), saved and loaded."""

import json
import random

import pytest
from transformers import AutoConfig, AutoTokenizer

from modeling_emovlm_kd import LABEL_SETS, EmoVLMKDConfig, EmoVLMKDImageProcessor, EmoVLMKDProcessor

MIKELS8_PROMPT = (
    "Observe the image and select the emotion category that best matches this image from the following 8 "
    "categories: amusement, anger, awe, contentment, disgust, excitement, fear, and sadness. Answer in dictionary "
    "form as follows: {'emotion':'amusement'}"
)
EKMAN6_PROMPT = (
    "Observe the image and select the emotion category that best matches this image from the following 6 "
    "categories: anger, disgust, fear, joy, sadness, and surprise. Answer in dictionary form as follows: "
    "{'emotion':'anger'}"
)
BINARY_PROMPT = (
    "Observe the image and select the emotion category that best matches this image from the following 2 "
    "categories: negative and positive. Answer in dictionary form as follows: {'emotion':'negative'}"
)
CONVERSATION = "Observe the image and describe key elements of the image."
REASONING = "Observe the image and describe the process of inferring the emotions conveyed in the image."
CUSTOM = {
    "categorical_prompt": "Pick one feeling of amusement, awe, fear, sadness. Reply {'emotion': '<feeling>'}.",
    "conversation_prompt": "List what you see.",
    "reasoning_prompt": "Explain, step by step, why the picture feels the way it does.",
}


@pytest.mark.parametrize("label_set,expected", [("mikels8", MIKELS8_PROMPT), ("emoset", MIKELS8_PROMPT),
                                                ("ekman6", EKMAN6_PROMPT), ("binary", BINARY_PROMPT)])
def test_default_prompts_are_the_papers_for_each_label_set(label_set, expected):
    config = EmoVLMKDConfig.from_label_set(label_set)
    assert config.categorical_prompt == expected
    assert config.conversation_prompt == CONVERSATION
    assert config.reasoning_prompt == REASONING


def test_class_list_is_alphabetical_whatever_the_class_index_order():
    shuffled = list(LABEL_SETS["mikels8"])
    random.Random(0).shuffle(shuffled)
    assert shuffled != LABEL_SETS["mikels8"]
    assert EmoVLMKDConfig.from_label_set(shuffled).categorical_prompt == MIKELS8_PROMPT


def test_custom_label_lists_get_the_same_wording():
    prompt = EmoVLMKDConfig.from_label_set(["zebra", "Apple", "mango"]).categorical_prompt
    assert prompt == (
        "Observe the image and select the emotion category that best matches this image from the following 3 "
        "categories: Apple, mango, and zebra. Answer in dictionary form as follows: {'emotion':'Apple'}"
    )


def test_answer_format_is_unchanged():
    config = EmoVLMKDConfig.from_label_set("mikels8")
    assert (config.answer_prefix, config.answer_suffix) == ("{'emotion': '", "'}")


def test_custom_prompts_are_saved_with_the_config(tmp_path):
    EmoVLMKDConfig.from_label_set("mikels8", **CUSTOM).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {key: saved[key] for key in CUSTOM} == CUSTOM
    loaded = EmoVLMKDConfig.from_pretrained(tmp_path)
    assert {key: getattr(loaded, key) for key in CUSTOM} == CUSTOM


def test_default_prompts_are_written_into_the_saved_config(tmp_path):
    EmoVLMKDConfig.from_label_set("binary").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["categorical_prompt"], saved["conversation_prompt"], saved["reasoning_prompt"]) == (
        BINARY_PROMPT, CONVERSATION, REASONING)


def test_a_config_saved_before_the_new_fields_keeps_its_categorical_prompt(tmp_path):
    EmoVLMKDConfig.from_label_set("mikels8").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["categorical_prompt"] = "Which emotion does this image evoke? Choose one of: awe, fear."
    del saved["conversation_prompt"], saved["reasoning_prompt"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = EmoVLMKDConfig.from_pretrained(tmp_path)
    assert loaded.categorical_prompt == "Which emotion does this image evoke? Choose one of: awe, fear."
    assert (loaded.conversation_prompt, loaded.reasoning_prompt) == (CONVERSATION, REASONING)


# ---- the processor reads its prompts from the config ---------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["vlm"])
    return EmoVLMKDImageProcessor.from_pretrained(tiny_base["vlm"]), tokenizer


def test_processor_speaks_the_configs_three_prompts(parts):
    config = EmoVLMKDConfig.from_label_set("mikels8", **CUSTOM)
    processor = EmoVLMKDProcessor.from_config(*parts, config)
    assert processor.categorical_messages(None, "awe")[0]["content"][1]["text"] == CUSTOM["categorical_prompt"]
    assert processor.conversation_messages(None, "x")[0]["content"][1]["text"] == CUSTOM["conversation_prompt"]
    assert processor.reasoning_messages(None, "y")[0]["content"][1]["text"] == CUSTOM["reasoning_prompt"]
    assert processor.categorical_messages(None, "awe")[1]["content"][0]["text"] == "{'emotion': 'awe'}"

    target = EmoVLMKDConfig.from_label_set("mikels8")
    processor.prepare_config(target)
    assert {key: getattr(target, key) for key in CUSTOM} == CUSTOM
    assert target.prompt_token_ids == processor.prompt_token_ids()


def test_processor_defaults_are_the_configs_defaults(parts):
    for label_set in ("mikels8", "ekman6", "binary"):
        labels = LABEL_SETS[label_set]
        processor = EmoVLMKDProcessor(*parts, chat_template=parts[1].chat_template, labels=labels)
        config = EmoVLMKDConfig.from_label_set(label_set)
        assert processor.categorical_prompt == config.categorical_prompt
        assert processor.conversation_prompt == config.conversation_prompt == CONVERSATION
        assert processor.reasoning_prompt == config.reasoning_prompt == REASONING
    assert processor.classification_prompt().endswith(BINARY_PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
                                                      "{'emotion': '")


def test_processor_round_trips_its_prompts(parts, tmp_path):
    processor = EmoVLMKDProcessor.from_config(*parts, EmoVLMKDConfig.from_label_set("ekman6", **CUSTOM))
    processor.save_pretrained(tmp_path)
    loaded = EmoVLMKDProcessor.from_pretrained(tmp_path)
    assert {key: getattr(loaded, key) for key in CUSTOM} == CUSTOM
    assert loaded.labels == LABEL_SETS["ekman6"]


def test_exported_checkpoint_config_holds_the_prompts_it_scores(tiny_checkpoint, parts):
    """Predict and the app load only the exported config (remote code): it carries every prompt, and its prompt
    token ids are those of its categorical prompt."""
    config = AutoConfig.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert (config.categorical_prompt, config.conversation_prompt, config.reasoning_prompt) == (
        MIKELS8_PROMPT, CONVERSATION, REASONING)
    assert config.prompt_token_ids == EmoVLMKDProcessor.from_config(*parts, config).prompt_token_ids()
