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


def _size(width: Any, height: Any, where: str) -> tuple[int, int]:
    """A positive (width, height) in pixels, or a DataError naming `where` (boxes are divided by them)."""
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError, OverflowError):
        w = h = 0
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: width {json.dumps(width)} and height {json.dumps(height)} must be positive "
                        "pixel counts; fix them or remove the image")
    return w, h


def _coco_captions(path: Path, cap: Any) -> tuple[dict[Any, dict[str, Any]], dict[Any, list[str]]]:
    """(image id -> image entry, image id -> its captions) of a captions file, each entry checked."""
    if not (isinstance(cap, dict) and isinstance(cap.get("images"), list) and isinstance(cap.get("annotations"), list)):
        raise DataError(f"{path}: not a COCO captions file (needs `images` and `annotations` lists)")
    images: dict[Any, dict[str, Any]] = {}
    for i, img in enumerate(cap["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataError(f"{path}: images[{i}] (id {img.get('id') if isinstance(img, dict) else None!r}) needs an "
                            "`id` and a string `file_name`; fix or remove it")
        images[img["id"]] = img
    by_image: dict[Any, list[str]] = {}
    for i, a in enumerate(cap["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a:
            raise DataError(f"{path}: annotations[{i}] needs an `image_id`; fix or remove it")
        caption = a.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path}: annotations[{i}] (id {a.get('id')!r}, image {a['image_id']!r}) has caption "
                            f"{json.dumps(caption)}, not a non-empty string; fix or remove it")
        by_image.setdefault(a["image_id"], []).append(" ".join(caption.split()))
    return images, by_image


def _coco_boxes(path: Path, inst: Any) -> dict[Any, list[Box]]:
    """Image id -> its boxes, normalised, from an instances file."""
    try:
        names = {c["id"]: c["name"] for c in inst["categories"]}
        entries = {img["id"]: img for img in inst["images"]}
        annotations = list(inst["annotations"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO instances file (missing or bad {e})") from None
    boxes: dict[Any, list[Box]] = {}
    for i, a in enumerate(annotations):
        where = f"{path}: annotations[{i}] (id {a.get('id') if isinstance(a, dict) else None!r})"
        try:
            img = entries[a["image_id"]]
            x, y, bw, bh = (float(v) for v in a["bbox"])  # COCO: top-left corner, width, height, in pixels
            name = names[a["category_id"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: missing or bad {e} (needs image_id, category_id and bbox [x, y, w, h] of "
                            "a listed image and category); fix or remove it") from None
        w, h = _size(img.get("width"), img.get("height"), f"{path}: image {a['image_id']!r}")
        boxes.setdefault(a["image_id"], []).append(Box(name, _normalise(x, y, x + bw, y + bh, w, h)))
    return boxes


def read_coco(captions: Path, instances: Path | None = None, limit: int | None = None) -> list[ImageRecord]:
    """Images of a COCO `captions_*.json` (2014 or 2017) in file order, with their boxes from
    `instances_*.json` when given. Images without a caption are left out; `limit` keeps the first N.

    `image` is the file name (`000000000139.jpg`; 2014: `COCO_train2014_000000000139.jpg`), `id` the
    image id as a string. Crowd annotations (`iscrowd: 1`) are kept, as the paper's context has them.
    A missing `file_name`, a width or height that is not positive, or a caption that is not a
    non-empty string stops with a one-line error naming the entry and what to do.
    """
    images, by_image = _coco_captions(Path(captions), _load_json(Path(captions)))
    boxes = _coco_boxes(Path(instances), _load_json(Path(instances))) if instances is not None else {}
    out = []
    for image_id, img in images.items():
        if image_id not in by_image:
            continue
        # The captions file's sizes are not needed (boxes use the instances file's): absent means unknown.
        unknown = img.get("width") is None and img.get("height") is None
        w, h = (0, 0) if unknown else _size(img.get("width"), img.get("height"), f"{captions}: image {image_id!r}")
        out.append(ImageRecord(id=str(image_id), image=img["file_name"], width=w, height=h,
                               captions=tuple(by_image[image_id]), boxes=tuple(boxes.get(image_id, ()))))
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
            pixels = d.get("width") is not None and d.get("height") is not None
            w, h = _size(d["width"], d["height"], where) if pixels else (0, 0)  # 0: unknown, boxes must be in [0, 1]
            boxes = []
            for b in d.get("boxes", []):
                try:
                    x1, y1, x2, y2 = (float(v) for v in b["bbox"])
                    category = str(b["category"])
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{where}: each box needs `category` and `bbox` [x1, y1, x2, y2]") from None
                if pixels:
                    bbox = _normalise(x1, y1, x2, y2, w, h)
                elif all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
                    bbox = (x1, y1, x2, y2)
                else:
                    raise DataError(f"{where}: box {b['bbox']} is in pixels but the line has no width/height")
                boxes.append(Box(category, bbox))
            out.append(ImageRecord(id=str(d.get("id", d["image"])), image=d["image"], width=w, height=h,
                                   captions=tuple(" ".join(c.split()) for c in captions), boxes=tuple(boxes)))
    return out
