# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD: a Qwen2-VL classifier fused with a distilled head on the same visual features (arXiv 2505.07164)."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .backbones import BACKBONES
from .configuration_emovlm_kd import EmoVLMKDConfig
from .fast_path import applied as _fast_path_applied
from .fast_path import is_enabled as _fast_path_enabled
from .fusion import EmoVLMKDFusion, init_fusion_weights, initializer_range


@dataclass
class EmoVLMKDImageClassifierOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Cross-entropy of the fused `logits`.
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Fused class scores of the gate.
    vlm_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Log-likelihood the VLM gives each label string after the answer prefix; `softmax` gives its label
        probabilities and `argmax` its label.
    head_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Logits of the distillation head.
    visual_features (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Pooled merged visual tokens, the head's input.
    branch_weights (`torch.FloatTensor` of shape `(batch_size, 2)`):
        How much each branch drove the decision, rows [vlm, head] summing to 1, from the gate's own
        `branch_weights` on the inputs it fused.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    vlm_logits: torch.FloatTensor | None = None
    head_logits: torch.FloatTensor | None = None
    visual_features: torch.FloatTensor | None = None
    branch_weights: torch.FloatTensor | None = None


def _pad_id(tokenizer) -> int:
    """The id that left-pads prompts for generation (masked out, so any token would do)."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def pool_visual_tokens(image_embeds: tuple[torch.Tensor, ...], pooling: str) -> torch.Tensor:
    """`(n_i, D)` merged tokens per image -> `(num_images, D)`."""
    if pooling == "max":
        return torch.stack([tokens.max(dim=0).values for tokens in image_embeds])
    return torch.stack([tokens.mean(dim=0) for tokens in image_embeds])


def label_token_log_probs(hidden: torch.Tensor, lm_head: nn.Module, row: torch.Tensor, tokens: list[int],
                          chunk_bytes: int = 4 << 20) -> torch.Tensor:
    """`log p(tokens[j])` at hidden state `row[j]` of each image, under `lm_head`'s softmax over the vocabulary.

    Args:
        hidden: `(batch, rows, hidden_size)` last hidden states of the positions that predict a token.
        lm_head: The language model's output layer.
        row: `(num_tokens,)` which row predicts each token.
        tokens: The `num_tokens` predicted token ids (a list: which vocabulary slice holds each is decided on the
            host, without waiting for the device).
        chunk_bytes: Largest float32 logits chunk `(chunk, batch * rows)`.

    A plain `nn.Linear` head is applied to `chunk_bytes`-sized slices of its weight, as `weight[slice] @ hidden.T`:
    the vocabulary is the long side of that product, which CPU matrix kernels run near their peak without repacking
    the weight on every call (`hidden @ weight.T` with a few hundred rows ran at half of it). Each slice's logits are
    computed in the head's dtype (as `lm_head` computes them, summed in another order), their `logsumexp` in float32,
    and the normaliser is the `logsumexp` of the slices'; each token's logit is read from its slice. No
    `(batch, rows, vocabulary)` tensor is built or cast. Other heads (quantized, wrapped, hooked) run whole, then the
    same float32 reduction.

    Returns:
        `torch.FloatTensor` of shape `(batch, num_tokens)`.
    """
    weight, bias = getattr(lm_head, "weight", None), getattr(lm_head, "bias", None)
    plain = (type(lm_head) is nn.Linear and weight.dtype.is_floating_point and not lm_head._forward_hooks
             and not lm_head._forward_pre_hooks and "forward" not in lm_head.__dict__)
    if not plain:
        logits = lm_head(hidden).float()
        columns = torch.tensor(tokens, device=logits.device)
        return logits[:, row, columns] - torch.logsumexp(logits, -1)[:, row]
    batch, rows = hidden.shape[:2]
    flat = hidden.reshape(batch * rows, -1).to(weight.dtype)
    vocab = weight.shape[0]
    chunk = max(256, chunk_bytes // (4 * batch * rows) // 256 * 256)
    # Column of each (image, token) pair in the `(chunk, batch * rows)` logits.
    columns = torch.arange(batch, device=hidden.device)[:, None] * rows + row[None, :]  # (batch, num_tokens)
    normalisers = []
    target = hidden.new_empty(batch, len(tokens), dtype=torch.float32)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        logits = weight[start:stop] @ flat.T  # (chunk, batch * rows)
        if bias is not None:
            logits += bias[start:stop, None]
        normalisers.append(torch.logsumexp(logits.float(), 0))
        inside = [j for j, token in enumerate(tokens) if start <= token < stop]
        if inside:
            index = torch.tensor(inside, device=hidden.device)
            offsets = torch.tensor([tokens[j] - start for j in inside], device=hidden.device)
            picked = columns[:, index]  # (batch, len(inside))
            target[:, index] = logits[offsets[None, :].expand_as(picked), picked].float()
    normaliser = torch.logsumexp(torch.stack(normalisers), 0) if len(normalisers) > 1 else normalisers[0]
    return target - normaliser.view(batch, rows)[:, row]


class EmoVLMKDPreTrainedModel(PreTrainedModel):
    config_class = EmoVLMKDConfig
    base_model_prefix = "emovlm_kd"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = sorted({name for backbone in BACKBONES.values() for name in backbone.no_split_modules})
    _supports_sdpa = True
    # Label scoring uses a custom 4D attention mask, which flash-attention kernels cannot take.
    _supports_flash_attn = False

    # Modules trained by this project: a checkpoint must hold exactly their tensors, in the config's shapes.
    _trained_modules = ("distillation_head.", "gate.")
    # They are tiny and were trained in float32: a bf16, fp16 or 4-bit load of the VLM keeps them in float32 and out
    # of bitsandbytes quantization. transformers reads these as regular expressions (searched in parameter names,
    # matched at the start of module names): anchored, so that `gate` does not also catch the LLM's `gate_proj`.
    _keep_in_fp32_modules = _keep_in_fp32_modules_strict = [r"^distillation_head\.", r"^gate\."]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint whose tensors do not match its config.

        transformers would initialise missing modules at random and only print a table; a classifier with a random
        head, gate or VLM tensor gives confident wrong answers, so missing tensors (of any module) and unexpected or
        mis-shaped head/gate tensors raise a `ValueError` naming them (for `pipeline()` too, which loads through here).
        """
        # Weights come from safetensors only: a pickle file in a stranger's checkpoint could run code.
        kwargs.setdefault("use_safetensors", True)
        want_info = kwargs.pop("output_loading_info", False)
        # Load with mismatches allowed so that they can be named here (transformers' own error names no tensor);
        # only the VLM's tensors may then differ in shape, and only when the caller asked for it.
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        problems = []
        # A tensor the checkpoint lacks would run at random, in the VLM as much as in the head or the gate (tied
        # weights are not reported missing). Extra tensors are refused only in the modules this project trains.
        missing = sorted(info.get("missing_keys", ()))
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if k.startswith(cls._trained_modules))
        for kind, names in (("missing keys", missing), ("unexpected keys", unexpected)):
            if names:
                problems.append(f"{kind}: {', '.join(names)}")
        mismatched = {entry[0] if isinstance(entry, (tuple, list)) else str(entry): entry
                      for entry in info.get("mismatched_keys", ())}
        refused = sorted(k for k in mismatched if k.startswith(cls._trained_modules) or not ignore_mismatched)
        if refused:
            shapes = [f"{k} {tuple(mismatched[k][1])} in the checkpoint, {tuple(mismatched[k][2])} in the config"
                      if isinstance(mismatched[k], (tuple, list)) and len(mismatched[k]) == 3 else k for k in refused]
            problems.append(f"shapes other than the config's: {', '.join(shapes)}")
        if problems:
            config = model.config
            raise ValueError(
                f"The checkpoint {args[0] if args else kwargs.get('pretrained_model_name_or_path')!r} does not match "
                f"its config (gate_type={config.gate_type!r}, head_hidden_dims={config.head_hidden_dims}, "
                f"{config.num_labels} labels): " + "; ".join(problems) + ". Refusing to run with randomly "
                "initialised modules; use the config the weights were saved with."
            )
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Bilinear)) and not isinstance(module, PreTrainedModel):
            init_fusion_weights(module, initializer_range(self.config))
        else:
            super()._init_weights(module)


class EmoVLMKDForImageClassification(EmoVLMKDPreTrainedModel):
    r"""
    Qwen2-VL with a distillation head and a gate. One forward pass runs the vision tower once; its merged visual
    tokens are pooled for the head and fed to the language model, which scores every label string after the
    categorical prompt's forced answer prefix (no sampling, no parsing). The gate fuses both branches.
    """

    def __init__(self, config: EmoVLMKDConfig):
        super().__init__(config)
        self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        # Built as every head and gate is (`fusion.py`); `post_init` initialises them through `_init_weights`. They
        # stay top-level modules so that checkpoints keep their `distillation_head.*` and `gate.*` tensor names.
        fusion = EmoVLMKDFusion.from_config(config, initialise=False)
        self.distillation_head = fusion.distillation_head
        self.gate = fusion.gate
        self._prompt_cache = None
        self.post_init()

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def get_output_embeddings(self):
        # Named so that quantization keeps the language model's head (the label scores) in full precision.
        return self.vlm.get_output_embeddings()

    # ---- visual features -------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor):
        """Run the vision tower once; `pooler_output` holds each image's merged tokens `(n_i, D)`."""
        # ---- fast-path hook (fast_path.py): the patch embedding as a matrix product, applied per call ----
        with _fast_path_applied(self.vlm):
            return self.vlm.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    # ---- VLM label scoring -----------------------------------------------------------------------------

    def _prompt_tensors(self, device):
        ids = self.config.prompt_token_ids
        if not ids:
            raise ValueError(
                "The config has no `prompt_token_ids`; run `EmoVLMKDProcessor.prepare_config(config)` so the model "
                "knows its classification prompt."
            )
        if len(ids["label_continuations"]) != self.config.num_labels:
            raise ValueError(
                f"The prompt scores {len(ids['label_continuations'])} labels but the config has "
                f"{self.config.num_labels}; re-run `EmoVLMKDProcessor.prepare_config(config)`."
            )
        if self._prompt_cache is None or self._prompt_cache["device"] != device:
            continuations = [torch.tensor(c, dtype=torch.long) for c in ids["label_continuations"]]
            label_index = torch.cat([torch.full((len(c),), i) for i, c in enumerate(continuations)])
            offset = torch.cat([torch.arange(len(c)) for c in continuations])
            self._prompt_cache = {
                "device": device,
                "before": torch.tensor(ids["before_image"], device=device),
                "after": torch.tensor(ids["after_image"], device=device),
                "continuations": torch.cat(continuations).to(device),
                "continuation_ids": [token for c in ids["label_continuations"] for token in c],
                "label_index": label_index.to(device),
                "offset": offset.to(device),
            }
        return self._prompt_cache

    def _classification_inputs(self, image_grid_thw: torch.LongTensor):
        """Left-padded prompts (one per image) followed by every label's continuation tokens, side by side."""
        device = image_grid_thw.device
        prompt = self._prompt_tensors(device)
        vlm_config = self.config.vlm_config
        num_image_tokens = self.config.backbone.num_image_tokens(vlm_config, image_grid_thw)
        prefix_lengths = [len(prompt["before"]) + n + len(prompt["after"]) for n in num_image_tokens]
        prefix_len = max(prefix_lengths)
        num_cont = len(prompt["continuations"])
        pad_id = self.config.prompt_token_ids.get("pad_token_id", 0)
        input_ids = torch.full((len(num_image_tokens), prefix_len + num_cont), pad_id, device=device)
        valid = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, (n, length) in enumerate(zip(num_image_tokens, prefix_lengths)):
            image = torch.full((n,), vlm_config.image_token_id, device=device)
            input_ids[b, prefix_len - length : prefix_len] = torch.cat([prompt["before"], image, prompt["after"]])
            valid[b, prefix_len - length :] = True
        input_ids[:, prefix_len:] = prompt["continuations"]
        mm_token_type_ids = (input_ids == vlm_config.image_token_id).int()
        return input_ids, valid, mm_token_type_ids, prefix_len

    def _label_scoring_mask(self, valid: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
        """4D additive mask: the prompt is causal; each label's tokens see the prompt and their own label only."""
        prompt = self._prompt_cache
        length = valid.shape[1]
        device = valid.device
        positions = torch.arange(length, device=device)
        allowed = positions[None, :] <= positions[:, None]
        same_label = prompt["label_index"][:, None] == prompt["label_index"][None, :]
        allowed[prefix_len:, prefix_len:] &= same_label
        allowed = allowed[None] & valid[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=device)[None]  # padding rows must see something
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _position_ids(self, input_ids, mm_token_type_ids, image_grid_thw, valid, prefix_len):
        """M-RoPE positions for the prompts; every label starts right after its prompt."""
        position_ids = self.config.backbone.rope_index(
            self.vlm,
            input_ids[:, :prefix_len],
            mm_token_type_ids=mm_token_type_ids[:, :prefix_len],
            image_grid_thw=image_grid_thw,
            attention_mask=valid[:, :prefix_len].long(),
        )
        start = position_ids[:, :, -1:] + 1
        label_positions = start + self._prompt_cache["offset"].view(1, 1, -1)
        return torch.cat([position_ids, label_positions], dim=-1)

    # Label scoring's log-normaliser runs over chunks of the vocabulary of at most this many bytes of float32 logits:
    # on CPU a chunk stays in cache; on accelerators few large chunks (few kernel launches) bound the memory.
    _SCORING_CHUNK_BYTES = 4 << 20
    _SCORING_CHUNK_BYTES_GPU = 256 << 20

    # Memoize label scoring's inputs for the last batch shape only while the 4D mask is this small (images of
    # thousands of tokens would keep hundreds of MiB alive between calls).
    _SCORING_MEMO_BYTES = 64 << 20

    def _scoring_inputs(self, image_grid_thw: torch.LongTensor, dtype: torch.dtype) -> dict:
        """The language model's inputs for label scoring besides the image (ids, tree mask, M-RoPE positions,
        rows to keep) and the rows' gather indices. They depend only on the prompt and the images' patch grids, so
        the last batch's are reused while the grids, device, dtype and inference mode stay the same."""
        prompt = self._prompt_tensors(image_grid_thw.device)
        key = (dtype, torch.is_inference_mode_enabled(), tuple(image_grid_thw.flatten().tolist()))
        memo = prompt.get("scoring")
        if memo is not None and memo[0] == key:
            return memo[1]
        input_ids, valid, mm_token_type_ids, prefix_len = self._classification_inputs(image_grid_thw)
        # Each continuation token is predicted by the previous token of its own label (the prompt's last one
        # for a label's first token); only those positions need logits.
        first = prompt["offset"] == 0
        predictor = torch.arange(len(prompt["offset"]), device=input_ids.device) + prefix_len - 1
        predictor = torch.where(first, torch.full_like(predictor, prefix_len - 1), predictor)
        # Every label's first token is predicted from the same (last prompt) position: compute each row once.
        positions, row = torch.unique(predictor, return_inverse=True)
        mask = self._label_scoring_mask(valid, prefix_len, dtype)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": self._position_ids(input_ids, mm_token_type_ids, image_grid_thw, valid, prefix_len),
            "mm_token_type_ids": mm_token_type_ids,
            "logits_to_keep": positions,
            "row": row,
        }
        if mask.numel() * mask.element_size() <= self._SCORING_MEMO_BYTES:
            prompt["scoring"] = (key, inputs)
        return inputs

    def score_labels(self, image_features: BaseModelOutputWithPooling, image_grid_thw: torch.LongTensor):
        """Log-likelihood of each label string (and the answer's closing suffix) after the answer prefix.

        One forward pass of the language model over `prompt + all label continuations`, with a tree-shaped
        attention mask, so labels that share leading tokens are each scored on their own path. Only the positions
        that predict a continuation token get logits, and their log-normaliser over the vocabulary is computed chunk
        by chunk (`label_token_log_probs`), never as a `(batch, rows, vocabulary)` float32 tensor.

        Returns:
            `torch.FloatTensor` of shape `(num_images, num_labels)`.
        """
        dtype = self.vlm.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        inputs = dict(self._scoring_inputs(image_grid_thw, dtype))
        row = inputs.pop("row")
        prompt = self._prompt_cache
        encoder_outputs = {"mm_encoder_outputs": {"image": image_features}, "image_grid_thw": image_grid_thw}
        if not _fast_path_enabled():  # the stock modules: `lm_head` over the kept rows, then the normaliser
            logits = self.vlm(**inputs, **encoder_outputs, use_cache=False).logits.float()
            token_scores = logits[:, row, prompt["continuations"]] - torch.logsumexp(logits, -1)[:, row]
        else:
            positions = inputs.pop("logits_to_keep")
            with _fast_path_applied(self.vlm):
                hidden = self.vlm.model(**inputs, **encoder_outputs, use_cache=False).last_hidden_state
            chunk_bytes = self._SCORING_CHUNK_BYTES if hidden.device.type == "cpu" else self._SCORING_CHUNK_BYTES_GPU
            token_scores = label_token_log_probs(hidden[:, positions], self.vlm.get_output_embeddings(), row,
                                                 prompt["continuation_ids"], chunk_bytes)
        scores = torch.zeros(token_scores.shape[0], self.config.num_labels, device=token_scores.device)
        return scores.index_add_(1, prompt["label_index"], token_scores)

    # ---- fusion ----------------------------------------------------------------------------------------

    @property
    def fusion(self) -> EmoVLMKDFusion:
        """This model's head and gate with the config's gate inputs, as the one `EmoVLMKDFusion` every consumer calls
        (not a registered submodule: it holds the model's own modules, rebuilt if one is replaced)."""
        config, fusion = self.config, self.__dict__.get("_fusion")
        if (fusion is None or fusion.distillation_head is not self.distillation_head or fusion.gate is not self.gate
                or (fusion.vlm_signal, fusion.head_signal) != (config.gate_vlm_signal, config.gate_head_signal)):
            fusion = EmoVLMKDFusion(self.distillation_head, self.gate, config.gate_vlm_signal, config.gate_head_signal)
            self.__dict__["_fusion"] = fusion  # outside `_modules`: no second copy of the tensors in the state dict
        return fusion

    def fuse(self, vlm_logits: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        """Gate logits from the VLM's label scores and the head's logits."""
        return self.fusion(vlm_logits, head_logits=head_logits, output_branch_weights=False).logits

    @property
    def gate_dtype(self) -> torch.dtype:
        return self.fusion.gate_dtype

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        vlm_logits: torch.FloatTensor | None = None,
        **kwargs,
    ) -> EmoVLMKDImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(total_patches, channels * temporal_patch * patch * patch)`):
            Flattened patches of the images, as the image processor returns them.
        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`):
            Temporal, height and width patch grid of each image.
        labels (`torch.LongTensor` of shape `(num_images,)`, *optional*):
            Class indices; when given, `loss` is the cross-entropy of the fused logits.
        visual_features, vlm_logits (*optional*):
            Cached pooled visual features `(num_images, D)` and VLM label scores `(num_images, C)`. When both are
            given, the VLM is not run at all (used by the training stages' caches).
        """
        if visual_features is None or vlm_logits is None:
            if pixel_values is None or image_grid_thw is None:
                raise ValueError("Pass `pixel_values` and `image_grid_thw` (or cached `visual_features` and `vlm_logits`).")
            image_features = self.get_image_features(pixel_values, image_grid_thw)
            visual_features = pool_visual_tokens(image_features.pooler_output, self.config.pooling)
            vlm_logits = self.score_labels(image_features, image_grid_thw)
        fused = self.fusion(vlm_logits, visual_features=visual_features)
        logits = fused.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return EmoVLMKDImageClassifierOutput(
            loss=loss, logits=logits, vlm_logits=vlm_logits, head_logits=fused.head_logits,
            visual_features=visual_features, branch_weights=fused.branch_weights,
        )

    # ---- explaining a label ----------------------------------------------------------------------------

    @torch.inference_mode()
    def explain(self, image_or_inputs, processor, max_new_tokens: int = 128) -> list[dict]:
        r"""
        The VLM's reasoning answer for each image, generated after the paper's reasoning prompt, next to the fused
        label. Costs one greedy generation of up to `max_new_tokens` tokens per image (plus a classification pass);
        the label is the model's (`forward`'s), whatever the text says.

        The prompt is the one stage 1 trained the reasoning instruction with: `processor.reasoning_messages()` (the
        config's `reasoning_prompt`) in the chat template, with the assistant turn opened and the image's visual
        tokens expanded as the processor expands them.

        Args:
            image_or_inputs: an image (path, bytes, PIL image, array) or a list of them, or what the image processor
                returns for them (a mapping with `pixel_values` and `image_grid_thw`).
            processor (`EmoVLMKDProcessor`): the checkpoint's processor (`AutoProcessor.from_pretrained(path,
                trust_remote_code=True)`): its chat template and tokenizer build the prompt and decode the answer.
            max_new_tokens (`int`, defaults to 128): the answer's bound, in tokens.

        Returns:
            One dict per image, in order: `label` and `score` (the fused decision and its probability),
            `explanation` (the decoded answer), `generated_tokens` (its length, the end-of-turn token included) and
            `truncated` (True when `max_new_tokens` cut it before the end of the turn).
        """
        pixel_values, image_grid_thw = self._explanation_inputs(image_or_inputs, processor, max_new_tokens)
        probabilities = self(pixel_values=pixel_values, image_grid_thw=image_grid_thw).logits.float().softmax(-1)
        results = []
        for answer, probs in zip(self._explanations(pixel_values, image_grid_thw, processor, max_new_tokens),
                                 probabilities):
            label = int(probs.argmax())
            results.append({"label": self.config.id2label[label], "score": float(probs[label]), **answer})
        return results

    @torch.inference_mode()
    def explanations(self, image_or_inputs, processor, max_new_tokens: int = 128) -> list[dict]:
        """`explain` without its classification pass, for a caller that has already classified the same images
        (the pipeline): one dict per image with `explanation`, `generated_tokens` and `truncated`."""
        pixel_values, image_grid_thw = self._explanation_inputs(image_or_inputs, processor, max_new_tokens)
        return self._explanations(pixel_values, image_grid_thw, processor, max_new_tokens)

    def _explanation_inputs(self, image_or_inputs, processor, max_new_tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """`explain`'s checks, and its images as `pixel_values` and `image_grid_thw` on the model's device."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}.")
        if processor.reasoning_prompt != self.config.reasoning_prompt:
            raise ValueError(f"The processor's reasoning_prompt {processor.reasoning_prompt!r} is not the model's "
                             f"{self.config.reasoning_prompt!r}: use the checkpoint's own processor.")
        if not (isinstance(image_or_inputs, Mapping) and "pixel_values" in image_or_inputs):
            images = image_or_inputs if isinstance(image_or_inputs, (list, tuple)) else [image_or_inputs]
            image_or_inputs = processor.image_processor(images, return_tensors="pt")
        device = self.get_input_embeddings().weight.device
        return image_or_inputs["pixel_values"].to(device), image_or_inputs["image_grid_thw"].to(device)

    def _explanations(self, pixel_values, image_grid_thw, processor, max_new_tokens: int) -> list[dict]:
        """The reasoning answer generated for each image (greedy, bounded by `max_new_tokens`)."""
        prompt = self._reasoning_prompt(processor, image_grid_thw)
        tokenizer = processor.tokenizer
        # The chat template ends the assistant's turn with `<|im_end|>` (Qwen's, every supported backbone).
        vocab = tokenizer.get_vocab()
        stop = sorted({vocab[token] for token in ("<|im_end|>",) if token in vocab}
                      | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
        sequences = self.vlm.generate(
            **prompt, pixel_values=pixel_values, image_grid_thw=image_grid_thw, max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=stop or None, pad_token_id=_pad_id(tokenizer),
        )
        results = []
        for row in sequences[:, prompt["input_ids"].shape[1] :].tolist():
            end = next((k for k, token in enumerate(row) if token in stop), None)
            results.append({
                "explanation": tokenizer.decode(row[:end], skip_special_tokens=True).strip(),
                "generated_tokens": len(row) if end is None else end + 1,
                "truncated": end is None,
            })
        return results

    def _reasoning_prompt(self, processor, image_grid_thw: torch.LongTensor) -> dict:
        """The reasoning prompt for each image, left-padded: `input_ids`, `attention_mask`, `mm_token_type_ids`."""
        text = processor.apply_chat_template(processor.reasoning_messages(), add_generation_prompt=True,
                                             tokenize=False)
        before, after = (processor.tokenizer(part, add_special_tokens=False)["input_ids"]
                         for part in text.split(processor.image_token))
        image_token = self.config.vlm_config.image_token_id
        counts = self.config.backbone.num_image_tokens(self.config.vlm_config, image_grid_thw)
        rows = [before + [image_token] * n + after for n in counts]
        width = max(map(len, rows))
        pad = _pad_id(processor.tokenizer)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=image_grid_thw.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                      device=image_grid_thw.device)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mm_token_type_ids": (input_ids == image_token).int()}


__all__ = [
    "EmoVLMKDPreTrainedModel",
    "EmoVLMKDForImageClassification",
    "EmoVLMKDImageClassifierOutput",
    "pool_visual_tokens",
    "label_token_log_probs",
]
