"""Training, evaluation, analysis and publishing of EmoVLM-KD: `python -m train <command>`."""

# The pipeline's stages in order (each also a `python -m train` command), from the stage table; importing it loads
# neither torch nor the training stack, so the command line lists them at once.
from train.infra.stage_table import STAGES

__all__ = ["STAGES"]
