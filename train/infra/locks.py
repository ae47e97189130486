"""One process at a time on a run folder or an output file.

`exclusive(path)` takes an OS file lock (`filelock`, released by the kernel when the holder dies, so a killed
process leaves no lock that blocks the next run) without waiting, and records the holder's PID beside it; a second
process fails at once with an error naming the lock and that PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from train.infra.files import write_text_atomic
from train.infra.secrets import redact_text


class LockedError(RuntimeError):
    """Another process holds the lock."""


def _holder(info_path: Path) -> str:
    try:
        info = json.loads(info_path.read_text())
        return f"PID {info['pid']} on {info.get('host', '?')} (`{info.get('command', '?')}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its PID was not recorded yet)"


@contextlib.contextmanager
def exclusive(lock_path: str | Path, what: str):
    """Hold `lock_path` while the block runs; `what` names the thing locked in the error message."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    info_path = lock_path.with_name(lock_path.name + ".pid")
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(
            f"{what} is in use: the lock {lock_path} is held by {_holder(info_path)}. Wait for that process to "
            "finish or stop it; a lock left by a killed process is released by the system."
        ) from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                # The holder's command line, shown to a second process: credentials inside URLs masked.
                "command": redact_text(" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]))[:300]}
        write_text_atomic(json.dumps(info), info_path)  # readers never see it half-written
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            info_path.unlink()
        lock.release()


__all__ = ["LockedError", "exclusive"]
