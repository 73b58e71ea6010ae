"""Judged tasks: LLaVA-Bench (In-the-Wild), LLaVA-Bench (COCO) and MM-Vet.

Layouts read:
- llava_bench: LLaVA's `llava-bench-in-the-wild` folder: `questions.jsonl` (question_id, image,
  text, category), `context.jsonl` (image, caption), `answers_gpt4.jsonl` (the reference answers),
  `images/`.
- llava_bench_coco: LLaVA's `coco2014_val_qa_eval` folder: `qa90_questions.jsonl`,
  `qa90_gpt4_answer.jsonl`, `caps_boxes_coco2014_val_80.jsonl` (captions + boxes); images in
  `images/` or COCO `val2014/` (COCO_val2014_ prefix).
- mmvet: the official `mm-vet.json` (id -> imagename, capability, question, answer) and `images/`, in the
  task folder (`mm-vet/` or `mmvet/`) or in the `mm-vet/` that extracting `mm-vet.zip` there leaves.

Or the lmms-lab parquet snapshots (`vistune.eval.tasks.parquet`), split `train` / `test`:
- llava_bench: lmms-lab/llava-bench-in-the-wild `data/train-*.parquet` (question_id, question,
  image, gpt_answer = the reference, category, caption = the context).
- llava_bench_coco: lmms-lab/llava-bench-coco `data/train-*.parquet` (question_id, question, image,
  answer (or gpt_answer) = the reference, category, caption). It has no boxes, so the judge's
  context is the captions only (as lmms-eval gives it), not captions + boxes as LLaVA's
  `caps_boxes_coco2014_val_80.jsonl` does.
- mmvet: lmms-lab/MMVet `data/test-*.parquet` (question_id, question, answer, image, capability as
  a comma-separated string).

LLaVA-Bench follows `eval_gpt_review_bench.py` / `eval_gpt_review_visual.py`: the judge sees the
context, the question, the reference answer as assistant 1 and the model's as assistant 2, with the
category's rule from LLaVA's rule.json (system prompt and temperature 0.2 as there), and scores both;
the result is model / reference x 100 (`metrics.relative_scores`). MM-Vet follows
`mm-vet_evaluator.py`: the few-shot grader prompt, a 0-1 correctness score per sample (temperature 0,
3 tokens), total and per capability as mean x 100, with its re-ask rule (`grade_mmvet`). A sample
still unread after the last re-ask is scored 0.0 by the official evaluator; here it is counted in
`unparsed` and left out of `total` (the issue's rule), and `total_official` gives the 0.0 reading.

Recorded judgements are scored without a judge: `--option llava_bench.reviews=FILE[,FILE...]` takes
review files of eval_gpt_review_bench.py (JSON lines: question_id, tuple = [reference score, model
score], [-1, -1] when unread), one per judge run, scored per run and averaged, `--option mmvet.grades=FILE` the grade json of mm-vet_evaluator.py ({id: {"score": [one
per run]}}, a sample's runs averaged).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from vistune.errors import DataError
from vistune.eval.judge import Judge
from vistune.eval.metrics import parse_mmvet_score, parse_review_scores, relative_scores
from vistune.eval.tasks import parquet
from vistune.eval.tasks.base import Item, Task, find, read_json, read_jsonl

REVIEW_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."


def _prompt_file(name: str) -> str:
    return resources.files("vistune.eval").joinpath("prompts", name).read_text(encoding="utf-8")


def review_content(context: str, question: str, reference: str, answer: str, rule: dict[str, str]) -> str:
    role = rule["role"]
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")


def _no_judge(items: Sequence[Item]) -> dict:
    return {"n": len(items), "note": "no judge given (--judge openai:MODEL): replies saved, not scored"}


def _recorded_for(items: Sequence[Item], recorded: dict[str, object], path: Path, task: str) -> None:
    """Fail naming the first item that the recorded judgements file does not cover."""
    lost = [it.id for it in items if it.id not in recorded]
    if lost:
        raise DataError(f"{path}: no recorded {task} judgement for {len(lost)} question(s) (first: {lost[0]})",
                        "missing record")


class LLaVABench(Task):
    name, folder, headline = "llava_bench", "llava-bench-in-the-wild", ("all",)
    max_new_tokens = 1024
    judged = True
    rule_prefix = "llava_bench_"

    def __init__(self, answers: str | Path | None = None, reviews: str | Path | None = None) -> None:
        super().__init__(answers)
        # One review file per judge run, comma-separated (the authors recorded three: eval1,2,3).
        self.reviews = [Path(p) for p in str(reviews).split(",") if p.strip()] if reviews is not None else None

    def _recorded_pairs(self, items: Sequence[Item], path: Path) -> dict[str, tuple[float, float] | None]:
        """(reference, model) scores per item from a recorded review file (None where the review was unread)."""
        pairs: dict[str, tuple[float, float] | None] = {}
        for row in read_jsonl(path):
            scores = row.get("tuple")
            pair = (float(scores[0]), float(scores[1])) if isinstance(scores, list) and len(scores) == 2 else \
                parse_review_scores(str(row.get("content", "")))
            pairs[str(row["question_id"])] = None if pair == (-1.0, -1.0) else pair
        _recorded_for(items, pairs, path, self.name)
        return pairs

    def _recorded_scores(self, items: Sequence[Item]) -> dict:
        """Each recorded run scored as summarize_gpt_review.py does; the headline is the mean over the runs
        (how the authors' LLaVA-Bench number is the mean of their three review runs)."""
        assert self.reviews
        runs = [relative_scores((it.meta["category"], pairs[it.id]) for it in items)
                for pairs in (self._recorded_pairs(items, path) for path in self.reviews)]
        per = {key: {"relative": sum(r[key]["relative"] for r in runs) / len(runs),
                     "unparsed": sum(r[key]["unparsed"] for r in runs)} for key in runs[0]}
        overall = per.get("all", {})
        return {"all": overall.get("relative", 0.0), "unparsed": overall.get("unparsed", 0), "n": len(items),
                "runs": [r.get("all", {}).get("relative", 0.0) for r in runs], "per_category": per}

    def _judged_pairs(self, items: Sequence[Item], replies: dict[str, str],
                      judge: Judge) -> dict[str, tuple[float, float] | None]:
        rules = json.loads(_prompt_file("llava_bench_rules.json"))
        pairs = {}
        for it in items:
            key = self.rule_prefix + it.meta["category"]
            if key not in rules:
                raise DataError(f"{self.name}: question {it.id} has category {it.meta['category']!r}; the rules "
                                f"know {', '.join(k.removeprefix(self.rule_prefix) for k in rules if k.startswith(self.rule_prefix))}")
            content = review_content(it.meta["context"], it.meta["question"], it.answer, replies.get(it.id, ""), rules[key])
            review = judge.complete([{"role": "system", "content": REVIEW_SYSTEM}, {"role": "user", "content": content}],
                                    temperature=0.2, max_tokens=1024)
            pairs[it.id] = parse_review_scores(review)
        return pairs

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("train", "test"))) is not None:
            return self._load_parquet(found[1])
        questions = read_jsonl(find(root, ["questions.jsonl"], self.name))
        refs = {r["question_id"]: r["text"] for r in read_jsonl(find(root, ["answers_gpt4.jsonl"], self.name))}
        ctx = {r["image"]: r["caption"] for r in read_jsonl(find(root, ["context.jsonl"], self.name))}
        return [self._item(root, q, refs, ctx) for q in questions]

    def _item(self, root: Path, q: dict, refs: dict, ctx: dict) -> Item:
        if q["question_id"] not in refs:
            raise DataError(f"{self.name}: question {q['question_id']} has no reference answer", "bad record")
        caption = ctx.get(q["image"], "")
        context = "\n".join(caption) if isinstance(caption, list) else caption
        return Item(str(q["question_id"]), q["text"], (root / "images" / q["image"],), refs[q["question_id"]],
                    {"category": q.get("category", "all"), "context": context, "question": q["text"]})

    def _load_parquet(self, shards: list[Path]) -> list[Item]:
        rows = parquet.read_rows(shards, ["question_id", "question", "image", "category"], self.name,
                                 ["gpt_answer", "answer", "caption"])
        items = []
        for r in rows:
            reference = r.get("gpt_answer") if r.get("gpt_answer") is not None else r.get("answer")
            if reference is None:
                raise DataError(f"{self.name}: {shards[0]} question {r['question_id']} has no reference answer "
                                "(gpt_answer / answer column)", "bad record")
            caption = r.get("caption") or ""
            context = "\n".join(caption) if isinstance(caption, list) else caption
            items.append(Item(str(r["question_id"]), r["question"],
                              (parquet.image_bytes(r["image"], f"{self.name} question {r['question_id']}"),), reference,
                              {"category": r["category"] or "all", "context": context, "question": r["question"]}))
        return items

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: Judge | None = None) -> dict:
        if self.reviews:
            return self._recorded_scores(items)
        if judge is None:
            return _no_judge(items)
        pairs = self._judged_pairs(items, replies, judge)
        per = relative_scores((it.meta["category"], pairs[it.id]) for it in items)
        overall = per.get("all", {})
        return {"all": overall.get("relative", 0.0), "unparsed": overall.get("unparsed", 0), "n": len(items),
                "per_category": per}


class LLaVABenchCOCO(LLaVABench):
    name, folder = "llava_bench_coco", "coco2014_val_qa_eval"
    rule_prefix = ""

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("train", "test"))) is not None:
            return self._load_parquet(found[1])
        questions = read_jsonl(find(root, ["qa90_questions.jsonl"], self.name))
        refs = {r["question_id"]: r["text"] for r in read_jsonl(find(root, ["qa90_gpt4_answer.jsonl"], self.name))}
        ctx = {}
        for r in read_jsonl(find(root, ["caps_boxes_coco2014_val_80.jsonl"], self.name)):
            boxes = "\n".join(f"{b['category']}: {b['bbox']}" for b in r.get("instances", []))
            ctx[r["image"]] = "\n".join(r["captions"]) + "\n\n" + boxes  # as eval_gpt_review_visual.py
        items = []
        for q in questions:
            it = self._item(root, q, refs, ctx)
            image = root / "images" / q["image"]
            if not image.is_file():
                image = root / "val2014" / f"COCO_val2014_{q['image']}"
            items.append(Item(it.id, it.prompt, (image,), it.answer, it.meta))
        return items


MMVET_REASK = "\nPredict the correctness of the answer (digit): "
MMVET_REASK_TEMPERATURES = (0.0, 0.5, 1.0, 1.5, 2.0)


def grade_mmvet(judge: Judge, content: str) -> tuple[float | None, int]:
    """(score or None, requests made) for one MM-Vet sample, as `mm-vet_evaluator.py` grades it:
    the grader prompt at temperature 0; while the reply is no score in [0, 1], the prompt plus
    "Predict the correctness of the answer (digit): " at temperature 0.0, 0.5, 1.0, 1.5, 2.0; the
    reply to the last re-ask is never read (the evaluator stops there with 0.0, None here). Each
    request differs in prompt or temperature, so each has its own cache entry."""
    value = parse_mmvet_score(judge.complete([{"role": "user", "content": content}], temperature=0.0, max_tokens=3))
    requests = 1
    for k, temperature in enumerate(MMVET_REASK_TEMPERATURES):
        if value is not None:
            break
        reply = judge.complete([{"role": "user", "content": content + MMVET_REASK}], temperature=temperature, max_tokens=3)
        requests += 1
        if k < len(MMVET_REASK_TEMPERATURES) - 1:
            value = parse_mmvet_score(reply)
    return value, requests


def _capabilities(cell: str | list[str]) -> list[str]:
    """MM-Vet capabilities: a list in mm-vet.json, a comma-separated string in the lmms-lab parquet."""
    return [c.strip() for c in cell.split(",") if c.strip()] if isinstance(cell, str) else list(cell)


class MMVet(Task):
    name, folder, headline = "mmvet", "mm-vet", ("total",)
    max_new_tokens = 1024
    judged = True

    def __init__(self, answers: str | Path | None = None, grades: str | Path | None = None) -> None:
        super().__init__(answers)
        self.grades = Path(grades) if grades is not None else None

    def llava_row_key(self, row: dict) -> str:
        # LLaVA numbers MM-Vet's questions 0, 1, ...; its convert_answers.py names them v1_{n}, mm-vet.json's ids.
        return f"v1_{row['question_id']}"

    def _recorded_values(self, items: Sequence[Item]) -> tuple[dict[str, float | None], int]:
        """Each item's recorded grade, the mean of its runs' scores (None where a run has none)."""
        assert self.grades is not None
        data = read_json(self.grades)
        values: dict[str, float | None] = {}
        for qid, row in (data.items() if isinstance(data, dict) else []):
            scores = row.get("score") if isinstance(row, dict) else None
            ok = isinstance(scores, list) and scores and all(isinstance(s, int | float) for s in scores)
            values[str(qid)] = sum(scores) / len(scores) if ok else None  # type: ignore[arg-type]
        _recorded_for(items, values, self.grades, self.name)
        return values, 0

    def _graded_values(self, items: Sequence[Item], replies: dict[str, str],
                       judge: Judge) -> tuple[dict[str, float | None], int]:
        grader = _prompt_file("mmvet_grader.txt")
        values: dict[str, float | None] = {}
        reasked = 0
        for it in items:
            truth = it.answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
            content = grader + "\n" + " | ".join([it.meta["question"], truth, replies.get(it.id, ""), ""])
            values[it.id], requests = grade_mmvet(judge, content)
            reasked += requests > 1
        return values, reasked

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("test",))) is not None:
            rows = parquet.read_rows(found[1], ["question_id", "question", "answer", "image", "capability"], self.name)
            return [Item(str(r["question_id"]), r["question"], (parquet.image_bytes(r["image"], f"mmvet {r['question_id']}"),),
                         r["answer"], {"capability": _capabilities(r["capability"]), "question": r["question"]})
                    for r in rows]
        if not (root / "mm-vet.json").is_file() and (root / "mm-vet" / "mm-vet.json").is_file():
            root = root / "mm-vet"  # mm-vet.zip extracted into a folder of LLaVA's docs (mmvet/) keeps its own mm-vet/
        data = read_json(find(root, ["mm-vet.json"], self.name))
        return [Item(qid, r["question"], (root / "images" / r["imagename"],), r["answer"],
                     {"capability": list(r["capability"]), "question": r["question"]}) for qid, r in data.items()]

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: Judge | None = None) -> dict:
        if self.grades is not None:
            values, reasked = self._recorded_values(items)
        elif judge is None:
            return _no_judge(items)
        else:
            values, reasked = self._graded_values(items, replies, judge)
        per: dict[str, list[float]] = defaultdict(list)
        unparsed = 0
        for it in items:
            value = values[it.id]
            if value is None:
                unparsed += 1
                continue
            per["total"].append(value)
            for cap in sorted(set(it.meta["capability"])):
                per[cap].append(value)
        means = {k: 100 * sum(v) / len(v) for k, v in per.items()}
        graded = len(per.get("total", []))
        return {"total": means.pop("total", 0.0), "graded": graded, "unparsed": unparsed, "reasked": reasked,
                "total_official": 100 * sum(per.get("total", [])) / len(items) if items else 0.0,
                "n": len(items), "per_capability": dict(sorted(means.items()))}

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """{id: reply}, the results file MM-Vet's online evaluator takes."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / "mmvet_results.json"
        path.write_text(json.dumps({it.id: replies.get(it.id, "") for it in items}, ensure_ascii=False, indent=1))
        return [path]
