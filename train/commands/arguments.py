"""Argument types shared by the command-line tools (`predict`, `evaluate-model`, `spread`)."""

import argparse


def int_at_least(minimum: int):
    """An argparse type: an integer of at least `minimum` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)

__all__ = ["int_at_least", "non_negative_int", "positive_int"]
