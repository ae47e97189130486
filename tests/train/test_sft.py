import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.infra.assemble import load_processor
from train.stages.instructions import build_instruction_dataset
from train.stages.sft import SFTStageConfig, build_sft_trainer, train_sft

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


# ---- stage 1 trains on the prompts the fused model scores ----------------------------------------------------------

CUSTOM_PROMPTS = {
    "categorical_prompt": "Which of amusement, awe, fear or sadness fits this picture? Reply as {'emotion': '<label>'}.",
    "conversation_prompt": "List what you see in the picture.",
}


def write_image_folder(root):
    rng = np.random.default_rng(1)
    for split, n in {"train": 2, "validation": 1, "test": 1}.items():
        for label in LABELS:
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


def test_stage1_trains_on_the_recipes_prompts_and_the_assembled_model_scores_the_same_tokens(tiny_base, tmp_path,
                                                                                            monkeypatch):
    import train.stages.sft as sft
    from train.infra.assemble import assemble
    from train.stages.instructions import AnswerCache, image_key
    from train.stages.pipeline import Pipeline

    seen = {}
    build = sft.build_sft_trainer

    def recording_build(train_dataset, processor, args, **kwargs):  # the real trainer; the test keeps its rows
        seen["rows"], seen["trainer"] = train_dataset, build(train_dataset, processor, args, **kwargs)
        return seen["trainer"]

    monkeypatch.setattr(sft, "build_sft_trainer", recording_build)
    recipe = {
        "output_dir": str(tmp_path / "run"), "seed": 3, "labels": LABELS,
        "data": {"kind": "imagefolder", "root": str(write_image_folder(tmp_path / "images"))},
        "base_models": {"vlm": str(tiny_base["vlm"])},
        "model": dict(CUSTOM_PROMPTS),
        "sft": {"use_peft": False, "gradient_checkpointing": False, "instruction_kinds": ["categorical", "conversation"],
                "max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", "disable_tqdm": True},
    }
    pipeline = Pipeline(recipe)
    cache = AnswerCache(pipeline.output_dir / "answers.jsonl")  # conversation answers written earlier
    for row in pipeline.data["train"]:
        cache.append({"key": image_key(row["image"]), "kind": "conversation", "label": LABELS[row["label"]],
                      "answer": "Soft light on a quiet street.", "generator": "test"})
    pipeline.run_stage("sft")

    rows, trainer = seen["rows"], seen["trainer"]
    prompts = {kind: {m[0]["content"][1]["text"] for m, k in zip(rows["messages"], rows["kind"]) if k == kind}
               for kind in ("categorical", "conversation")}
    assert prompts == {"categorical": {CUSTOM_PROMPTS["categorical_prompt"]},
                       "conversation": {CUSTOM_PROMPTS["conversation_prompt"]}}

    model, processor = assemble(pipeline.stage_dir("sft") / "merged", LABELS, **pipeline.recipe.model_kwargs())
    scored = model.config.prompt_token_ids
    assert scored == processor.prompt_token_ids()
    assert model.config.categorical_prompt == CUSTOM_PROMPTS["categorical_prompt"]
    assert model.config.conversation_prompt == CUSTOM_PROMPTS["conversation_prompt"]
    categorical = [i for i, kind in enumerate(rows["kind"]) if kind == "categorical"]
    batch = trainer.data_collator([rows[i] for i in categorical])
    image_token = processor.image_token_id
    for input_ids, supervised, mask, i in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                             categorical):
        tokens = input_ids[mask.bool()].tolist()
        prompt = scored["before_image"] + [image_token] * tokens.count(image_token) + scored["after_image"]
        label_tokens = scored["label_continuations"][rows["label"][i]]
        # The training text up to the end of the answer is token for token what the fused model scores.
        assert tokens[: len(prompt) + len(label_tokens)] == prompt + label_tokens
        first_supervised = int((supervised[mask.bool()] != -100).nonzero()[0])
        assert 0 < first_supervised < len(prompt)


def test_every_prompt_is_a_recipe_model_option_that_reruns_stage1_and_reaches_the_config():
    from modeling_emovlm_kd.configuration_emovlm_kd import PROMPT_KEYS
    from train.infra.provenance import stage_settings
    from train.infra.recipe import ModelSection

    assert ModelSection.PROMPT_KEYS == PROMPT_KEYS and set(PROMPT_KEYS) <= set(ModelSection.CONFIG_KEYS)
    recipe = {"labels": LABELS, "model": {key: f"{key} text" for key in PROMPT_KEYS}}
    assert {f"model.{key}" for key in PROMPT_KEYS} <= set(stage_settings(recipe, "sft"))
    assert "model.categorical_prompt" in stage_settings(recipe, "features")  # the caches score after it
    assert ModelSection().processor_kwargs(recipe["model"]) == recipe["model"]


# ---- validation during stage 1: the scored label's accuracy at each evaluation -------------------------------------


@pytest.fixture(scope="module")
def with_validation(dataset_dict):
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(8)]
    features = dataset_dict["train"].features
    validation = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 3, 2, 1, 0]}, features=features)
    return datasets.DatasetDict({"train": dataset_dict["train"], "validation": validation})


def evaluations(log_history):
    return [entry for entry in log_history if "eval_loss" in entry]


def accuracy_of_saved_model(folder, dataset):
    """argmax(score_labels) == label, with the model as `assemble` loads it from a saved folder."""
    from train.infra.assemble import assemble

    model, processor = assemble(folder, LABELS)
    inputs = processor.image_processor(list(dataset["image"]), return_tensors="pt")
    with torch.no_grad():
        scores = model.score_labels(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]),
                                    inputs["image_grid_thw"])
    return float((scores.argmax(-1) == torch.tensor(list(dataset["label"]))).float().mean())


def test_stage1_logs_the_scored_label_accuracy_of_the_training_model_at_each_evaluation(tiny_base, with_validation,
                                                                                       tmp_path):
    args = sft_args(tmp_path, model_name_or_path=str(tiny_base["vlm"]), use_peft=False, learning_rate=5e-2,
                    instruction_kinds=["categorical"], eval_strategy="steps", eval_steps=1, eval_max_images=3,
                    per_device_eval_batch_size=2, save_strategy="steps", save_steps=1, save_total_limit=None)
    train_sft(with_validation, LABELS, args)
    history = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    evals = evaluations(history)
    assert [entry["step"] for entry in evals] == [1, 2]
    # The seeded subset: eval_max_images images, the same at each evaluation.
    subset = with_validation["validation"].shuffle(seed=args.seed).select(range(3))
    for entry in evals:
        assert entry["eval_label_images"] == 3
        # Each evaluation scores the model as it was at that step: the checkpoint saved right after it.
        expected = accuracy_of_saved_model(tmp_path / f"checkpoint-{entry['step']}", subset)
        assert entry["eval_label_accuracy"] == pytest.approx(expected)


def full_sequence_scores(model, processor, images):
    """Each label's log-likelihood by plain causal forwards of `prompt + label continuation` (one per label), not
    through the fused model's one-pass tree-masked scoring."""
    ids = processor.prompt_token_ids()
    scores = []
    for image in images:
        inputs = processor.image_processor([image], return_tensors="pt")
        n_image = int(inputs["image_grid_thw"].prod()) // 4  # spatial merge 2x2
        prompt = ids["before_image"] + [processor.image_token_id] * n_image + ids["after_image"]
        row = []
        for continuation in ids["label_continuations"]:
            input_ids = torch.tensor([prompt + continuation])
            with torch.no_grad():
                logits = model(input_ids=input_ids, pixel_values=inputs["pixel_values"],
                               image_grid_thw=inputs["image_grid_thw"],
                               mm_token_type_ids=(input_ids == processor.image_token_id).int(),
                               use_cache=False).logits[0].float()
            log_probs = logits[len(prompt) - 1 : -1].log_softmax(-1)
            row.append(float(log_probs[torch.arange(len(continuation)), torch.tensor(continuation)].sum()))
        scores.append(row)
    return torch.tensor(scores)


def test_qlora_stage1_scores_labels_with_its_adapters_active_on_the_whole_validation_split(tiny_base, with_validation,
                                                                                          tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import train.stages.sft as sft

    seen = {}
    build = sft.build_sft_trainer

    def recording_build(*args, **kwargs):  # the real trainer; the test keeps it to score its model afterwards
        seen["trainer"] = build(*args, **kwargs)
        return seen["trainer"]

    monkeypatch.setattr(sft, "build_sft_trainer", recording_build)
    args = sft_args(tmp_path, model_name_or_path=str(tiny_base["vlm"]), use_peft=True, load_in_4bit=True,
                    instruction_kinds=["categorical"], learning_rate=5e-2, eval_strategy="steps", eval_steps=2)
    train_sft(with_validation, LABELS, args)
    trainer = seen["trainer"]
    (last,) = evaluations(trainer.state.log_history)
    assert last["step"] == 2 and last["eval_label_images"] == 8  # no eval_max_images: every validation image
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the adapters did not train"
    validation = with_validation["validation"]
    trainer.model.eval()
    scores = full_sequence_scores(trainer.model, trainer.processing_class, list(validation["image"]))
    expected = float((scores.argmax(-1) == torch.tensor(list(validation["label"]))).float().mean())
    assert last["eval_label_accuracy"] == pytest.approx(expected)


def test_evaluation_needs_a_validation_split_and_eval_max_images_an_evaluation(tiny_base, dataset_dict, tmp_path):
    args = sft_args(tmp_path, model_name_or_path=str(tiny_base["vlm"]), use_peft=False,
                    instruction_kinds=["categorical"], eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match="'validation' split"):
        train_sft(dataset_dict, LABELS, args)
    with pytest.raises(ValueError, match="eval_max_images is set but eval_strategy is 'no'"):
        sft_args(tmp_path, eval_max_images=4)


@pytest.mark.parametrize("value, message", [(0, r"sft\.eval_max_images: must be an integer >= 1, got 0"),
                                            ("many", r"sft\.eval_max_images: expected int")])
def test_a_bad_eval_max_images_in_the_recipe_fails_naming_the_key(tmp_path, value, message):
    from train.infra.recipe import RecipeError, validate_recipe

    recipe = {"output_dir": str(tmp_path / "run"), "labels": LABELS, "data": {"kind": "imagefolder", "root": "x"},
              "sft": {"eval_strategy": "steps", "eval_steps": 10, "eval_max_images": value}}
    with pytest.raises(RecipeError, match=message) as raised:
        validate_recipe(recipe, where="my-recipe.yaml")
    assert "my-recipe.yaml" in str(raised.value) and "sft" in str(raised.value)


def test_label_accuracy_refuses_sharded_parameters(tiny_base, with_validation, tmp_path, monkeypatch):
    import train.stages.sft as sft

    monkeypatch.setattr(sft, "is_deepspeed_zero3_enabled", lambda: True)  # as under a ZeRO-3 launch
    processor = load_processor(tiny_base["vlm"], LABELS)
    instructions = build_instruction_dataset(with_validation["validation"], processor, kinds=["categorical"])
    args = sft_args(tmp_path, model_name_or_path=str(tiny_base["vlm"]), use_peft=False, eval_strategy="epoch")
    with pytest.raises(ValueError, match="FSDP or DeepSpeed ZeRO-3"):
        build_sft_trainer(instructions, processor, args, eval_dataset=instructions,
                          label_eval_dataset=with_validation["validation"])
