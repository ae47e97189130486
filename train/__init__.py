"""Training, evaluation, analysis and publishing of EmoVLM-KD: `python -m train <command>`."""

# The pipeline's stages in order (each also a `python -m train` command); here so the command line can list them
# without importing the training stack.
STAGES = ("base", "instructions", "sft", "teacher", "features", "distill", "gate", "evaluate", "export")
