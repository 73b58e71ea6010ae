"""Rescoring someone else's answers: an answer file in LLaVA's layout becomes the task's predictions.

LLaVA's `model_vqa*.py` write one JSON line per question, `{"question_id", "prompt", "text", ...}`;
ScienceQA's `eval_science_qa.py` also writes a result json, `{"results": {pid: option index, -1 when
it read no letter}}`. Users rescore published models from these files (`--option TASK.answers=FILE`).
Which item an answer names is the task's business (`Task.llava_keys` / `Task.llava_row_key`): POPE's
per-split id offsets, MME's task/image plus prompt, VizWiz's row index (or image name, in its upload
file); most tasks use the id itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vistune.errors import DataError
from vistune.eval.tasks.base import Item, Task, read_json, read_jsonl, write_text_atomic

# eval_science_qa.py's --options: the letter of each option index.
_SQA_LETTERS = ("A", "B", "C", "D", "E")


def _rows(path: Path, task: Task) -> list[dict]:
    """The answer rows of `path`: JSON lines, ScienceQA's result json or an upload list of {image, answer}
    (VizWiz's answers_upload) turned into rows."""
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, list) and all(isinstance(r, dict) and {"image", "answer"} <= r.keys() for r in data):
            return [{"question_id": r["image"], "text": r["answer"]} for r in data]
        if not (isinstance(data, dict) and isinstance(data.get("results"), dict)):
            raise DataError(f"{path}: a .json answer file must be eval_science_qa.py's result json "
                            "({\"results\": {pid: index}}) or an upload list of {\"image\", \"answer\"}; other "
                            "answers are JSON lines (.jsonl)", "bad file")
        if task.name != "scienceqa":
            raise DataError(f"{path}: a ScienceQA result json given for task {task.name}", "bad file")
        return [{"question_id": pid, "text": _SQA_LETTERS[i] if 0 <= int(i) < len(_SQA_LETTERS) else "FAILED"}
                for pid, i in data["results"].items()]
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
            raise DataError(f"{path}:{n}: expected LLaVA's answer layout {{\"question_id\", \"text\", ...}}",
                            "bad record")
    return rows


def read_llava_answers(path: str | Path, task: Task, items: Sequence[Item]) -> dict[str, str]:
    """item id -> reply for the items `path` answers (answers to questions the task does not score, such as
    ScienceQA's text-only ones, are left out). Fails naming the first answer that matches no question (a file
    of another task or split), or when two answers name one item."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{task.name}: answer file {path} not found", "missing file")
    keys = task.llava_keys(items)
    replies: dict[str, str] = {}
    unmatched: list[str] = []
    for n, row in enumerate(_rows(path, task), 1):
        try:
            key = task.llava_row_key(row)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}: answer {n} (question_id {row.get('question_id')!r}) is not a {task.name} "
                            f"answer in LLaVA's layout ({type(e).__name__}: {e})", "bad record") from None
        if key not in keys:
            unmatched.append(key)
            continue
        item_id = keys[key]
        if item_id is None:  # a question the task does not score (ScienceQA's text-only ones)
            continue
        if item_id in replies:
            raise DataError(f"{path}: two answers for {task.name} item {item_id} (question_id "
                            f"{row['question_id']!r})", "bad record")
        replies[item_id] = str(row["text"])
    if unmatched:
        raise DataError(f"{path}: {len(unmatched)} answer(s) name no {task.name} question read from the data "
                        f"(first: {unmatched[0]!r}); is it this task's (and split's) answer file?", "bad record")
    return replies


def import_answers(task: Task, items: Sequence[Item], predictions: Path) -> int:
    """Write `task.answers` as the predictions file the runner reads (replacing it); returns the count."""
    replies = read_llava_answers(task.answers, task, items)  # type: ignore[arg-type]
    write_text_atomic(predictions, "".join(
        json.dumps({"id": it.id, "prompt": it.prompt, "reply": replies[it.id]}, ensure_ascii=False) + "\n"
        for it in items if it.id in replies))
    return len(replies)
