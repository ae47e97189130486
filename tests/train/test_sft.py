import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.assemble import load_processor
from train.instructions import build_instruction_dataset
from train.sft import SFTStageConfig, build_sft_trainer, train_sft

LABELS = ["amusement", "awe", "fear", "sadness"]


@pytest.fixture(scope="module")
def dataset_dict():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(8)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    train = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3] * 2}, features=features)
    return datasets.DatasetDict({"train": train})


def sft_args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                    save_strategy="no", disable_tqdm=True, gradient_checkpointing=False)
    return SFTStageConfig(**{**defaults, **kwargs})


def test_defaults_follow_the_paper(tmp_path):
    args = SFTStageConfig(output_dir=str(tmp_path))
    assert args.model_name_or_path == "Qwen/Qwen2-VL-7B-Instruct"
    assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (8, 8, 0.05)
    assert args.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert args.learning_rate == 1e-4 and args.assistant_only_loss
    assert args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    with pytest.raises(ValueError, match="use_peft"):
        SFTStageConfig(output_dir=str(tmp_path), use_peft=False, load_in_4bit=True)


def test_loss_covers_only_the_assistant_answer(tiny_base, dataset_dict, tmp_path):
    processor = load_processor(tiny_base["vlm"], LABELS)
    instructions = build_instruction_dataset(dataset_dict["train"], processor, kinds=["categorical"])
    trainer = build_sft_trainer(instructions, processor,
                                sft_args(tmp_path, model_name_or_path=str(tiny_base["vlm"]), use_peft=False))
    batch = trainer.data_collator([instructions[i] for i in range(2)])
    for row, label in zip(batch["labels"], ["amusement", "awe"]):
        supervised = processor.tokenizer.decode(row[row != -100])
        assert supervised.strip() == f"{{'emotion': '{label}'}}<|im_end|>"


def test_qlora_on_cpu_trains_lora_on_the_language_model_and_saves_adapter_and_merged(tiny_base, dataset_dict,
                                                                                    tmp_path):
    pytest.importorskip("bitsandbytes")
    args = sft_args(tmp_path, model_name_or_path=str(tiny_base["vlm"]), use_peft=True, load_in_4bit=True,
                    instruction_kinds=["categorical"], learning_rate=1e-2)
    merged = train_sft(dataset_dict, LABELS, args)
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 8, 0.05)
    lora = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert lora and all("language_model" in key for key in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "LoRA B stayed zero: no training"
    base, tuned = load_file(tiny_base["vlm"] / "model.safetensors"), load_file(merged / "model.safetensors")
    q = next(k for k in base if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.allclose(base[q], tuned[q])
    vision = [k for k in base if k.startswith("visual.")]
    assert vision and all(torch.equal(base[k], tuned[k]) for k in vision)
    assert (merged / "tokenizer_config.json").exists()


def test_full_fine_tuning_also_trains_the_vision_tower(tiny_base, dataset_dict, tmp_path):
    args = sft_args(tmp_path, model_name_or_path=str(tiny_base["vlm"]), use_peft=False,
                    instruction_kinds=["categorical"], learning_rate=1e-3)
    merged = train_sft(dataset_dict, LABELS, args)
    base, tuned = load_file(tiny_base["vlm"] / "model.safetensors"), load_file(merged / "model.safetensors")
    patch = next(k for k in base if "patch_embed" in k)
    assert not torch.equal(base[patch], tuned[patch])
