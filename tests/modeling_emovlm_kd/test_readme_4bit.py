"""The README's 4-bit snippet ("Use a trained model"), run as written on the tiny checkpoint on CPU, with the model id
and revision replaced by the checkpoint's folder: it loads through the checkpoint's own `loading_emovlm_kd.py` and
keeps `lm_head`, the visual merger, the head and the gate out of 4 bits; a plain `BitsAndBytesConfig` does not keep
the merger."""

import re
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, BitsAndBytesConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (code,) = [block for block in blocks if "load_in_4bit=True" in block and "load_pipeline" in block]
    return code


def _four_bit(module) -> bool:
    return any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())


def test_the_readme_4bit_snippet_keeps_merger_head_gate_and_lm_head_in_full_precision(tiny_checkpoint, tmp_path,
                                                                                      monkeypatch):
    code = _snippet().replace('"org/emovlm-kd-emoset"', repr(str(tiny_checkpoint))).replace('"<commit sha>"', "None")
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save("photo.jpg")
    namespace = {}
    exec(compile(code, "README.md (4-bit snippet)", "exec"), namespace)  # noqa: S102 - the README's own code
    model = namespace["model"]
    assert _four_bit(model.vlm.model.language_model)
    assert not _four_bit(model.vlm.model.visual.merger) and not isinstance(model.vlm.lm_head, bnb.nn.Linear4bit)
    for module in (model.distillation_head, model.gate):
        assert not _four_bit(module) and {p.dtype for p in module.parameters()} == {torch.float32}
    answer = namespace["classifier"]("photo.jpg", top_k=3)
    assert [entry["label"] for entry in answer] and len(answer) == 3
    assert {entry["label"] for entry in answer} <= set(model.config.id2label.values())


def test_a_plain_4bit_config_quantises_the_merger(tiny_checkpoint):
    """Why the README does not show `BitsAndBytesConfig(load_in_4bit=True)` alone."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForImageClassification.from_pretrained(tiny_checkpoint, trust_remote_code=True,
                                                            quantization_config=config, device_map="cpu")
    assert _four_bit(model.vlm.model.visual.merger)
