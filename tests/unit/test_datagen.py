"""datagen units: sources, symbolic context, reply parser, template teacher, resume, align, converters, mix."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from vistune.cli import main
from vistune.data.records import parse_record
from vistune.datagen.align import np_filter, run_align
from vistune.datagen.context import symbolic_context
from vistune.datagen.instruct import run_instruct
from vistune.datagen.jsonl import JsonlAppender, rejects_path
from vistune.datagen.mix import convert_vqa, run_mix
from vistune.datagen.outputs import sidecar_path
from vistune.datagen.parse import Rejected, parse_reply
from vistune.datagen.sources import Box, ImageRecord, read_coco, read_jsonl
from vistune.datagen.teachers import get_teacher
from vistune.datagen.template import TemplateTeacher
from vistune.errors import DataError, RegistryKeyError

KINDS = ["conversation", "detail", "complex"]

SYNTHETIC = ImageRecord("s1", "s1.png", 64, 64, ("Two red circles and a small blue square on a striped background.",),
                        (Box("red circle", (0.05, 0.05, 0.25, 0.25)), Box("red circle", (0.05, 0.70, 0.25, 0.90)),
                         Box("blue square", (0.75, 0.40, 0.85, 0.50)), Box("green triangle", (0.40, 0.40, 0.60, 0.60))))
COCO_LIKE = ImageRecord("139", "000000000139.jpg", 640, 426,
                        ("A woman stands in the dining area at the table.", "A room with chairs, a table, and a woman in it."),
                        (Box("person", (0.645, 0.370, 0.728, 0.694)), Box("dining table", (0.0, 0.47, 0.5, 1.0)),
                         Box("chair", (0.05, 0.5, 0.15, 0.8)), Box("chair", (0.2, 0.5, 0.3, 0.8))))
NO_BOXES = ImageRecord("7", "7.jpg", 10, 10, ("A kitchen with a stove.",), ())


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


# -- sources and context -------------------------------------------------------------------------

def test_read_coco_normalises_boxes_and_keeps_captioned_images(tmp_path: Path) -> None:
    captions = _write(tmp_path / "captions_train2017.json", {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "width": 640, "height": 400},
                   {"id": 5, "file_name": "000000000005.jpg", "width": 10, "height": 10},
                   {"id": 285, "file_name": "000000000285.jpg", "width": 500, "height": 500}],
        "annotations": [{"image_id": 139, "id": 1, "caption": "A woman  stands\nat the table."},
                        {"image_id": 285, "id": 2, "caption": "A bear."},
                        {"image_id": 139, "id": 3, "caption": "A room."}]})
    instances = _write(tmp_path / "instances_train2017.json", {
        "images": [{"id": 139, "width": 640, "height": 400}, {"id": 285, "width": 500, "height": 500}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 67, "name": "dining table", "supercategory": "furniture"}],
        "annotations": [{"image_id": 139, "category_id": 1, "bbox": [64, 40, 128, 200], "iscrowd": 0},
                        {"image_id": 139, "category_id": 67, "bbox": [0, 200, 640, 200], "iscrowd": 0}]})
    recs = read_coco(captions, instances)
    assert [r.id for r in recs] == ["139", "285"]  # image 5 has no caption
    assert recs[0].captions == ("A woman stands at the table.", "A room.")
    assert recs[0].boxes == (Box("person", (0.1, 0.1, 0.3, 0.6)), Box("dining table", (0.0, 0.5, 1.0, 1.0)))
    assert recs[1].boxes == () and recs[0].image == "000000000139.jpg"
    assert [r.id for r in read_coco(captions, limit=1)] == ["139"]


def test_read_jsonl_pixels_or_normalised(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"image": "a.jpg", "width": 200, "height": 100, "captions": ["x"],
                             "boxes": [{"category": "cat", "bbox": [20, 10, 100, 100]}]}) + "\n\n" +
                 json.dumps({"id": "b", "image": "b.jpg", "captions": "y",
                             "boxes": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]}) + "\n")
    a, b = read_jsonl(p)
    assert (a.id, a.boxes[0].bbox) == ("a.jpg", (0.1, 0.1, 0.5, 1.0))
    assert (b.id, b.captions, b.boxes[0].bbox) == ("b", ("y",), (0.1, 0.2, 0.3, 0.4))
    p.write_text(json.dumps({"image": "c.jpg", "boxes": [{"category": "x", "bbox": [5, 5, 50, 50]}]}) + "\n")
    with pytest.raises(DataError, match="no width/height"):
        read_jsonl(p)


def test_symbolic_context_format() -> None:
    rec = ImageRecord("1", "1.jpg", 1, 1, ("A cat.", "A cat on a mat."), (Box("cat", (0.1, 0.25, 0.5, 1 / 3)),))
    assert symbolic_context(rec, with_boxes=True) == "A cat.\nA cat on a mat.\ncat: [0.100, 0.250, 0.500, 0.333]"
    assert symbolic_context(rec, with_boxes=False) == "A cat.\nA cat on a mat."


# -- parser --------------------------------------------------------------------------------------

def test_parse_conversation_formats() -> None:
    text = "**Question 1:**\nWhat is it?\n===\n**Answer 1:**\nA cat.\nIt sleeps.\n===\nQ: Where?\nA: On a mat."
    assert parse_reply("conversation", text) == [("What is it?", "A cat.\nIt sleeps."), ("Where?", "On a mat.")]


@pytest.mark.parametrize("kind,text,finish,reason", [
    ("conversation", "   ", "stop", "empty reply"),
    ("conversation", "Question: a?\nAnswer: b", "length", "truncated (finish_reason=length)"),
    ("conversation", "Just some text about a cat.", "stop", "no question/answer turns"),
    ("conversation", "Question: a?\nQuestion: b?\nAnswer: c", "stop", "turns do not alternate"),
    ("conversation", "Answer: b\nQuestion: a?", "stop", "turns do not alternate"),
    ("conversation", "Question: a?\nAnswer:", "stop", "empty question or answer"),
    ("conversation", "Question: Where is it?\nAnswer: At [0.1, 0.2, 0.5, 0.6].", "stop", "leaks coordinates"),
    ("complex", "Question: a?\nAnswer: b.\nQuestion: c?\nAnswer: d.", "stop", "complex: not exactly one question and answer"),
    ("detail", "The captions say a cat sleeps on a soft mat in the sun.", "stop", "mentions captions or bounding boxes"),
    ("detail", "A cat, whose bounding box is large, sleeps on the mat in the sun.", "stop",
     "mentions captions or bounding boxes"),
    ("detail", "A cat sleeps at 0.412 across, on a soft mat in the sun today.", "stop", "leaks coordinates"),
    ("detail", "A cat.", "stop", "detail: too short"),
    ("detail", "Question: what?\nAnswer: a cat sleeping on a mat in the sun.", "stop",
     "detail: written as question/answer turns"),
])
def test_parse_rejections(kind: str, text: str, finish: str, reason: str) -> None:
    with pytest.raises(Rejected) as e:
        parse_reply(kind, text, finish)
    assert e.value.reason == reason


# -- template teacher ----------------------------------------------------------------------------

@pytest.mark.parametrize("record", [SYNTHETIC, COCO_LIKE, NO_BOXES], ids=["synthetic", "coco", "no-boxes"])
def test_template_replies_parse_for_every_kind_and_seed(record: ImageRecord) -> None:
    rules = TemplateTeacher()
    for seed in range(40):
        for kind in KINDS:
            text = rules.reply(record, kind, random.Random(seed))
            pairs = parse_reply(kind, text)  # raises Rejected if not valid
            assert not re.search(r"\d\.\d", text)  # no coordinates, ever
            if kind == "detail":
                assert len(pairs[0][1].split(". ")) >= 2 or record is NO_BOXES
            if kind == "complex":
                assert pairs[0][1].count(". ") >= 1  # a multi-sentence answer
            if kind == "conversation" and record.boxes:
                assert len(pairs) >= 4


def test_template_facts_are_true_of_the_boxes() -> None:
    rules = TemplateTeacher()
    answers = " ".join(a for seed in range(60) for kind in KINDS
                       for _, a in parse_reply(kind, rules.reply(SYNTHETIC, kind, random.Random(seed))))
    assert "two red circles" in answers and "one blue square" in answers
    assert "The blue square is on the right side of the image." in answers
    assert "The green triangle is in the center of the image." in answers
    assert "The square is blue." in answers
    assert "The blue square is to the right of the green triangle." in answers or \
        "The green triangle is to the left of the blue square." in answers
    assert "three red circles" not in answers and "blue square is on the left" not in answers
    coco = " ".join(rules.reply(COCO_LIKE, k, random.Random(s)) for s in range(30) for k in KINDS)
    assert "two chairs" in coco and "dining table" in coco and "There is one person." in coco


def test_template_deterministic_and_captions_only_mode() -> None:
    t = get_teacher("template")
    import asyncio

    from vistune.datagen.teachers import Request

    def reply(teacher: object, seed: int, kind: str = "conversation", record: ImageRecord = COCO_LIKE) -> str:
        return asyncio.run(teacher.complete(Request(f"{record.id}-{kind}", kind, [], record, seed))).text  # type: ignore[attr-defined]

    assert reply(t, 1) == reply(t, 1)
    assert len({reply(t, s) for s in range(6)}) > 1
    strict = get_teacher("template", conversation_boxes=False)
    text = " ".join(reply(strict, s) for s in range(10))
    assert "chair" in text.lower() and "person" not in text  # chairs are in a caption, "person" only in the boxes


def test_get_teacher_exact_keys() -> None:
    with pytest.raises(RegistryKeyError, match="template, openai:MODEL, hf:PATH"):
        get_teacher("templates")
    with pytest.raises(RegistryKeyError):
        get_teacher("openai")  # no model


# -- pipeline and resume -------------------------------------------------------------------------

def test_instruct_records_are_valid_llava_and_resume_repairs_a_torn_line(tmp_path: Path) -> None:
    records = [SYNTHETIC, COCO_LIKE, NO_BOXES]
    for r in records:
        (tmp_path / r.image).touch()
    out = tmp_path / "out.jsonl"
    s = run_instruct(records, KINDS, get_teacher("template"), out, seed=3, progress=False)
    assert s.written == {k: 3 for k in KINDS} and s.n_rejected == 0 and "conversation" in s.text()
    full = out.read_text()
    lines = full.splitlines()
    for i, line in enumerate(lines):
        d = json.loads(line)
        sample = parse_record(d, i, tmp_path)  # the trainer's own check
        assert sample.messages[0].content.count("<image>") == 1
    placements = {json.loads(line)["conversations"][0]["value"].startswith("<image>") for line in lines}
    assert placements == {True, False}  # the image both before and after the question
    # keep 4 lines, tear the 5th in half, and resume
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])
    s2 = run_instruct(records, KINDS, get_teacher("template"), out, seed=3, progress=False)
    assert s2.skipped == 4 and s2.n_written == 5
    assert sorted(out.read_text().splitlines()) == sorted(lines)
    assert rejects_path(out).exists() and rejects_path(out).read_text() == ""


def test_instruct_rejects_duplicate_record_ids_and_unknown_kinds(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="twice"):
        run_instruct([NO_BOXES, NO_BOXES], ["detail"], get_teacher("template"), tmp_path / "o.jsonl", progress=False)
    with pytest.raises(DataError, match="valid: conversation, detail, complex"):
        run_instruct([NO_BOXES], ["details"], get_teacher("template"), tmp_path / "o.jsonl", progress=False)


def test_appender_refuses_foreign_lines(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"no_id": 1}\n')
    with pytest.raises(DataError, match="x.jsonl:1: not a JSON record with an `id`.*not resuming"):
        JsonlAppender(p)


# -- align ---------------------------------------------------------------------------------------

def test_align_one_record_per_image_or_caption(tmp_path: Path) -> None:
    recs = [COCO_LIKE, NO_BOXES, ImageRecord("x", "x.jpg", 1, 1, (), ())]
    s = run_align(recs, tmp_path / "a.jsonl", seed=1)
    data = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert s.written == {"align": 2} and [d["id"] for d in data] == ["139", "7"]
    assert data[0]["conversations"][1]["value"] in COCO_LIKE.captions
    human = data[0]["conversations"][0]["value"]
    assert human.startswith("<image>\n") or human.endswith("\n<image>")
    run_align(recs, tmp_path / "b.json", per_caption=True)
    assert [d["id"] for d in json.loads((tmp_path / "b.json").read_text())] == ["139-0", "139-1", "7-0"]


def test_np_filter_drops_rare_and_caps_frequent() -> None:
    caps = ["dog"] * 5 + ["cat"] * 2 + ["dog park"] + ["bird"] * 3
    kept, dropped = np_filter(caps, min_count=3, max_count=4, seed=0, extract=lambda c: c.split(" ", 1)[:1]
                              if c != "dog park" else ["dog", "park"])
    kept_caps = [caps[i] for i in kept]
    assert kept_caps.count("cat") == 0  # "cat" is seen twice < 3
    assert "dog park" not in kept_caps  # "park" is rare
    assert kept_caps.count("dog") == 4 and kept_caps.count("bird") == 3  # dog (6 > 4) capped at 4
    assert dropped == {"rare noun phrase (< 3)": 3, "frequent noun phrase capped at 4": 1}


def test_noun_phrases_with_textblob(tmp_path: Path) -> None:
    pytest.importorskip("textblob")
    from vistune.datagen.align import noun_phrases

    assert noun_phrases("Two red circles and a small blue square on a striped background.") == \
        ["red circles", "small blue square", "striped background"]
    assert noun_phrases("A man riding a horse on the beach.") == ["man", "horse", "beach"]
    recs = [ImageRecord(str(i), f"{i}.jpg", 1, 1, (c,), ()) for i, c in enumerate(
        ["A man riding a horse."] * 3 + ["A man with a horse."] * 2 + ["A zebra near a man."])]
    s = run_align(recs, tmp_path / "f.jsonl", filter_noun_phrases=True, min_np_count=3, max_np_count=4)
    assert s.written == {"align": 4} and s.rejected == {"rare noun phrase (< 3)": 1, "frequent noun phrase capped at 4": 1}


# -- converters and mix --------------------------------------------------------------------------

def _convert(tmp_path: Path, layout: str, questions: object, annotations: object = None, **kw: object) -> list[dict]:
    q = _write(tmp_path / f"{layout}_q.json", questions)
    a = _write(tmp_path / f"{layout}_a.json", annotations) if annotations is not None else None
    out = tmp_path / f"{layout}.jsonl"
    convert_vqa(layout, q, a, out, **kw)  # type: ignore[arg-type]
    return [json.loads(line) for line in out.read_text().splitlines()]


SHORT = "\nAnswer the question using a single word or phrase."


def test_convert_vqav2_and_okvqa_merge_per_image(tmp_path: Path) -> None:
    qs = {"questions": [{"image_id": 9, "question": "What color is it?", "question_id": 90},
                        {"image_id": 9, "question": "How many?", "question_id": 91},
                        {"image_id": 25, "question": "Is it wet?", "question_id": 250}]}
    anns = {"annotations": [
        {"question_id": 90, "image_id": 9, "multiple_choice_answer": "red", "answers": [{"answer": "red"}]},
        {"question_id": 91, "image_id": 9, "answers": [{"answer": "2"}, {"answer": "3"}, {"answer": "3"}]},
        {"question_id": 250, "image_id": 25, "multiple_choice_answer": "no", "answers": [{"answer": "no"}]}]}
    recs = _convert(tmp_path, "vqav2", qs, anns)
    assert recs[0] == {"id": "vqav2-9", "image": "coco/train2017/000000000009.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?" + SHORT}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many?" + SHORT}, {"from": "gpt", "value": "3"}]}
    assert len(recs) == 2
    unmerged = _convert(tmp_path, "okvqa", qs, anns, merge_per_image=False,
                        image_template="coco/train2014/COCO_train2014_{image_id:012d}.jpg")
    assert len(unmerged) == 3 and unmerged[2]["image"] == "coco/train2014/COCO_train2014_000000000025.jpg"


def test_convert_gqa_ocrvqa_textcaps(tmp_path: Path) -> None:
    gqa = _convert(tmp_path, "gqa", {"201307251": {"imageId": "2407890", "question": "Is it a dog?", "answer": "yes",
                                                   "fullAnswer": "Yes, it is a dog."}})
    assert gqa == [{"id": "gqa-2407890", "image": "gqa/images/2407890.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs it a dog?" + SHORT}, {"from": "gpt", "value": "yes"}]}]
    ocr = _convert(tmp_path, "ocrvqa", {"1234567890": {"imageURL": "http://x/1.jpg", "title": "T", "genre": "Travel",
                                                       "questions": ["Who wrote this book?", "Is this a travel book?"],
                                                       "answers": ["Jane Doe", "Yes"], "split": 1}})
    assert ocr[0]["image"] == "ocr_vqa/images/1234567890.jpg" and len(ocr[0]["conversations"]) == 4
    assert ocr[0]["conversations"][3]["value"] == "Yes"
    tc = _convert(tmp_path, "textcaps", {"dataset_type": "train", "data": [
        {"image_id": "0054c91397f2fe05", "caption_str": "A sign that says STOP.", "image_path": "train/0054c91397f2fe05.jpg"},
        {"image_id": "0054c91397f2fe05", "caption_str": "A red STOP sign.", "image_path": "train/0054c91397f2fe05.jpg"}]})
    assert len(tc) == 1 and tc[0]["image"] == "textvqa/train_images/0054c91397f2fe05.jpg"
    assert tc[0]["conversations"][0]["value"] == "<image>\nProvide a one-sentence caption for the provided image."
    assert tc[0]["conversations"][1]["value"] in ("A sign that says STOP.", "A red STOP sign.")


def test_convert_aokvqa_letters(tmp_path: Path) -> None:
    recs = _convert(tmp_path, "aokvqa", [
        {"split": "train", "image_id": 299207, "question_id": "22MexNkBPpdZGX6sxbxVBH", "question": "What is the man by the bags awaiting?",
         "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
         "direct_answers": ["ride"] * 10, "difficult_direct_answer": False, "rationales": ["..."]},
        {"split": "test", "image_id": 1, "question_id": "t", "question": "?", "choices": ["a", "b"]}])
    assert recs == [{"id": "aokvqa-299207", "image": "coco/train2017/000000299207.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the man by the bags awaiting?\nA. skateboarder\nB. train\nC. delivery\n"
                                   "D. cab\nAnswer with the option's letter from the given choices directly."},
        {"from": "gpt", "value": "D"}]}]


def test_convert_refcoco_and_vg_boxes(tmp_path: Path) -> None:
    refs = [{"ref_id": 0, "ann_id": 11, "image_id": 581857, "split": "train", "category_id": 1,
             "file_name": "COCO_train2014_000000581857_11.jpg",
             "sentences": [{"sent": "man in red", "raw": "Man in red.", "tokens": ["man", "in", "red"], "sent_id": 0},
                           {"sent": "left guy", "raw": "left guy", "tokens": ["left", "guy"], "sent_id": 1}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 581857, "split": "testA", "sentences": [{"sent": "no"}]}]
    inst = {"images": [{"id": 581857, "width": 200, "height": 100, "file_name": "COCO_train2014_000000581857.jpg"}],
            "annotations": [{"id": 11, "image_id": 581857, "bbox": [20, 10, 80, 40], "category_id": 1}],
            "categories": [{"id": 1, "name": "person"}]}
    recs = _convert(tmp_path, "refcoco", refs, inst, seed=2)
    assert len(recs) == 1 and len(recs[0]["conversations"]) == 4  # test split left out
    # on the padded 200x200 square the box is x 20..100, y 60..100 -> [0.10, 0.30, 0.50, 0.50]
    box = "[0.10, 0.30, 0.50, 0.50]"
    turns = [(recs[0]["conversations"][i]["value"], recs[0]["conversations"][i + 1]["value"]) for i in (0, 2)]
    for (q, a), phrase in zip(turns, ["man in red", "left guy"]):
        q = q.removeprefix("<image>\n")
        assert (q, a) in ((f"Please provide a short description for this region: {box}", phrase),
                          (f"Please provide the bounding box coordinate of the region this sentence describes: {phrase}.", box))
    image_frame = _convert(tmp_path, "refcoco", refs, inst, box_frame="image", merge_per_image=False)
    assert "[0.10, 0.10, 0.50, 0.50]" in json.dumps(image_frame)
    vg = _convert(tmp_path, "vg", [{"id": 1, "regions": [
        {"region_id": 1382, "width": 82, "height": 139, "image_id": 1, "phrase": "the clock is green in colour", "y": 57, "x": 421},
        {"region_id": 1383, "width": 10, "height": 10, "image_id": 1, "phrase": "shade is along the street", "y": 0, "x": 0}]}],
        [{"image_id": 1, "width": 800, "height": 600, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg"}],
        box_frame="image", max_turns=1)
    assert [r["id"] for r in vg] == ["vg-1-0", "vg-1-1"] and vg[0]["image"] == "vg/VG_100K_2/1.jpg"
    assert "[0.53, 0.10, 0.63, 0.33]" in json.dumps(vg[0])


def test_convert_unknown_layout_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryKeyError, match="vqav2, okvqa"):
        convert_vqa("vqa", tmp_path / "q.json", None, tmp_path / "o.jsonl")
    with pytest.raises(DataError, match="published gqa layout"):
        _convert(tmp_path, "gqa", {"1": {"question": "no image id"}})


def test_mix_ratios_shuffle_and_unique_ids(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [{"id": str(i), "conversations": []} for i in range(100)])
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"id": str(i), "src": "b", "conversations": []}) + "\n" for i in range(40)))
    out = tmp_path / "mix.jsonl"
    s = run_mix([(a, 0.75), (b, 0.5)], out, seed=0)
    data = [json.loads(line) for line in out.read_text().splitlines()]
    assert s.written == {"a.json": 75, "b.jsonl": 20} and len(data) == 95
    ids = [d["id"] for d in data]
    assert len(set(ids)) == 95
    assert sum(d.get("src") == "b" for d in data) == 20
    assert [d.get("src") for d in data[:20]] != [None] * 20 or [d.get("src") for d in data[-20:]] != ["b"] * 20  # shuffled
    assert run_mix([(a, 0.75), (b, 0.5)], tmp_path / "again.jsonl", seed=0) and \
        (tmp_path / "again.jsonl").read_text() == out.read_text()
    with pytest.raises(DataError, match=r"in \(0, 1\]"):
        run_mix([(a, 1.5)], out)


def test_cli_datagen_convert_mix_align_instruct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = _write(tmp_path / "gqa.json", {"1": {"imageId": "n1", "question": "Q?", "answer": "a"}})
    assert main(["datagen", "convert", "gqa", "--questions", str(q), "--out", str(tmp_path / "g.jsonl")]) == 0
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"id": "r1", "image": "r1.jpg", "captions": ["A red circle."],
                               "boxes": [{"category": "red circle", "bbox": [0.1, 0.1, 0.3, 0.3]}]}) + "\n")
    assert main(["datagen", "align", "--jsonl", str(src), "--out", str(tmp_path / "al.jsonl")]) == 0
    assert main(["datagen", "instruct", "--jsonl", str(src), "--teacher", "template", "--out", str(tmp_path / "i.jsonl"),
                 "--no-progress"]) == 0
    assert "written 3, rejected 0" in capsys.readouterr().out
    assert main(["datagen", "mix", str(tmp_path / "g.jsonl"), f"{tmp_path / 'i.jsonl'}:0.67",
                 "--out", str(tmp_path / "m.json")]) == 0
    assert len(json.loads((tmp_path / "m.json").read_text())) == 3
    assert main(["datagen", "mix", "--out", str(tmp_path / "none.json")]) == 2  # nothing to mix is an error
    assert main(["datagen", "instruct", "--jsonl", str(src), "--teacher", "gpt4", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "valid: template, openai:MODEL, hf:PATH" in capsys.readouterr().err


# -- malformed COCO entries are named, not tracebacks (issue 17 item 13) -------------------------

COCO_IMAGE = {"id": 1, "file_name": "000000000001.jpg", "width": 640, "height": 480}
COCO_CAPTION = {"id": 7, "image_id": 1, "caption": "A dog."}


@pytest.mark.parametrize("image,caption,in_instances,message", [
    ({"id": 1, "width": 640, "height": 480}, COCO_CAPTION, False,
     r"captions.json: images\[0\] \(id 1\) needs .* `file_name`"),
    ({**COCO_IMAGE, "width": 0}, COCO_CAPTION, False, "captions.json: image 1: width 0 and height 480 must be"),
    ({**COCO_IMAGE, "width": 0}, COCO_CAPTION, True, "instances.json: image 1: width 0 and height 480 must be"),
    ({"id": 1, "file_name": "1.jpg", "height": 480}, COCO_CAPTION, True,
     "instances.json: image 1: width null and height 480"),
    (COCO_IMAGE, {**COCO_CAPTION, "caption": None}, False,
     r"captions.json: annotations\[0\] \(id 7, image 1\) has caption null, not a non-empty string"),
    (COCO_IMAGE, {"id": 7, "image_id": 1}, False, r"annotations\[0\] \(id 7, image 1\) has caption null"),
])
def test_read_coco_names_the_bad_entry(tmp_path: Path, image: dict, caption: dict, in_instances: bool,
                                       message: str) -> None:
    captions = _write(tmp_path / "captions.json", {"images": [image], "annotations": [caption]})
    instances = _write(tmp_path / "instances.json", {
        "images": [image], "categories": [{"id": 1, "name": "dog"}],
        "annotations": [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]}) if in_instances else None
    with pytest.raises(DataError, match=message):
        read_coco(captions, instances)


def test_read_coco_without_sizes_in_the_captions_file_and_jsonl_zero_width(tmp_path: Path) -> None:
    captions = _write(tmp_path / "captions.json", {"images": [{"id": 1, "file_name": "1.jpg"}],
                                                   "annotations": [COCO_CAPTION]})
    assert [(r.id, r.image, r.captions) for r in read_coco(captions)] == [("1", "1.jpg", ("A dog.",))]
    lines = tmp_path / "r.jsonl"
    lines.write_text(json.dumps({"image": "a.jpg", "width": 0, "height": 3,
                                 "boxes": [{"category": "dog", "bbox": [1, 1, 2, 2]}]}) + "\n")
    with pytest.raises(DataError, match="r.jsonl:1: width 0 and height 3 must be positive"):
        read_jsonl(lines)

# -- RefCOCO's pickle runs no code (issue 17 item 5) ---------------------------------------------

# refs(unc).p as the refer API's Python 2 cPickle wrote it (protocol 0: `S` byte strings, `I`/`L` numbers).
PY2_REFS = (b"(lp0\n(dp1\nS'ref_id'\np2\nI0\nsS'ann_id'\np3\nL11L\nsS'image_id'\np4\nI581857\nsS'split'\np5\n"
            b"S'train'\np6\nsS'sent_ids'\np7\n(lp8\nI0\nasS'sentences'\np9\n(lp10\n(dp11\nS'sent'\np12\n"
            b"S'man in red'\np13\nsS'tokens'\np14\n(lp15\nS'man'\np16\naS'in'\np17\naS'red'\np18\nasS'sent_id'\np19\n"
            b"I0\nsasa.")
REFCOCO_INSTANCES = {"images": [{"id": 581857, "width": 200, "height": 100}],
                     "annotations": [{"id": 11, "image_id": 581857, "bbox": [20, 10, 80, 40], "category_id": 1}]}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_refcoco_pickle_loads_plain_data_only(tmp_path: Path) -> None:
    import pickle

    inst = _write(tmp_path / "instances.json", REFCOCO_INSTANCES)
    refs = [{"ref_id": 0, "ann_id": 11, "image_id": 581857, "split": "train", "sent_ids": [0],
             "sentences": [{"sent": "man in red", "tokens": ["man", "in", "red"], "sent_id": 0}]}]
    assert pickle.loads(PY2_REFS) == refs
    outputs = []
    for i, data in enumerate([PY2_REFS, pickle.dumps(refs, protocol=2), pickle.dumps(refs)]):
        (tmp_path / f"refs{i}.p").write_bytes(data)
        convert_vqa("refcoco", tmp_path / f"refs{i}.p", inst, tmp_path / f"o{i}.jsonl", seed=0)
        outputs.append((tmp_path / f"o{i}.jsonl").read_text())
    assert outputs[0] == outputs[1] == outputs[2] and "man in red" in outputs[0]

    marker = tmp_path / "PWNED"
    for payload in ([_Payload(marker)], refs + [{"sentences": _Payload(marker)}]):
        (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(DataError) as refused:
            convert_vqa("refcoco", tmp_path / "refs(unc).p", inst, tmp_path / "evil.jsonl")
        assert not marker.exists(), "the pickle ran code"
        assert re.search(r"refs\(unc\).p: not loaded as a plain-data pickle .*system", str(refused.value))
        assert not (tmp_path / "evil.jsonl").exists()

# -- never write over someone else's file (issue 17 item 3) --------------------------------------

def _foreign_files(tmp_path: Path) -> dict[str, bytes]:
    """Files a user could pass as --out by mistake: a LLaVA set written by json.dump on one line (no
    trailing newline, so old code took it all for a torn line), the same indented, and a JSONL set."""
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    records = [{"id": str(i), "image": f"{i}.jpg", "conversations": turns} for i in range(1000)]
    return {"one_line.jsonl": json.dumps(records).encode(),
            "indented.jsonl": json.dumps(records[:3], indent=1).encode(),
            "llava.jsonl": "".join(json.dumps(r) + "\n" for r in records[:50]).encode()}


@pytest.mark.parametrize("name", ["one_line.jsonl", "indented.jsonl", "llava.jsonl"])
def test_instruct_refuses_an_existing_file_it_did_not_write(tmp_path: Path, name: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / name
    content = _foreign_files(tmp_path)[name]
    out.write_bytes(content)
    with pytest.raises(DataError, match=f"{name} already exists and was not written by `vistune datagen instruct`"):
        run_instruct([NO_BOXES], KINDS, get_teacher("template"), out, progress=False)
    assert out.read_bytes() == content  # byte-identical
    assert not rejects_path(out).exists() and not sidecar_path(out).exists()
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"id": "r1", "image": "r1.jpg", "captions": ["A red circle."]}) + "\n")
    assert main(["datagen", "instruct", "--jsonl", str(src), "--teacher", "template", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "choose another --out" in err
    assert out.read_bytes() == content


def test_instruct_refuses_a_json_out_and_a_foreign_rejects_file(tmp_path: Path) -> None:
    out = tmp_path / "train.json"  # training would read it as one JSON list; instruct appends lines
    content = _foreign_files(tmp_path)["one_line.jsonl"]  # the 1000-record train.json
    out.write_bytes(content)
    with pytest.raises(DataError, match="give a .jsonl name"):
        run_instruct([NO_BOXES], KINDS, get_teacher("template"), out, progress=False)
    assert out.read_bytes() == content and not sidecar_path(out).exists()
    out = tmp_path / "fresh.jsonl"
    rejects_path(out).write_text("my notes\n")
    with pytest.raises(DataError, match="fresh.rejects.jsonl already exists"):
        run_instruct([NO_BOXES], KINDS, get_teacher("template"), out, progress=False)
    assert rejects_path(out).read_text() == "my notes\n" and not out.exists()


def test_instruct_resumes_only_its_own_output(tmp_path: Path) -> None:
    out = tmp_path / "mine.jsonl"
    run_instruct([NO_BOXES], KINDS, get_teacher("template"), out, progress=False)
    assert json.loads(sidecar_path(out).read_text())["command"] == "instruct"
    again = run_instruct([NO_BOXES, COCO_LIKE], KINDS, get_teacher("template"), out, progress=False)
    assert again.skipped == 3 and again.n_written == 3
    # Even with our sidecar, a file replaced by something that is not our JSONL is left alone.
    content = _foreign_files(tmp_path)["one_line.jsonl"]
    out.write_bytes(content)
    with pytest.raises(DataError, match="neither a record nor a torn one of ours"):
        run_instruct([NO_BOXES], KINDS, get_teacher("template"), out, progress=False)
    assert out.read_bytes() == content


def test_whole_file_builders_replace_only_their_own_output(tmp_path: Path) -> None:
    src = [COCO_LIKE, NO_BOXES]
    q = _write(tmp_path / "gqa_q.json", {"1": {"imageId": "n1", "question": "Q?", "answer": "a"}})
    builders = {"align": lambda out: run_align(src, out), "convert": lambda out: convert_vqa("gqa", q, None, out),
                "mix": lambda out: run_mix([(tmp_path / "a.jsonl", 1.0)], out)}
    run_align(src, tmp_path / "a.jsonl")
    for command, build in builders.items():
        for name, content in _foreign_files(tmp_path).items():
            out = tmp_path / command / name
            out.parent.mkdir(exist_ok=True)
            out.write_bytes(content)
            with pytest.raises(DataError, match=f"not written by `vistune datagen {command}`"):
                build(out)
            assert out.read_bytes() == content
        own = tmp_path / command / "own.json"
        build(own)
        build(own)  # a rerun replaces the command's own output
        assert json.loads(own.read_text())
    with pytest.raises(DataError, match="written by `vistune datagen align`, not `mix`"):
        run_mix([(tmp_path / "a.jsonl", 1.0)], tmp_path / "align" / "own.json")


def test_scienceqa_never_replaces_llavas_own_file(tmp_path: Path) -> None:
    from vistune.datagen.scienceqa import convert_scienceqa

    (tmp_path / "problems.json").write_text(json.dumps({"1": {"question": "Q?", "choices": ["a", "b"], "answer": 0}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["1"]}))
    theirs = tmp_path / "llava_train_QCM-LEA.json"  # the name LLaVA's own download has
    theirs.write_text('[{"id": "theirs"}]')
    with pytest.raises(DataError, match="not written by `vistune datagen scienceqa`"):
        convert_scienceqa(tmp_path, "train")
    assert theirs.read_text() == '[{"id": "theirs"}]'


def test_instruct_resumes_an_output_written_before_sidecars(tmp_path: Path) -> None:
    out = tmp_path / "old.jsonl"
    run_instruct([NO_BOXES, COCO_LIKE], KINDS, get_teacher("template"), out, progress=False)
    lines = out.read_text().splitlines()
    sidecar_path(out).unlink()  # as an interrupted run of an earlier version left it
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    again = run_instruct([NO_BOXES, COCO_LIKE], KINDS, get_teacher("template"), out, progress=False)
    assert again.skipped == 4 and again.n_written == 2 and sorted(out.read_text().splitlines()) == sorted(lines)
