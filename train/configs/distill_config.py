"""Stage 2's arguments (`train/stages/distill.py` trains the head)."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.configs.trainer_args import CachedFeatureArguments


@dataclass
class DistillationConfig(CachedFeatureArguments):
    """Arguments of stage 2: the shared cached-feature stage arguments plus the distillation loss's own fields."""

    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term; 1 - alpha weighs the CE term."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of teacher and student."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")


__all__ = ["DistillationConfig"]
