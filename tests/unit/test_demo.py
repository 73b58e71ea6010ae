"""The demo's parts: the synthetic world's files, the answer metric, question drawing and scoring, the
benchmark scripts' helpers (the tiny run of the whole pipeline is e2e/test_demo_tiny.py)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from vistune.datagen.sources import read_coco
from vistune.demo.world import (
    CATEGORIES,
    COLOURS,
    MULTI_IMAGE_TYPES,
    QUESTION_TYPES,
    SHAPES,
    TIERS,
    build_world,
    questions,
    render,
    sample_scene,
)
from vistune.eval.metrics import exact_match, normalize_vqa_answer
from vistune.eval.tasks.demo import (
    Question,
    description_scores,
    objects_named,
    score_questions,
    select_questions,
)


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
        assert 1 <= len(scene.objects) <= 3
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
            if qtype == "count":
                assert int(a) == len(scene.objects)
            if qtype in ("colour", "shape", "size", "position"):  # readout: one-object scenes only
                assert len(scene.objects) == 1
                o = scene.objects[0]
                assert a == {"colour": o.colour, "shape": o.shape, "size": o.size,
                             "position": "left" if o.centre[0] < 32 else "right"}[qtype]
            if qtype == "shape_of_colour":
                colour = q.split()[4]
                assert [o.shape for o in scene.objects if o.colour == colour] == [a]
            if qtype == "colour_of_shape":
                shape = q.split()[-1].rstrip("?")
                assert [o.colour for o in scene.objects if o.shape == shape] == [a]
    assert set(types) == set(QUESTION_TYPES) and set(TIERS) == set(QUESTION_TYPES) | set(MULTI_IMAGE_TYPES)
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


def test_oracle_tokens_count_each_object_in_the_cell_of_its_box_centre(tmp_path: Path) -> None:
    """demo_oracle's ground-truth image tokens: per cell, the colours and shapes whose box centres fall
    there; the `total` question's answer is the scene's number of objects."""
    from benchmarks import demo_oracle as oracle

    build_world(tmp_path, {"train": 6, "test": 2}, seed=0)
    inst = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    tokens = oracle.oracle_tokens(tmp_path / "annotations" / "instances_train.json", grid=4)
    names = {c["id"]: c["name"] for c in inst["categories"]}
    expected = {i: torch.zeros(16, len(COLOURS) + len(SHAPES)) for i in tokens}
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        cell = int((y + h / 2) // 16) * 4 + int((x + w / 2) // 16)  # 64-px images, 16-px cells
        colour, shape = names[a["category_id"]].split()
        expected[a["image_id"]][cell, list(COLOURS).index(colour)] += 1
        expected[a["image_id"]][cell, len(COLOURS) + SHAPES.index(shape)] += 1
    assert all(torch.equal(tokens[i], expected[i]) for i in tokens)
    total = oracle.questions(tmp_path / "annotations", "train", "total", tokens)
    per_image = Counter(a["image_id"] for a in inst["annotations"])
    assert sorted((i, int(answer)) for i, _, answer in total) == sorted((i, per_image[i]) for i in tokens)


def test_regions_cover_the_patches_under_each_box(tmp_path: Path) -> None:
    """The CLIP stand-in's region-text pairs: a box's patches are those whose centres it covers (row-major),
    a box covering no patch centre gets the patch at its centre, and the caption is the category name."""
    from vistune.demo.standins import box_regions as _regions

    instances = {"images": [{"id": 7, "file_name": "a.png", "width": 64, "height": 64},
                            {"id": 8, "file_name": "b.png", "width": 128, "height": 128}],
                 "categories": [{"id": 1, "name": "red circle", "supercategory": "circle"},
                                {"id": 2, "name": "orange square", "supercategory": "square"}],
                 "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [27, 3, 24, 24]},
                                 {"id": 2, "image_id": 7, "category_id": 2, "bbox": [5, 57, 2, 2]},
                                 {"id": 3, "image_id": 8, "category_id": 1, "bbox": [0, 0, 32, 32]},
                                 {"id": 4, "image_id": 7, "category_id": 1, "bbox": [28, 40, 8, 8]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    images = instances["images"] + [{"id": 9, "file_name": "c.png", "width": 64, "height": 64}]
    got = _regions(path, images, image_size=64, patch_size=8)
    assert got[0] == [([3, 4, 5, 11, 12, 13, 19, 20, 21], "A red circle."), ([56], "An orange square."),
                      ([43], "A red circle.")]
    assert got[1] == [([0, 1, 8, 9], "A red circle.")]  # a 128 px image's box, scaled to the encoder's 64 px
    assert got[2] == []


def _q(qid: int, qtype: str, answer: str, image: str = "a.png") -> Question:
    return Question(qid, Path(image), qtype, f"question {qid}?", answer)


def test_scores_by_tier_and_type_with_the_majority_rate() -> None:
    """Readout and binding tiers are scored apart, each as the mean over its questions; each type shows the
    rate of its most common answer."""
    qs = [_q(1, "colour", "red"), _q(2, "colour", "blue"), _q(3, "colour", "red"), _q(4, "count", "2"),
          _q(5, "existence", "yes"), _q(6, "existence", "no")]
    got = score_questions(qs, ["Red.", "red", "red", "two", "yes", "yes"])
    assert got["per_type"]["colour"] == {"accuracy": 2 / 3, "n": 3, "majority": 2 / 3}
    assert got["per_type"]["count"]["accuracy"] == 1.0  # "two" is "2" after VQA's normalisation
    assert got["tiers"]["readout"] == {"accuracy": 0.75, "n": 4}
    assert got["tiers"]["binding"] == {"accuracy": 0.5, "n": 2}
    assert got["accuracy"] == 4 / 6


def test_questions_are_drawn_evenly_over_each_types_answers(tmp_path: Path) -> None:
    """So that one fixed answer scores about 1/(answers) on every type: blind is not flattered by a skew."""
    build_world(tmp_path, {"test": 300}, seed=0)
    ann = tmp_path / "annotations"
    names = {im["id"]: im["file_name"] for im in json.loads((ann / "captions_test.json").read_text())["images"]}
    chosen = select_questions(ann / "vqa_questions_test.json", ann / "vqa_annotations_test.json", tmp_path / "test",
                              names, 12, seed=0)
    by_type: dict[str, Counter[str]] = {}
    for q in chosen:
        by_type.setdefault(q.type, Counter())[q.answer] += 1
    assert by_type["count"] == Counter({"1": 4, "2": 4, "3": 4})
    assert by_type["existence"] == Counter({"yes": 6, "no": 6})
    assert all(len(set(c.values())) == 1 for c in by_type.values())  # every answer equally often


def test_description_objects_precision_recall_and_degeneracy() -> None:
    """Objects named are a colour word right before a shape word (singular or plural);
    precision / recall / F1 are pooled over images; repeats and non-words are counted."""
    assert objects_named("Two red circles and a large blue square, a green.") == {"red circle", "blue square"}
    assert objects_named("A small yellow triangle on a striped background.") == {"yellow triangle"}
    truths = [{"red circle", "blue square"}, {"green triangle"}]
    preds = ["A red circle and a blue triangle.", "Thehehe is a green triangle green triangle green triangle."]
    d = description_scores(preds, truths, vocabulary={"a", "red", "circle", "and", "blue", "triangle", "green", "is"})
    # 2 of 3 named objects are right; 2 of the 3 true objects are named.
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == pytest.approx(2 / 3)
    assert d["f1"] == pytest.approx(2 / 3)
    assert d["with_repeated_3gram"] == 1 and d["non_words"] == ["thehehe"] and d["non_word_count"] == 1
    assert description_scores(["(nothing)"], [{"red circle"}], set())["f1"] == 0.0


def test_blind_descriptions_use_blank_images_of_the_processors_mean(tmp_path: Path) -> None:
    """`describe(blind=True)` hands the engine a blank image the size of each test image, in the mean colour."""
    from types import SimpleNamespace

    from vistune.demo.evaluate import describe

    image = tmp_path / "scene.png"
    render(sample_scene(random.Random(0), 1)).save(image)
    seen: list = []

    class Engine:
        bundle = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.5, 0.25, 0.0]))

        def generate(self, convs, images, sampling):  # noqa: ANN001, ANN202
            seen.extend(images)
            return [" A red circle. "] * len(convs)

    assert describe(Engine(), [image, image], blind=True, batch_size=1) == ["A red circle."] * 2  # type: ignore[arg-type]
    assert len(seen) == 2
    blank = seen[0][0]
    # The mean as LLaVA's expand2square pads: int(x * 255), truncated (127.5 -> 127, 63.75 -> 63).
    assert blank.size == (64, 64) and blank.getcolors() == [(64 * 64, (127, 63, 0))]
    describe(Engine(), [image], blind=False)  # type: ignore[arg-type]
    assert seen[-1] == [image]


def test_teacher_replies_tokenize_into_words(tmp_path: Path) -> None:
    """Issue 19's "Thehehe is a ...": trained on captions and questions only, the tokenizer split the
    template teacher's words into letters ("T" + "he", " h" "o" "l" "d" "s"). With the replies in its
    corpus, each reply word is a token of its own."""
    from transformers import AutoTokenizer

    from vistune.datagen.instruct import run_instruct
    from vistune.datagen.teachers import get_teacher
    from vistune.demo import standins, texts

    build_world(tmp_path / "w", {"train": 40}, seed=0)
    ann = tmp_path / "w" / "annotations"
    run_instruct(read_coco(ann / "captions_train.json", ann / "instances_train.json"), ["detail", "complex"],
                 get_teacher("template"), tmp_path / "instruct.jsonl", seed=0)
    replies = texts.replies(tmp_path / "instruct.jsonl")
    corpus = texts.texts_for_tokenizer(json.loads((ann / "captions_train.json").read_text()),
                                       ann / "vqa_questions_train.json", ann / "vqa_annotations_train.json", replies)
    tok = AutoTokenizer.from_pretrained(standins.build_tokenizer(corpus, tmp_path / "tok"))
    for text in ("The image has", " In total the scene holds"):  # a reply's start, a later sentence
        assert len(tok(text)["input_ids"]) == len(text.split())


def test_a_scenes_questions_come_in_no_fixed_order() -> None:
    """LLaVA-1.5 packs an image's questions into one conversation; in a fixed order the turn told the
    type, and the model answered "right" to a size question asked first."""
    firsts = Counter(questions(sample_scene(random.Random(i), i), random.Random(i))[0][0] for i in range(200))
    assert len(firsts) >= 6 and max(firsts.values()) < 100


def test_stage1_summary_reads_the_trend_from_means_over_tenths() -> None:
    """The report's stage-1 line: first step, step at a tenth, last tenth's mean, and the mean of each
    tenth, from which it says in how many tenths the loss fell (hand-made curve: flat, then falling)."""
    from vistune.demo.report import _loss_summary, _stage1_note

    losses = [2.0] * 10 + [1.0] * 10 + [1.0 - 0.05 * k for k in range(1, 9) for _ in range(10)]  # 100 steps
    s = _loss_summary(losses)
    assert s["first"] == 2.0 and s["at_one_tenth"] == 2.0 and abs(s["last_tenth_mean"] - 0.6) < 1e-9
    assert [round(m, 2) for m in s["tenth_means"]] == [2.0, 1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6]
    assert "falls in 8 of the 8 tenths that follow" in _stage1_note(s)
    flat = _loss_summary([1.0] * 50)
    assert "falls in 0 of the 8" in _stage1_note(flat)
