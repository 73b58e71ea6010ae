"""Which files a datagen command may write over: only its own earlier output, known by a sidecar.

`--out` may name a file that already holds someone's data (a 1000-record `train.json`). Replacing
it, or "repairing" it as a torn resume file, destroys that data. So every datagen command claims
its output before touching it: beside `OUT` it writes `OUT.datagen` (JSON: the command's name),
and it writes over or resumes into an existing, non-empty `OUT` only when that sidecar is there
and names the same command. Anything else is refused untouched, with a one-line error that says
what to do. The sidecar is written before the output is first opened, so no crash can leave an
output of ours without one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vistune.datagen.jsonl import write_jsonl_atomic
from vistune.errors import DataError
from vistune.files import write_text

SIDECAR_SUFFIX = ".datagen"


def sidecar_path(out: Path) -> Path:
    """`data.jsonl` -> `data.jsonl.datagen`, next to it."""
    return out.with_name(out.name + SIDECAR_SUFFIX)


def _owner(out: Path) -> str | None:
    """The command named by `out`'s sidecar, or None when there is none (or it is not ours)."""
    try:
        data = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("command") if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def claim_output(out: Path, command: str, companions: tuple[Path, ...] = (),
                 adopt: Callable[[Path], bool] | None = None) -> None:
    """Check that `command` (e.g. "instruct") may write `out` and the `companions` written with it
    (the rejects file), then record the claim. Raises DataError, touching nothing, when one of them
    exists with content but `out` was not written by this command. `adopt(path)`: True for a file
    without a sidecar that is recognisably this command's all the same (written before sidecars were)."""
    out = Path(out)
    owner = _owner(out)
    for path in (out, *companions):
        if path.is_dir():
            raise DataError(f"{path} is a folder; --out needs a file name")
        if owner == command or not path.exists() or path.stat().st_size == 0:
            continue
        if owner is None and adopt is not None and adopt(path):
            continue
        if owner is None:
            raise DataError(f"{path} already exists and was not written by `vistune datagen {command}` "
                            f"(no {sidecar_path(out).name} beside it); refusing to touch it: choose another "
                            f"--out, or delete the file if its content is not needed")
        raise DataError(f"{path} was written by `vistune datagen {owner}`, not `{command}`; refusing to touch it: "
                        f"choose another --out, or delete the file if its content is not needed")
    if owner != command:
        write_text(sidecar_path(out), json.dumps({"command": command, "writer": "vistune datagen"}) + "\n")


def write_records(out: Path, records: list[dict[str, Any]], command: str) -> None:
    """Claim `out` for `command`, then write all `records` at once, atomically (temp file + rename):
    a JSON list when `out` ends in .json, else JSONL. For the fast, deterministic builders."""
    out = Path(out)
    claim_output(out, command)
    if out.suffix != ".json":
        write_jsonl_atomic(out, records)
        return
    write_text(out, json.dumps(records, ensure_ascii=False, indent=1))
