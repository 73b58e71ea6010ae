"""Atomic file writes: a reader (another process, a resumed run) sees the old file or the new one, never
half of one. Write to a temporary file in the same folder, then `os.replace` it onto the name, which is
atomic within one filesystem (POSIX rename). Named `files`, not `io`, so as not to shadow the standard
library's `io` for a script run from inside the package.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (with any writer: `open`, `savefig`, a workbook's
    `save`); when the block ends without error it replaces `path`, else it is removed. The temporary name is
    hidden, unique per call (so processes writing the same file do not collide), and keeps `path`'s suffix
    for writers that choose a format by it. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the block failed: after os.replace it is gone


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns `path`."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


@contextmanager
def replacing_folder(path: str | Path, prefix: str | None = None) -> Iterator[Path]:
    """A new temporary folder beside `path` for the block to fill; when the block ends without error it
    replaces `path` (a folder there is removed first: between that and the rename, a crash leaves neither),
    else it is removed. `prefix` names the temporary folder (default `.{name}.`), for a cleaner that
    finds those a killed process left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["replacing", "replacing_folder", "write_text"]
