"""The demo's evaluation: held-out short-answer questions asked with the image and again blind.

Questions come from the test split's VQA-layout files, balanced per type (existence answers half yes,
half no, as POPE balances them). Each question is asked twice through the inference engine: with its
image, and with the image replaced by a blank one of the encoder's mean colour, so the difference
measures what the model reads from the image rather than from the question's wording.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from vistune.eval.metrics import exact_match
from vistune.infer.engine import Engine, Sampling

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Question:
    id: int
    image: Path
    type: str
    question: str
    answer: str


def load_questions(questions: Path, annotations: Path, image_folder: Path, file_names: dict[int, str],
                   per_type: int, seed: int) -> list[Question]:
    """Up to `per_type` questions of each type; existence split evenly between yes and no."""
    answers = {a["question_id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    pools: dict[str, list[Question]] = defaultdict(list)
    for q in json.loads(questions.read_text())["questions"]:
        a = answers[q["question_id"]]
        key = a["question_type"] + ("/" + a["multiple_choice_answer"] if a["question_type"] == "existence" else "")
        pools[key].append(Question(q["question_id"], image_folder / file_names[q["image_id"]], a["question_type"],
                                   q["question"], a["multiple_choice_answer"]))
    rng = random.Random(seed)
    chosen = []
    for key in sorted(pools):
        n = per_type // 2 if key.startswith("existence/") else per_type
        chosen += rng.sample(pools[key], min(n, len(pools[key])))
    return chosen


def blank_like(image: Path, engine: Engine) -> Image.Image:
    """A blank image of the same size in the image processor's mean colour (what padding uses)."""
    mean = getattr(engine.bundle.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    with Image.open(image) as im:
        size = im.size
    return Image.new("RGB", size, tuple(int(round(m * 255)) for m in mean))


def ask_all(engine: Engine, questions: list[Question], blind: bool, batch_size: int = 32,
            desc: str = "eval") -> list[str]:
    """Greedy short answers for every question, in batches."""
    sampling = Sampling(max_new_tokens=8)
    out: list[str] = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        chunk = questions[start:start + batch_size]
        convs = [[{"role": "user", "content": f"<image>\n{q.question}\n{SHORT_ANSWER_PROMPT}"}] for q in chunk]
        images = [[blank_like(q.image, engine) if blind else q.image] for q in chunk]
        out += engine.generate(convs, images, sampling)
    return out


def score(questions: list[Question], predictions: list[str]) -> dict:
    """Accuracy overall and per type; overall is the mean over questions (types are balanced)."""
    per: dict[str, list[bool]] = defaultdict(list)
    for q, p in zip(questions, predictions):
        per[q.type].append(exact_match(p, q.answer))
    flat = [x for xs in per.values() for x in xs]
    return {"accuracy": sum(flat) / max(1, len(flat)),
            "per_type": {t: {"accuracy": sum(xs) / len(xs), "n": len(xs)} for t, xs in sorted(per.items())}}


def describe(engine: Engine, images: list[Path], instruction: str, max_new_tokens: int = 96) -> list[str]:
    """Generated descriptions of a few images, for the report."""
    convs = [[{"role": "user", "content": f"<image>\n{instruction}"}] for _ in images]
    return engine.generate(convs, [[p] for p in images], Sampling(max_new_tokens=max_new_tokens))
