"""Append-only JSONL output that survives `kill -9` at any moment.

Each sample is one `os.write` of one complete line on an O_APPEND descriptor, so a killed run
leaves at worst a torn last line (a partial write). Opening the file again cuts such a tail off and
reports the ids already present, so a rerun writes exactly the missing samples. (Data in the page
cache survives a killed process; only a machine crash could lose the last lines, and those samples
would then simply be generated again: never duplicated.) Only a file whose complete lines are all
records with an id, and whose tail begins as `append` begins a line, is repaired; anything else is
refused untouched. Callers first check that the file is theirs at all (`outputs.claim_output`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vistune.errors import DataError
from vistune.files import replacing

_LINE_START = b'{"id": '  # how `append` begins every line


def is_torn_line(tail: bytes) -> bool:
    """Whether `tail` (the bytes after the last newline) can be the start of a line `append` wrote."""
    return tail.startswith(_LINE_START) or _LINE_START.startswith(tail)


def rejects_path(out: Path) -> Path:
    """`data.jsonl` -> `data.rejects.jsonl`, next to it."""
    return out.with_name(f"{out.stem}.rejects{out.suffix or '.jsonl'}")


class JsonlAppender:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        if self.path.exists():
            self._repair_and_read()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_and_read(self) -> None:
        # Check every complete line before changing a byte: a file that is not ours stays as it was.
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        for lineno, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                # A complete line that is not ours: refuse rather than guess which samples are done.
                raise DataError(f"{self.path}:{lineno}: not a JSON record with an `id`, so not this command's "
                                "output; not resuming into it (choose another --out)") from None
        tail = data[end:]
        if tail and not is_torn_line(tail):
            raise DataError(f"{self.path}: its last line is neither a record nor a torn one of ours; not resuming "
                            "into it (choose another --out)")
        if tail:
            with self.path.open("r+b") as f:
                f.truncate(end)

    def append(self, record: dict[str, Any]) -> None:
        record = {"id": record["id"], **record}  # the id leads every line: how a torn tail is recognised
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # a regular file takes it in one write; loop only for the pathological case
            n = os.write(self._fd, view)
            view = view[n:]
        self.ids.add(str(record["id"]))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    """Whole-file write for the fast, deterministic builders (align, mix): temp file + rename."""
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
