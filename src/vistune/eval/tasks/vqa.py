"""Short-answer VQA tasks: VQAv2, VizWiz, TextVQA (soft VQA accuracy) and GQA (exact match).

Layouts read (each from its task folder under --data):
- vqav2: the official `v2_OpenEnded_mscoco_{subset}_questions.json` (test-dev2015 preferred, as in
  LLaVA-1.5), with `v2_mscoco_{subset}_annotations.json` when the subset has public answers; images
  `{test2015|val2014}/COCO_{...}_{image_id:012d}.jpg`.
- vizwiz: the official VizWiz-VQA `test.json` (else `val.json`), images in `test/` (`val/`).
- textvqa: the official `TextVQA_0.5.1_val.json`, OCR tokens from each entry's `ocr_tokens` or from
  `TextVQA_Rosetta_OCR_v0.2_val.json`; images `train_images/{image_id}.jpg`.
- gqa: the official `testdev_balanced_questions.json`, images `images/{imageId}.jpg`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from vistune.errors import DataError
from vistune.eval.metrics import (
    gqa_match,
    normalize_gqa_answer,
    normalize_vqa_answer,
    vqa_accuracy,
)
from vistune.eval.tasks.base import (
    SHORT_ANSWER,
    VIZWIZ_UNANSWERABLE,
    Item,
    Task,
    accuracy,
    find,
    read_json,
    with_line,
    write_text_atomic,
)


def _soft_scores(items: Sequence[Item], replies: dict[str, str], type_key: str) -> dict:
    """Soft accuracy (x100) overall and per `meta[type_key]`, over the items that have answers."""
    scored = [it for it in items if it.answer]
    if not scored:
        return {"n": len(items), "scored": 0, "note": "no public answers: upload the submission file"}
    per: dict[str, list[float]] = defaultdict(list)
    for it in scored:
        s = vqa_accuracy(replies.get(it.id, ""), it.answer)
        per["all"].append(s)
        per[str(it.meta.get(type_key, "unknown"))].append(s)
    out: dict = {"accuracy": 100 * accuracy(per.pop("all")), "n": len(items), "scored": len(scored)}
    out["per_type"] = {k: 100 * accuracy(v) for k, v in sorted(per.items())}
    return out


def _write_json(path: Path, data: object) -> Path:
    return write_text_atomic(path, json.dumps(data))


class VQAv2(Task):
    name, folder, headline = "vqav2", "vqav2", ("accuracy",)

    def __init__(self) -> None:
        self.full_test_ids: list[int] = []  # the test2015 question ids, when that file is present

    def load(self, root: Path) -> list[Item]:
        qfile = find(root, ["v2_OpenEnded_mscoco_test-dev2015_questions.json", "v2_OpenEnded_mscoco_val2014_questions.json",
                            "v2_OpenEnded_mscoco_*_questions.json"], self.name)
        subset = qfile.name.removeprefix("v2_OpenEnded_mscoco_").removesuffix("_questions.json")
        image_dir = "test2015" if subset.startswith("test") else subset
        full = root / "v2_OpenEnded_mscoco_test2015_questions.json"
        self.full_test_ids = ([q["question_id"] for q in read_json(full)["questions"]]
                              if subset == "test-dev2015" and full.is_file() else [])
        answers: dict[int, dict] = {}
        afile = root / f"v2_mscoco_{subset}_annotations.json"
        if afile.is_file():
            answers = {a["question_id"]: a for a in read_json(afile)["annotations"]}
        items = []
        for q in read_json(qfile)["questions"]:
            a = answers.get(q["question_id"])
            items.append(Item(str(q["question_id"]), with_line(q["question"], SHORT_ANSWER),
                              (root / image_dir / f"COCO_{image_dir}_{q['image_id']:012d}.jpg",),
                              [x["answer"] for x in a["answers"]] if a else None,
                              {"answer_type": a["answer_type"] if a else None}))
        return items

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        return _soft_scores(items, replies, "answer_type")

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """[{question_id, answer}] with answers through the EvalAI processor, as LLaVA's converter does;
        questions of the full test2015 file that were not asked (test-dev is its subset) get ""."""
        rows = [{"question_id": int(it.id), "answer": normalize_vqa_answer(replies.get(it.id, ""))} for it in items]
        asked = {row["question_id"] for row in rows}
        rows += [{"question_id": q, "answer": ""} for q in self.full_test_ids if q not in asked]
        return [_write_json(out / "vqav2_answers_upload.json", rows)]


class VizWiz(Task):
    name, folder, headline = "vizwiz", "vizwiz", ("accuracy",)

    def load(self, root: Path) -> list[Item]:
        afile = find(root, ["test.json", "val.json", "Annotations/test.json", "Annotations/val.json"], self.name)
        split = afile.stem
        image_dir = next((d for d in (root / split, root.parent / split) if d.is_dir()), root / split)
        items = []
        for row in read_json(afile):
            prompt = with_line(with_line(row["question"], VIZWIZ_UNANSWERABLE), SHORT_ANSWER)
            answers = [a["answer"] for a in row.get("answers", [])] or None
            items.append(Item(row["image"], prompt, (image_dir / row["image"],), answers,
                              {"answer_type": row.get("answer_type")}))
        return items

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        return _soft_scores(items, replies, "answer_type")

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """[{image, answer}] as the VizWiz server takes it (answers through the EvalAI processor)."""
        rows = [{"image": it.id, "answer": normalize_vqa_answer(replies.get(it.id, ""))} for it in items]
        return [_write_json(out / "vizwiz_answers_upload.json", rows)]


class TextVQA(Task):
    name, folder, headline = "textvqa", "textvqa", ("accuracy",)

    def load(self, root: Path) -> list[Item]:
        qfile = find(root, ["TextVQA_0.5.1_val.json", "TextVQA_*_val.json"], self.name)
        ocr: dict[str, list[str]] = {}
        ocr_files = sorted(root.glob("TextVQA_Rosetta_OCR_*_val.json"))
        if ocr_files:
            ocr = {r["image_id"]: r.get("ocr_tokens", []) for r in read_json(ocr_files[0])["data"]}
        image_dir = root / "train_images"
        items = []
        for row in read_json(qfile)["data"]:
            tokens = row.get("ocr_tokens", ocr.get(row["image_id"], []))
            prompt = row["question"]
            if tokens:  # LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl: the question, then the OCR line
                prompt += "\nReference OCR token: " + ", ".join(tokens)
            items.append(Item(str(row["question_id"]), with_line(prompt, SHORT_ANSWER),
                              (image_dir / f"{row['image_id']}.jpg",), row.get("answers") or None, {}))
        return items

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        out = _soft_scores(items, replies, "none")
        out.pop("per_type", None)
        return out


class GQA(Task):
    name, folder, headline = "gqa", "gqa", ("accuracy",)

    def load(self, root: Path) -> list[Item]:
        qfile = find(root, ["testdev_balanced_questions.json", "*_balanced_questions.json"], self.name)
        questions = read_json(qfile)
        if not isinstance(questions, dict):
            raise DataError(f"{qfile}: expected GQA's {{question_id: question}} object", "bad file")
        return [Item(qid, with_line(q["question"], SHORT_ANSWER), (root / "images" / f"{q['imageId']}.jpg",),
                     q.get("answer"), {"structural": q.get("types", {}).get("structural")})
                for qid, q in questions.items()]

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        per: dict[str, list[bool]] = defaultdict(list)
        for it in items:
            ok = gqa_match(replies.get(it.id, ""), it.answer or "")
            per["all"].append(ok)
            per[str(it.meta.get("structural"))].append(ok)
        return {"accuracy": 100 * accuracy(per.pop("all")), "n": len(items),
                "per_type": {k: 100 * accuracy(v) for k, v in sorted(per.items())}}

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """[{questionId, prediction}], the file the official GQA eval.py reads."""
        rows = [{"questionId": it.id, "prediction": normalize_gqa_answer(replies.get(it.id, ""))} for it in items]
        return [_write_json(out / "gqa_testdev_balanced_predictions.json", rows)]
