"""An append-only JSONL record store that survives being killed mid-write.

Used by the instruction answer cache (`train/stages/instructions.py`) and `train predict`'s JSONL output
(`train/commands/predict.py`): one JSON object per line, each `append` written in one call, flushed and fsynced before it
returns, so that a kill can only ever cut the line being written. Reading drops that torn last line (a line without
its `\\n`) and cuts it off before the next append, so a new record always starts on a line of its own. Complete
lines that do not parse (or that `validate` refuses) are skipped and counted, never fatal.

    store = RecordStore("runs/emoset/answers.jsonl", validate=lambda r: "key" in r)
    records = store.read()          # every readable record, in file order
    store.append([{"key": "a", "answer": "..."}])
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RecordStore:
    """Append-only JSONL of dict records at `path` (created with its folder on the first append).

    `validate(record) -> bool` refuses records of the wrong shape on read (they count as skipped lines).
    `ensure_ascii=False` keeps non-ASCII text readable in the file; the default escapes it, which also writes file
    names holding lone surrogates (undecodable bytes) that UTF-8 cannot encode.
    """

    def __init__(self, path: str | os.PathLike, validate: Callable[[dict], bool] | None = None,
                 ensure_ascii: bool = True):
        self.path = Path(path)
        self.validate = validate
        self.ensure_ascii = ensure_ascii
        self.skipped_lines = 0
        self._repair_at: int | None = None  # byte offset of a torn last line, cut off before the next append
        self._checked = False  # whether _repair_at is known (after a read or the first append)

    def read(self) -> list[dict[str, Any]]:
        """The file's readable records in order; counts unreadable lines in `skipped_lines`. Does not write."""
        self.skipped_lines, self._repair_at, self._checked = 0, None, True
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self._repair_at = end
            self.skipped_lines += 1
            logger.warning("Ignoring a partially written last line of %s (an interrupted run).", self.path)
        records = []
        for line in data[:end].split(b"\n"):
            record = self._parse(line)
            if record is None:
                self.skipped_lines += line.strip() != b""
            else:
                records.append(record)
        unreadable = self.skipped_lines - (self._repair_at is not None)
        if unreadable:
            logger.warning("Skipped %d unreadable line(s) of %s.", unreadable, self.path)
        return records

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict) or (self.validate is not None and not self.validate(record)):
            return None
        return record

    def repair(self) -> None:
        """Cut off a torn last line now (`append` does it by itself). Reads only the last byte of a file that this
        store has not read yet, so appending record by record stays cheap."""
        if not self._checked:
            self._checked = True
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as file:
                    file.seek(-1, os.SEEK_END)
                    if file.read(1) != b"\n":
                        self._repair_at = self.path.read_bytes().rfind(b"\n") + 1
        if self._repair_at is not None:
            with open(self.path, "r+b") as file:
                file.truncate(self._repair_at)
            self._repair_at = None

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append `records` in one write, flushed and fsynced: after a kill, each is either whole or torn."""
        text = "".join(json.dumps(record, ensure_ascii=self.ensure_ascii) + "\n" for record in records)
        if not text:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repair()
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the file by `records` atomically (a temporary file renamed over it)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.unlink(missing_ok=True)
        RecordStore(tmp, ensure_ascii=self.ensure_ascii).append(records)
        tmp.touch()
        os.replace(tmp, self.path)


__all__ = ["RecordStore"]
