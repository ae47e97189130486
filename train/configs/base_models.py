"""The real base models a recipe trains from when it names none (the paper's): one place for the recipe's defaults,
the stage configs and the model card. Torch-free, so the card's metadata loads without torch."""

DEFAULT_VLM = "Qwen/Qwen2-VL-7B-Instruct"
DEFAULT_TEACHER = "google/vit-base-patch16-384"

__all__ = ["DEFAULT_TEACHER", "DEFAULT_VLM"]
