"""The demo world's benchmark: held-out short-answer questions asked with the image and blind.

Layout read: the world folder `vistune demo` writes (`annotations/vqa_questions_{split}.json` and
`vqa_annotations_{split}.json` in the VQAv2 layout, with the demo's `question_type`;
`annotations/captions_{split}.json` for file names; images in `{split}/`; optionally
`annotations/compare_{split}.json`, two-image questions of type `compare`).

Questions are balanced per type and answer (as POPE balances yes and no): up to `per_type` per type,
split evenly over the type's answers and drawn with `seed`, or all with `per_type=None`. So a blind
model that always gives one answer scores about 1/(number of answers) on a type; the score reports
that rate (`majority`) beside each type. Each question is asked twice: with its image, and with a
blank image of the encoder's mean colour (what padding uses), so the difference measures what the
model reads from the image. Types fall into the world's tiers (`vistune.demo.world.TIERS`: readout,
binding), scored apart. `vistune.demo.evaluate` runs this same code.

Descriptions are scored by the objects they name: `objects_named` finds each "colour shape" phrase
("a red circle", "two blue squares"), and `description_scores` compares those categories with the
scene's true ones (precision, recall, F1 over all images together), and counts what makes generated
text degenerate: repeated word n-grams and words the world's text never uses.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from vistune.eval.metrics import exact_match
from vistune.eval.tasks.base import SHORT_ANSWER, Item, Task, find
from vistune.images import pad_colour

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

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
    """Up to `per_type` questions of each type (all with None), split evenly over the type's answers.
    `compare`: the world's two-image questions, a type of their own (left out when None or absent)."""
    answers = {a["question_id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    pools: dict[str, list[Question]] = defaultdict(list)
    for q in json.loads(questions.read_text())["questions"]:
        a = answers[q["question_id"]]
        key = f"{a['question_type']}/{a['multiple_choice_answer']}"
        pools[key].append(Question(q["question_id"], image_folder / file_names[q["image_id"]], a["question_type"],
                                   q["question"], a["multiple_choice_answer"]))
    if compare is not None and compare.is_file():
        for q in json.loads(compare.read_text())["questions"]:
            paths = tuple(image_folder / file_names[i] for i in q["image_ids"])
            pools[f"{q['question_type']}/{q['answer']}"].append(Question(q["question_id"], paths[0], q["question_type"], q["question"],
                                                      q["answer"], paths))
    if per_type is None:
        return [q for key in sorted(pools) for q in pools[key]]
    rng = random.Random(seed)
    answers_of: dict[str, int] = defaultdict(int)
    for key in pools:
        answers_of[key.split("/")[0]] += 1
    chosen = []
    for key in sorted(pools):
        n = per_type // answers_of[key.split("/")[0]]  # each answer equally often
        chosen += rng.sample(pools[key], min(n, len(pools[key])))
    return chosen


def prompt(question: Question) -> str:
    return f"{question.question}\n{SHORT_ANSWER}"


def blank_like(image: Path, processor: BaseImageProcessor) -> Image.Image:
    """A blank image of the same size in the image processor's mean colour (what padding uses)."""
    with Image.open(image) as im:
        size = im.size
    return Image.new("RGB", size, pad_colour(processor))


def score_questions(questions: Sequence[Question], predictions: Sequence[str]) -> dict:
    """Accuracy overall, per tier and per type (fractions; each is the mean over its questions), and per
    type the majority rate: the share of its most common answer, what one fixed answer would score."""
    from vistune.demo.world import TIERS

    per: dict[str, list[bool]] = defaultdict(list)
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for q, p in zip(questions, predictions, strict=True):
        per[q.type].append(exact_match(p, q.answer))
        answers[q.type][q.answer] += 1
    tiers: dict[str, list[bool]] = defaultdict(list)
    for t, xs in per.items():
        tiers[TIERS.get(t, "other")] += xs
    flat = [x for xs in per.values() for x in xs]
    return {"accuracy": _mean(flat),
            "tiers": {tier: {"accuracy": _mean(xs), "n": len(xs)} for tier, xs in sorted(tiers.items())},
            "per_type": {t: {"accuracy": _mean(xs), "n": len(xs), "majority": answers[t].most_common(1)[0][1] / len(xs)}
                         for t, xs in sorted(per.items())}}


def _mean(xs: Sequence[bool | float]) -> float:
    return sum(xs) / max(1, len(xs))


_PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle"}


def objects_named(text: str) -> set[str]:
    """The categories ("red circle") a description names: each colour word directly followed by a shape
    word, singular or plural ("a large red circle", "two red circles")."""
    from vistune.demo.world import COLOURS, SHAPES

    words = re.findall(r"[a-z]+", text.lower())
    found = set()
    for i, w in enumerate(words[:-1]):
        if w in COLOURS:
            shape = _PLURALS.get(words[i + 1], words[i + 1])
            if shape in SHAPES:
                found.add(f"{w} {shape}")
    return found


def repeated_ngrams(text: str, n: int = 3) -> int:
    """How many word n-grams of `text` repeat an earlier one (0 for text that never loops)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams))


def description_scores(predictions: Sequence[str], truths: Sequence[set[str]], vocabulary: set[str]) -> dict:
    """Object precision / recall / F1 of `predictions` against each image's true categories, pooled over
    all images (micro-averaged), plus degeneracy counts: descriptions with a repeated word 3-gram, and
    words not in `vocabulary` (the world's text), e.g. "thehehe"."""
    hits = named = true = 0
    for text, objs in zip(predictions, truths, strict=True):
        got = objects_named(text)
        hits, named, true = hits + len(got & objs), named + len(got), true + len(objs)
    precision, recall = hits / max(1, named), hits / max(1, true)
    words = [w for text in predictions for w in re.findall(r"[a-z]+", text.lower())]
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "n": len(predictions), "words": len(words),
            "with_repeated_3gram": sum(repeated_ngrams(t) > 0 for t in predictions),
            "non_words": sorted({w for w in words if w not in vocabulary}),
            "non_word_count": sum(w not in vocabulary for w in words)}


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

    def images(self, item: Item, processor: BaseImageProcessor) -> list:
        if item.meta["view"] == "blind":
            return [blank_like(p, processor) for p in item.images]  # type: ignore[arg-type]
        return list(item.images)

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        scores = {}
        for view in ("with_image", "blind"):
            chosen = [it for it in items if it.meta["view"] == view]
            scores[view] = score_questions([it.meta["question"] for it in chosen], [replies.get(it.id, "") for it in chosen])
        with_image, blind = scores["with_image"], scores["blind"]
        return {**compare_views(with_image, blind), "n": len(items) // 2}


def compare_views(with_image: dict, blind: dict) -> dict:
    """The report's shape of two `score_questions` results: accuracies, tiers and types side by side."""
    return {"accuracy_with_image": with_image["accuracy"], "accuracy_blind": blind["accuracy"],
            "tiers": {t: {"with_image": row["accuracy"], "blind": blind["tiers"][t]["accuracy"], "n": row["n"]}
                      for t, row in with_image["tiers"].items()},
            "per_type": {t: {"with_image": row["accuracy"], "blind": blind["per_type"][t]["accuracy"], "n": row["n"],
                             "majority": row["majority"]}
                         for t, row in with_image["per_type"].items()}}
