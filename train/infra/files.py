"""Writing files so that a killed or failing process never leaves half of one behind."""

from __future__ import annotations

import hashlib
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


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 over a model folder's weight files (`*.safetensors` and their index, by name, in name order): the
    identity of the weights that were saved, recorded by the export and checked by `python -m train verify`."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors"
                                                                  or p.name.endswith(".safetensors.index.json")))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights.")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def without_local_paths(data: Any) -> Any:
    """A saved config's JSON with every `_name_or_path` that names a local path (absolute, or under `~`) emptied, at
    any depth.

    `save_pretrained` records where each (sub-)config was loaded from: for a trained run, a folder of this machine
    (`<run>/sft/merged`). Loading never reads it; it names this machine, not the model, and must not be published.
    """
    if isinstance(data, dict):
        return {key: "" if key == "_name_or_path" and isinstance(value, str) and (
            os.path.isabs(value) or value.startswith("~")) else without_local_paths(value)
            for key, value in data.items()}
    if isinstance(data, list):
        return [without_local_paths(value) for value in data]
    return data


def public_json(path: str | Path) -> bytes | None:
    """A JSON file as it may leave the machine (`without_local_paths`, laid out as `save_pretrained` writes it), or
    None when it records no local path and can go as it is."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    cleaned = without_local_paths(data)
    if cleaned == data:
        return None
    return (json.dumps(cleaned, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


__all__ = ["public_json", "weights_sha256", "without_local_paths", "write_json_atomic", "write_text_atomic"]
