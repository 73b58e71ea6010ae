"""The demo's evaluation: held-out short-answer questions asked with the image and again blind.

A thin front for the pipeline over `vistune.eval.tasks.demo`, the task `vistune eval demo` runs:
the same question selection, prompts, blank images, batching and scoring, so the report's numbers
and `vistune eval demo --option demo.per_type=N` (with the demo's seed and batch size 32) agree.
"""

from __future__ import annotations

from pathlib import Path

from vistune.eval.run import generate_replies
from vistune.eval.tasks.base import SHORT_ANSWER
from vistune.eval.tasks.demo import (
    DemoTask,
    Question,
    blank_like,
    items_for,
    score_questions,
    select_questions,
)
from vistune.infer.engine import Engine, Sampling

SHORT_ANSWER_PROMPT = SHORT_ANSWER
BATCH_SIZE = 32

__all__ = ["SHORT_ANSWER_PROMPT", "Question", "ask_all", "blank_like", "describe", "load_questions", "reading_request",
           "score"]


def load_questions(questions: Path, annotations: Path, image_folder: Path, file_names: dict[int, str],
                   per_type: int, seed: int, compare: Path | None = None) -> list[Question]:
    """Up to `per_type` questions of each type; existence split evenly between yes and no; `compare`:
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


def describe(engine: Engine, images: list[Path], instruction: str, max_new_tokens: int = 96) -> list[str]:
    """Generated descriptions of a few images, for the report."""
    convs = [[{"role": "user", "content": f"<image>\n{instruction}"}] for _ in images]
    return engine.generate(convs, [[p] for p in images], Sampling(max_new_tokens=max_new_tokens))


def reading_request(description: str, question: str) -> str:
    """The user turn asking a short-answer question about a description given as text: the shape of the
    stand-in LLM's reading examples (pretraining), of its reading check, and of benchmarks/demo_reading.py."""
    return f"{description}\n{question}\n{SHORT_ANSWER_PROMPT}"


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
