# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD as a transformers model: configuration, modeling and processing.

The module files are also the Hub payload: `save_pretrained` copies them next to the weights and
`trust_remote_code=True` loads them from there. Importing this package additionally registers the classes with
the Auto classes, so local code can use `AutoModelForImageClassification` and friends without remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoProcessor

from .configuration_emovlm_kd import (
    DATASET_LABEL_SETS,
    GATE_TYPES,
    LABEL_SETS,
    EmoVLMKDConfig,
    resolve_label_set,
)
from .fusion import GATES, EmoVLMKDDistillationHead, EmoVLMKDFusion
from .modeling_emovlm_kd import (
    EmoVLMKDForImageClassification,
    EmoVLMKDImageClassifierOutput,
    EmoVLMKDPreTrainedModel,
)
from .processing_emovlm_kd import EmoVLMKDImageProcessor, EmoVLMKDProcessor, load_image

AutoConfig.register(EmoVLMKDConfig.model_type, EmoVLMKDConfig, exist_ok=True)
AutoModel.register(EmoVLMKDConfig, EmoVLMKDForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(EmoVLMKDConfig, EmoVLMKDForImageClassification, exist_ok=True)
AutoImageProcessor.register(EmoVLMKDConfig, slow_image_processor_class=EmoVLMKDImageProcessor, exist_ok=True)
AutoProcessor.register(EmoVLMKDConfig, EmoVLMKDProcessor, exist_ok=True)


def register_for_auto_class(config: EmoVLMKDConfig) -> None:
    """Point `config.auto_map` at the module files so that `save_pretrained` ships them as remote code."""
    EmoVLMKDConfig.register_for_auto_class()
    EmoVLMKDForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    EmoVLMKDImageProcessor.register_for_auto_class("AutoImageProcessor")
    EmoVLMKDProcessor.register_for_auto_class("AutoProcessor")
    config.auto_map = {
        "AutoConfig": "configuration_emovlm_kd.EmoVLMKDConfig",
        "AutoModel": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
        "AutoModelForImageClassification": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
        "AutoImageProcessor": "processing_emovlm_kd.EmoVLMKDImageProcessor",
        "AutoProcessor": "processing_emovlm_kd.EmoVLMKDProcessor",
    }
    # `pipeline("image-classification", trust_remote_code=True)` uses this class (it decodes paths at reduced scale);
    # `save_hub_folder` ships its file beside the others.
    config.custom_pipelines = {
        "image-classification": {"impl": "pipeline_emovlm_kd.EmoVLMKDImageClassificationPipeline",
                                 "pt": ["AutoModelForImageClassification"], "tf": [], "type": "image"},
    }


PIPELINE_FILE = "pipeline_emovlm_kd.py"
# The inference front door: the pipeline class, its engine and the shared loading options. No Auto class names
# them, so `save_pretrained` does not ship them: `save_hub_folder` copies them beside the model's files.
FRONT_DOOR_FILES = (PIPELINE_FILE, "inference.py", "loading_emovlm_kd.py")


__all__ = [
    "DATASET_LABEL_SETS",
    "GATES",
    "GATE_TYPES",
    "LABEL_SETS",
    "EmoVLMKDConfig",
    "EmoVLMKDDistillationHead",
    "EmoVLMKDForImageClassification",
    "EmoVLMKDFusion",
    "EmoVLMKDImageClassifierOutput",
    "EmoVLMKDImageProcessor",
    "EmoVLMKDPreTrainedModel",
    "EmoVLMKDProcessor",
    "load_image",
    "register_for_auto_class",
    "resolve_label_set",
]
