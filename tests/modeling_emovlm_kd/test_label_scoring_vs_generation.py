"""The scored VLM label equals the label parsed from greedy `generate()` on a model trained to answer."""

import numpy as np
import pytest
import torch
from PIL import Image

from train.infra.assemble import assemble

# Four labels, two of which share their leading token, so the test covers multi-token scoring paths too.
LABELS = ["awe", "awe-struck", "fear", "sadness"]
COLOURS = [(230, 40, 40), (40, 200, 40), (40, 40, 230), (220, 220, 30)]


def coloured(colour, seed):
    rng = np.random.default_rng(seed)
    noise = rng.integers(-25, 26, (56, 56, 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def train_to_answer(model, processor, steps=80):
    """Full fine-tuning of the tiny VLM on categorical answers (colour -> label), loss on the answer only."""
    images = [coloured(c, seed) for seed in range(3) for c in COLOURS]
    labels = [label for _ in range(3) for label in LABELS]
    texts = [
        processor.apply_chat_template(processor.categorical_messages(None, label), tokenize=False) for label in labels
    ]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    prompt_len = len(processor(text=[processor.classification_prompt()], images=images[:1])["input_ids"][0])
    prompt_len -= len(processor.tokenizer(processor.answer_prefix)["input_ids"])
    targets = batch["input_ids"].clone()
    targets[:, :prompt_len] = -100  # all images have the same size, so prompts align
    targets[batch["attention_mask"] == 0] = -100
    vlm = model.vlm.train()
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = vlm(**batch, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    vlm.eval()
    return loss.item()


@pytest.mark.slow
def test_scored_label_equals_greedy_generation_when_parse_is_valid(tiny_base):
    torch.manual_seed(0)
    model, processor = assemble(tiny_base["vlm"], LABELS, head_hidden_dims=[32])
    assert train_to_answer(model, processor) < 0.05
    model.eval()
    images = [coloured(c, seed) for seed in (10, 11) for c in COLOURS] + [
        Image.fromarray(np.random.default_rng(s).integers(0, 256, (56, 56, 3), dtype=np.uint8)) for s in range(4)
    ]
    prompt = processor.apply_chat_template(processor.categorical_messages(), add_generation_prompt=True, tokenize=False)
    valid = 0
    with torch.no_grad():
        scored = model(**processor.image_processor(images, return_tensors="pt")).vlm_logits.argmax(-1)
        for image, label_id in zip(images, scored.tolist()):
            inputs = processor(text=[prompt], images=[image], return_tensors="pt")
            generated = model.vlm.generate(**inputs, do_sample=False, max_new_tokens=16)
            answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            parsed = processor.parse_answer(answer)
            if parsed is not None:
                valid += 1
                assert parsed == LABELS[label_id], answer
    assert valid >= 8  # at least every training colour parses, so the comparison is not vacuous
