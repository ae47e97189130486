"""Stage 1's throughput knobs (issue 23): each is a recipe value that reaches the trainer, leaves the loss of the
first steps unchanged where it should (attention kernels: within fp32 rounding; DataLoader workers and pinned memory:
identical), changes only the batch composition where it must (length grouping: the same examples every epoch), and is
refused with one line where it cannot work (padding-free batching for images, which TRL refuses; Liger kernels and
flash-attention without CUDA and their package).

The losses are compared after plain SGD steps: a rounding difference in a gradient then moves the weights by
`lr` times that difference. (Adam divides by the gradient's running scale, so a parameter whose gradient is zero up
to rounding takes a full step in a rounding-dependent direction: no bound from the arithmetic.)
"""

import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import is_flash_attn_2_available, is_liger_kernel_available
from trl import SFTConfig, SFTTrainer

from train.infra.assemble import load_processor
from train.infra.provenance import stage_settings
from train.stages.instructions import build_instruction_dataset
from train.stages.sft import SFTStageConfig, add_length_column, build_sft_trainer, masked_attention

LABELS = ["amusement", "awe", "fear", "sadness"]
# Image sizes (width, height) whose visual token counts differ under the tiny processor's 56x56..112x112 bounds.
SIZES = [(56, 56), (112, 112), (56, 112), (112, 56), (84, 84), (112, 84), (56, 84), (84, 112)]
FP32_RELATIVE = 1e-5  # fp32 rounding (2**-23 ~ 1.2e-7 per operation) summed over the tiny model's reordered reductions
BF16_RELATIVE = 2e-2  # bf16's 8-bit mantissa (2**-8 ~ 4e-3 per operation), a few operations deep


class VaryingAnswers:
    """Conversation and reasoning answers of different lengths (3 to 27 words), fixed by the image and kind, as a
    real generator's would differ: the rows' token counts then vary, which length grouping works on."""

    WORDS = ["the", "colours", "and", "light", "suggest", "a", "calm", "scene", "with", "people"]

    def generate(self, image, kind, label):
        count = 3 + (image.width * 7 + image.height * 3 + len(kind)) % 25
        return " ".join(self.WORDS[i % len(self.WORDS)] for i in range(count)) + f". {label}"


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    return datasets.Dataset.from_dict({"image": pictures, "label": [0, 1, 2, 3] * 2}, features=features)


@pytest.fixture(scope="module")
def processor(tiny_base):
    return load_processor(tiny_base["vlm"], LABELS)


@pytest.fixture(scope="module")
def instructions(images, processor, tmp_path_factory):
    """16 rows: each image's categorical and reasoning instruction, of varied lengths."""
    cache = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    return build_instruction_dataset(images, processor, kinds=["categorical", "reasoning"],
                                     generator=VaryingAnswers(), cache_path=cache, show_progress=False)


def stage1_args(tiny_base, tmp_path, **knobs):
    defaults = dict(output_dir=str(tmp_path), model_name_or_path=str(tiny_base["vlm"]), use_peft=False,
                    activation_checkpointing=False, max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                    save_strategy="no", disable_tqdm=True, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                    seed=0, bf16=False)  # float32 on every machine (SFTStageConfig picks bf16 on a GPU)
    return SFTStageConfig(**{**defaults, **knobs})


def first_losses(tiny_base, instructions, processor, tmp_path, **knobs):
    trainer = build_sft_trainer(instructions, processor, stage1_args(tiny_base, tmp_path, **knobs))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3
    return trainer, losses


# ---- attention kernels ----------------------------------------------------------------------------------------------


def test_eager_and_sdpa_attention_give_the_same_first_losses_within_fp32_rounding(tiny_base, instructions, processor,
                                                                                  tmp_path):
    sdpa, sdpa_losses = first_losses(tiny_base, instructions, processor, tmp_path / "sdpa", attn_implementation="sdpa")
    eager, eager_losses = first_losses(tiny_base, instructions, processor, tmp_path / "eager",
                                       attn_implementation="eager")
    assert sdpa.model.config._attn_implementation == "sdpa"
    assert eager.model.config._attn_implementation == "eager"
    assert eager.model.config.vision_config._attn_implementation == "eager"
    assert eager_losses == pytest.approx(sdpa_losses, rel=FP32_RELATIVE)
    assert eager_losses[-1] < eager_losses[0]  # the steps trained


def test_unset_attention_is_the_library_default_and_reaches_trls_model_config(tiny_base, tmp_path):
    unset = stage1_args(tiny_base, tmp_path)
    assert unset.attn_implementation is None and unset.model_config().attn_implementation is None
    chosen = stage1_args(tiny_base, tmp_path, attn_implementation="eager")
    assert chosen.model_config().attn_implementation == "eager"


@pytest.mark.parametrize("value, message", [
    ("bogus", r"^sft\.attn_implementation: 'bogus' is not one of eager, sdpa, flash_attention_2, flash_attention_3"),
])
def test_an_unknown_attention_implementation_is_refused_in_one_line(tiny_base, tmp_path, value, message):
    with pytest.raises(ValueError, match=message) as raised:
        stage1_args(tiny_base, tmp_path, attn_implementation=value)
    assert "\n" not in str(raised.value)


@pytest.mark.skipif(is_flash_attn_2_available(), reason="the refusal is for machines without CUDA or flash-attn")
def test_flash_attention_is_refused_in_one_line_without_cuda_and_flash_attn(tiny_base, tmp_path):
    with pytest.raises(ValueError, match=r"^sft\.attn_implementation: flash_attention_2 needs") as raised:
        stage1_args(tiny_base, tmp_path, attn_implementation="flash_attention_2", bf16=True, use_cpu=True)
    assert "\n" not in str(raised.value) and "flash-attn" in str(raised.value)


def test_the_recipe_and_trl_model_init_kwargs_cannot_disagree_on_attention(tiny_base, tmp_path):
    with pytest.raises(ValueError, match=r"sft\.attn_implementation is 'eager' but sft\.model_init_kwargs"):
        stage1_args(tiny_base, tmp_path, attn_implementation="eager",
                    model_init_kwargs={"attn_implementation": "sdpa"})


@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attention 2 needs a CUDA GPU and flash-attn")
def test_flash_attention_trains_in_bf16_close_to_sdpa_and_label_scoring_still_gets_its_mask(tiny_base, instructions,
                                                                                           processor, images,
                                                                                           tmp_path):
    _, sdpa_losses = first_losses(tiny_base, instructions, processor, tmp_path / "sdpa", bf16=True,
                                  attn_implementation="sdpa")
    flash, flash_losses = first_losses(tiny_base, instructions, processor, tmp_path / "flash", bf16=True,
                                       attn_implementation="flash_attention_2")
    assert flash_losses == pytest.approx(sdpa_losses, rel=BF16_RELATIVE)
    # Label scoring passes a 4D mask, which flash kernels cannot take: it scores with sdpa, then switches back.
    flash.label_eval_dataset = images
    metrics = flash.label_metrics()
    assert metrics["label_images"] == len(images)
    assert flash.accelerator.unwrap_model(flash.model).config._attn_implementation == "flash_attention_2"


class _Model:
    """What `masked_attention` touches of a model: its attention implementation and the switch."""

    def __init__(self, implementation):
        self.config = type("Config", (), {"_attn_implementation": implementation})()
        self.switches = []

    def set_attn_implementation(self, value):
        self.switches.append(value)
        self.config._attn_implementation = value


@pytest.mark.parametrize("implementation, switches", [("sdpa", []), ("eager", []),
                                                      ("flash_attention_2", ["sdpa", "flash_attention_2"])])
def test_label_scoring_runs_with_an_attention_that_takes_its_4d_mask_and_switches_back(implementation, switches):
    model = _Model(implementation)
    with pytest.raises(RuntimeError, match="scoring failed"), masked_attention(model):
        assert model.config._attn_implementation in ("eager", "sdpa")
        raise RuntimeError("scoring failed")
    assert model.switches == switches and model.config._attn_implementation == implementation


# ---- DataLoader workers and pinned memory ---------------------------------------------------------------------------


def test_dataloader_workers_give_identical_losses_and_reach_the_trainer(tiny_base, instructions, processor, tmp_path):
    _, main_process = first_losses(tiny_base, instructions, processor, tmp_path / "w0", dataloader_num_workers=0)
    workers, in_workers = first_losses(tiny_base, instructions, processor, tmp_path / "w2", dataloader_num_workers=2)
    assert workers.get_train_dataloader().num_workers == 2
    assert in_workers == main_process  # the same batches in the same order, collated elsewhere: bit for bit


@pytest.mark.skipif(torch.accelerator.is_available(), reason="pinned memory is turned off only without an accelerator")
def test_pinned_memory_is_turned_off_without_an_accelerator_so_the_dataloader_does_not_warn(tiny_base, instructions,
                                                                                           processor, tmp_path):
    args = stage1_args(tiny_base, tmp_path, dataloader_pin_memory=True)
    assert args.dataloader_pin_memory is False
    trainer = build_sft_trainer(instructions, processor, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(trainer.get_train_dataloader()))
    assert not [w for w in caught if "pin_memory" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_memory_on_cuda_gives_identical_losses(tiny_base, instructions, processor, tmp_path):
    pinned, with_pinning = first_losses(tiny_base, instructions, processor, tmp_path / "pin", dataloader_pin_memory=True)
    _, without = first_losses(tiny_base, instructions, processor, tmp_path / "nopin", dataloader_pin_memory=False)
    assert pinned.get_train_dataloader().pin_memory
    assert with_pinning == without


def test_dataloader_settings_change_no_result_but_the_batch_and_kernel_choices_do():
    recipe = {"sft": {"dataloader_num_workers": 4, "dataloader_pin_memory": True,
                      "dataloader_persistent_workers": True, "dataloader_multiprocessing_context": "spawn",
                      "include_num_input_tokens_seen": "non_padding", "attn_implementation": "eager",
                      "train_sampling_strategy": "group_by_length", "use_liger_kernel": True, "padding_free": False}}
    settings = stage_settings(recipe, "sft")
    assert set(settings) == {"sft.attn_implementation", "sft.train_sampling_strategy", "sft.use_liger_kernel",
                             "sft.padding_free"}


# ---- length grouping ------------------------------------------------------------------------------------------------


def test_the_length_column_is_each_rows_token_count_as_the_collator_builds_it(tiny_base, instructions, processor,
                                                                             tmp_path):
    lengths = add_length_column(instructions, processor)["length"]
    trainer = build_sft_trainer(instructions, processor, stage1_args(tiny_base, tmp_path))
    collated = [int(trainer.data_collator([row])["attention_mask"].sum()) for row in instructions]
    assert lengths == collated
    assert len(set(lengths)) > 4  # the fixture's lengths vary


def _padding(lengths, batches):
    return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)


def test_length_grouping_sees_every_example_once_per_epoch_in_batches_of_similar_length(tiny_base, instructions,
                                                                                      processor, tmp_path):
    # Trainer's sampler sorts "megabatches" of min(50, rows // (4 * batch)) batches: 64 rows make 4-batch ones.
    instructions = datasets.concatenate_datasets([instructions] * 4)
    lengths = add_length_column(instructions, processor)["length"]
    batches = {}
    for strategy in ("random", "group_by_length"):
        trainer = build_sft_trainer(instructions, processor,
                                    stage1_args(tiny_base, tmp_path / strategy, train_sampling_strategy=strategy))
        dataloader = trainer.get_train_dataloader()
        batches[strategy] = [list(batch) for batch in dataloader.batch_sampler]
        if strategy == "group_by_length":
            assert isinstance(dataloader.batch_sampler.sampler, LengthGroupedSampler)
    for strategy, epoch in batches.items():
        assert sorted(i for batch in epoch for i in batch) == list(range(len(instructions))), strategy
    assert batches["group_by_length"] != batches["random"]  # the batch composition changes
    assert _padding(lengths, batches["group_by_length"]) < _padding(lengths, batches["random"])


def test_length_grouping_trains_and_evaluates_through_the_trainer(tiny_base, instructions, processor, images, tmp_path):
    args = stage1_args(tiny_base, tmp_path, train_sampling_strategy="group_by_length", eval_strategy="steps",
                       eval_steps=3, per_device_eval_batch_size=4)
    trainer = build_sft_trainer(instructions, processor, args, eval_dataset=instructions, label_eval_dataset=images)
    trainer.train()
    evaluation = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evaluation and np.isfinite(evaluation[0]["eval_loss"]) and evaluation[0]["eval_label_images"] == 8
    assert trainer.args.length_column_name in trainer.train_dataset.column_names


# ---- refused where the libraries or the hardware cannot ----------------------------------------------------------


@pytest.mark.parametrize("option", ["padding_free", "packing"])
def test_padding_free_is_refused_in_one_line_because_trl_refuses_it_for_images(tiny_base, tmp_path, option):
    with pytest.raises(ValueError, match=rf"^sft\.{option}: TRL .* vision") as raised:
        stage1_args(tiny_base, tmp_path, **{option: True})
    assert "\n" not in str(raised.value)


def test_trl_itself_refuses_padding_free_batches_of_images(tiny_base, instructions, processor, tmp_path):
    """Why the recipe value is refused: if a TRL upgrade supports it, this fails and the refusal can go."""
    args = SFTConfig(output_dir=str(tmp_path), padding_free=True, per_device_train_batch_size=2, use_cpu=True,
                     report_to="none")
    with pytest.raises(ValueError, match="Padding-free training is yet not supported for vision datasets"):
        SFTTrainer(model=str(tiny_base["vlm"]), args=args, processing_class=processor,
                   train_dataset=instructions.select_columns(["images", "messages"]))


def test_padding_free_in_a_recipe_fails_naming_the_file_and_key(tmp_path):
    from train.infra.recipe import RecipeError, validate_recipe

    recipe = {"output_dir": str(tmp_path / "run"), "labels": LABELS, "data": {"kind": "imagefolder", "root": "x"},
              "sft": {"padding_free": True}}
    with pytest.raises(RecipeError, match=r"my-recipe\.yaml.*sft.*padding_free"):
        validate_recipe(recipe, where="my-recipe.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_liger_kernels_are_refused_in_one_line_without_cuda(tiny_base, tmp_path):
    with pytest.raises(ValueError, match=r"^sft\.use_liger_kernel: Liger's Triton kernels need a CUDA GPU") as raised:
        stage1_args(tiny_base, tmp_path, use_liger_kernel=True)
    assert "\n" not in str(raised.value)


def test_liger_kernels_are_refused_in_one_line_without_the_package(tiny_base, tmp_path, monkeypatch):
    import train.configs.sft_config as sft_config

    monkeypatch.setattr(sft_config, "_has_cuda", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(sft_config, "is_liger_kernel_available", lambda: False)
    with pytest.raises(ValueError, match=r"^sft\.use_liger_kernel: .*pip install liger-kernel") as raised:
        stage1_args(tiny_base, tmp_path, use_liger_kernel=True, use_cpu=True)
    assert "\n" not in str(raised.value)


@pytest.mark.skipif(not (torch.cuda.is_available() and is_liger_kernel_available()),
                    reason="Liger's Triton kernels need a CUDA GPU and the liger-kernel package")
def test_liger_kernels_give_the_same_first_losses_within_fp32_rounding(tiny_base, instructions, processor, tmp_path):
    _, plain = first_losses(tiny_base, instructions, processor, tmp_path / "plain")
    _, liger = first_losses(tiny_base, instructions, processor, tmp_path / "liger", use_liger_kernel=True)
    assert liger == pytest.approx(plain, rel=FP32_RELATIVE)


# ---- the benchmark's entry point (bench.gpu_check calls it on CUDA) --------------------------------------------------


def test_the_throughput_benchmark_measures_each_knob_on_and_off_and_names_what_is_refused(tiny_base, tmp_path):
    from bench.sft_throughput import stage1_throughput

    result = stage1_throughput(tiny_base["vlm"], device="cpu",
                               knobs=("eager_attention", "workers", "group_by_length", "padding_free", "liger"),
                               num_images=8, image_sizes=SIZES, batch_size=4, reps=1, warmup=0, workdir=tmp_path,
                               use_peft=False)
    rows = {row["case"]: row for row in result["rows"]}
    assert set(rows) == {"baseline", "eager_attention", "workers", "group_by_length", "padding_free", "liger"}
    for case in ("baseline", "eager_attention", "workers", "group_by_length"):
        assert rows[case]["status"] == "ok" and rows[case]["tokens_per_s"] > 0, case
        assert rows[case]["tokens"] == rows["baseline"]["tokens"], case  # one epoch: the same rows in every case
    # Only the batch composition moves the first loss; the kernels and the workers do not (fp32 rounding / exactly).
    assert rows["workers"]["first_loss"] == rows["baseline"]["first_loss"]
    assert rows["eager_attention"]["first_loss"] == pytest.approx(rows["baseline"]["first_loss"], rel=FP32_RELATIVE)
    assert rows["padding_free"]["status"] == "refused" and "vision" in rows["padding_free"]["reason"]
    if not torch.cuda.is_available():
        assert rows["liger"]["status"] == "refused" and "CUDA" in rows["liger"]["reason"]
    assert "| baseline |" in result["table"]
