"""Known-harmless library messages, filtered by message at the project's entry points (never at import).

`python -m train` calls `quiet_known_warnings()` first thing, so a user's run shows what needs attention; importing
the project or the libraries from one's own code still shows everything. Each entry says why it is harmless; a
message that differs from the listed text in its beginning is shown.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, start of the message) of log records to drop.
KNOWN_LOG_MESSAGES = (
    # bitsandbytes >= 0.50, at import on CPUs with AVX512-BF16: the optional `kernels` package would download a 4-bit
    # CPU kernel from the Hub; without it bitsandbytes uses its own CPU kernels (see shared STACK-NOTES).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# (warning category, regular expression matching the start of the message) of warnings to ignore.
KNOWN_WARNINGS = (
    # torch's DataLoader without an accelerator: Trainer's default `dataloader_pin_memory=True` is a no-op there.
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)


class _DropKnownMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Filter the messages of `KNOWN_LOG_MESSAGES` and `KNOWN_WARNINGS` in this process (calling it again changes
    nothing). Call it before the libraries are imported: bitsandbytes logs its message at import."""
    prefixes: dict[str, tuple[str, ...]] = {}
    for name, prefix in KNOWN_LOG_MESSAGES:
        prefixes[name] = (*prefixes.get(name, ()), prefix)
    for name, known in prefixes.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropKnownMessages) for existing in logger.filters):
            logger.addFilter(_DropKnownMessages(known))
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)  # replaces an identical filter


__all__ = ["KNOWN_LOG_MESSAGES", "KNOWN_WARNINGS", "quiet_known_warnings"]
