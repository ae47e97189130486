"""The model card says what dtype the exported weights are stored in, read from the weights themselves: a bf16 export
(the 7B recipes' `model.dtype: bfloat16`) is not "stored float32"."""

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

from train.commands.card import HubFolder, build_card, stored_dtype
from train.infra.assemble import assemble, save_hub_folder


def _export(tiny_base, folder, dtype):
    torch.manual_seed(0)
    model, processor = assemble(tiny_base["vlm"], "mikels8", head_hidden_dims=[64], dtype=dtype)
    return save_hub_folder(model, processor, folder)


def _bf16_paragraph(folder) -> str:
    text = ModelCard(str(build_card(HubFolder.load(folder), "custom", "emo-org/dtype"))).text
    before, _ = text.split("\n\n```python\nimport torch\nfrom transformers import pipeline\n", 1)
    return " ".join(before.rsplit("\n\n", 1)[1].split())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_card_names_the_stored_dtype(tiny_base, tmp_path, dtype):
    folder = _export(tiny_base, tmp_path / "final", dtype)
    assert stored_dtype(folder) == dtype
    paragraph = _bf16_paragraph(folder)
    if dtype == "float32":
        assert paragraph.startswith("In bfloat16 (half the memory of the stored float32 weights")
    else:
        assert "stored float32" not in paragraph
        assert paragraph.startswith("The VLM's weights are stored in bfloat16 (the distillation head and the gate in "
                                    "float32), and `from_pretrained` loads them so by default")


def test_a_bf16_export_loads_in_bf16_by_default(tiny_base, tmp_path):
    """What the bf16 card says: without `dtype`, `from_pretrained` keeps the stored bf16 (head and gate float32)."""
    model = AutoModelForImageClassification.from_pretrained(_export(tiny_base, tmp_path / "final", "bfloat16"),
                                                            trust_remote_code=True)
    assert model.vlm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in (*model.distillation_head.parameters(), *model.gate.parameters())} == {torch.float32}


def test_a_folder_without_weights_has_no_stored_dtype(tmp_path):
    assert stored_dtype(tmp_path) is None


def test_a_card_without_recorded_base_models_names_the_recipe_defaults(tiny_base, tmp_path):
    """The card's `base_model` falls back to the recipe's own defaults (one place: train/configs/sections.py), not to
    a second copy of the model ids."""
    from train.configs.base_models import DEFAULT_TEACHER, DEFAULT_VLM

    card = ModelCard(str(build_card(HubFolder.load(_export(tiny_base, tmp_path / "final", "float32")), "custom",
                                    "emo-org/defaults")))
    assert card.data.base_model == DEFAULT_VLM == "Qwen/Qwen2-VL-7B-Instruct"
    assert f"`{DEFAULT_TEACHER}`" in card.text or f"[{DEFAULT_TEACHER}]" in card.text
