"""Stage 1's arguments: TRL's `SFTConfig` plus the base model, LoRA/QLoRA and instruction-data fields
(`train/stages/sft.py` trains with them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import trl
from peft import LoraConfig
from transformers import AutoConfig
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_liger_kernel_available
from trl import ModelConfig, SFTConfig, get_peft_config

from modeling_emovlm_kd.backbones import get_backbone
from train.configs.base_models import DEFAULT_VLM

# The instruction formats of stage 1 (the paper's three); an answer must be generated for all but the first.
KINDS = ("categorical", "conversation", "reasoning")
# The attention kernels stage 1 can train with, and for flash-attention the check that its CUDA kernels are installed.
# (Hub kernels, e.g. `kernels-community/flash-attn2`, are left out: they download at load time.)
ATTENTION = {"eager": None, "sdpa": None, "flash_attention_2": is_flash_attn_2_available,
             "flash_attention_3": is_flash_attn_3_available}
# Samplers that read each row's token count (the `length_column_name` column `train.stages.sft` adds).
LENGTH_SAMPLERS = ("group_by_length", "batch_rebalance")


def _has_cuda() -> bool:
    return torch.cuda.is_available()


@dataclass
class SFTStageConfig(SFTConfig):
    """`SFTConfig` for stage 1, plus the base model, LoRA/QLoRA and instruction-data fields."""

    SET_BY_PIPELINE: ClassVar[tuple[str, ...]] = ("model_name_or_path",)  # the run's base VLM (`base_models.vlm`)

    model_name_or_path: str = field(default=DEFAULT_VLM, metadata={"help": "Base VLM to tune."})
    use_peft: bool = field(default=True, metadata={"help": "LoRA (True) or full fine-tuning (False)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit NF4 + double quant."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        metadata={"help": "Modules LoRA adapts, in the LLM only (the backbone's vision tower is excluded)."},
    )
    instruction_kinds: list[str] = field(
        default_factory=lambda: list(KINDS), metadata={"help": "Instruction formats to train on."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    assistant_only_loss: bool = field(default=True, metadata={"help": "Loss on the assistant's answers only."})
    max_length: int | None = field(default=None, metadata={"help": "No truncation: it would cut image tokens."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Logging integrations."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch (for resuming)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints to keep."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernels of the model stage 1 trains (TRL's `ModelConfig.attn_implementation`, passed "
                "through `model_init_kwargs`): sdpa (torch's fused attention), eager, or flash_attention_2 / "
                "flash_attention_3 (CUDA, bf16/fp16, the flash-attn package). Unset: transformers' choice, sdpa for "
                "the Qwen-VL models. The same loss up to rounding."})
    eval_max_images: int | None = field(default=None, metadata={
        "help": "Validation images scored at each evaluation (eval_strategy: steps or epoch), drawn with the seed: "
                "eval_label_accuracy (the scored label's accuracy) and eval_loss on their categorical instructions. "
                "Unset: the whole validation split."})

    def __post_init__(self):
        # TRL turns bf16 on by default; use it only where the hardware has it, so one recipe runs on CPU and GPU.
        if self.bf16 is None and not self.fp16:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()
        self._check_throughput_options()
        unknown = set(self.instruction_kinds) - set(KINDS)
        if unknown or not self.instruction_kinds:
            raise ValueError(f"instruction_kinds must be a non-empty subset of {KINDS}, got {self.instruction_kinds}.")
        if self.load_in_4bit and not self.use_peft:
            raise ValueError("load_in_4bit (QLoRA) needs use_peft: 4-bit weights cannot be fine-tuned directly.")
        if self.eval_max_images is not None:
            if self.eval_max_images < 1:
                raise ValueError(f"eval_max_images must be at least 1 (or unset: the whole validation split), got "
                                 f"{self.eval_max_images}.")
            if self.eval_strategy == "no":
                raise ValueError("eval_max_images is set but eval_strategy is 'no': nothing would be evaluated; set "
                                 "eval_strategy to steps (with eval_steps) or epoch.")

    def _check_throughput_options(self) -> None:
        """Refuse, in one line, the speed options that cannot work for stage 1 or on this machine (the recipe check
        runs this where the pipeline runs), and leave pinned memory off where nothing could use it."""
        if self.padding_free or self.packing:
            option = "padding_free" if self.padding_free else "packing"
            raise ValueError(f"sft.{option}: TRL {trl.__version__} refuses {option.replace('_', '-')} batches for vision "
                             f"data sets, and stage 1 trains on images; leave it false (sft.train_sampling_strategy: "
                             f"group_by_length cuts padding instead).")
        if self.use_liger_kernel:
            if not _has_cuda():
                raise ValueError("sft.use_liger_kernel: Liger's Triton kernels need a CUDA GPU, and this machine has "
                                 "none; leave it false here.")
            if not is_liger_kernel_available():
                raise ValueError("sft.use_liger_kernel: the liger-kernel package (>= 0.3) is not installed; pip install "
                                 "liger-kernel, or leave it false.")
        self._check_attention()
        if not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # pinned pages only speed copies to an accelerator (torch warns)

    def _check_attention(self) -> None:
        value = self.attn_implementation
        if value is None:
            return
        if value not in ATTENTION:
            raise ValueError(f"sft.attn_implementation: {value!r} is not one of {', '.join(ATTENTION)} (or unset: "
                             f"transformers' choice).")
        available = ATTENTION[value]
        if available is not None and not available():
            raise ValueError(f"sft.attn_implementation: {value} needs a CUDA GPU and the flash-attn package "
                             f"(pip install flash-attn), and this machine lacks "
                             f"{'a CUDA GPU' if not _has_cuda() else 'flash-attn'}; use sdpa.")
        if available is not None and not (self.bf16 or self.fp16):
            raise ValueError(f"sft.attn_implementation: {value} runs in bf16 or fp16 only; set sft.bf16: true.")
        chosen = (self.model_init_kwargs or {}).get("attn_implementation")
        if chosen is not None and chosen != value:
            raise ValueError(f"sft.attn_implementation is {value!r} but sft.model_init_kwargs.attn_implementation is "
                             f"{chosen!r}; set one of them.")

    def model_config(self) -> ModelConfig:
        """The base model and LoRA/4-bit options as TRL's `ModelConfig` (what TRL's scripts parse beside
        `SFTConfig`). The 4-bit load itself is the project's one 4-bit config
        (`train.infra.assemble.quantization_config`), which keeps the head, the gate and the backbone's
        full-precision modules out of the quantisation."""
        return ModelConfig(model_name_or_path=self.model_name_or_path, use_peft=self.use_peft, lora_r=self.lora_r,
                           lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                           lora_target_modules=list(self.lora_target_modules), load_in_4bit=self.load_in_4bit,
                           bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                           attn_implementation=self.attn_implementation)

    def peft_config(self) -> LoraConfig | None:
        """TRL's LoRA config (`trl.get_peft_config`) with the backbone's scope: the named modules of the LLM only,
        the vision tower excluded (`modeling_emovlm_kd/backbones.py`)."""
        config = get_peft_config(self.model_config())
        if config is None:
            return None
        return dataclasses.replace(config, **get_backbone(self.base_model_type()).lora_kwargs(self.lora_target_modules))

    def base_model_type(self) -> str:
        """The base model's `model_type` (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`): its backbone family."""
        return AutoConfig.from_pretrained(self.model_name_or_path).model_type


__all__ = ["ATTENTION", "KINDS", "LENGTH_SAMPLERS", "SFTStageConfig"]
