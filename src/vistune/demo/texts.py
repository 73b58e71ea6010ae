"""The world's text the stand-ins learn from: the tokenizer's corpus, the stand-in LLM's pretraining
text, and the vocabulary a description is checked against. Text only: no image is ever in it."""

from __future__ import annotations

import json
import re
from pathlib import Path


def texts_for_lm(captions_file: Path, vqa_questions: Path, vqa_answers: Path, tokenizer_dir: Path,
                  seed: int, replies: list[str] | None = None) -> list[str]:
    """The stand-in LLM's pretraining text: each image's captions as one document (several
    descriptions of one scene, as web pages repeat what a picture shows), chat-formatted questions
    answered from a description given in the prompt (the reading-comprehension skill any instruct LLM
    brings to LLaVA), and `replies`, the teacher's instruction replies as plain text: the English a
    real LLM knows before LLaVA starts. Without them the replies' words ("In total the scene holds")
    were never seen, the tokenizer split them into letters and descriptions came out as "Thehehe is".
    No image is ever in this text, so the blind evaluation stays blind."""
    import random

    from transformers import AutoTokenizer

    from vistune.demo.evaluate import reading_request

    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    caps = json.loads(captions_file.read_text())
    by_image: dict[int, list[str]] = {}
    for a in caps["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    answers = {a["question_id"]: a["multiple_choice_answer"] for a in json.loads(vqa_answers.read_text())["annotations"]}
    questions: dict[int, list[tuple[str, str]]] = {}
    for q in json.loads(vqa_questions.read_text())["questions"]:
        questions.setdefault(q["image_id"], []).append((q["question"], answers[q["question_id"]]))
    texts = []
    for image_id, captions in by_image.items():
        texts.append(" ".join(captions))
        for q, a in rng.sample(questions.get(image_id, []), min(4, len(questions.get(image_id, [])))):
            messages = [{"role": "user", "content": reading_request(" ".join(captions), q)},
                        {"role": "assistant", "content": a}]
            texts.append(tok.apply_chat_template(messages, tokenize=False))
    texts += replies or []
    rng.shuffle(texts)
    return texts


def texts_for_tokenizer(captions: dict, vqa_questions: Path, vqa_answers: Path, teacher: list[str]) -> list[str]:
    """The world's text the tokenizer learns its merges from: captions, each question with its short
    answer on a line of its own, where replies start, and the teacher's replies. Trained on captions
    alone, BPE only ever saw answer words after a space and split a reply like "yes" into single
    letters; without the replies it split "The" at a reply's start into "T" + "he"."""
    from vistune.answer_formats import SHORT_ANSWER

    answers = {a["question_id"]: a["multiple_choice_answer"] for a in json.loads(vqa_answers.read_text())["annotations"]}
    return [a["caption"] for a in captions["annotations"]] + [
        f"{q['question']}\n{SHORT_ANSWER}\n{answers[q['question_id']]}"
        for q in json.loads(vqa_questions.read_text())["questions"]] + teacher


def replies(instruct: Path) -> list[str]:
    """Every teacher reply of the instruction data, one text each, in file order."""
    return [t["value"] for line in instruct.read_text().splitlines() if line
            for t in json.loads(line)["conversations"] if t["from"] == "gpt"]


def vocabulary(ann: Path, instruct: Path) -> set[str]:
    """Every word of the world's training text (captions, questions, teacher replies): the words a
    description may use; anything else it writes is a non-word."""
    texts = [a["caption"] for a in json.loads((ann / "captions_train.json").read_text())["annotations"]]
    texts += replies(instruct)
    texts += [q["question"] for q in json.loads((ann / "vqa_questions_train.json").read_text())["questions"]]
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
