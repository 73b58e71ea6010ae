"""Data files for tests in more than one layer (unit: the loader's checks; e2e: a training run meets them)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def bomb_png(path: Path, width: int = 20000, height: int = 10000) -> Path:
    """A real PNG whose header claims 200 MP, over the 2 x Image.MAX_IMAGE_PIXELS (179 MP) Pillow refuses
    to open; under 100 bytes on disk, as a decompression bomb would be."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def two_image_data(dataset_dir: Path, out: Path, bad: bool = False, singles: bool = True) -> Path:
    """out/pairs.json: the fixture records (or only the text-only ones) plus six two-image records, and with
    `bad` one whose two images have one placeholder. Image paths are relative to dataset_dir/images."""
    records = [r for r in json.loads((dataset_dir / "train.json").read_text()) if singles or "image" not in r]
    for k in range(6):
        a, b = f"img_{k}.png", f"img_{k + 1}.png"
        records.append({"id": f"pair_{k}", "image": [a, b], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich image shows the shape on the left?"},
            {"from": "gpt", "value": "The first." if k % 2 == 0 else "The second."}]})
    if bad:  # two images, one placeholder
        records.append({"id": "pair_bad", "image": ["img_0.png", "img_1.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhich one?"}, {"from": "gpt", "value": "The first."}]})
    path = out / "pairs.json"
    path.write_text(json.dumps(records))
    return path
