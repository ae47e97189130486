"""Writing files so that a killed or failing process never leaves half of one behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text_atomic(text: str | Callable[[], str], path: str | Path, mode: int = 0o644) -> Path:
    """Write `text` (or what a callable returns) to a unique temporary file beside `path`, then rename it into place
    with permissions `mode` (0o600 for a file holding a credential: it is never readable by others, not even
    between the write and a later chmod).

    Readers (other ranks included) see the old file or the new one, never a mix; if producing the text fails, the
    old file is left as it was and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        try:
            handle.write(text() if callable(text) else text)
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.chmod(handle.name, mode)  # temporary files are private; results and split files are meant to be shared
    os.replace(handle.name, path)
    return path


def write_json_atomic(data: Any, path: str | Path, default: Callable[[Any], Any] | None = None) -> Path:
    """`write_text_atomic` of `data` as indented JSON; `default` is `json.dumps`'s hook for other types."""
    return write_text_atomic(lambda: json.dumps(data, indent=2, default=default) + "\n", path)


__all__ = ["write_json_atomic", "write_text_atomic"]
