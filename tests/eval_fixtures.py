"""Tiny benchmark folders in each task's published layout (a handful of items, 16-px images).

Each writer returns the task's folder; `write_all(root)` writes every task under root/<folder>, the
way LLaVA's playground/data/eval/ holds them. Contents are made up; the layouts are the real ones.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

COLOURS = [(220, 30, 30), (30, 180, 60), (30, 60, 220), (240, 220, 40)]


def image(path: Path, i: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16 + 4 * (i % 3), 16), COLOURS[i % len(COLOURS)]).save(path)
    return path


def _png_b64(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def vqav2(root: Path) -> Path:
    qs = [{"image_id": 100 + i, "question": q, "question_id": 1000 + i}
          for i, q in enumerate(["What color is it?", "How many shapes?", "Is it red?"])]
    answers = [["red"] * 10, ["2"] * 7 + ["two"] + ["3"] * 2, ["yes"] * 9 + ["no"]]
    types = ["other", "number", "yes/no"]
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": qs})
    _json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": t, "multiple_choice_answer": a[0],
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]}
        for q, a, t in zip(qs, answers, types)]})
    for i, q in enumerate(qs):
        image(root / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg", i)
    return root


def gqa(root: Path) -> Path:
    qs = {"201": {"imageId": "n1", "question": "Is it overcast?", "answer": "no", "types": {"structural": "verify"}},
          "202": {"imageId": "n2", "question": "What is on the table?", "answer": "cup", "types": {"structural": "query"}}}
    _json(root / "testdev_balanced_questions.json", qs)
    for i, q in enumerate(qs.values()):
        image(root / "images" / f"{q['imageId']}.jpg", i)
    return root


def vizwiz(root: Path) -> Path:
    rows = [{"image": f"VizWiz_val_0000000{i}.jpg", "question": q, "answer_type": t,
             "answers": [{"answer": a, "answer_confidence": "yes"}] * 10}
            for i, (q, a, t) in enumerate([("What is this?", "unanswerable", "unanswerable"), ("What color?", "blue", "other")])]
    _json(root / "val.json", rows)
    for i, r in enumerate(rows):
        image(root / "val" / r["image"], i)
    return root


def textvqa(root: Path) -> Path:
    data = [{"question": "what is the brand?", "question_id": 34602, "image_id": "abc1", "answers": ["nikon"] * 10},
            {"question": "what number is shown?", "question_id": 34603, "image_id": "abc2", "answers": ["12"] * 10}]
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})
    _json(root / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [{"image_id": "abc1", "ocr_tokens": ["nikon", "d50"]},
                                                                 {"image_id": "abc2", "ocr_tokens": []}]})
    for i, d in enumerate(data):
        image(root / "train_images" / f"{d['image_id']}.jpg", i)
    return root


def pope(root: Path) -> Path:
    for c, cat in enumerate(["adversarial", "popular", "random"]):
        rows = [{"question_id": k + 1, "image": f"COCO_val2014_00000000000{k}.jpg",
                 "text": f"Is there a {obj} in the image?", "label": label}
                for k, (obj, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("cup", "no")])]
        _jsonl(root / "coco" / f"coco_pope_{cat}.json", rows)
    for k in range(4):
        image(root / "val2014" / f"COCO_val2014_00000000000{k}.jpg", k)
    return root


def scienceqa(root: Path) -> Path:
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["dog", "trout"], "answer": 0, "hint": "", "image": "image.png",
              "split": "test", "subject": "natural science"},
        "2": {"question": "Which color is shown?", "choices": ["red", "blue", "green"], "answer": 2,
              "hint": "Look at the picture.", "image": "image.png", "split": "test", "subject": "natural science"},
        "3": {"question": "No image here?", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None,
              "split": "test", "subject": "language science"},
        "4": {"question": "Train question", "choices": ["a", "b"], "answer": 1, "hint": "", "image": "image.png",
              "split": "train", "subject": "social science"},
    }
    _json(root / "problems.json", problems)
    _json(root / "pid_splits.json", {"train": ["4"], "val": [], "test": ["1", "2", "3"]})
    for pid in ("1", "2"):
        image(root / "images" / "test" / pid / "image.png", int(pid))
    return root


def mme(root: Path) -> Path:
    base = root / "MME_Benchmark_release_version"
    for t, task in enumerate(["existence", "code_reasoning"]):
        for k in range(2):
            stem = f"{task[:4]}{k}"
            if task == "existence":  # images and .txt side by side
                image(base / task / f"{stem}.jpg", k)
                txt = base / task / f"{stem}.txt"
            else:  # images/ + questions_answers_YN/
                image(base / task / "images" / f"{stem}.png", k + t)
                txt = base / task / "questions_answers_YN" / f"{stem}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                           "Is there a cat in this image? Please answer yes or no.\tNo\n")
    return root


def mmbench(root: Path, cn: bool = False) -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    rows = [[0, "What colour is the square?", "nan", "red", "green", "blue", "yellow", "A", "attribute", "fine", _png_b64(0)],
            [1, "How many shapes?", "Count them.", "one", "two", "", "", "B", "counting", "coarse", _png_b64(1)],
            [2, "Which shape?", "nan", "circle", "square", "triangle", "", "C", "shape", "coarse", "0"]]  # image by reference
    name = "mmbench_dev_cn_20231003.tsv" if cn else "mmbench_dev_20230712.tsv"
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return root


def seed(root: Path) -> Path:
    qs = [{"answer": "A", "choice_a": "red", "choice_b": "blue", "choice_c": "green", "choice_d": "pink",
           "data_id": "1_a.jpg", "data_type": "image", "question": "What colour?", "question_id": "101", "question_type_id": 1},
          {"answer": "C", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4", "data_id": "2_b.jpg",
           "data_type": "image", "question": "How many?", "question_id": "102", "question_type_id": 2},
          {"answer": "B", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w", "data_id": "v.mp4",
           "data_type": "video", "question": "A video question", "question_id": "103", "question_type_id": 10}]
    _json(root / "SEED-Bench.json", {"questions": qs, "question_type": {"Scene Understanding": 1, "Instance Identity": 2,
                                                                        "Action Recognition": 10}})
    for i, q in enumerate(qs[:2]):
        image(root / "SEED-Bench-image" / q["data_id"], i)
    return root


def llava_bench(root: Path) -> Path:
    qs = [{"question_id": i, "image": f"{i:03d}.jpg", "text": t, "category": c}
          for i, (t, c) in enumerate([("What is in the image?", "conv"), ("Describe the image in detail.", "detail"),
                                      ("Why might this be funny? [unparseable]", "complex")])]
    _jsonl(root / "questions.jsonl", qs)
    _jsonl(root / "answers_gpt4.jsonl", [{"question_id": q["question_id"], "text": f"Reference answer {i}."}
                                         for i, q in enumerate(qs)])
    _jsonl(root / "context.jsonl", [{"id": q["image"], "image": q["image"], "caption": f"A coloured square, picture {i}."}
                                    for i, q in enumerate(qs)])
    for i, q in enumerate(qs):
        image(root / "images" / q["image"], i)
    return root


def llava_bench_coco(root: Path) -> Path:
    qs = [{"question_id": i, "image": f"00000000044{i}.jpg", "text": t, "category": c}
          for i, (t, c) in enumerate([("What colour is it?", "conv"), ("Describe it.", "detail")])]
    _jsonl(root / "qa90_questions.jsonl", qs)
    _jsonl(root / "qa90_gpt4_answer.jsonl", [{"question_id": q["question_id"], "text": "A red square."} for q in qs])
    _jsonl(root / "caps_boxes_coco2014_val_80.jsonl", [
        {"id": i, "image": q["image"], "captions": ["A square.", "A red square."],
         "instances": [{"category": "square", "bbox": [0.1, 0.1, 0.9, 0.9]}]} for i, q in enumerate(qs)])
    image(root / "images" / qs[0]["image"], 0)
    image(root / "val2014" / f"COCO_val2014_{qs[1]['image']}", 1)  # the COCO name works too
    return root


def mmvet(root: Path) -> Path:
    data = {"v1_0": {"imagename": "v1_0.png", "capability": ["rec"], "question": "What colour?", "answer": "red"},
            "v1_1": {"imagename": "v1_1.png", "capability": ["ocr", "math"], "question": "x?", "answer": "-1<AND>-5"},
            "v1_2": {"imagename": "v1_2.png", "capability": ["rec", "know"], "question": "[unparseable] why?",
                     "answer": "because"}}
    _json(root / "mm-vet.json", data)
    for i, r in enumerate(data.values()):
        image(root / "images" / r["imagename"], i)
    return root


WRITERS = {"vqav2": ("vqav2", vqav2), "gqa": ("gqa", gqa), "vizwiz": ("vizwiz", vizwiz),
           "textvqa": ("textvqa", textvqa), "pope": ("pope", pope), "scienceqa": ("scienceqa", scienceqa),
           "mme": ("MME", mme), "mmbench": ("mmbench", mmbench),
           "mmbench_cn": ("mmbench_cn", lambda r: mmbench(r, cn=True)), "seed": ("seed_bench", seed),
           "llava_bench": ("llava-bench-in-the-wild", llava_bench),
           "llava_bench_coco": ("coco2014_val_qa_eval", llava_bench_coco), "mmvet": ("mm-vet", mmvet)}


def write_all(root: Path) -> Path:
    for folder, writer in WRITERS.values():
        writer(root / folder)
    return root
