"""The demo: the synthetic world's files, the answer metric, and a reduced-size run of the whole
pipeline (it checks that every step runs and writes its outputs, not the accuracy targets)."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from vistune.datagen.sources import read_coco
from vistune.demo.world import CATEGORIES, COLOURS, MULTI_IMAGE_TYPES, QUESTION_TYPES, SHAPES, build_world, questions, render, sample_scene
from vistune.eval.metrics import exact_match, normalize_vqa_answer


def test_normalize_answer_follows_vqa_processing() -> None:
    assert normalize_vqa_answer("Two.") == "2"
    assert normalize_vqa_answer("The Red") == "red"
    assert normalize_vqa_answer("  yes!") == "yes"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("3.5") == "3.5"
    assert exact_match("Left.", "left") and not exact_match("left", "right")


def test_scenes_are_deterministic_and_valid() -> None:
    a = sample_scene(random.Random(3), 1)
    b = sample_scene(random.Random(3), 1)
    assert a == b
    assert render(a).tobytes() == render(b).tobytes()
    for i in range(200):
        scene = sample_scene(random.Random(i), i)
        assert 1 <= len(scene.objects) <= 4
        for o in scene.objects:
            assert 0 <= o.box[0] < o.box[2] <= 64 and 0 <= o.box[1] < o.box[3] <= 64


def test_questions_are_true_of_the_scene() -> None:
    types: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    for i in range(300):
        scene = sample_scene(random.Random(i), i)
        cats = Counter(o.category for o in scene.objects)
        for qtype, q, a in questions(scene, random.Random(i)):
            types[qtype] += 1
            if qtype == "existence":
                answers[a] += 1
                category = q.removeprefix("Is there a ").removeprefix("Is there an ").removesuffix(" in the image?")
                assert (a == "yes") == (category in cats)
            if qtype == "counting":
                shape = q.split()[2][:-1]
                assert int(a) == sum(o.shape == shape for o in scene.objects)
    assert set(types) == set(QUESTION_TYPES)
    assert answers["yes"] == answers["no"]  # existence is balanced, as POPE is


def test_world_is_in_the_coco_layout_and_reads_like_coco(tmp_path: Path) -> None:
    counts = build_world(tmp_path, {"train": 6, "test": 3}, seed=0)
    assert counts["train"]["images"] == 6
    ann = tmp_path / "annotations"
    inst = json.loads((ann / "instances_train.json").read_text())
    assert {c["name"] for c in inst["categories"]} == set(CATEGORIES)
    assert all(len(a["bbox"]) == 4 for a in inst["annotations"])
    caps = json.loads((ann / "captions_train.json").read_text())
    assert len(caps["annotations"]) >= 6 * 4  # several captions per image
    records = read_coco(ann / "captions_train.json", ann / "instances_train.json")
    assert len(records) == 6 and all(r.boxes and len(r.captions) >= 4 for r in records)
    assert all(0 <= v <= 1 for r in records for b in r.boxes for v in b.bbox)
    test_ids = {im["id"] for im in json.loads((ann / "captions_test.json").read_text())["images"]}
    assert not test_ids & {im["id"] for im in caps["images"]}  # splits share no image
    q = json.loads((ann / "vqa_questions_train.json").read_text())["questions"]
    a = json.loads((ann / "vqa_annotations_train.json").read_text())["annotations"]
    assert [x["question_id"] for x in q] == [x["question_id"] for x in a]


@pytest.mark.slow
def test_tiny_demo_runs_every_step(tmp_path: Path) -> None:
    from vistune.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "tiny"]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy_with_image", "accuracy_blind", "per_type", "wall_seconds", "machine", "peak_memory_gib"):
        assert key in report
    assert set(report["per_type"]) == set(QUESTION_TYPES) | set(MULTI_IMAGE_TYPES)
    assert 0 <= report["accuracy_with_image"] <= 1
    assert report["machine"]["torch"]
    assert (out / "loss_curves.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| type | with image | blind | questions |" in md and "loss_curves.png" in md
    # The model is an ordinary vistune checkpoint, and every data file went through datagen.
    assert (out / "finetune" / "vistune.json").is_file()
    for name in ("instruct.jsonl", "align.jsonl", "vqa.jsonl", "finetune.jsonl"):
        assert (out / "data" / name).stat().st_size > 0
    kinds = Counter(json.loads(line).get("kind") for line in (out / "data" / "instruct.jsonl").open())
    assert set(kinds) == {"conversation", "detail", "complex"}
    # Running it again finds every step done and gives the same numbers.
    assert main(["demo", "--out", str(out), "--size", "tiny"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["per_type"] == report["per_type"]
    # `vistune eval demo` on the same world and model gives the report's numbers.
    settings = report["settings"]
    assert main(["eval", "demo", "--model", str(out / "finetune"), "--data", str(out / "world"),
                 "--out", str(tmp_path / "eval"), "--batch-size", "32", "--device", "cpu",
                 "--option", f"demo.per_type={settings['eval_per_type']}", "--option", f"demo.seed={report['seed']}"]) == 0
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())["demo"]
    assert ev["accuracy_with_image"] == report["accuracy_with_image"]
    assert ev["accuracy_blind"] == report["accuracy_blind"]
    assert ev["per_type"] == report["per_type"]
    # benchmarks/demo_probe.py reads one token per object of the world's instances files.
    probe = _benchmark("demo_probe")
    feats, shapes, colours = probe.object_features(out / "parts" / "clip", out / "world", "train", 1000, -2)
    objects = json.loads((out / "world" / "annotations" / "instances_train.json").read_text())["annotations"]
    assert feats.shape == (len(objects), 128) and len(shapes) == len(colours) == len(objects)
    assert 0.0 <= probe.probe(feats, shapes, feats, shapes) <= 1.0
    # benchmarks/demo_oracle.py trains the demo's LLM on ground-truth tokens of the same world.
    oracle = _benchmark("demo_oracle")
    oracle.main(["--world", str(out / "world"), "--lm", str(out / "parts" / "lm"), "--task", "counting", "--steps", "2",
                 "--batch-size", "4", "--eval-every", "1", "--eval-questions", "8", "--output", str(tmp_path / "oracle.json")])
    curve = json.loads((tmp_path / "oracle.json").read_text())["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2] and all(0.0 <= c["accuracy"] <= 1.0 for c in curve)
    oracle.main(["--world", str(out / "world"), "--lm", str(out / "parts" / "lm"), "--task", "existence", "--steps", "1",
                 "--batch-size", "4", "--eval-questions", "8", "--image-after-question",
                 "--output", str(tmp_path / "oracle_after.json")])
    assert len(json.loads((tmp_path / "oracle_after.json").read_text())["curve"]) == 2
    # benchmarks/demo_reading.py trains a fresh LLM on text descriptions, with the demo's tokenizer.
    _benchmark("demo_reading").main(["--tokenizer", str(out / "parts" / "tokenizer"), "--steps", "2", "--batch-size", "4",
                                     "--hidden", "32", "--layers", "1", "--eval-every", "1",
                                     "--output", str(tmp_path / "reading.json"), "--save", str(tmp_path / "reader")])
    reading = json.loads((tmp_path / "reading.json").read_text())["curve"]
    assert [c["step"] for c in reading] == [1, 2]
    assert set(reading[0]["per_type"]) <= set(QUESTION_TYPES) and 0.0 <= reading[-1]["accuracy"] <= 1.0
    assert (tmp_path / "reader" / "config.json").is_file() and (tmp_path / "reader" / "tokenizer.json").is_file()


def _benchmark(name: str):  # noqa: ANN202
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_oracle_tokens_count_each_object_in_the_cell_of_its_box_centre(tmp_path: Path) -> None:
    """demo_oracle's ground-truth image tokens: per cell, the colours and shapes whose box centres fall
    there; the `total` question's answer is the scene's number of objects."""
    oracle = _benchmark("demo_oracle")
    build_world(tmp_path, {"train": 6, "test": 2}, seed=0)
    inst = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    tokens = oracle.oracle_tokens(tmp_path / "annotations" / "instances_train.json", grid=4)
    names = {c["id"]: c["name"] for c in inst["categories"]}
    expected = {i: torch.zeros(16, 8) for i in tokens}
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        cell = int((y + h / 2) // 16) * 4 + int((x + w / 2) // 16)  # 64-px images, 16-px cells
        colour, shape = names[a["category_id"]].split()
        expected[a["image_id"]][cell, list(COLOURS).index(colour)] += 1
        expected[a["image_id"]][cell, 5 + SHAPES.index(shape)] += 1
    assert all(torch.equal(tokens[i], expected[i]) for i in tokens)
    total = oracle.questions(tmp_path / "annotations", "train", "total", tokens)
    per_image = Counter(a["image_id"] for a in inst["annotations"])
    assert sorted((i, int(answer)) for i, _, answer in total) == sorted((i, per_image[i]) for i in tokens)


def test_regions_cover_the_patches_under_each_box(tmp_path: Path) -> None:
    """The CLIP stand-in's region-text pairs: a box's patches are those whose centres it covers (row-major),
    a box covering no patch centre gets the patch at its centre, and the caption is the category name."""
    from vistune.demo.pipeline import _regions

    instances = {"images": [{"id": 7, "file_name": "a.png", "width": 64, "height": 64},
                            {"id": 8, "file_name": "b.png", "width": 128, "height": 128}],
                 "categories": [{"id": 1, "name": "red circle", "supercategory": "circle"},
                                {"id": 2, "name": "orange square", "supercategory": "square"}],
                 "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [27, 3, 24, 24]},
                                 {"id": 2, "image_id": 7, "category_id": 2, "bbox": [5, 57, 2, 2]},
                                 {"id": 3, "image_id": 8, "category_id": 1, "bbox": [0, 0, 32, 32]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    images = instances["images"] + [{"id": 9, "file_name": "c.png", "width": 64, "height": 64}]
    got = _regions(path, images, image_size=64, patch_size=8)
    assert got[0] == [([3, 4, 5, 11, 12, 13, 19, 20, 21], "A red circle."), ([56], "An orange square.")]
    assert got[1] == [([0, 1, 8, 9], "A red circle.")]  # a 128 px image's box, scaled to the encoder's 64 px
    assert got[2] == []
