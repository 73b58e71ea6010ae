"""Short-answer VQA tasks: VQAv2, VizWiz, TextVQA (soft VQA accuracy) and GQA (exact match).

Layouts read (each from its task folder under --data):
- vqav2: the official `v2_OpenEnded_mscoco_{subset}_questions.json` (test-dev2015 preferred, as in
  LLaVA-1.5), with `v2_mscoco_{subset}_annotations.json` when the subset has public answers; images
  `{test2015|val2014}/COCO_{...}_{image_id:012d}.jpg`. Without it, LLaVA's docs' layout: eval.zip's
  `llava_vqav2_mscoco_test-dev2015.jsonl` (+ `llava_vqav2_mscoco_test2015.jsonl` for the upload's full
  id list) and `test2015/`.
- vizwiz: the official VizWiz-VQA `test.json` (else `val.json`), images in `test/` (`val/`).
- textvqa: the official `TextVQA_0.5.1_val.json`, OCR tokens from each entry's `ocr_tokens` or from
  `TextVQA_Rosetta_OCR_v0.2_val.json`; images `train_images/{image_id}.jpg`.
- gqa: the official `testdev_balanced_questions.json`, images `images/{imageId}.jpg`.

Or each task's lmms-lab parquet snapshot (`vistune.eval.tasks.parquet`), detected by its shards:
- vqav2: lmms-lab/VQAv2 `data/{testdev,validation}-*.parquet` (question_id, question, image,
  answers [{answer, ...}], answer_type); `data/test-*` supplies the full test ids for the upload.
- vizwiz: lmms-lab/VizWiz-VQA `data/{test,val}-*.parquet` (question_id, question, image, answers
  [str], category); the item id is `{question_id}.jpg`, the image name the VizWiz server keys on.
- textvqa: lmms-lab/textvqa `data/validation-*.parquet` (question_id, question, image, answers,
  ocr_tokens).
- gqa: lmms-lab/GQA `testdev_balanced_instructions/testdev-*.parquet` (id, imageId, question,
  answer, types) joined on imageId with `testdev_balanced_images/testdev-*.parquet` (id, image).
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
from vistune.eval.tasks import parquet
from vistune.eval.tasks.base import (
    SHORT_ANSWER,
    VIZWIZ_UNANSWERABLE,
    Item,
    Task,
    accuracy,
    find,
    read_json,
    read_jsonl,
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

    def __init__(self, answers: str | Path | None = None) -> None:
        super().__init__(answers)
        self.full_test_ids: list[int] = []  # the test2015 question ids, when that file is present

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("testdev", "validation"))) is not None:
            return self._load_parquet(root, *found)
        llava = root / "llava_vqav2_mscoco_test-dev2015.jsonl"
        if llava.is_file() and not any(root.glob("v2_OpenEnded_mscoco_*_questions.json")):
            return self._load_llava(root, llava)
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

    def _load_llava(self, root: Path, qfile: Path) -> list[Item]:
        """LLaVA's docs' layout: eval.zip's question files (prompts as the authors asked) + `test2015/`."""
        full = root / "llava_vqav2_mscoco_test2015.jsonl"
        self.full_test_ids = [int(r["question_id"]) for r in read_jsonl(full)] if full.is_file() else []
        return [Item(str(r["question_id"]), with_line(r["text"], SHORT_ANSWER), (root / "test2015" / r["image"],),
                     None, {"answer_type": None}) for r in read_jsonl(qfile)]

    def _load_parquet(self, root: Path, split: str, shards: list[Path]) -> list[Item]:
        rows = parquet.read_rows(shards, ["question_id", "question", "image"], self.name, ["answers", "answer_type"])
        full = parquet.find_split(root, ("test",)) if split == "testdev" else None
        self.full_test_ids = [r["question_id"] for r in parquet.read_rows(full[1], ["question_id"], self.name)] \
            if full else []
        return [Item(str(r["question_id"]), with_line(r["question"], SHORT_ANSWER),
                     (parquet.image_bytes(r["image"], f"vqav2 question {r['question_id']}"),),
                     [a["answer"] for a in r["answers"]] if r.get("answers") else None,
                     {"answer_type": r.get("answer_type")}) for r in rows]

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
        if (found := parquet.find_split(root, ("test", "val"))) is not None:
            rows = parquet.read_rows(found[1], ["question_id", "question", "image"], self.name, ["answers", "category"])
            # `category` holds the VizWiz answer type (unanswerable, yes/no, number, other)
            return [Item(f"{r['question_id']}.jpg", with_line(with_line(r["question"], VIZWIZ_UNANSWERABLE), SHORT_ANSWER),
                         (parquet.image_bytes(r["image"], f"vizwiz {r['question_id']}"),), list(r.get("answers") or []) or None,
                         {"answer_type": r.get("category")}) for r in rows]
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

    def llava_keys(self, items: Sequence[Item]) -> dict[str, str | None]:
        # LLaVA's llava_test.jsonl numbers the questions 0, 1, ... in test.json's order; the item id is the image
        # name, which its upload file keys on.
        return {str(k): it.id for k, it in enumerate(items)} | {it.id: it.id for it in items}

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        return _soft_scores(items, replies, "answer_type")

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """[{image, answer}] as the VizWiz server takes it (answers through the EvalAI processor)."""
        rows = [{"image": it.id, "answer": normalize_vqa_answer(replies.get(it.id, ""))} for it in items]
        return [_write_json(out / "vizwiz_answers_upload.json", rows)]


def _ocr_prompt(question: str, tokens: Sequence[str]) -> str:
    """LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl: the question capitalised as `str.capitalize` does (none of
    its 5,000 questions keeps a capital after the first letter), then the OCR line, empty when there are no
    tokens (115 of its prompts)."""
    return question.strip().capitalize() + "\nReference OCR token: " + ", ".join(tokens)


class TextVQA(Task):
    name, folder, headline = "textvqa", "textvqa", ("accuracy",)

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("validation",))) is not None:
            rows = parquet.read_rows(found[1], ["question_id", "question", "image"], self.name, ["answers", "ocr_tokens"])
            return [Item(str(r["question_id"]), with_line(_ocr_prompt(r["question"], r.get("ocr_tokens") or []), SHORT_ANSWER),
                         (parquet.image_bytes(r["image"], f"textvqa question {r['question_id']}"),),
                         list(r.get("answers") or []) or None, {}) for r in rows]
        qfile = find(root, ["TextVQA_0.5.1_val.json", "TextVQA_*_val.json"], self.name)
        ocr: dict[str, list[str]] = {}
        ocr_files = sorted(root.glob("TextVQA_Rosetta_OCR_*_val.json"))
        if ocr_files:
            ocr = {r["image_id"]: r.get("ocr_tokens", []) for r in read_json(ocr_files[0])["data"]}
        image_dir = root / "train_images"
        items = []
        for row in read_json(qfile)["data"]:
            tokens = row.get("ocr_tokens", ocr.get(row["image_id"], []))
            items.append(Item(str(row["question_id"]), with_line(_ocr_prompt(row["question"], tokens), SHORT_ANSWER),
                              (image_dir / f"{row['image_id']}.jpg",), row.get("answers") or None, {}))
        return items

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        out = _soft_scores(items, replies, "none")
        out.pop("per_type", None)
        return out


class GQA(Task):
    name, folder, headline = "gqa", "gqa", ("accuracy",)

    def load(self, root: Path) -> list[Item]:
        found = parquet.find_split(root, ("testdev",), ("testdev_balanced_instructions",))
        if found is not None:
            return self._load_parquet(root, found[1])
        if (root / "data").is_dir() and not (root / "images").is_dir():
            root = root / "data"  # LLaVA's layout: gqa/data/ holds the official questions, images and eval.py
        qfile = find(root, ["testdev_balanced_questions.json", "*_balanced_questions.json"], self.name)
        questions = read_json(qfile)
        if not isinstance(questions, dict):
            raise DataError(f"{qfile}: expected GQA's {{question_id: question}} object", "bad file")
        return [Item(qid, with_line(q["question"], SHORT_ANSWER), (root / "images" / f"{q['imageId']}.jpg",),
                     q.get("answer"), {"structural": q.get("types", {}).get("structural")})
                for qid, q in questions.items()]

    def _load_parquet(self, root: Path, shards: list[Path]) -> list[Item]:
        rows = parquet.read_rows(shards, ["id", "imageId", "question"], self.name, ["answer", "types"])
        images_at = parquet.find_split(root, ("testdev",), ("testdev_balanced_images",))
        if images_at is None:
            raise DataError(f"gqa: {root} has testdev_balanced_instructions/ but no testdev_balanced_images/testdev-*.parquet "
                            "(lmms-lab/GQA keeps the images in that config)", "missing file")
        images = {r["id"]: r["image"] for r in parquet.read_rows(images_at[1], ["id", "image"], self.name)}
        items = []
        for r in rows:
            if r["imageId"] not in images:
                raise DataError(f"gqa: question {r['id']} refers to image {r['imageId']}, which is not in "
                                f"{images_at[1][0].parent}", "bad record")
            items.append(Item(str(r["id"]), with_line(r["question"], SHORT_ANSWER),
                              (parquet.image_bytes(images[r["imageId"]], f"gqa image {r['imageId']}"),), r.get("answer"),
                              {"structural": (r.get("types") or {}).get("structural")}))
        return items

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
