"""`EmoVLMKDForImageClassification.explain`: the reasoning answer after the paper's reasoning prompt, next to the
fused label.

On the tiny random model the generated text is noise; what is tested is the code path: the generation starts after
exactly the tokens stage 1 trained the reasoning instruction on (the config's `reasoning_prompt` in the chat
template, the image's visual tokens expanded as the processor expands them), it stops within `max_new_tokens`, the
text is the decoded new tokens, and the label next to it is the model's fused label.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, AutoProcessor, pipeline

SIZES = [(28, 28), (56, 112), (90, 90)]  # different patch grids, so the batched prompts are padded


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    return model, processor


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def test_explain_generates_after_the_reasoning_prompt_bounded_and_keeps_the_label(loaded, monkeypatch):
    model, processor = loaded
    pictures = images()
    calls = []
    generate = model.vlm.generate

    def spy(**kwargs):
        sequences = generate(**kwargs)
        calls.append((kwargs, sequences))
        return sequences

    monkeypatch.setattr(model.vlm, "generate", spy)
    explained = model.explain(pictures, processor, max_new_tokens=7)
    ((kwargs, sequences),) = calls  # one batched generation for all images
    assert kwargs["max_new_tokens"] == 7 and sequences.shape[1] - kwargs["input_ids"].shape[1] <= 7

    # The prompt is the one stage 1 trained the reasoning instruction with: the chat template over the processor's
    # reasoning messages (the config's reasoning prompt), and the training text of any answer starts with it.
    prompt = processor.apply_chat_template(processor.reasoning_messages(), add_generation_prompt=True, tokenize=False)
    assert model.config.reasoning_prompt in prompt
    trained = processor.apply_chat_template(processor.reasoning_messages(None, "An answer."), tokenize=False)
    assert trained.startswith(prompt)
    mask = kwargs["attention_mask"].bool()
    for i, picture in enumerate(pictures):
        expected = processor(text=[prompt], images=[picture], return_tensors="pt")["input_ids"][0]
        assert kwargs["input_ids"][i][mask[i]].tolist() == expected.tolist()

    with torch.no_grad():
        output = model(**processor.image_processor(pictures, return_tensors="pt"))
    probabilities = output.logits.softmax(-1)
    stop = {processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.tokenizer.eos_token_id}
    for i, result in enumerate(explained):
        assert result["label"] == model.config.id2label[int(probabilities[i].argmax())]  # the label is unchanged
        assert result["score"] == pytest.approx(float(probabilities[i].max()), abs=1e-5)
        new = sequences[i, kwargs["input_ids"].shape[1]:].tolist()
        ends = [k for k, token in enumerate(new) if token in stop]
        kept = new[: ends[0]] if ends else new
        assert 1 <= result["generated_tokens"] <= 7
        assert result["generated_tokens"] == (ends[0] + 1 if ends else len(new))
        assert result["truncated"] == (not ends)
        assert result["explanation"] == processor.tokenizer.decode(kept, skip_special_tokens=True).strip()

    # One image at a time: the same text (greedy decoding; the batch's left padding is masked).
    alone = model.explain(pictures[1], processor, max_new_tokens=7)
    assert alone[0]["explanation"] == explained[1]["explanation"] and alone[0]["label"] == explained[1]["label"]


def test_explain_refuses_an_unbounded_request_and_a_foreign_prompt(loaded, tiny_checkpoint):
    model, processor = loaded
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.explain(images()[0], processor, max_new_tokens=0)
    other = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    other.reasoning_prompt = "Describe the image."
    with pytest.raises(ValueError, match="reasoning_prompt"):
        model.explain(images()[0], other, max_new_tokens=4)


def test_the_front_door_explains_on_request_and_only_then(tiny_checkpoint, loaded):
    model, processor = loaded
    classifier = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True)
    pictures = images(seed=3)
    plain = classifier(pictures, batch_size=3, top_k=2)
    explained = classifier(pictures, batch_size=3, top_k=2, explain=True, max_new_tokens=5)
    direct = model.explain(pictures, processor, max_new_tokens=5)
    for a, b, want in zip(plain, explained, direct):
        assert "explanation" not in a[0]
        assert [e["label"] for e in a] == [e["label"] for e in b]  # explaining changes no label or score
        assert b[0]["explanation"] == want["explanation"] and b[0]["label"] == want["label"]
    (bad,) = classifier(b"not an image", explain=True, max_new_tokens=5)
    assert bad["label"] is None and "error" in bad


def test_the_front_door_classifies_once_when_it_explains(tiny_checkpoint):
    """The pipeline has already classified the batch: explaining adds the generation only, not a second forward."""
    classifier = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True)
    forwards = []
    classifier.model.register_forward_hook(lambda module, args, output: forwards.append(1))
    classifier(images(seed=4), batch_size=3, explain=True, max_new_tokens=3)
    assert len(forwards) == 1
