"""Annotation sources: COCO caption/instance files as distributed, or a JSONL of `{image, captions, boxes}`.

Everything becomes an `ImageRecord` whose boxes are `x1, y1, x2, y2` normalised to [0, 1] by the
image's width and height, the form the symbolic context prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistune.errors import DataError


@dataclass(frozen=True)
class Box:
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2, normalised to [0, 1]


@dataclass(frozen=True)
class ImageRecord:
    id: str  # stable: output ids are built from it, and resume relies on that
    image: str  # path as the LLaVA record will hold it (relative to the training image folder)
    width: int
    height: int
    captions: tuple[str, ...]
    boxes: tuple[Box, ...]


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, v))


def _normalise(x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> tuple[float, float, float, float]:
    return (_clip01(x1 / w), _clip01(y1 / h), _clip01(x2 / w), _clip01(y2 / h))


def read_coco(captions: Path, instances: Path | None = None, limit: int | None = None) -> list[ImageRecord]:
    """Images of a COCO `captions_*.json` (2014 or 2017) in file order, with their boxes from
    `instances_*.json` when given. Images without a caption are left out; `limit` keeps the first N.

    `image` is the file name (`000000000139.jpg`; 2014: `COCO_train2014_000000000139.jpg`), `id` the
    image id as a string. Crowd annotations (`iscrowd: 1`) are kept, as the paper's context has them.
    """
    cap = _load_json(Path(captions))
    try:
        images = {img["id"]: img for img in cap["images"]}
        by_image: dict[Any, list[str]] = {}
        for a in cap["annotations"]:
            by_image.setdefault(a["image_id"], []).append(" ".join(str(a["caption"]).split()))
    except (KeyError, TypeError) as e:
        raise DataError(f"{captions}: not a COCO captions file (missing {e})") from None
    boxes: dict[Any, list[Box]] = {}
    if instances is not None:
        inst = _load_json(Path(instances))
        try:
            names = {c["id"]: c["name"] for c in inst["categories"]}
            sizes = {img["id"]: (img["width"], img["height"]) for img in inst["images"]}
            for a in inst["annotations"]:
                w, h = sizes[a["image_id"]]
                x, y, bw, bh = a["bbox"]  # COCO: top-left corner, width, height, in pixels
                boxes.setdefault(a["image_id"], []).append(
                    Box(names[a["category_id"]], _normalise(x, y, x + bw, y + bh, w, h)))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{instances}: not a COCO instances file (missing or bad {e})") from None
    out = []
    for image_id, img in images.items():
        if image_id not in by_image:
            continue
        out.append(ImageRecord(id=str(image_id), image=img["file_name"], width=int(img["width"]),
                               height=int(img["height"]), captions=tuple(by_image[image_id]),
                               boxes=tuple(boxes.get(image_id, ()))))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_jsonl(path: Path) -> list[ImageRecord]:
    """Records of a JSONL file, one image a line:

        {"id": "a1" (optional, default: `image`), "image": "dir/a1.jpg", "width": 640, "height": 480,
         "captions": ["..."], "boxes": [{"category": "dog", "bbox": [x1, y1, x2, y2]}]}

    Boxes are corners `x1, y1, x2, y2`. With `width` and `height` given they are in pixels and are
    normalised here; without them they must already be normalised to [0, 1] (checked).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict) or not isinstance(d.get("image"), str):
                raise DataError(f"{where}: needs an object with a string `image`")
            captions = d.get("captions", [])
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{where}: `captions` must be a list of strings")
            w, h = d.get("width"), d.get("height")
            pixels = w is not None and h is not None
            boxes = []
            for b in d.get("boxes", []):
                try:
                    x1, y1, x2, y2 = (float(v) for v in b["bbox"])
                    category = str(b["category"])
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{where}: each box needs `category` and `bbox` [x1, y1, x2, y2]") from None
                if pixels:
                    bbox = _normalise(x1, y1, x2, y2, int(w), int(h))
                elif all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
                    bbox = (x1, y1, x2, y2)
                else:
                    raise DataError(f"{where}: box {b['bbox']} is in pixels but the line has no width/height")
                boxes.append(Box(category, bbox))
            out.append(ImageRecord(id=str(d.get("id", d["image"])), image=d["image"], width=int(w or 0),
                                   height=int(h or 0), captions=tuple(" ".join(c.split()) for c in captions),
                                   boxes=tuple(boxes)))
    return out
