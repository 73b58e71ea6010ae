"""The demo world's benchmark: held-out short-answer questions asked with the image and blind.

Layout read: the world folder `vistune demo` writes (`annotations/vqa_questions_{split}.json` and
`vqa_annotations_{split}.json` in the VQAv2 layout, with the demo's `question_type`;
`annotations/captions_{split}.json` for file names; images in `{split}/`; optionally
`annotations/compare_{split}.json`, two-image questions of type `compare`).

Questions are balanced per type (existence half yes, half no, as POPE balances them): up to
`per_type` per type drawn with `seed`, or all with `per_type=None`. Each is asked twice: with its
image, and with a blank image of the encoder's mean colour (what padding uses), so the difference
measures what the model reads from the image. `vistune.demo.evaluate` runs this same code.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from vistune.eval.metrics import exact_match
from vistune.eval.tasks.base import SHORT_ANSWER, Item, Task, find

if TYPE_CHECKING:
    from vistune.infer.engine import Engine

DEMO_MAX_NEW_TOKENS = 8  # every demo answer is a word or two


@dataclass(frozen=True)
class Question:
    id: int
    image: Path
    type: str
    question: str
    answer: str
    images: tuple[Path, ...] = ()  # all the question's images, when it has several (`image` is the first)

    @property
    def all_images(self) -> tuple[Path, ...]:
        return self.images or (self.image,)


def select_questions(questions: Path, annotations: Path, image_folder: Path, file_names: dict[int, str],
                     per_type: int | None, seed: int, compare: Path | None = None) -> list[Question]:
    """Up to `per_type` questions of each type (all with None); existence split evenly between yes and no.
    `compare`: the world's two-image questions, a type of their own (left out when None or absent)."""
    answers = {a["question_id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    pools: dict[str, list[Question]] = defaultdict(list)
    for q in json.loads(questions.read_text())["questions"]:
        a = answers[q["question_id"]]
        key = a["question_type"] + ("/" + a["multiple_choice_answer"] if a["question_type"] == "existence" else "")
        pools[key].append(Question(q["question_id"], image_folder / file_names[q["image_id"]], a["question_type"],
                                   q["question"], a["multiple_choice_answer"]))
    if compare is not None and compare.is_file():
        for q in json.loads(compare.read_text())["questions"]:
            paths = tuple(image_folder / file_names[i] for i in q["image_ids"])
            pools[q["question_type"]].append(Question(q["question_id"], paths[0], q["question_type"], q["question"],
                                                      q["answer"], paths))
    if per_type is None:
        return [q for key in sorted(pools) for q in pools[key]]
    rng = random.Random(seed)
    chosen = []
    for key in sorted(pools):
        n = per_type // 2 if key.startswith("existence/") else per_type
        chosen += rng.sample(pools[key], min(n, len(pools[key])))
    return chosen


def prompt(question: Question) -> str:
    return f"{question.question}\n{SHORT_ANSWER}"


def blank_like(image: Path, engine: Engine) -> Image.Image:
    """A blank image of the same size in the image processor's mean colour (what padding uses)."""
    mean = getattr(engine.bundle.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    with Image.open(image) as im:
        size = im.size
    return Image.new("RGB", size, tuple(round(m * 255) for m in mean))


def score_questions(questions: Sequence[Question], predictions: Sequence[str]) -> dict:
    """Accuracy overall and per type (fractions); overall is the mean over questions (types are balanced)."""
    per: dict[str, list[bool]] = defaultdict(list)
    for q, p in zip(questions, predictions):
        per[q.type].append(exact_match(p, q.answer))
    flat = [x for xs in per.values() for x in xs]
    return {"accuracy": sum(flat) / max(1, len(flat)),
            "per_type": {t: {"accuracy": sum(xs) / len(xs), "n": len(xs)} for t, xs in sorted(per.items())}}


def items_for(questions: Sequence[Question], view: str) -> list[Item]:
    """The items asking `questions` with the image (view "with_image") or blind ("blind")."""
    return [Item(f"{q.id}/{view}", prompt(q), q.all_images, q.answer, {"question": q, "view": view}) for q in questions]


class DemoTask(Task):
    """Options: split (default test), per_type (default all), seed (default 0)."""

    name, folder, headline = "demo", "world", ("accuracy_with_image", "accuracy_blind")
    max_new_tokens = DEMO_MAX_NEW_TOKENS

    def __init__(self, split: str = "test", per_type: int | None = None, seed: int = 0) -> None:
        self.split, self.per_type, self.seed = split, per_type, seed

    def questions(self, root: Path) -> list[Question]:
        ann = root / "annotations"
        find(root, [f"annotations/vqa_questions_{self.split}.json"], self.name)
        images = json.loads(find(root, [f"annotations/captions_{self.split}.json"], self.name).read_text())["images"]
        names = {im["id"]: im["file_name"] for im in images}
        return select_questions(ann / f"vqa_questions_{self.split}.json", ann / f"vqa_annotations_{self.split}.json",
                                root / self.split, names, self.per_type, self.seed, ann / f"compare_{self.split}.json")

    def load(self, root: Path) -> list[Item]:
        # All questions with the image first, then all blind: `batch_group` keeps the two passes in
        # separate batches, exactly as the demo's pipeline asks them, so the numbers match its report.
        qs = self.questions(root)
        return items_for(qs, "with_image") + items_for(qs, "blind")

    def batch_group(self, item: Item) -> str:
        return item.meta["view"]

    def images(self, item: Item, engine: Engine) -> list:
        if item.meta["view"] == "blind":
            return [blank_like(p, engine) for p in item.images]  # type: ignore[arg-type]
        return list(item.images)

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        scores = {}
        for view in ("with_image", "blind"):
            chosen = [it for it in items if it.meta["view"] == view]
            scores[view] = score_questions([it.meta["question"] for it in chosen], [replies.get(it.id, "") for it in chosen])
        with_image, blind = scores["with_image"], scores["blind"]
        return {"accuracy_with_image": with_image["accuracy"], "accuracy_blind": blind["accuracy"],
                "per_type": {t: {"with_image": row["accuracy"], "blind": blind["per_type"][t]["accuracy"], "n": row["n"]}
                             for t, row in with_image["per_type"].items()},
                "n": len(items) // 2}
