"""LLaVA-1.5's academic mixture: VQA-style sets -> LLaVA records with response-format prompts, and
`run_mix` to combine sets with ratios.

Converters read each set in its published layout (`layout`, exact keys):

| layout | `questions` file | `annotations` file | prompt added (LLaVA-1.5, Table 7) |
|---|---|---|---|
| `vqav2`, `okvqa` | `{"questions": [{image_id, question, question_id}]}` | `{"annotations": [{question_id, answers: [{answer}], multiple_choice_answer?}]}` | short answer |
| `gqa` | `{qid: {imageId, question, answer, fullAnswer, ...}}` (`*_balanced_questions.json`) | - | short answer |
| `ocrvqa` | `dataset.json`: `{image_id: {questions: [...], answers: [...], ...}}` | - | short answer |
| `aokvqa` | `aokvqa_v1p0_train.json`: `[{image_id, question_id, question, choices, correct_choice_idx, ...}]` | - | option letter |
| `textcaps` | `TextCaps_0.1_train.json`: `{"data": [{image_id, caption_str, ...}]}` | - | one-sentence caption |
| `refcoco` | `refs(unc).p` (pickle, plain data only) or the same list as JSON: `[{ref_id, ann_id, image_id, split, sentences: [{sent}]}]` | COCO `instances.json` (boxes, image sizes) | region description or box |
| `vg` | `region_descriptions.json`: `[{id, regions: [{image_id, x, y, width, height, phrase}]}]` | `image_data.json`: `[{image_id, width, height, url}]` | region description or box |

Short answer: "Answer the question using a single word or phrase."; option letter: the choices as
"A. ...", one a line, then "Answer with the option's letter from the given choices directly.";
region sets pick at random per region between "Please provide a short description for this region:
[x1, y1, x2, y2]" (answer: the phrase) and "Please provide the bounding box coordinate of the region
this sentence describes: {phrase}" (answer: the box). Boxes have 2 decimals and, by default, are
normalised on the image padded to a centred square (`box_frame="square"`), which is the frame the
model sees under vistune's default `image_preprocess: pad` (as LLaVA-1.5's); `"image"` normalises
by width and height instead. RefCOCO keeps only its `train` split (the others are benchmarks).

With `merge_per_image` (default) all questions about one image become one multi-turn conversation,
as LLaVA-1.5 did; `<image>` leads the first turn, as in LLaVA-1.5's mixture.
"""

from __future__ import annotations

import json
import pickle
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vistune.answer_formats import CAPTION, GROUND, LETTER_ANSWER, REGION, SHORT_ANSWER
from vistune.data.records import read_records
from vistune.datagen.outputs import write_records
from vistune.datagen.summary import Summary
from vistune.errors import DataError, RegistryKeyError
from vistune.tokens import IMAGE_PLACEHOLDER

IMAGE_TEMPLATES = {  # where LLaVA-1.5's mixture keeps each set's images, relative to one image folder
    "vqav2": "coco/train2017/{image_id:012d}.jpg",
    "okvqa": "coco/train2017/{image_id:012d}.jpg",
    "aokvqa": "coco/train2017/{image_id:012d}.jpg",
    "refcoco": "coco/train2017/{image_id:012d}.jpg",
    "gqa": "gqa/images/{image_id}.jpg",
    "ocrvqa": "ocr_vqa/images/{image_id}.jpg",
    "textcaps": "textvqa/train_images/{image_id}.jpg",
    "vg": "vg/{folder}/{image_id}.jpg",  # folder: VG_100K or VG_100K_2, from image_data.json's url
}

Item = tuple[Any, str, str, dict[str, Any]]  # (image id, question, answer, extra template fields)


def _load(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".p":  # RefCOCO's refs(unc).p, as distributed
        return _load_plain_pickle(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build (lists, dicts, tuples, str, bytes, int, float, bool,
    None): `find_class` is the one door through which a pickle reaches code (os.system, eval, any
    class), and it admits nothing. refs(unc).p (the refer API's file, a Python 2 pickle) is a list of
    dicts of strings, numbers and lists, so it loads; a crafted file fails before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only plain lists, dicts, strings and numbers "
                                     "are accepted")


def _load_plain_pickle(path: Path) -> Any:
    with path.open("rb") as f:
        try:  # Python 2 byte strings decode as UTF-8 (a superset of the ASCII the refer files hold)
            return _PlainUnpickler(f, encoding="utf-8").load()
        except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not loaded as a plain-data pickle ({e}); refusing it, as a pickle can run code. "
                            "Convert the file to JSON with the same list of refs, from a Python you trust") from None


def _need(annotations: Path | None, layout: str) -> Path:
    if annotations is None:
        raise DataError(f"layout {layout!r} needs an annotations file")
    return annotations


def _majority(answers: list[dict[str, Any]]) -> str:
    """The most frequent answer (first seen wins a tie), as VQAv2's multiple_choice_answer is."""
    counts = Counter(str(a["answer"]).strip() for a in answers)
    return max(counts, key=lambda a: (counts[a], -[str(x["answer"]).strip() for x in answers].index(a)))


def _box(x1: float, y1: float, x2: float, y2: float, w: float, h: float, frame: str) -> str:
    if frame == "square":  # the image centred on a square of side max(w, h)
        side = max(w, h)
        dx, dy = (side - w) / 2, (side - h) / 2
        vals = ((x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side)
    else:
        vals = (x1 / w, y1 / h, x2 / w, y2 / h)
    return "[" + ", ".join(f"{min(1.0, max(0.0, v)):.2f}" for v in vals) + "]"


def _vqa(questions: Path, annotations: Path | None, layout: str) -> Iterator[Item]:
    qs = _load(questions)["questions"]
    anns = {a["question_id"]: a for a in _load(_need(annotations, layout))["annotations"]}
    for q in qs:
        a = anns.get(q["question_id"])
        if a is None:
            continue
        answer = a.get("multiple_choice_answer") or _majority(a["answers"])
        yield q["image_id"], f"{q['question']}\n{SHORT_ANSWER}", answer, {}


def _gqa(questions: Path) -> Iterator[Item]:
    for q in _load(questions).values():
        yield q["imageId"], f"{q['question']}\n{SHORT_ANSWER}", str(q["answer"]), {}


def _ocrvqa(questions: Path) -> Iterator[Item]:
    for image_id, d in _load(questions).items():
        for q, a in zip(d["questions"], d["answers"]):
            yield image_id, f"{q}\n{SHORT_ANSWER}", str(a), {}


def _aokvqa(questions: Path) -> Iterator[Item]:
    for q in _load(questions):
        if q.get("correct_choice_idx") is None:  # the test split has no answers
            continue
        options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(q["choices"]))
        yield q["image_id"], f"{q['question']}\n{options}\n{LETTER_ANSWER}", chr(65 + q["correct_choice_idx"]), {}


def _textcaps(questions: Path, rng: random.Random, merge: bool) -> Iterator[Item]:
    by_image: dict[str, list[str]] = {}
    for d in _load(questions)["data"]:
        if "caption_str" in d:  # the test file has no captions
            by_image.setdefault(d["image_id"], []).append(d["caption_str"])
    for image_id, caps in by_image.items():
        for c in [rng.choice(caps)] if merge else caps:  # one caption per image, as LLaVA-1.5's 22K
            yield image_id, CAPTION, c, {}


def _region(phrase: str, box: str, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return REGION.format(box=box), phrase
    return GROUND.format(phrase=phrase.strip().rstrip(".")) + ".", box


def _refcoco(questions: Path, annotations: Path | None, rng: random.Random, frame: str) -> Iterator[Item]:
    inst = _load(_need(annotations, "refcoco"))
    sizes = {i["id"]: (i["width"], i["height"]) for i in inst["images"]}
    boxes = {a["id"]: a["bbox"] for a in inst["annotations"]}
    for ref in _load(questions):
        if ref.get("split", "train") != "train":
            continue
        x, y, bw, bh = boxes[ref["ann_id"]]
        w, h = sizes[ref["image_id"]]
        box = _box(x, y, x + bw, y + bh, w, h, frame)
        for s in ref["sentences"]:
            q, a = _region(s["sent"], box, rng)
            yield ref["image_id"], q, a, {}


def _vg(questions: Path, annotations: Path | None, rng: random.Random, frame: str) -> Iterator[Item]:
    meta = {}
    for d in _load(_need(annotations, "vg")):
        image_id = d.get("image_id", d.get("id"))
        url = str(d.get("url", ""))
        folder = url.rstrip("/").split("/")[-2] if "/" in url else "VG_100K"
        meta[image_id] = (d["width"], d["height"], folder)
    for entry in _load(questions):
        for r in entry["regions"]:
            w, h, folder = meta[r["image_id"]]
            box = _box(r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"], w, h, frame)
            q, a = _region(" ".join(str(r["phrase"]).split()), box, rng)
            yield r["image_id"], q, a, {"folder": folder}


LAYOUTS = ("vqav2", "okvqa", "gqa", "ocrvqa", "aokvqa", "textcaps", "refcoco", "vg")


def _image_path(template: str, image_id: Any, extra: dict[str, Any]) -> str:
    try:
        return template.format(image_id=int(image_id), **extra)
    except (ValueError, TypeError):  # a non-numeric id under a numeric format such as {image_id:012d}
        return template.replace(":012d", "").format(image_id=image_id, **extra)


def convert_vqa(layout: str, questions: Path, annotations: Path | None, out: Path, *, image_template: str | None = None,
                merge_per_image: bool = True, seed: int = 0, box_frame: str = "square",
                max_turns: int | None = None) -> Summary:
    """Convert one set (see the module docstring) to LLaVA records in `out` (.jsonl, or .json for a list).

    `image_template` (a `str.format` pattern with `{image_id}`) overrides where images are said to be;
    `max_turns` splits a merged image's questions into conversations of at most that many turns."""
    if layout not in LAYOUTS:
        raise RegistryKeyError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if box_frame not in ("square", "image"):
        raise RegistryKeyError(f"unknown box_frame {box_frame!r}; valid: square, image")
    rng = random.Random(seed)
    items: Iterator[Item]
    try:
        if layout in ("vqav2", "okvqa"):
            items = _vqa(questions, annotations, layout)
        elif layout == "gqa":
            items = _gqa(questions)
        elif layout == "ocrvqa":
            items = _ocrvqa(questions)
        elif layout == "aokvqa":
            items = _aokvqa(questions)
        elif layout == "textcaps":
            items = _textcaps(questions, rng, merge_per_image)
        elif layout == "refcoco":
            items = _refcoco(questions, annotations, rng, box_frame)
        else:
            items = _vg(questions, annotations, rng, box_frame)
        groups: dict[str, tuple[str, list[tuple[str, str]]]] = {}  # key -> (image, turns)
        template = image_template or IMAGE_TEMPLATES[layout]
        for n, (image_id, q, a, extra) in enumerate(items):
            key = str(image_id) if merge_per_image else f"{image_id}-{n}"
            groups.setdefault(key, (_image_path(template, image_id, extra), []))[1].append((q, a))
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{questions}: not in the published {layout} layout (missing or bad {e})") from None
    records = []
    for key, (image, turns) in groups.items():
        step = max_turns or len(turns)
        for part, start in enumerate(range(0, len(turns), step)):
            conv = []
            for i, (q, a) in enumerate(turns[start:start + step]):
                conv += [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}" if i == 0 else q},
                         {"from": "gpt", "value": a}]
            rid = f"{layout}-{key}" + (f"-{part}" if len(turns) > step else "")
            records.append({"id": rid, "image": image, "conversations": conv})
    summary = Summary()
    summary.wrote(layout, len(records))
    write_records(Path(out), records, "convert")
    return summary


def run_mix(inputs: list[tuple[Path, float]], out: Path, *, seed: int = 0) -> Summary:
    """Combine LLaVA sets (.json or .jsonl): keep a random `ratio` (0 < ratio <= 1) of each, shuffle all.

    Ids stay as they are unless two records share one; then (and for records without an id) the id
    becomes `{file stem}/{id or index}`, so every output id is unique."""
    rng = random.Random(seed)
    merged: list[dict[str, Any]] = []
    summary = Summary()
    seen: set[str] = set()
    for path, ratio in inputs:
        if not 0 < ratio <= 1:
            raise DataError(f"{path}: ratio {ratio} must be in (0, 1] (the fraction of the set to keep)")
        records = read_records(path)
        k = round(ratio * len(records))
        keep = sorted(rng.sample(range(len(records)), k))
        for i in keep:
            r = dict(records[i])
            rid = str(r["id"]) if "id" in r else None
            if rid is None or rid in seen:
                rid = f"{Path(path).stem}/{rid if rid is not None else i}"
            if rid in seen:
                raise DataError(f"{path}: record {i} has id {rid!r} twice even after prefixing; fix the input ids")
            r["id"] = rid
            seen.add(rid)
            merged.append(r)
        summary.wrote(Path(path).name, k)
        if len(records) > k:
            summary.reject(f"{Path(path).name}: left out by ratio {ratio}", len(records) - k)
    rng.shuffle(merged)
    write_records(Path(out), merged, "mix")
    return summary
