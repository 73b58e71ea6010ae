"""ScienceQA ensembles with a text-only teacher, as in the LLaVA paper (section 5.2).

- complement: the teacher's answer, except where the teacher gives none (a text-only model often
  declines image questions), where the vision model's answer is used.
- judge: where the two answers differ, the teacher sees the question, the options and both answers
  and picks the final one; where they agree, that answer stands.

The teacher is any OpenAI-compatible chat model (`vistune.eval.judge.Judge`), asked the same text
prompt the vision model got, without the image. Its replies go through the judge's disk cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from vistune.eval.judge import Judge
from vistune.eval.metrics import scienceqa_parse
from vistune.eval.tasks.base import LETTER_ANSWER, Item

ENSEMBLES = ("complement", "judge")
TEACHER_SYSTEM = "You are a helpful assistant. Answer multiple-choice science questions."


def teacher_answers(items: Sequence[Item], teacher: Judge) -> dict[str, str | None]:
    """The teacher's letter per item (None where it gives none), from the text prompt alone."""
    out = {}
    for it in items:
        reply = teacher.complete([{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": it.prompt}],
                                 temperature=0.0, max_tokens=16)
        out[it.id] = scienceqa_parse(reply.strip(), it.meta["num_choices"])
    return out


def complement(model: dict[str, str | None], teacher: dict[str, str | None]) -> dict[str, str | None]:
    """Teacher's answer where it has one, else the model's."""
    return {k: teacher.get(k) if teacher.get(k) is not None else v for k, v in model.items()}


def judge_prompt(item: Item, first: str | None, second: str | None) -> str:
    question = item.prompt.removesuffix(LETTER_ANSWER).rstrip()
    return (f"{question}\n\nTwo students answered this question. Student 1 chose {first or 'nothing'}; "
            f"student 2 chose {second or 'nothing'}. Decide which option is correct.\n{LETTER_ANSWER}")


def judge(items: Sequence[Item], model: dict[str, str | None], teacher_letters: dict[str, str | None],
          teacher: Judge) -> dict[str, str | None]:
    """Agreeing answers stand; on disagreement the teacher picks (the model's answer if it picks none)."""
    out: dict[str, str | None] = {}
    for it in items:
        a, b = model.get(it.id), teacher_letters.get(it.id)
        if a == b:
            out[it.id] = a
            continue
        reply = teacher.complete([{"role": "system", "content": TEACHER_SYSTEM},
                                  {"role": "user", "content": judge_prompt(it, a, b)}], temperature=0.0, max_tokens=16)
        picked = scienceqa_parse(reply.strip(), it.meta["num_choices"])
        out[it.id] = picked if picked is not None else a
    return out
