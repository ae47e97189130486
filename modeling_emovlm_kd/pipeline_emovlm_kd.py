# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""`pipeline("image-classification", model=..., trust_remote_code=True)` for EmoVLM-KD: the one inference front door.

`train predict`, the demo app, the Inference Endpoints handler and `python -m train demo` all classify through this
class (shipped with every checkpoint; `loading_emovlm_kd.load_pipeline` loads it with the project's dtype, device
and 4-bit options).

    classifier = pipeline("image-classification", model="org/emovlm-kd-emoset", revision="<sha>",
                          trust_remote_code=True)
    classifier("photo.jpg", top_k=3)                                  # one image: a list of elements
    classifier(["a.jpg", image_bytes, pil_image], batch_size=8)       # several: one list per image, in order
    classifier("photo.jpg", explain=True, max_new_tokens=128)         # also the VLM's reasoning (one generation)

Inputs: file paths, image bytes, PIL images, numpy arrays, http(s) or `data:` URLs. Images of any sizes batch
together (`batch_size`), with the same results as one at a time; `num_workers` decodes in DataLoader workers.

Answer per image, the image-classification task format (`huggingface_hub.ImageClassificationOutputElement` parses
it), `top_k` elements (default 5, at most the number of labels) best first:

    [{"label": "awe", "score": 0.91,              # fused (the gate's) probability: the decision
      "vlm_score": 0.88, "head_score": 0.52,      # this label's probability from the VLM and from the head
      "vlm_log_likelihood": -0.13,                # the VLM's raw score of this label (its log-likelihood)
      "vlm": {"label": "awe", "score": 0.88},     # first element only: each branch's own label and probability,
      "head": {"label": "fear", "score": 0.6},    #   and how much each branch drove the decision (the gate's
      "branch_weights": {"vlm": 0.73, "head": 0.27},  # `branch_weights`, summing to 1)
      "explanation": "...",                       # first element, with explain=True: the reasoning answer,
      "explanation_tokens": 87, "explanation_truncated": False},  # its length and whether max_new_tokens cut it
     {"label": "contentment", "score": 0.05, "vlm_score": ..., "head_score": ..., "vlm_log_likelihood": ...}, ...]

An input that cannot be classified (unreadable, not an image, over the processor's `max_image_pixels`, a shape the
model refuses) answers `[{"label": None, "score": None, "error": "<one line naming the file>"}]`, and the other
images of its batch are classified as if it were not there.

`function_to_apply` ("softmax", the default, "sigmoid" or "none") transforms the fused logits into `score`; the
branch scores are always probabilities. `explain=True` costs one generation of up to `max_new_tokens` tokens per
image (`EmoVLMKDForImageClassification.explain`, after the paper's reasoning prompt); it needs the checkpoint's
tokenizer, which exported checkpoints ship.
"""

from __future__ import annotations

from transformers import ImageClassificationPipeline
from transformers.pipelines.image_classification import ClassificationFunction

from .inference import BATCH_ERRORS, answer, classify, errors_of, prepare, split
from .processing_emovlm_kd import EmoVLMKDProcessor


class EmoVLMKDImageClassificationPipeline(ImageClassificationPipeline):
    """The image-classification pipeline of EmoVLM-KD: batched, error-isolating, every branch in the answer."""

    # Loaded with the model when the checkpoint has one (explain needs it); a checkpoint without one still classifies.
    _load_tokenizer = None
    # What callers check before reading this format (a checkpoint exported earlier answers the stock pipeline's).
    answers_every_branch = True

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, timeout=None, explain=None,
                             max_new_tokens=None):
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}.")
        preprocess, _, postprocess = super()._sanitize_parameters(top_k, function_to_apply, timeout)
        forward = {}
        if explain:
            if self.tokenizer is None:
                raise ValueError("explain=True needs the checkpoint's tokenizer, which was not found with the model.")
            forward["explain"] = True
            if max_new_tokens is not None:
                if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                    raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}.")
                forward["max_new_tokens"] = max_new_tokens
        return preprocess, forward, postprocess

    def __call__(self, inputs=None, **kwargs):
        """Classify one input or a list of inputs; see the module docstring for the inputs and the answer.

        Args:
            inputs: a path, image bytes, a PIL image, a numpy array or an http(s)/`data:` URL, or a list of them.
            top_k (`int`, *optional*, defaults to 5): elements per image (capped at the number of labels).
            batch_size (`int`, *optional*, defaults to 1): images per forward pass.
            explain (`bool`, *optional*): also generate the VLM's reasoning answer for each image.
            max_new_tokens (`int`, *optional*, defaults to 128): the bound of that answer, in tokens.
            function_to_apply (`str`, *optional*): `softmax` (default), `sigmoid` or `none` for the fused `score`.
        """
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image, timeout=None):
        return prepare(self.image_processor, image, timeout)

    def _forward(self, model_inputs, explain=False, max_new_tokens=None):
        outputs = classify(self.model, model_inputs)
        if explain:
            self._explain(model_inputs, outputs, {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})
        return outputs

    def _explain(self, batch, outputs, options):
        """Add each classified image's reasoning answer to `outputs` (one batched generation; one image at a time
        if that fails, so that only the image at fault gets an error)."""
        errors = outputs["error"]
        readable = [i for i, error in enumerate(errors_of(batch)) if error is None]  # the batch's images, in order
        singles = dict(zip(readable, split(batch)))
        targets = [i for i in readable if errors[i] is None]  # classified: the others have an error already
        results = {}
        if targets and targets == readable:
            try:
                results = dict(zip(targets, self.model.explanations(batch, self.explaining_processor, **options)))
            except BATCH_ERRORS:
                results = {}
        for i in targets:
            if i not in results:
                try:
                    (results[i],) = self.model.explanations(singles[i], self.explaining_processor, **options)
                except BATCH_ERRORS as error:
                    errors[i] = f"cannot explain this image: {' '.join(str(error).split())}"
        blank = [None] * len(errors)
        outputs.update(explanation=list(blank), explanation_tokens=list(blank), explanation_truncated=list(blank))
        for i, result in results.items():
            outputs["explanation"][i] = result["explanation"]
            outputs["explanation_tokens"][i] = result["generated_tokens"]
            outputs["explanation_truncated"][i] = result["truncated"]

    @property
    def explaining_processor(self) -> EmoVLMKDProcessor:
        """The processor `explain` builds its prompt with: this pipeline's image processor and tokenizer, with the
        model's own prompts (`EmoVLMKDProcessor.from_config`)."""
        if getattr(self, "_explaining_processor", None) is None:
            self._explaining_processor = EmoVLMKDProcessor.from_config(self.image_processor, self.tokenizer,
                                                                       self.model.config)
        return self._explaining_processor

    def postprocess(self, model_outputs, function_to_apply=None, top_k=5):
        logits = model_outputs["logits"].float()
        if function_to_apply in (None, ClassificationFunction.SOFTMAX):
            scores = logits.softmax(-1)
        elif function_to_apply == ClassificationFunction.SIGMOID:
            scores = logits.sigmoid()
        else:
            scores = logits
        return answer(model_outputs, self.model.config.id2label, top_k, scores)


__all__ = ["EmoVLMKDImageClassificationPipeline"]
