"""Multiple-choice tasks: ScienceQA-IMG, MMBench / MMBench-CN (circular), SEED-Bench (image).

Layouts read:
- scienceqa: the official ScienceQA `problems.json` + `pid_splits.json`, images
  `images/test/{pid}/image.png` (LLaVA's `llava_test_CQM-A.json`, when present, gives the prompts
  verbatim). Only the test questions with an image are asked (ScienceQA-IMG, as LLaVA-1.5 reports).
  Without LLaVA's file the prompt is "Context: HINT\\nQUESTION\\nA. ...\\nB. ..." (context line only
  when the hint is not empty), then the letter instruction.
- mmbench / mmbench_cn: the MMBench TSV (`mmbench_dev_20230712.tsv`, `mmbench_dev_cn_20231003.tsv`,
  or any `*.tsv`): index, question, hint, A-D, answer, category, base64 image. Files whose indices
  already hold the circular copies (index + k * 1e6, as the 2023 releases do) are read as they are;
  otherwise each question is expanded into one pass per circular shift of its options.
- seed: the official `SEED-Bench.json`, image questions only, images `SEED-Bench-image/{data_id}`.

Or the lmms-lab parquet snapshots (`vistune.eval.tasks.parquet`):
- scienceqa: lmms-lab/ScienceQA config ScienceQA-IMG, `ScienceQA-IMG/test-*.parquet` (or
  lmms-lab/ScienceQA-IMG `data/test-*`): image, question, choices, answer (index), hint, subject.
  The parquet has no problem id, so items are numbered `test/{row}` in file order.
- mmbench / mmbench_cn: lmms-lab/MMBench `en/dev-*.parquet` / `cn/dev-*.parquet` (or lmms-lab/
  MMBench_EN, MMBench_CN `data/dev-*`): the TSV's columns with `image` an embedded image.
- seed: lmms-lab/SEED-Bench `data/test-*.parquet`: the JSON's fields, `image` a list of images,
  `question_type_id` named by SEED_IMAGE_TYPES.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vistune.errors import DataError
from vistune.eval.metrics import (
    OPTION_LETTERS,
    circular_accuracy,
    mmbench_parse,
    scienceqa_parse,
    seed_match,
)
from vistune.eval.mmbench_judge import mmbench_judge_letter, mmbench_matcher_prompt
from vistune.eval.tasks import parquet
from vistune.eval.tasks.base import (
    LETTER_ANSWER,
    LETTER_ANSWER_CN,
    Item,
    Task,
    accuracy,
    b64,
    find,
    read_json,
    with_line,
)
from vistune.files import replacing
from vistune.tokens import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from vistune.eval.judge import Judge

CIRCULAR_STRIDE = 1_000_000  # MMBench's index offset between circular copies of one question


def options_block(options: Sequence[str]) -> str:
    return "\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options))


class ScienceQA(Task):
    """Options: ensemble (complement | judge; the --judge model is the text-only teacher)."""

    name, folder, headline = "scienceqa", "scienceqa", ("img_accuracy",)

    def __init__(self, ensemble: str | None = None, answers: str | Path | None = None) -> None:
        from vistune.eval.scienceqa_ensemble import ENSEMBLES

        super().__init__(answers)
        if ensemble is not None and ensemble not in ENSEMBLES:
            raise DataError(f"scienceqa: unknown ensemble {ensemble!r}; valid: {', '.join(ENSEMBLES)}", "bad option")
        self.ensemble = ensemble
        self.text_only: list[str] = []  # test pids without an image (JSON layout): LLaVA answers them too
        if ensemble:
            self.headline = ("img_accuracy", "ensemble_accuracy")

    def load(self, root: Path) -> list[Item]:
        found = parquet.find_split(root, ("test",), ("ScienceQA-IMG", "data", "."))
        if found is not None:
            return self._load_parquet(found[1])
        problems = read_json(find(root, ["problems.json"], self.name))
        splits = read_json(find(root, ["pid_splits.json"], self.name))
        llava = {}
        if (root / "llava_test_CQM-A.json").is_file():
            llava = {str(r["id"]): r for r in read_json(root / "llava_test_CQM-A.json")}
        items = []
        self.text_only = [pid for pid in splits["test"] if not problems[pid].get("image")]
        for pid in splits["test"]:
            p = problems[pid]
            if not p.get("image"):
                continue
            if pid in llava:
                prompt = llava[pid]["conversations"][0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            else:
                prompt = _sqa_prompt(p)
            items.append(_sqa_item(pid, prompt, root / "images" / "test" / pid / p["image"], p))
        return items

    def llava_keys(self, items: Sequence[Item]) -> dict[str, str | None]:
        # LLaVA asks every test question and reports IMG accuracy over those with an image; only those are items.
        return {pid: None for pid in self.text_only} | {it.id: it.id for it in items}

    def _load_parquet(self, shards: list[Path]) -> list[Item]:
        rows = parquet.read_rows(shards, ["image", "question", "choices", "answer"], self.name, ["hint", "subject"])
        return [_sqa_item(f"test/{k}", _sqa_prompt(r), parquet.image_bytes(r["image"], f"scienceqa {shards[0].name} row {k}"),
                          r) for k, r in enumerate(rows) if r["image"] is not None]  # ScienceQA-FULL: image questions only

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: Judge | None = None) -> dict:
        per: dict[str, list[bool]] = defaultdict(list)
        letters = {it.id: scienceqa_parse(replies.get(it.id, "FAILED"), it.meta["num_choices"]) for it in items}
        for it in items:
            per["all"].append(letters[it.id] == it.answer)
            per[str(it.meta.get("subject"))].append(letters[it.id] == it.answer)
        out = {"img_accuracy": 100 * accuracy(per.pop("all")), "n": len(items),
               "failed": sum(v is None for v in letters.values()),
               "per_subject": {k: 100 * accuracy(v) for k, v in sorted(per.items())}}
        if self.ensemble:
            from vistune.eval import scienceqa_ensemble as ens

            if judge is None:
                raise DataError("scienceqa: an ensemble needs the text-only teacher: --judge openai:MODEL", "bad option")
            teacher = ens.teacher_answers(items, judge)
            final = ens.complement(letters, teacher) if self.ensemble == "complement" else \
                ens.judge(items, letters, teacher, judge)
            out |= {"ensemble": self.ensemble,
                    "teacher_accuracy": 100 * accuracy([teacher[it.id] == it.answer for it in items]),
                    "teacher_failed": sum(v is None for v in teacher.values()),
                    "ensemble_accuracy": 100 * accuracy([final[it.id] == it.answer for it in items])}
        return out


def _sqa_prompt(p: dict) -> str:
    """"Context: HINT" (when there is a hint), the question, then the lettered options."""
    lines = [f"Context: {p['hint']}"] if (p.get("hint") or "").strip() else []
    return "\n".join([*lines, p["question"], options_block(p["choices"])])


def _sqa_item(item_id: str, prompt: str, image: Path | bytes, p: dict) -> Item:
    return Item(item_id, with_line(prompt, LETTER_ANSWER), (image,), OPTION_LETTERS[p["answer"]],
                {"num_choices": len(p["choices"]), "subject": p.get("subject"), "question": p["question"],
                 "choices": list(p["choices"]), "hint": p.get("hint") or ""})


def _read_tsv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's 128 KiB default
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _present(value: str | None) -> bool:
    return value is not None and value.strip() != "" and value.strip().lower() != "nan"


class MMBench(Task):
    name, folder, headline = "mmbench", "mmbench", ("circular_accuracy",)
    files = ("mmbench_dev_20230712.tsv", "mmbench_dev_en*.tsv", "MMBench_DEV_EN*.tsv", "*.tsv")
    parquet_configs = ("en", "data", ".")  # lmms-lab/MMBench `en/`, lmms-lab/MMBench_EN `data/`
    instruction = LETTER_ANSWER

    def __init__(self, answers: str | Path | None = None) -> None:
        super().__init__(answers)
        self.rows: dict[int, dict[str, str]] = {}  # the TSV rows, for the submission file

    def load(self, root: Path) -> list[Item]:
        found = parquet.find_split(root, ("dev",), self.parquet_configs)
        if found is not None:
            rows = [{k: v if isinstance(v, dict) or v is None else str(v) for k, v in r.items()}
                    for r in parquet.read_rows(found[1], ["index", "question", "A", "B", "image"], self.name,
                                               ["hint", "C", "D", "E", "answer", "category", "L2-category", "l2-category",
                                                "source", "comment", "split"])]
            images = {int(r["index"]): parquet.image_bytes(r["image"], f"{self.name} index {r['index']}") for r in rows}
        else:
            path = find(root, list(self.files), self.name)
            rows = _read_tsv(path)
            for col in ("index", "question", "A", "B", "image"):
                if rows and col not in rows[0]:
                    raise DataError(f"{path}: no {col!r} column; expected MMBench's TSV layout", "bad file")
            images = {}
        self.rows = {int(r["index"]): r for r in rows}
        has_copies = any(i >= CIRCULAR_STRIDE for i in self.rows)
        items = []
        for index, r in self.rows.items():
            options = [r[c] for c in "ABCDEFGHIJ" if _present(r.get(c))]
            if images:
                encoded = images[index]
            else:
                image = r["image"]
                if image.isdigit():  # newer TSVs store an image once and refer to it by index
                    image = self.rows[int(image)]["image"]
                encoded = b64(image)
            answer = r.get("answer") if _present(r.get("answer")) else None
            shifts = 1 if has_copies else len(options)
            for k in range(shifts):
                opts = options[k:] + options[:k]
                ans = None
                if answer is not None:
                    ans = OPTION_LETTERS[(OPTION_LETTERS.index(answer.strip()) - k) % len(options)]
                question = f"{r['hint']}\n{r['question']}" if _present(r.get("hint")) else r["question"]
                items.append(Item(str(index + k * CIRCULAR_STRIDE),
                                  with_line(f"{question}\n{options_block(opts)}", self.instruction),
                                  (encoded,), ans,
                                  {"group": str(index % CIRCULAR_STRIDE), "options": opts,
                                   "category": r.get("category"), "question": r["question"]}))
        return items

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: Judge | None = None) -> dict:
        """Circular accuracy. Replies `can_infer` cannot read count as wrong, or, with a judge, are
        matched to an option by it as VLMEvalKit's circular evaluation does (`match_with_judge`)."""
        scored = [it for it in items if it.answer is not None]
        if not scored:
            return {"n": len(items), "scored": 0, "note": "no public answers: upload the submission file"}
        letters = {it.id: mmbench_parse(replies.get(it.id, ""), len(it.meta["options"]), it.meta["options"])
                   for it in scored}
        unread = sum(v is None for v in letters.values())
        judged = self.match_with_judge(scored, replies, letters, judge) if judge is not None else {}
        letters |= judged
        results, per_cat = [], defaultdict(list)
        for it in scored:
            results.append((it.meta["group"], letters[it.id] == it.answer))
            per_cat[str(it.meta.get("category"))].append((it.meta["group"], letters[it.id] == it.answer))
        out = {k: 100 * v if "accuracy" in k else v for k, v in circular_accuracy(results).items()}
        out |= {"n": len(items), "passes": len(scored), "unparsed": sum(letters[it.id] in (None, "Z") for it in scored),
                "unread_by_rules": unread, "matcher": "judge" if judge is not None else "exact (can_infer only)",
                "judge_matched": sum(v not in (None, "Z") for v in judged.values()),
                "per_category": {c: 100 * circular_accuracy(r)["circular_accuracy"] for c, r in sorted(per_cat.items())}}
        return out

    @staticmethod
    def match_with_judge(scored: Sequence[Item], replies: dict[str, str], letters: dict[str, str | None],
                         judge: Judge, attempts: int = 3) -> dict[str, str | None]:
        """Letters the judge gives for passes `can_infer` could not read, as VLMEvalKit's
        `eval_circular_group` asks: a question none of whose read passes is wrong has its unread
        passes asked in order, stopping at the first wrong one (the question has failed then); each
        unread judge reply is asked again, up to `attempts` requests. Where VLMEvalKit then draws a
        random option, the pass stays unmatched (None) and counts as wrong."""
        groups: dict[str, list[Item]] = defaultdict(list)
        for it in scored:
            groups[it.meta["group"]].append(it)
        out: dict[str, str | None] = {}
        for passes in groups.values():
            if any(letters[it.id] is not None and letters[it.id] != it.answer for it in passes):
                continue  # already failed: no judge call (VLMEvalKit's prefetch)
            for it in passes:
                if letters[it.id] is not None:
                    continue
                prompt = mmbench_matcher_prompt(it.meta["question"], it.meta["options"], replies.get(it.id, "").strip())
                letter = None
                for attempt in range(attempts):
                    letter = mmbench_judge_letter(judge.complete([{"role": "user", "content": prompt}], temperature=0.0,
                                                                 attempt=attempt), it.meta["options"])
                    if letter is not None:
                        break
                out[it.id] = letter
                if letter != it.answer:
                    break
        return out

    def llava_row_key(self, row: dict) -> str:
        # model_vqa_mmbench.py: question_id is the TSV index, round_id the circular shift (0 when the TSV holds the copies).
        return str(int(row["question_id"]) + int(row.get("round_id") or 0) * CIRCULAR_STRIDE)

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """The xlsx the MMBench server takes, as LLaVA's convert_mmbench_for_submission.py writes it: the TSV's
        rows without the image, hint, category, source, comment and l2-category columns, `prediction`
        inserted as the 7th column (after D), the index a number and empty cells empty."""
        try:
            from openpyxl import Workbook
        except ImportError:
            raise DataError("the MMBench submission is an .xlsx file: pip install 'vistune[eval]' (openpyxl)",
                            "missing dependency") from None
        drop = {"image", "hint", "category", "source", "comment", "l2-category"}
        columns = [c for c in next(iter(self.rows.values()), {}) if c not in drop]
        at = min(6, len(columns))  # the script's `insert(6, 'prediction', None)`
        wb = Workbook()
        ws = wb.active
        ws.append([*columns[:at], "prediction", *columns[at:]])
        for index, r in self.rows.items():
            cells: list[object] = [int(index) if c == "index" else (r[c] if r[c] not in ("", "nan") else None)
                                   for c in columns]
            ws.append([*cells[:at], replies.get(str(index), ""), *cells[at:]])
        path = out / f"{self.name}_submission.xlsx"
        with replacing(path) as tmp:
            wb.save(tmp)
        return [path]


class MMBenchCN(MMBench):
    # LLaVA's docs put the CN TSV beside the EN one in mmbench/ (a folder of its own works too): so no
    # catch-all "*.tsv" here, which would read the EN file.
    name, folder = "mmbench_cn", "mmbench"
    files = ("mmbench_dev_cn_20231003.tsv", "mmbench_dev_cn*.tsv", "MMBench_DEV_CN*.tsv", "*_cn_*.tsv")

    def load(self, root: Path) -> list[Item]:
        if root.name == self.folder and (root.parent / self.name).is_dir():
            if not any(any(root.glob(pattern)) for pattern in self.files):
                root = root.parent / self.name
        return super().load(root)
    parquet_configs = ("cn", "data", ".")
    instruction = LETTER_ANSWER_CN


# SEED-Bench's evaluation dimensions (question_type_id -> name); the parquet layout carries only the
# ids. The table is the `question_type` of AILab-CVC/SEED-Bench's DATASET.md; some third-party
# scripts swap 3 and 4 (Attributes / Location). A SEED-Bench.json next to the parquet wins.
SEED_IMAGE_TYPES = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Location",
                    4: "Instance Attributes", 5: "Instances Counting", 6: "Spatial Relation",
                    7: "Instance Interaction", 8: "Visual Reasoning", 9: "Text Understanding",
                    10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding"}


class SEED(Task):
    name, folder, headline = "seed", "seed_bench", ("accuracy",)

    def load(self, root: Path) -> list[Item]:
        if (found := parquet.find_split(root, ("test",))) is not None:
            rows = parquet.read_rows(found[1], ["question_id", "question", "answer", "choice_a", "choice_b", "choice_c",
                                                "choice_d", "image"], self.name, ["data_type", "question_type_id"])
            names = SEED_IMAGE_TYPES
            if (root / "SEED-Bench.json").is_file():
                names = {v: k for k, v in read_json(root / "SEED-Bench.json").get("question_type", {}).items()}
            return [self._item(q, parquet.images_of(q["image"], f"seed question {q['question_id']}"),
                               names.get(int(q.get("question_type_id") or 0), str(q.get("question_type_id"))))
                    for q in rows if q.get("data_type", "image") == "image"]
        data = read_json(find(root, ["SEED-Bench.json"], self.name))
        type_names = {v: k for k, v in data.get("question_type", {}).items()}
        items = []
        for q in data["questions"]:
            if q.get("data_type", "image") != "image":
                continue
            items.append(self._item(q, (root / "SEED-Bench-image" / q["data_id"],),
                                    type_names.get(q.get("question_type_id"), str(q.get("question_type_id")))))
        return items

    def _item(self, q: dict, images: tuple, type_name: str) -> Item:
        options = [q[f"choice_{c}"] for c in "abcd"]
        return Item(str(q["question_id"]), with_line(f"{q['question']}\n{options_block(options)}", LETTER_ANSWER),
                    images, q["answer"], {"type": type_name})

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: object = None) -> dict:
        per: dict[str, list[bool]] = defaultdict(list)
        for it in items:
            ok = seed_match(replies.get(it.id, ""), it.answer)
            per["all"].append(ok)
            per[it.meta["type"]].append(ok)
        return {"accuracy": 100 * accuracy(per.pop("all")), "n": len(items),
                "per_type": {k: 100 * accuracy(v) for k, v in sorted(per.items())}}
