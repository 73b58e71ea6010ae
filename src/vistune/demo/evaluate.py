"""The demo's evaluation: held-out short-answer questions asked with the image and again blind.

A thin front for the pipeline over `vistune.eval.tasks.demo`, the task `vistune eval demo` runs:
the same question selection, prompts, blank images, batching and scoring, so the report's numbers
and `vistune eval demo --option demo.per_type=N` (with the demo's seed and batch size 32) agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from vistune.answer_formats import SHORT_ANSWER
from vistune.eval.run import generate_replies
from vistune.eval.tasks.demo import (
    DemoTask,
    Question,
    blank_like,
    compare_views,
    description_scores,
    items_for,
    score_questions,
    select_questions,
)
from vistune.infer.engine import Engine, Sampling
from vistune.tokens import IMAGE_PLACEHOLDER

BATCH_SIZE = 32
DESCRIBE = "Describe the image briefly."  # held out: stage 2's brief captions use other wordings

__all__ = ["DESCRIBE", "Question", "ask_all", "blank_like", "describe", "evaluate",
           "load_questions", "reading_request", "score", "true_objects"]


def load_questions(questions: Path, annotations: Path, image_folder: Path, file_names: dict[int, str],
                   per_type: int, seed: int, compare: Path | None = None) -> list[Question]:
    """Up to `per_type` questions of each type, split evenly over its answers; `compare`:
    the two-image questions' file."""
    return select_questions(questions, annotations, image_folder, file_names, per_type, seed, compare)


def ask_all(engine: Engine, questions: list[Question], blind: bool, batch_size: int = BATCH_SIZE,
            desc: str = "eval") -> list[str]:
    """Greedy short answers for every question, in batches (through the eval runner's generation)."""
    items = items_for(questions, "blind" if blind else "with_image")
    return generate_replies(engine, DemoTask(), items, batch_size, desc=desc)


def score(questions: list[Question], predictions: list[str]) -> dict:
    """Accuracy overall and per type; overall is the mean over questions (types are balanced)."""
    return score_questions(questions, predictions)


def describe(engine: Engine, images: list[Path], instruction: str = DESCRIBE, blind: bool = False,
             max_new_tokens: int = 48, batch_size: int = BATCH_SIZE) -> list[str]:
    """Greedy descriptions of `images` (blind: of a blank image in each one's place), in batches."""
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        convs = [[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{instruction}"}] for _ in chunk]
        pictures = [[blank_like(p, engine.bundle.image_processor) if blind else p] for p in chunk]
        out += engine.generate(convs, pictures, Sampling(max_new_tokens=max_new_tokens))
    return [r.strip() for r in out]


def true_objects(instances: Path) -> dict[str, set[str]]:
    """Image file name -> the categories ("red circle") of its boxes, from a COCO instances file."""
    inst = json.loads(instances.read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    out: dict[str, set[str]] = {f: set() for f in files.values()}
    for a in inst["annotations"]:
        out[files[a["image_id"]]].add(names[a["category_id"]])
    return out


def evaluate(model: Path, world: Path, per_type: int, n_descriptions: int, seed: int, vocabulary: set[str],
             reading_lm: Path | None = None) -> dict:
    """The demo's evaluation on the test split: `per_type` questions per type asked with the image and
    blind, and `n_descriptions` test images described with the image and blind, scored against their
    true objects. `reading_lm`: also the stand-in LLM's answers from the captions as text."""
    engine = Engine.load(model, device="cpu")
    ann = world / "annotations"
    test_images = json.loads((ann / "captions_test.json").read_text())["images"]
    names = {im["id"]: im["file_name"] for im in test_images}
    questions = load_questions(ann / "vqa_questions_test.json", ann / "vqa_annotations_test.json", world / "test",
                               names, per_type, seed, ann / "compare_test.json")
    with_image = ask_all(engine, questions, blind=False, desc="with image")
    blind = ask_all(engine, questions, blind=True, desc="blind")
    paths = [world / "test" / im["file_name"] for im in test_images[:n_descriptions]]
    truth = true_objects(ann / "instances_test.json")
    described = (describe(engine, paths), describe(engine, paths, blind=True))
    d_with, d_blind = (description_scores(d, [truth[p.name] for p in paths], vocabulary) for d in described)
    out = {"questions": questions, "predictions": (with_image, blind),
           "scores": compare_views(score(questions, with_image), score(questions, blind)),
           "descriptions": {"f1_with_image": d_with["f1"], "f1_blind": d_blind["f1"],
                            "precision_with_image": d_with["precision"], "recall_with_image": d_with["recall"],
                            "precision_blind": d_blind["precision"], "recall_blind": d_blind["recall"],
                            **{k: d_with[k] for k in ("n", "words", "with_repeated_3gram", "non_words",
                                                      "non_word_count")}},
           "described": list(zip(paths, *described)), "truth": truth, "example_image": paths[0]}
    if reading_lm is not None:
        # The ceiling the stand-in LLM sets: its answers from a perfect description (captions as text).
        by_name: dict[str, list[str]] = {}
        for a in json.loads((ann / "captions_test.json").read_text())["annotations"]:
            by_name.setdefault(names[a["image_id"]], []).append(a["caption"])
        out["answers_from_captions"] = score(questions, ask_from_captions(reading_lm, questions, by_name))
    return out


def reading_request(description: str, question: str) -> str:
    """The user turn asking a short-answer question about a description given as text: the shape of the
    stand-in LLM's reading examples (pretraining), of its reading check, and of benchmarks/demo_reading.py."""
    return f"{description}\n{question}\n{SHORT_ANSWER}"


def ask_from_captions(lm_dir: Path, questions: list[Question], captions: dict[str, list[str]],
                      batch_size: int = BATCH_SIZE) -> list[str]:
    """The stand-in LLM alone answers each question from its image's captions given as text, in the
    prompt shape of its pretraining: what it can read from a perfect description. A VLM built on it
    is not expected to read more from the image than this. `captions` maps image file names."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    replies: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        prompts = [tok.apply_chat_template(
            [{"role": "user", "content": reading_request(_described(q, captions), q.question)}],
            tokenize=False, add_generation_prompt=True) for q in chunk]
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = lm.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        replies += tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [r.strip() for r in replies]


def _described(question: Question, captions: dict[str, list[str]]) -> str:
    """The captions standing in for the question's image(s); several images are told apart by order."""
    if len(question.all_images) == 1:
        return " ".join(captions[question.image.name])
    names = ("First", "Second", "Third", "Fourth")
    return " ".join(f"{names[k]} image: {' '.join(captions[p.name])}" for k, p in enumerate(question.all_images))
