"""Yes/no tasks: POPE (adversarial, popular, random) and MME.

Layouts read:
- pope: the official POPE files `coco_pope_{adversarial,popular,random}.json` (JSON lines:
  question_id, image, text, label), in the folder or its `coco/` subfolder, as LLaVA's eval folder
  keeps them; images from COCO `val2014/`. Item ids are CATEGORY/question_id (ids repeat across files).
- mme: the official `MME_Benchmark_release_version/` folder (or its contents): one folder per subtask
  holding either `images/` + `questions_answers_YN/*.txt` or the images and .txt files side by side;
  each .txt holds two "question<TAB>Yes|No" lines for its image.

Or the lmms-lab parquet snapshots (`vistune.eval.tasks.parquet`):
- pope: lmms-lab/POPE `data/test-*.parquet` (question_id, question, answer, image, category =
  adversarial | popular | random).
- mme: lmms-lab/MME `data/test-*.parquet` (question_id = the image's path within its subtask,
  question, answer Yes/No, image, category = the subtask); an image's questions keep their file order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from vistune.errors import DataError
from vistune.eval.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    mme_scores,
    pope_metrics,
    pope_parse,
)
from vistune.eval.tasks import parquet
from vistune.eval.tasks.base import SHORT_ANSWER, Item, Task, read_jsonl, with_line

POPE_CATEGORIES = ("adversarial", "popular", "random")
# LLaVA's llava_pope_test.jsonl numbers each split's POPE question_id from its own offset.
POPE_LLAVA_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
# MME's .txt questions end with this; LLaVA's llava_mme.jsonl drops it before adding the short-answer line.
MME_YES_NO = "Please answer yes or no."


def mme_prompt(question: str) -> str:
    """The prompt LLaVA-1.5 asked for an MME question (as in its llava_mme.jsonl)."""
    question = question.strip()
    if question.endswith(MME_YES_NO):
        question = question[: -len(MME_YES_NO)].strip()
    return with_line(question, SHORT_ANSWER)


class POPE(Task):
    name, folder, headline = "pope", "pope", ("f1", "accuracy")

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("test",))) is not None:
            rows = parquet.read_rows(found[1], ["question_id", "question", "answer", "image", "category"], self.name)
            # grouped by category in POPE_CATEGORIES order, as the JSON layout's three files are read
            rows.sort(key=lambda r: POPE_CATEGORIES.index(r["category"]) if r["category"] in POPE_CATEGORIES else 99)
            return [Item(f"{r['category']}/{r['question_id']}", with_line(r["question"].strip(), SHORT_ANSWER),
                         (parquet.image_bytes(r["image"], f"pope {r['category']}/{r['question_id']}"),),
                         r["answer"].strip().lower(), {"category": r["category"]}) for r in rows]
        base = root / "coco" if (root / "coco").is_dir() else root
        image_dir = next((d for d in (root / "val2014", root.parent / "val2014") if d.is_dir()), root / "val2014")
        items = []
        for cat in POPE_CATEGORIES:
            path = base / f"coco_pope_{cat}.json"
            if not path.is_file():
                continue
            for r in read_jsonl(path):
                items.append(Item(f"{cat}/{r['question_id']}", with_line(r["text"], SHORT_ANSWER),
                                  (image_dir / r["image"],), r["label"], {"category": cat}))
        if not items:
            raise DataError(f"pope: no coco_pope_{{{','.join(POPE_CATEGORIES)}}}.json in {base}", "missing file")
        return items

    def llava_row_key(self, row: dict) -> str:
        qid = int(row["question_id"])
        offsets = {v: k for k, v in POPE_LLAVA_OFFSETS.items()}
        base = qid - qid % 10_000_000
        if base not in offsets:
            raise DataError(f"pope: answer question_id {qid} is outside LLaVA's split offsets "
                            f"{POPE_LLAVA_OFFSETS}", "bad record")
        return f"{offsets[base]}/{qid - base}"

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        by_cat: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for it in items:
            preds, labels = by_cat[it.meta["category"]]
            preds.append(pope_parse(replies.get(it.id, "")))
            labels.append(it.answer)
        cats = {c: {k: (100 * v if k != "n" else v) for k, v in pope_metrics(*pl).items()}
                for c, pl in sorted(by_cat.items())}
        out = {k: sum(m[k] for m in cats.values()) / len(cats) for k in ("f1", "accuracy", "precision", "recall",
                                                                           "yes_ratio")}
        return out | {"n": len(items), "per_category": cats}


def _mme_root(root: Path) -> Path:
    inner = root / "MME_Benchmark_release_version"
    return inner if inner.is_dir() else root


class MME(Task):
    name, folder, headline = "mme", "MME", ("perception", "cognition")

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("test",))) is not None:
            return self._load_parquet(found[1])
        root = _mme_root(root)
        items = []
        for task in (*MME_PERCEPTION, *MME_COGNITION):
            tdir = root / task
            if not tdir.is_dir():
                continue
            qa_dir = tdir / "questions_answers_YN" if (tdir / "questions_answers_YN").is_dir() else tdir
            img_dir = tdir / "images" if (tdir / "images").is_dir() else tdir
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next((p for p in (img_dir / f"{txt.stem}{ext}" for ext in (".jpg", ".png", ".jpeg"))
                              if p.is_file()), None)
                if image is None:  # rescoring answers needs no image; asking a model fails on the missing file
                    image = img_dir / txt.stem
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for k, line in enumerate(lines):
                    question, _, answer = line.rpartition("\t")
                    if answer.strip().lower() not in ("yes", "no"):
                        raise DataError(f"mme: {txt} line {k + 1}: answer {answer!r} is not Yes/No", "bad record")
                    items.append(Item(f"{task}/{image.name}/{k}", mme_prompt(question), (image,),
                                      answer.strip().lower(), {"task": task, "image": image.name,
                                                               "question": question.strip()}))
        if not items:
            raise DataError(f"mme: no subtask folders ({', '.join(MME_PERCEPTION[:3])}, ...) in {root}", "missing file")
        return items

    def _load_parquet(self, shards: list[Path]) -> list[Item]:
        rows = parquet.read_rows(shards, ["question_id", "question", "answer", "image", "category"], self.name)
        per_image: dict[tuple[str, str], int] = defaultdict(int)
        order = {t: k for k, t in enumerate((*MME_PERCEPTION, *MME_COGNITION))}
        items = []
        for r in sorted(rows, key=lambda r: order.get(r["category"], len(order))):  # stable: file order per subtask
            task, image = r["category"], str(r["question_id"]).rsplit("/", 1)[-1]
            answer = str(r["answer"]).strip().lower().rstrip(".")
            if answer not in ("yes", "no"):
                raise DataError(f"mme: question {r['question_id']} has answer {r['answer']!r}, not Yes/No", "bad record")
            k = per_image[(task, image)]
            per_image[(task, image)] += 1
            items.append(Item(f"{task}/{image}/{k}", mme_prompt(r["question"]),
                              (parquet.image_bytes(r["image"], f"mme {r['question_id']}"),), answer,
                              {"task": task, "image": image, "question": r["question"].strip()}))
        return items

    def llava_keys(self, items: Sequence[Item]) -> dict[str, str | None]:
        # LLaVA's question_id is TASK/IMAGE, the same for both questions of an image: the prompt tells them apart.
        return {f"{it.meta['task']}/{Path(it.meta['image']).stem}\n{it.prompt}": it.id for it in items}

    def llava_row_key(self, row: dict) -> str:
        return f"{str(row['question_id']).rsplit('.', 1)[0]}\n{row.get('prompt', '')}"

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        rows = [(it.meta["task"], it.meta["image"], it.answer, replies.get(it.id, "")) for it in items]
        return mme_scores(rows) | {"n": len(items)}

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """One IMAGE<TAB>QUESTION<TAB>GT<TAB>REPLY file per subtask, what MME's calculation.py reads."""
        folder = out / "mme_results"
        folder.mkdir(parents=True, exist_ok=True)
        lines: dict[str, list[str]] = defaultdict(list)
        for it in items:
            reply = replies.get(it.id, "").replace("\t", " ").replace("\n", " ")
            lines[it.meta["task"]].append(f"{it.meta['image']}\t{it.meta['question']}\t{it.answer.capitalize()}\t{reply}")
        paths = []
        for task, rows in lines.items():
            path = folder / f"{task}.txt"
            path.write_text("\n".join(rows) + "\n", encoding="utf-8")
            paths.append(path)
        return paths
