"""Tiny lmms-lab parquet snapshots, one per task, holding the same questions as `eval_fixtures`.

Each writer reads the raw files of a JSON-layout fixture folder (not through vistune's readers) and
writes them in the layout the lmms-lab dataset publishes on the hub: the shard names, the columns
and the image cells as {bytes, path} structs, the way a `datasets.Image` feature is stored. Column
sources: the dataset cards and lmms-eval's task utils (see the lmms-lab table in docs/eval.md).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def _img(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": path.name}


def _png(encoded_b64: str) -> dict:
    raw = base64.b64decode(encoded_b64)
    Image.open(io.BytesIO(raw)).verify()
    return {"bytes": raw, "path": None}


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _json(path: Path) -> object:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def vqav2(src: Path, out: Path) -> Path:
    qs = _json(src / "v2_OpenEnded_mscoco_val2014_questions.json")["questions"]
    ann = {a["question_id"]: a for a in _json(src / "v2_mscoco_val2014_annotations.json")["annotations"]}
    rows = [{"question_type": "what", "multiple_choice_answer": ann[q["question_id"]]["multiple_choice_answer"],
             "answers": ann[q["question_id"]]["answers"], "image_id": q["image_id"],
             "answer_type": ann[q["question_id"]]["answer_type"], "question_id": q["question_id"], "question": q["question"],
             "image": _img(src / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg")} for q in qs]
    _write(out / "data" / "validation-00000-of-00001.parquet", rows)
    return out


def gqa(src: Path, out: Path) -> Path:
    qs = _json(src / "testdev_balanced_questions.json")
    _write(out / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
           [{"id": qid, "imageId": q["imageId"], "question": q["question"], "answer": q["answer"],
             "fullAnswer": q["answer"] + ".", "isBalanced": True,
             "types": {"structural": q["types"]["structural"], "semantic": "rel", "detailed": "x"}}
            for qid, q in qs.items()])
    _write(out / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
           [{"id": q["imageId"], "image": _img(src / "images" / f"{q['imageId']}.jpg")} for q in qs.values()])
    return out


def vizwiz(src: Path, out: Path) -> Path:
    rows = [{"question_id": r["image"].removesuffix(".jpg"), "image": _img(src / "val" / r["image"]),
             "question": r["question"], "answers": [a["answer"] for a in r["answers"]], "category": r["answer_type"]}
            for r in _json(src / "val.json")]
    _write(out / "data" / "val-00000-of-00001.parquet", rows)
    return out


def textvqa(src: Path, out: Path) -> Path:
    ocr = {r["image_id"]: r["ocr_tokens"] for r in _json(src / "TextVQA_Rosetta_OCR_v0.2_val.json")["data"]}
    rows = [{"image_id": d["image_id"], "question_id": d["question_id"], "question": d["question"],
             "question_tokens": d["question"].split(), "image": _img(src / "train_images" / f"{d['image_id']}.jpg"),
             "image_width": 16, "image_height": 16, "answers": d["answers"], "image_classes": [],
             "set_name": "val", "ocr_tokens": ocr[d["image_id"]]} for d in _json(src / "TextVQA_0.5.1_val.json")["data"]]
    _write(out / "data" / "validation-00000-of-00001.parquet", rows)
    return out


def pope(src: Path, out: Path) -> Path:
    rows = []
    for cat in ("random", "popular", "adversarial"):  # not the readers' order: they must sort
        for r in _jsonl(src / "coco" / f"coco_pope_{cat}.json"):
            rows.append({"id": str(len(rows)), "question_id": str(r["question_id"]), "question": r["text"],
                         "answer": r["label"], "image_source": r["image"].removesuffix(".jpg"),
                         "image": _img(src / "val2014" / r["image"]), "category": cat})
    _write(out / "data" / "test-00000-of-00001.parquet", rows)
    return out


def scienceqa(src: Path, out: Path) -> Path:
    problems = _json(src / "problems.json")
    rows = [{"image": _img(src / "images" / "test" / pid / p["image"]), "question": p["question"], "choices": p["choices"],
             "answer": p["answer"], "hint": p["hint"], "task": "closed choice", "grade": "grade2",
             "subject": p["subject"], "topic": "t", "category": "c", "skill": "s", "lecture": "", "solution": ""}
            for pid, p in problems.items() if pid in _json(src / "pid_splits.json")["test"] and p["image"]]
    _write(out / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    return out


def mme(src: Path, out: Path) -> Path:
    base = src / "MME_Benchmark_release_version"
    rows = []
    for task in ("existence", "code_reasoning"):
        tdir = base / task
        qa_dir = tdir / "questions_answers_YN" if (tdir / "questions_answers_YN").is_dir() else tdir
        img_dir = tdir / "images" if (tdir / "images").is_dir() else tdir
        for txt in sorted(qa_dir.glob("*.txt")):
            image = next(p for p in img_dir.glob(f"{txt.stem}.*") if p.suffix != ".txt")
            for line in txt.read_text().splitlines():
                question, answer = line.split("\t")
                rows.append({"question_id": f"{task}/{image.name}", "image": _img(image), "question": question,
                             "answer": answer, "category": task})
    _write(out / "data" / "test-00000-of-00001.parquet", rows)
    return out


def mmbench(src: Path, out: Path, cn: bool = False) -> Path:
    csv.field_size_limit(sys.maxsize)
    name = "mmbench_dev_cn_20231003.tsv" if cn else "mmbench_dev_20230712.tsv"
    with (src / name).open(newline="") as f:
        tsv = list(csv.DictReader(f, delimiter="\t"))
    by_index = {r["index"]: r for r in tsv}
    rows = []
    for r in tsv:
        image = r["image"] if not r["image"].isdigit() else by_index[r["image"]]["image"]
        rows.append({"index": int(r["index"]), "question": r["question"], "hint": None if r["hint"] == "nan" else r["hint"],
                     "answer": r["answer"], **{c: (r[c] or None) for c in "ABCD"}, "category": r["category"],
                     "image": _png(image), "source": "s", "L2-category": r["l2-category"], "comment": None,
                     "split": "dev"})
    _write(out / ("cn" if cn else "en") / "dev-00000-of-00001.parquet", rows)
    return out


def seed(src: Path, out: Path) -> Path:
    data = _json(src / "SEED-Bench.json")
    rows = [{**{k: q[k] for k in ("answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_id", "data_type",
                                    "question", "question_id", "question_type_id")},
             "image": [_img(src / "SEED-Bench-image" / q["data_id"])] if q["data_type"] == "image" else [],
             "segment": None} for q in data["questions"]]
    _write(out / "data" / "test-00000-of-00001.parquet", rows)
    return out


def llava_bench(src: Path, out: Path) -> Path:
    refs = {r["question_id"]: r["text"] for r in _jsonl(src / "answers_gpt4.jsonl")}
    ctx = {r["image"]: r["caption"] for r in _jsonl(src / "context.jsonl")}
    rows = [{"question_id": q["question_id"], "question": q["text"], "image": _img(src / "images" / q["image"]),
             "caption": ctx[q["image"]], "gpt_answer": refs[q["question_id"]], "category": q["category"],
             "image_id": q["image"].removesuffix(".jpg")} for q in _jsonl(src / "questions.jsonl")]
    _write(out / "data" / "train-00000-of-00001.parquet", rows)
    return out


def llava_bench_coco(src: Path, out: Path) -> Path:
    refs = {r["question_id"]: r["text"] for r in _jsonl(src / "qa90_gpt4_answer.jsonl")}
    caps = {r["image"]: r["captions"] for r in _jsonl(src / "caps_boxes_coco2014_val_80.jsonl")}
    rows = []
    for q in _jsonl(src / "qa90_questions.jsonl"):
        image = src / "images" / q["image"]
        image = image if image.is_file() else src / "val2014" / f"COCO_val2014_{q['image']}"
        rows.append({"question_id": q["question_id"], "question": q["text"], "answer": refs[q["question_id"]],
                     "image": _img(image), "category": q["category"], "caption": caps[q["image"]],
                     "image_id": q["image"]})
    _write(out / "data" / "train-00000-of-00001.parquet", rows)
    return out


def mmvet(src: Path, out: Path) -> Path:
    rows = [{"question_id": qid, "image": _img(src / "images" / r["imagename"]), "question": r["question"],
             "answer": r["answer"], "image_source": r["imagename"], "capability": ",".join(r["capability"])}
            for qid, r in _json(src / "mm-vet.json").items()]
    _write(out / "data" / "test-00000-of-00001.parquet", rows)
    return out


WRITERS = {"vqav2": vqav2, "gqa": gqa, "vizwiz": vizwiz, "textvqa": textvqa, "pope": pope, "scienceqa": scienceqa,
           "mme": mme, "mmbench": mmbench, "mmbench_cn": lambda s, o: mmbench(s, o, cn=True), "seed": seed,
           "llava_bench": llava_bench, "llava_bench_coco": llava_bench_coco, "mmvet": mmvet}
