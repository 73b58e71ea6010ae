"""Reading the parquet layouts in which the HF evaluation datasets are published (lmms-lab/*).

A hub snapshot keeps each split as shards named `<split>-NNNNN-of-NNNNN[-hash].parquet`, under
`data/` for a dataset's default config or under `<config>/` otherwise (`ScienceQA-IMG/test-*`,
`en/dev-*`, `testdev_balanced_images/testdev-*`). Image columns are the `datasets.Image` feature
stored as a struct {bytes, path}; a sequence of images is a list of those structs.

pyarrow reads the files; this module only finds the shards of a split, checks the columns a task
needs (naming the file and what is missing) and turns image cells into encoded bytes, which the
task decodes at batch time like MMBench's base64 cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistune.errors import DataError

# Where a split's shards lie in a snapshot, relative to the task's folder, in the order tried.
SHARD_DIRS = ("data", ".")


def find_split(root: Path, splits: Sequence[str], configs: Sequence[str] = SHARD_DIRS) -> tuple[str, list[Path]] | None:
    """The first (split, shards) found under root/<config>/<split>-*.parquet, configs and splits in
    the order given; None when none is there (the task then reads its JSON layout)."""
    for config in configs:
        for split in splits:
            shards = sorted((root / config).glob(f"{split}-*.parquet"))
            if shards:
                return split, shards
    return None


def has_parquet(root: Path) -> bool:
    """Whether the folder holds any parquet file (a snapshot) at its top or one level down."""
    return any(root.glob("*.parquet")) or any(root.glob("*/*.parquet"))


def read_rows(shards: Sequence[Path], columns: Sequence[str], task: str,
              optional: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of all shards as dicts with `columns` (required) and those of `optional` present."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{task}: reading the parquet layout needs pyarrow: pip install 'vistune[eval]'",
                        "missing dependency") from None
    rows: list[dict[str, Any]] = []
    for shard in shards:
        names = pq.read_schema(shard).names
        lacking = [c for c in columns if c not in names]
        if lacking:
            raise DataError(f"{task}: {shard} has no column(s) {', '.join(lacking)} (it has {', '.join(names)}); "
                            "expected the lmms-lab layout listed in docs/eval.md", "bad file")
        wanted = [*columns, *(c for c in optional if c in names)]
        rows += pq.read_table(shard, columns=wanted).to_pylist()
    return rows


def image_bytes(cell: Any, where: str) -> bytes:
    """Encoded image bytes from a `datasets.Image` cell ({bytes, path}), raw bytes, or a one-image list."""
    if isinstance(cell, list) and len(cell) == 1:
        cell = cell[0]
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if isinstance(cell, (bytes, bytearray)) and cell:
        return bytes(cell)
    raise DataError(f"{where}: no embedded image bytes (hub snapshots embed them; a path-only cell "
                    "cannot be resolved here)", "bad record")


def images_of(cell: Any, where: str) -> tuple[bytes, ...]:
    """All images of a cell that holds one image or a sequence of them (SEED-Bench's `image`)."""
    cells = cell if isinstance(cell, list) else [cell]
    return tuple(image_bytes(c, f"{where} image {k}") for k, c in enumerate(cells))
