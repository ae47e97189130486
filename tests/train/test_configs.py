"""The stage configs (`train/configs/`): apart from the trainers, LoRA through TRL's `ModelConfig` with the
backbone's scope, and the recipe's keys typed by `HfArgumentParser`'s own field types."""

import pytest
from peft import LoraConfig

from modeling_emovlm_kd.backbones import get_backbone
from train.configs.sft_config import SFTStageConfig
from train.infra.recipe import RecipeError, load_recipe

DEMO = "train/recipes/tiny/demo.yaml"


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj"], ["q_proj"], ["q_proj", "o_proj"]])
def test_lora_through_trl_keeps_the_backbones_scope(tiny_base, tmp_path, targets):
    args = SFTStageConfig(output_dir=str(tmp_path), model_name_or_path=str(tiny_base["vlm"]), lora_r=4, lora_alpha=16,
                          lora_dropout=0.1, lora_target_modules=targets, use_cpu=True)
    model_config = args.model_config()
    assert (model_config.lora_r, model_config.lora_alpha, model_config.use_peft) == (4, 16, True)
    expected = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                          **get_backbone("qwen2_vl").lora_kwargs(targets))
    assert args.peft_config().to_dict() == expected.to_dict()
    assert args.peft_config().exclude_modules == get_backbone("qwen2_vl").lora_exclude_modules  # LLM only
    full = SFTStageConfig(output_dir=str(tmp_path), model_name_or_path=str(tiny_base["vlm"]), use_peft=False,
                          use_cpu=True)
    assert full.peft_config() is None


@pytest.mark.parametrize("override, typed", [
    ("sft.learning_rate=1e-3", ("sft", "learning_rate", 1e-3)),            # a YAML string, typed as a flag is
    ("sft.num_train_epochs=2", ("sft", "num_train_epochs", 2.0)),           # int -> the field's float
    ("sft.use_peft=yes", ("sft", "use_peft", True)),
    ("sft.report_to=wandb", ("sft", "report_to", "wandb")),                # the str member of `str | list[str]`
    ("sft.report_to=[wandb, tensorboard]", ("sft", "report_to", ["wandb", "tensorboard"])),
    ("sft.lr_scheduler_type=cosine", ("sft", "lr_scheduler_type", "cosine")),
    ("model.head_hidden_dims=[64, 32]", ("model", "head_hidden_dims", [64, 32])),
    ("model.max_pixels=null", ("model", "max_pixels", None)),
    ("data.fractions=[0.8, 0.1, 0.1]", ("data", "fractions", [0.8, 0.1, 0.1])),
])
def test_values_are_typed_by_the_parsers_field_types(override, typed, monkeypatch):
    from transformers.integrations import integration_utils

    # Trackers named by a recipe must be installed (checked at validation): this test is about typing only.
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
    section, key, value = typed
    recipe = load_recipe(DEMO, [override])
    assert recipe.as_set[section][key] == value and type(recipe.as_set[section][key]) is type(value)


@pytest.mark.parametrize("override, message", [
    ("model.head_hidden_dims=[64, wide]", r"model\.head_hidden_dims: expected an integer, got 'wide'"),
    ("model.gate_num_experts=2.5", r"model\.gate_num_experts: expected an integer, got 2\.5"),
    ("teacher.augment=[true]", r"teacher\.augment: expected true or false, got \[True\]"),
    ("model.pooling=null", r"model\.pooling: expected str, got null"),
])
def test_wrong_types_fail_in_one_line_naming_the_key(override, message):
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(DEMO, [override])
    assert "\n" not in str(error.value)
