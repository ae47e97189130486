"""Stage 1: instruction-tune the VLM with TRL's `SFTTrainer` (QLoRA on the LLM's `q_proj`, `k_proj`, `v_proj` by default).

Trains on the categorical, conversation and reasoning instructions of every training image, with the loss on the
assistant's answers only. Saves the LoRA adapter and a merged full model (tokenizer and image processor included),
which stages 2 and 3 freeze. Full fine-tuning (`use_peft: false`) is an option; the tiny offline model needs it,
since its vision tower is random.

With `eval_strategy` set (`steps` or `epoch`), each evaluation reports, besides `eval_loss` on the categorical
instructions of (a seeded subset of, `eval_max_images`) the validation images, `eval_label_accuracy`: how often the
label the model scores highest (`EmoVLMKDForImageClassification.score_labels`, on the model being trained, LoRA
adapters active) is the image's label, the metric stages 2-3 and the export are judged by.

    python -m train sft --config recipes/qwen2-vl-7b/emoset.yaml
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from peft import PeftModel
from PIL import ExifTags, Image
from transformers import AutoModelForImageTextToText, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import SFTTrainer
from trl.data_utils import prepare_multimodal_messages

from modeling_emovlm_kd import EmoVLMKDConfig, EmoVLMKDForImageClassification
from train.configs.sft_config import LENGTH_SAMPLERS, SFTStageConfig
from train.infra.assemble import load_processor, quantization_config
from train.stages.instructions import build_instruction_dataset
from train.stages.trainer_utils import StrictCheckpointLoading

logger = logging.getLogger(__name__)


def _compute_dtype(args: SFTStageConfig) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def _avoid_cpu_4bit_repacking(model) -> None:
    """bitsandbytes repacks 4-bit weights in place during a no-grad forward on AVX512-BF16 CPUs, which breaks the
    next training step (see ../shared/STACK-NOTES.md); turning that path off keeps CPU QLoRA runs trainable."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def validation_subset(dataset, max_images: int | None, seed: int):
    """The validation images stage 1 evaluates on: all of them, or `max_images` drawn with `seed` (a split is often
    sorted by label, so its first rows would be one class)."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_images))


def add_length_column(dataset, processor, column: str = "length"):
    """`dataset` (`images`, `messages`) with each row's token count in `column`, as the vision-language collator
    builds the row: the chat template's tokens, each image placeholder expanded to its visual tokens (the image's
    patches at the processor's resized size, `merge_size**2` per token). The image sizes come from the files' headers
    (EXIF rotation applied, as the processor does), so this costs a tokenisation per row, no decoding.

    `train_sampling_strategy: group_by_length` (and `batch_rebalance`) read it: TRL prepares no `input_ids` for
    vision data sets, from which `Trainer` would infer lengths."""
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    per_token = image_processor.merge_size**2
    rows = dataset.select_columns(["images", "messages"])
    if isinstance(rows.features["images"], datasets.List) and isinstance(rows.features["images"].feature,
                                                                          datasets.Image):
        rows = rows.cast_column("images", datasets.List(datasets.Image(decode=False)))  # headers only
    lengths = []
    for batch in rows.iter(batch_size=256):
        conversations = [prepare_multimodal_messages(messages, images=images)
                         for messages, images in zip(batch["messages"], batch["images"])]
        texts = processor.apply_chat_template(conversations, tokenize=False)
        for ids, images in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], batch["images"]):
            visual = sum(image_processor.get_number_of_image_patches(*_image_height_width(image)) // per_token
                         for image in images)
            lengths.append(len(ids) - ids.count(image_token_id) + visual)
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, lengths)


def _image_height_width(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an undecoded `datasets.Image` value, as the processor will orient it."""
    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with Image.open(source) as opened:
            return _oriented(opened)
    return _oriented(image)


def _oriented(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    # EXIF orientations 5-8 are transposed: the processor (`exif_transpose`) swaps the sides.
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
        width, height = height, width
    return height, width


@contextlib.contextmanager
def masked_attention(vlm):
    """Label scoring passes a 4D mask (each label sees the prompt and itself only), which flash-attention kernels
    cannot take: a model training with them scores with sdpa, then switches back."""
    current = vlm.config._attn_implementation
    if current in ("eager", "sdpa"):
        yield
        return
    vlm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        vlm.set_attn_implementation(current)


def label_scorer(vlm, processor) -> EmoVLMKDForImageClassification:
    """The fused model's label scoring around `vlm` itself (not a copy): `score_labels` then runs the model being
    trained, adapters included, after the prompt and label tokens of `processor`. Head and gate stay on the meta
    device: only the VLM branch is used."""
    config = EmoVLMKDConfig.from_label_set(processor.labels, vlm_config=vlm.config.to_dict())
    processor.prepare_config(config)
    with torch.device("meta"):
        scorer = EmoVLMKDForImageClassification(config)
    scorer.vlm = vlm
    scorer.config.vlm_config = vlm.config
    return scorer


class EmoVLMSFTTrainer(StrictCheckpointLoading, SFTTrainer):
    """`SFTTrainer` that also reports the scored label's accuracy at each evaluation, and whose resume and best
    checkpoint (`load_best_model_at_end`) also work for fully fine-tuned Qwen2-VL.

    Given `label_eval_dataset` (`image`, `label` columns), every evaluation adds `<prefix>_label_accuracy` and
    `<prefix>_label_images` to the metrics of `evaluation_loop`, so they are logged with `eval_loss` (log history,
    every `report_to` tracker). Under several processes each scores a shard and the counts are summed.

    `Trainer` reads a checkpoint's state dict as saved (Hub key layout: `model.layers.*`, `visual.*`) into a model
    whose modules are named `model.language_model.*`, `model.visual.*`, and loads it non-strictly, so nothing but
    `lm_head` is restored (transformers issue #43701). `StrictCheckpointLoading` loads the checkpoint with
    `from_pretrained`, which applies the model's own key conversion, and copies every weight or fails; LoRA
    adapters load through peft.
    """

    def __init__(self, *args, label_eval_dataset=None, **kwargs):
        self.label_eval_dataset = label_eval_dataset
        self._label_scorer = None
        super().__init__(*args, **kwargs)
        if label_eval_dataset is not None and (self.is_fsdp_enabled or is_deepspeed_zero3_enabled()):
            # The label scoring runs the unwrapped model, whose parameters FSDP and ZeRO-3 keep sharded.
            raise ValueError("Stage 1's label accuracy (sft.eval_strategy) cannot run under FSDP or DeepSpeed ZeRO-3 "
                             "(sharded parameters); use DDP or ZeRO-2, or set sft.eval_strategy: 'no'.")

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.label_eval_dataset is not None:
            for key, value in self.label_metrics().items():
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output

    @torch.no_grad()
    def label_metrics(self) -> dict[str, float]:
        """Accuracy of the highest-scored label on `label_eval_dataset`, with the model as it is now."""
        model = self.accelerator.unwrap_model(self.model)
        vlm = model.get_base_model() if isinstance(model, PeftModel) else model  # LoRA layers stay in, active
        if self._label_scorer is None or self._label_scorer.vlm is not vlm:
            self._label_scorer = label_scorer(vlm, self.processing_class)
        scorer, image_processor = self._label_scorer, self.processing_class.image_processor
        was_training = vlm.training
        vlm.eval()
        device = vlm.get_input_embeddings().weight.device
        shard = self.label_eval_dataset.shard(self.accelerator.num_processes, self.accelerator.process_index,
                                              contiguous=True)
        correct, batch_size = 0, self.args.per_device_eval_batch_size
        try:
            with masked_attention(vlm):
                for start in range(0, len(shard), batch_size):
                    rows = shard[start : start + batch_size]
                    inputs = image_processor(rows["image"], return_tensors="pt").to(device)
                    features = scorer.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                    scores = scorer.score_labels(features, inputs["image_grid_thw"])
                    correct += int((scores.argmax(-1).cpu() == torch.tensor(rows["label"])).sum())
        finally:
            vlm.train(was_training)
        counts = torch.tensor([correct, len(shard)], device=self.accelerator.device)
        correct, total = self.accelerator.reduce(counts, reduction="sum").tolist()
        return {"label_accuracy": correct / max(total, 1), "label_images": total}

    def _set_signature_columns_if_needed(self):
        # TRL keeps only the vision columns; a length-grouping sampler also needs the token counts.
        super()._set_signature_columns_if_needed()
        column = self.args.length_column_name
        if self.args.train_sampling_strategy in LENGTH_SAMPLERS and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]


def build_sft_trainer(train_dataset, processor, args: SFTStageConfig, eval_dataset=None,
                      label_eval_dataset=None) -> SFTTrainer:
    """`SFTTrainer` over an instruction data set (`images`, `messages` columns) for the configured base model.

    `eval_dataset` (instructions) gives `eval_loss`; `label_eval_dataset` (`image`, `label`) the label accuracy.
    The throughput options reach the trainer here: `attn_implementation` through `model_init_kwargs`, a length
    column for `train_sampling_strategy: group_by_length`; the rest (DataLoader workers, pinned memory, Liger
    kernels) are `TrainingArguments` that `Trainer` applies itself."""
    args.model_init_kwargs = dict(args.model_init_kwargs or {})
    args.model_init_kwargs.setdefault("dtype", _compute_dtype(args))
    if args.attn_implementation is not None:
        args.model_init_kwargs["attn_implementation"] = args.attn_implementation
    if args.load_in_4bit:
        args.model_init_kwargs["quantization_config"] = quantization_config(True, _compute_dtype(args),
                                                                            args.base_model_type())
        if not torch.cuda.is_available():
            args.model_init_kwargs.setdefault("device_map", "cpu")
    train_dataset = train_dataset.select_columns(["images", "messages"])
    eval_dataset = eval_dataset.select_columns(["images", "messages"]) if eval_dataset is not None else None
    if args.train_sampling_strategy in LENGTH_SAMPLERS:  # Trainer's eval sampler groups by length too
        train_dataset = add_length_column(train_dataset, processor, args.length_column_name)
        if eval_dataset is not None:
            eval_dataset = add_length_column(eval_dataset, processor, args.length_column_name)
    trainer = EmoVLMSFTTrainer(
        model=args.model_name_or_path,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=args.peft_config(),
        label_eval_dataset=label_eval_dataset,
    )
    if args.load_in_4bit and not torch.cuda.is_available():
        _avoid_cpu_4bit_repacking(trainer.model)
    return trainer


def save_merged(trainer: SFTTrainer, processor, args: SFTStageConfig, output_dir: Path) -> Path:
    """Save the adapter (LoRA) and a merged full-precision model with tokenizer and image processor.

    Only the main process writes (ranks writing the same files at once can leave them corrupt); the others wait.
    """
    merged_dir = output_dir / "merged"
    if trainer.is_world_process_zero():
        _write_merged(trainer, processor, args, output_dir, merged_dir)
    trainer.accelerator.wait_for_everyone()
    return merged_dir


def _write_merged(trainer: SFTTrainer, processor, args: SFTStageConfig, output_dir: Path, merged_dir: Path) -> None:
    if args.use_peft:
        adapter_dir = output_dir / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        if args.load_in_4bit:
            # Merging into 4-bit weights would lose precision: merge into a fresh full-precision base instead.
            base = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=_compute_dtype(args))
            model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            model = trainer.model.merge_and_unload()
    else:
        model = trainer.model
    model.save_pretrained(merged_dir)
    processor.tokenizer.save_pretrained(merged_dir)
    processor.image_processor.save_pretrained(merged_dir)


def train_sft(
    dataset_dict,
    labels,
    args: SFTStageConfig,
    generator=None,
    answers_cache: str | Path | None = None,
    resume_from_checkpoint: str | bool | None = None,
    categorical_prompt: str | None = None,
    conversation_prompt: str | None = None,
    reasoning_prompt: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    skip_missing: bool = False,
) -> Path:
    """Build the instruction data of `dataset_dict["train"]`, tune the VLM, and return the merged model's folder.

    The three instructions are the recipe's `model.categorical_prompt`, `model.conversation_prompt` and
    `model.reasoning_prompt` (`None`: the paper's wording for `labels`, as `EmoVLMKDConfig` defaults them), the
    same ones the feature caches and the exported model read, so the model is scored after the prompt it learnt.
    `min_pixels`/`max_pixels` bound the image resolution (`load_processor`); the processor saved with the merged
    model carries them to the caches and the export.

    The pipeline generates the answers beforehand (stage `instructions`) and passes no `generator`: every rank
    reads the cache at `answers_cache`, and `skip_missing=True` leaves out the rows whose answers failed there.
    Given a `generator` (a single-process library call), the main process asks it for the missing answers first;
    the other ranks would wait at a barrier meanwhile, which is why the pipeline does not do so.
    """
    processor = load_processor(args.model_name_or_path, labels, categorical_prompt=categorical_prompt,
                               conversation_prompt=conversation_prompt, reasoning_prompt=reasoning_prompt,
                               min_pixels=min_pixels, max_pixels=max_pixels)
    state = PartialState()
    with state.main_process_first():
        train_set = build_instruction_dataset(
            dataset_dict["train"],
            processor,
            kinds=args.instruction_kinds,
            generator=generator if state.is_main_process else None,
            cache_path=answers_cache,
            skip_missing=skip_missing or not state.is_main_process,
        )
    logger.info("Stage 1 trains on %d instructions (%s).", len(train_set), ", ".join(args.instruction_kinds))
    label_eval = eval_set = None
    if args.eval_strategy != "no":
        if "validation" not in dataset_dict:
            raise ValueError(f"sft.eval_strategy is {args.eval_strategy.value!r} but the data has no 'validation' "
                             f"split (it has {', '.join(dataset_dict)}); set sft.eval_strategy: 'no' or add one.")
        label_eval = validation_subset(dataset_dict["validation"], args.eval_max_images, args.seed)
        eval_set = build_instruction_dataset(label_eval, processor, kinds=["categorical"], show_progress=False)
        logger.info("Stage 1 evaluates on %d validation images.", len(label_eval))
    trainer = build_sft_trainer(train_set, processor, args, eval_dataset=eval_set, label_eval_dataset=label_eval)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return save_merged(trainer, processor, args, Path(args.output_dir))


def run(context) -> None:
    set_seed(context.seed)
    args = context.stage_args("sft", model_name_or_path=context.base_models["vlm"])
    # The answers come from stage `instructions` (already run): every rank reads the same cache and leaves out the
    # same failed rows. The recipe's prompts, the ones the caches and the export score after (unset: the paper's
    # wording), and its resolution bounds, saved with the merged model's processor for every later stage.
    generated = context.recipe.instructions.generator != "none"  # none: every answer must be cached
    train_sft(context.data, context.labels, args, answers_cache=context.answers_cache,
              resume_from_checkpoint=context.resume("sft"), skip_missing=generated,
              **context.recipe.processor_kwargs())

__all__ = ["EmoVLMSFTTrainer", "add_length_column", "build_sft_trainer", "label_scorer", "masked_attention", "run",
           "save_merged", "train_sft", "validation_subset"]
