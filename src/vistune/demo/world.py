"""The demo's synthetic world: rendered scenes of coloured shapes, written in the COCO layout.

A scene holds 1-3 large, separate objects (shape, colour, size, position) on a pale textured
background; two scenes in five hold a single object. Its ground truth becomes what a real data set
ships:
- `annotations/captions_{split}.json`: several captions per image in varied wording (COCO captions),
  each naming every object by colour and shape;
- `annotations/instances_{split}.json`: one box per object, category "red circle" with supercategory
  "circle" (COCO instances; bbox is [x, y, w, h] in pixels);
- `annotations/vqa_questions_{split}.json` + `vqa_annotations_{split}.json`: short-answer questions
  in the VQAv2 layout (`question_type` holds the demo's type, see `TIERS`), the world's stand-in for
  an academic VQA set;
- `annotations/compare_{split}.json`: two-image questions ("Which image has more circles? Answer first
  or second."), `{"questions": [{question_id, image_ids: [a, b], question, answer, question_type}]}`.
Every later step reads these files the way it reads the real COCO and VQAv2 files.

Questions come in two tiers (`TIERS`). **Readout** questions ask for an attribute of the scene itself,
so the answer is read off the image with no need to find the thing a question names: the colour,
shape, side and size of a one-object scene's object, and scene-level questions (how many objects,
more than two, which colour covers most). **Binding** questions name one object and ask about another
of its attributes (existence with POPE's negatives, the colour of the circle, the shape of the red
object, and the two-image comparison): the skill a pretrained LLM brings to LLaVA and a minutes-old
one lacks (benchmarks/README.md). Colour and shape questions are only asked when the answer is unique.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vistune.files import write_text

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
}
CATEGORIES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
#: Question type -> tier. Readout needs no binding of a named object to another attribute.
TIERS: dict[str, str] = {
    "colour": "readout", "shape": "readout", "position": "readout", "size": "readout",  # one-object scenes
    "count": "readout", "more_than_two": "readout", "main_colour": "readout",  # any scene
    "existence": "binding", "colour_of_shape": "binding", "shape_of_colour": "binding", "compare": "binding",
}
MULTI_IMAGE_TYPES: tuple[str, ...] = ("compare",)  # questions about two images at once
QUESTION_TYPES: tuple[str, ...] = tuple(t for t in TIERS if t not in MULTI_IMAGE_TYPES)
COMPARE_QUESTION = "Which image has more circles? Answer first or second."
_COMPARE_ID = 10**9  # compare question ids start here, clear of the VQA ids (scene id * 100 + k)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
#: Smooth backgrounds only: stripes, speckles and checks (the first world's) cost the small CLIP steps
#: it needs for the objects. `render` still draws every kind.
BACKGROUNDS = ("plain", "gradient")
#: Box side in pixels of a small / large object on a 64-px canvas: large enough that each object
#: covers several of the CLIP stand-in's 8-px patches, so its shape is in its tokens.
SIZES: dict[str, tuple[int, int]] = {"small": (18, 22), "large": (28, 34)}
#: Objects per scene, drawn uniformly from this tuple: one object in two scenes of five, at most three.
OBJECT_COUNTS: tuple[int, ...] = (1, 1, 2, 2, 3)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        """Painted pixels (a circle covers pi/4 of its box, a triangle half)."""
        side = (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])
        return side * {"circle": 0.785, "square": 1.0, "triangle": 0.5}[self.shape]


@dataclass(frozen=True)
class Scene:
    id: int
    objects: tuple[Obj, ...]
    background: str
    tint: tuple[int, int, int]
    seed: int  # for the background texture

    @property
    def file_name(self) -> str:
        return f"{self.id:012d}.png"


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 2) -> bool:
    """The boxes are at least `gap` pixels apart, so objects never touch and counting stays unambiguous."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(rng: random.Random, scene_id: int, canvas: int = 64) -> Scene:
    """A random scene of `OBJECT_COUNTS` objects that do not touch (fewer when they do not fit)."""
    n = rng.choice(OBJECT_COUNTS)
    objects: list[Obj] = []
    for _ in range(n):
        for _attempt in range(50):
            # A lone object is small or large; in a crowd, at most one is large, so all fit.
            size = rng.choice(tuple(SIZES)) if n == 1 or not any(o.size == "large" for o in objects) else "small"
            side = rng.randint(*SIZES[size])
            x0, y0 = rng.randint(1, canvas - side - 1), rng.randint(1, canvas - side - 1)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, o.box) for o in objects):
                objects.append(Obj(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, box))
                break
    # Pale, low-saturation backgrounds, so no background is mistaken for an object colour.
    tint = tuple(rng.randint(170, 235) for _ in range(3))
    return Scene(scene_id, tuple(objects), rng.choice(BACKGROUNDS), tint, rng.randrange(2**31))  # type: ignore[arg-type]


def render(scene: Scene, canvas: int = 64) -> Image.Image:
    """The scene as an RGB image; colours are jittered per object so no two reds are identical."""
    rng = random.Random(scene.seed)
    img = Image.new("RGB", (canvas, canvas), scene.tint)
    draw = ImageDraw.Draw(img)
    darker = tuple(max(0, c - rng.randint(20, 45)) for c in scene.tint)
    if scene.background == "stripes":
        step, vertical = rng.randint(4, 8), rng.random() < 0.5
        for k in range(0, canvas, step * 2):
            draw.rectangle((k, 0, k + step - 1, canvas) if vertical else (0, k, canvas, k + step - 1), fill=darker)
    elif scene.background == "gradient":
        for y in range(canvas):
            t = y / canvas
            draw.line((0, y, canvas, y), fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(scene.tint, darker)))
    elif scene.background == "speckles":
        for _ in range(canvas * 3):
            x, y = rng.randrange(canvas), rng.randrange(canvas)
            draw.point((x, y), fill=darker)
    elif scene.background == "checks":
        step = rng.randint(6, 10)
        for y in range(0, canvas, step):
            for x in range(0, canvas, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=darker)
    for o in scene.objects:
        colour = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in COLOURS[o.colour])
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            draw.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1), fill=colour)
    return img


# --------------------------------------------------------------------------------------------------
# Captions: several per image, in varied wording, as COCO has five by different annotators.
# --------------------------------------------------------------------------------------------------

def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _phrase(group: list[Obj], with_size: bool) -> str:
    """'a small red circle', 'two blue squares'."""
    o, n = group[0], len(group)
    size = f"{o.size} " if with_size and n == 1 else ""
    if n == 1:
        return _a(f"{size}{o.colour} {o.shape}")
    return f"{NUMBER_WORDS[n]} {o.colour} {_plural(o.shape, n)}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def side_at(x: float) -> str | None:
    """"left" or "right" for a centre at `x` (a fraction of the width) clearly on one side, else None."""
    return "left" if x < 0.42 else "right" if x > 0.58 else None


def side(obj: Obj, canvas: int = 64) -> str | None:
    """"left" or "right" when the object's centre is clearly on one side of the image, else None."""
    return side_at(obj.centre[0] / canvas)


def captions(scene: Scene, rng: random.Random, n: int = 5, canvas: int = 64) -> list[str]:
    """`n` captions in different wordings, each naming every object by colour and shape."""
    groups: dict[str, list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault(o.category, []).append(o)
    ordered = sorted(groups.values(), key=lambda g: g[0].centre[0])  # left to right
    # In the colour list's order (red, green, blue, yellow): an order the image tells, so a describer
    # that has named the red objects moves on to the next colour instead of naming red again.
    by_colour = sorted(groups.values(), key=lambda g: (list(COLOURS).index(g[0].colour), SHAPES.index(g[0].shape)))
    bg = {"plain": "a plain", "stripes": "a striped", "gradient": "a shaded", "speckles": "a speckled",
          "checks": "a checkered"}[scene.background]
    count = len(scene.objects)
    lone = scene.objects[0] if count == 1 else None
    where = side(lone, canvas) if lone else None
    templates = [
        lambda: f"{_join([_phrase(g, True) for g in ordered])} on {bg} background.",
        lambda: f"A picture of {_join([_phrase(g, False) for g in by_colour])}.",
        lambda: f"{NUMBER_WORDS[count].capitalize()} {'shape' if count == 1 else 'shapes'}: "
                f"{_join([_phrase(g, False) for g in ordered])}.",
        lambda: f"From left to right: {_join([_phrase(g, False) for g in ordered])}.",
        lambda: (f"{_phrase([lone], True)} {f'on the {where} of' if where else 'in the middle of'} the picture."
                 if lone else f"There are {NUMBER_WORDS[count]} shapes: {_join([_phrase(g, True) for g in ordered])}."),
    ]
    out: list[str] = []
    for t in rng.sample(templates, min(n, len(templates))):
        text = t()
        out.append(text[0].upper() + text[1:])
    return out


# --------------------------------------------------------------------------------------------------
# Short-answer questions (the world's VQA set)
# --------------------------------------------------------------------------------------------------

def _readout(scene: Scene, rng: random.Random, canvas: int) -> list[tuple[str, str, str]]:
    """Questions about the scene itself: a lone object's attributes, and scene-level counts and colours."""
    objs = scene.objects
    qs: list[tuple[str, str, str]] = []
    if len(objs) == 1:
        o = objs[0]
        qs.append(("colour", rng.choice(("What color is the object?", "What color is the shape in the image?")),
                   o.colour))
        qs.append(("shape", rng.choice(("What shape is the object?", "What shape is in the image?")), o.shape))
        qs.append(("size", "Is the object small or large?", o.size))
        if side(o, canvas):
            qs.append(("position", "Is the object on the left or on the right?", side(o, canvas)))  # type: ignore[arg-type]
    qs.append(("count", rng.choice(("How many objects are there in the image?", "How many shapes are in the image?")),
               str(len(objs))))
    qs.append(("more_than_two", "Are there more than two objects in the image?", "yes" if len(objs) > 2 else "no"))
    areas: Counter[str] = Counter()
    for o in objs:
        areas[o.colour] += o.area
    (top, a1), *rest = areas.most_common()
    if len(objs) > 1 and (not rest or a1 >= 1.5 * rest[0][1]):  # only when one colour clearly covers most
        qs.append(("main_colour", "Which color covers most of the image?", top))
    return qs


def _binding(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Questions that name one object and ask about another of its attributes (scenes of 2+ objects)."""
    objs = scene.objects
    if len(objs) < 2:
        return []
    cats = Counter(o.category for o in objs)
    qs: list[tuple[str, str, str]] = []
    # POPE's negatives: random (any absent category), popular (here every category is equally
    # frequent, so: an absent category sharing a word with a present one) and adversarial (differing
    # from a present object in one attribute only). The last two coincide in this world.
    absent = [c for c in CATEGORIES if c not in cats]
    near = [c for c in absent if any(c.split()[0] == o.colour or c.split()[1] == o.shape for o in objs)]
    kind = rng.choice(("random", "popular", "adversarial"))
    qs.append(("existence", f"Is there {_a(rng.choice(sorted(cats)))} in the image?", "yes"))
    qs.append(("existence", f"Is there {_a(rng.choice(near if kind != 'random' and near else absent))} in the image?",
               "no"))
    shapes, colours = Counter(o.shape for o in objs), Counter(o.colour for o in objs)
    unique_shapes = sorted(s for s, k in shapes.items() if k == 1)
    if unique_shapes:
        s = rng.choice(unique_shapes)
        qs.append(("colour_of_shape", f"What color is the {s}?", next(o.colour for o in objs if o.shape == s)))
    unique_colours = sorted(c for c, k in colours.items() if k == 1)
    if unique_colours:
        c = rng.choice(unique_colours)
        qs.append(("shape_of_colour", f"What shape is the {c} object?", next(o.shape for o in objs if o.colour == c)))
    return qs


def questions(scene: Scene, rng: random.Random, canvas: int = 64) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples true of `scene`: each type the scene allows, once (existence as
    a yes/no pair, so its answers stay balanced), in random order. In a fixed order, LLaVA-1.5's packing
    of an image's questions into one conversation made the turn tell the type ("turn 1 is the colour"),
    and a model that learnt that answered "right" to a size question asked first."""
    qs = _readout(scene, rng, canvas) + _binding(scene, rng)
    rng.shuffle(qs)
    return qs


def compare_questions(scenes: list[Scene], rng: random.Random, n: int) -> list[dict[str, Any]]:
    """`n` two-image questions: two scenes with different numbers of circles, the answer ("first" or
    "second", drawn evenly) naming the one with more."""
    out: list[dict[str, Any]] = []
    circles = {s.id: sum(o.shape == "circle" for o in s.objects) for s in scenes}
    for k in range(n if len(set(circles.values())) > 1 else 0):
        a, b = rng.sample(scenes, 2)
        while circles[a.id] == circles[b.id]:
            a, b = rng.sample(scenes, 2)
        if (circles[a.id] > circles[b.id]) != (rng.random() < 0.5):
            a, b = b, a  # the "first" answer half the time
        out.append({"question_id": _COMPARE_ID + k, "image_ids": [a.id, b.id], "question": COMPARE_QUESTION,
                    "answer": "first" if circles[a.id] > circles[b.id] else "second", "question_type": "compare"})
    return out


# --------------------------------------------------------------------------------------------------
# Writing a split in the COCO layout
# --------------------------------------------------------------------------------------------------

def answer_type(answer: str) -> str:
    """VQAv2's answer types."""
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data))


def write_split(scenes: list[Scene], root: Path, split: str, seed: int, canvas: int = 64,
                n_compare: int = 0) -> dict[str, int]:
    """Images under root/split/, annotations under root/annotations/; returns counts."""
    rng = random.Random(f"{seed}-{split}")
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": c, "supercategory": c.split()[1]} for i, c in enumerate(CATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, caps, anns, vqa_q, vqa_a = [], [], [], [], []
    for scene in scenes:
        render(scene, canvas).save(root / split / scene.file_name)
        images.append({"id": scene.id, "file_name": scene.file_name, "width": canvas, "height": canvas})
        for text in captions(scene, rng, canvas=canvas):
            caps.append({"id": len(caps) + 1, "image_id": scene.id, "caption": text})
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            anns.append({"id": len(anns) + 1, "image_id": scene.id, "category_id": cat_id[o.category],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                         "attributes": {"size": o.size}})
        for k, (qtype, question, answer) in enumerate(questions(scene, rng, canvas)):
            qid = scene.id * 100 + k
            vqa_q.append({"image_id": scene.id, "question": question, "question_id": qid})
            vqa_a.append({"question_id": qid, "image_id": scene.id, "question_type": qtype,
                          "answer_type": answer_type(answer),
                          "multiple_choice_answer": answer,
                          "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                      for k in range(10)]})
    info = {"description": "vistune demo world", "version": "1.0"}
    _write_json(root / "annotations" / f"captions_{split}.json",
                {"info": info, "images": images, "annotations": caps})
    _write_json(root / "annotations" / f"instances_{split}.json",
                {"info": info, "images": images, "annotations": anns, "categories": categories})
    _write_json(root / "annotations" / f"vqa_questions_{split}.json",
                {"info": info, "data_subtype": split, "questions": vqa_q})
    _write_json(root / "annotations" / f"vqa_annotations_{split}.json",
                {"info": info, "data_subtype": split, "annotations": vqa_a})
    counts = {"images": len(images), "captions": len(caps), "objects": len(anns), "questions": len(vqa_q)}
    if n_compare:
        # Its own generator, so adding compare questions leaves every other file of the split unchanged.
        compare = compare_questions(scenes, random.Random(f"{seed}-{split}-compare"), n_compare)
        _write_json(root / "annotations" / f"compare_{split}.json", {"info": info, "questions": compare})
        counts["compare_questions"] = len(compare)
    return counts


def build_world(root: Path, sizes: dict[str, int], seed: int, canvas: int = 64,
                compare: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
    """All splits; scene ids are unique across splits, and the same seed gives the same files.
    `compare`: two-image questions per split (none by default)."""
    compare = compare or {}
    rng = random.Random(seed)
    counts, next_id = {}, 1
    for split, n in sizes.items():
        scenes = [sample_scene(rng, next_id + i, canvas) for i in range(n)]
        next_id += n
        counts[split] = write_split(scenes, root, split, seed, canvas, compare.get(split, 0))
    return counts
