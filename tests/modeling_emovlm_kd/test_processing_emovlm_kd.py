import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_emovlm_kd import EmoVLMKDForImageClassification, EmoVLMKDProcessor
from modeling_emovlm_kd.configuration_emovlm_kd import DEFAULT_CONVERSATION_PROMPT, DEFAULT_REASONING_PROMPT


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return EmoVLMKDProcessor.from_pretrained(tiny_checkpoint)


def test_processor_round_trips_through_auto_processor_remote_code(tiny_checkpoint, processor):
    loaded = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert type(loaded).__name__ == "EmoVLMKDProcessor"
    assert loaded.labels == processor.labels
    assert loaded.classification_prompt() == processor.classification_prompt()


def test_three_instruction_formats(processor):
    image = Image.new("RGB", (32, 32))
    categorical = processor.categorical_messages(image, "awe")
    assert categorical[0]["content"][0] == {"type": "image", "image": image}
    prompt = categorical[0]["content"][1]["text"]
    assert all(label in prompt for label in processor.labels)
    assert categorical[1]["content"][0]["text"] == "{'emotion': 'awe'}"
    assert processor.conversation_messages(image, "A calm lake.")[0]["content"][1]["text"] == DEFAULT_CONVERSATION_PROMPT
    assert processor.reasoning_messages(image, "Because...")[1]["content"][0]["text"] == "Because..."
    assert "inferring the emotion" in DEFAULT_REASONING_PROMPT and "key elements" in DEFAULT_CONVERSATION_PROMPT
    with pytest.raises(ValueError, match="joy"):
        processor.categorical_messages(image, "joy")


@pytest.mark.parametrize(
    "text,label",
    [
        ("{'emotion': 'awe'}", "awe"),
        ("  {'emotion': 'sadness'}<|im_end|>", "sadness"),
        ('{"emotion": "fear"}', "fear"),
        ("{'emotion': 'joy'}", None),  # not in the Mikels set
        ("{'emotion': 'aw", None),
        ("awe", None),
        ("{'feeling': 'awe'}", None),
    ],
)
def test_parse_answer(processor, text, label):
    assert processor.parse_answer(text) == label


def test_prompt_ids_match_the_chat_template_tokenization(processor):
    ids = processor.prompt_token_ids()
    for label, cont in zip(processor.labels, ids["label_continuations"]):
        text = processor.classification_prompt() + label + processor.answer_suffix
        full = processor(text=[text], images=[Image.new("RGB", (56, 56))], return_tensors="pt")["input_ids"][0]
        image_tokens = int((full == processor.image_token_id).sum())
        expected = ids["before_image"] + [processor.image_token_id] * image_tokens + ids["after_image"] + cont
        assert full.tolist() == expected


def _image_variants(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    sixteen = Image.fromarray((np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16))
    gif = tmp_path / "anim.gif"
    base.save(gif, save_all=True, append_images=[base.rotate(90)], duration=100)
    png_path = tmp_path / "img.png"
    base.save(png_path)
    return {
        "rgb": base,
        "grayscale": base.convert("L"),
        "rgba": base.convert("RGBA"),
        "cmyk": base.convert("CMYK"),
        "palette": base.convert("P"),
        "16-bit": sixteen,
        "animated-gif": Image.open(gif),
        "numpy-uint8": rgb,
        "numpy-gray": rgb[..., 0],
        "numpy-uint16": rgb.astype(np.uint16) * 257,
        "path": str(png_path),
    }


@torch.no_grad()
def test_every_input_kind_classifies(tiny_checkpoint, processor, tmp_path):
    model = EmoVLMKDForImageClassification.from_pretrained(tiny_checkpoint).eval()
    variants = _image_variants(tmp_path)
    batch = processor.image_processor(list(variants.values()), return_tensors="pt")
    out = model(**batch)
    assert out.logits.shape == (len(variants), 8) and torch.isfinite(out.logits).all()
    # 16-bit data is rescaled, not clipped to white.
    sixteen = processor.image_processor(variants["16-bit"], return_tensors="pt")["pixel_values"]
    assert sixteen.std() > 0.1
    # An 8-bit array and its 16-bit version give the same pixels.
    a = processor.image_processor(variants["numpy-uint8"], return_tensors="pt")["pixel_values"]
    b = processor.image_processor(variants["numpy-uint16"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(a, b)


def test_unreadable_files_are_named_in_the_error(processor, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (text, empty):
        with pytest.raises(ValueError, match=bad.name):
            processor.image_processor(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        processor.image_processor(str(tmp_path / "missing.jpg"))
    with pytest.raises(TypeError, match="int"):
        processor.image_processor(42)
