"""Benchmark prompts as the LLaVA authors asked them, and rescoring their released answer files
(issue 18 items 7 and 8).

The data under tests/data/llava_eval/ are slices of the authors' files (haotian-liu/LLaVA at 32cebc3)
and of POPE's; see its README. Expected scores are worked out by hand from the official scorers'
logic on those slices (eval_pope.py, MME's calculation.py, eval_science_qa.py), written in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistune.errors import DataError
from vistune.eval.run import run_eval
from vistune.eval.tasks import get_task

DATA = Path(__file__).parents[1] / "data" / "llava_eval"
ANSWERS = {"pope": DATA / "pope" / "answers" / "llava-v1.5-13b.jsonl",
           "mme": DATA / "MME" / "answers" / "llava-v1.5-13b.jsonl",
           "scienceqa": DATA / "scienceqa" / "answers" / "llava-v1.5-13b_result.json"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rescored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("rescore")
    return run_eval(list(ANSWERS), None, DATA, out, task_options={k: {"answers": str(v)} for k, v in ANSWERS.items()})


def test_pope_rescored_as_eval_pope_scores_it(rescored: dict[str, dict]) -> None:
    # The first 10 questions of each split; labels alternate yes, no, ... in all three files.
    # adversarial replies: No No Yes No Yes No Yes Yes Yes No -> TP 4, FP 1 (q8), TN 4, FN 1 (q1): P = R = F1 = 0.8
    # random replies:      No No Yes No Yes No Yes No  Yes No -> TP 4, FP 0, TN 5, FN 1: P 1, R 0.8, F1 8/9, acc 0.9
    # popular replies:     No No Yes No Yes No Yes No  Yes Yes -> TP 4, FP 1 (q10), TN 4, FN 1: F1 0.8, acc 0.8
    pope = rescored["pope"]
    cats = pope["per_category"]
    assert cats["adversarial"]["f1"] == pytest.approx(80.0) and cats["adversarial"]["accuracy"] == pytest.approx(80.0)
    assert cats["random"]["f1"] == pytest.approx(100 * 8 / 9) and cats["random"]["precision"] == pytest.approx(100.0)
    assert cats["random"]["accuracy"] == pytest.approx(90.0) and cats["random"]["recall"] == pytest.approx(80.0)
    assert cats["popular"]["f1"] == pytest.approx(80.0) and cats["popular"]["accuracy"] == pytest.approx(80.0)
    assert pope["f1"] == pytest.approx((80.0 + 100 * 8 / 9 + 80.0) / 3)
    assert pope["n"] == 30


def test_mme_rescored_without_images(rescored: dict[str, dict]) -> None:
    # code_reasoning/0020.png: both replies "Yes", ground truth Yes then No -> acc 1/2, acc+ 0/1 (the
    # image is not right twice): score 100 * 0.5 + 100 * 0 = 50, the whole cognition sum of this slice.
    mme = rescored["mme"]
    assert mme["tasks"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert mme["cognition"] == pytest.approx(50.0) and mme["perception"] == 0


def test_scienceqa_rescored_from_the_result_json(rescored: dict[str, dict]) -> None:
    # results (pred index) vs answer: 5144 -1 (its "C" of 2 options) vs 0, 11 2 vs 1, 23 0 vs 1, 42 4 vs 1
    # wrong; 5, 62, 85, 87 right -> IMG accuracy 4 / 8 = 50.00. The file also answers pid 4, a text-only
    # question (right, 1 = B), which IMG accuracy leaves out.
    sqa = rescored["scienceqa"]
    assert sqa["img_accuracy"] == pytest.approx(50.0) and sqa["n"] == 8 and sqa["failed"] == 1


def test_prompts_equal_the_authors_question_files() -> None:
    """POPE and MME prompts built from the benchmarks' own files are the authors' prompts, character for character."""
    pope = {it.id: it.prompt for it in get_task("pope").load(DATA / "pope")}
    offsets = {0: "adversarial", 10_000_000: "random", 20_000_000: "popular"}
    authors = _jsonl(DATA / "pope" / "llava_pope_test.jsonl")
    for row in authors:
        qid = row["question_id"]
        assert pope[f"{offsets[qid - qid % 10_000_000]}/{qid % 10_000_000}"] == row["text"]
    mme = [it.prompt for it in get_task("mme").load(DATA / "MME")]
    assert mme == [row["text"] for row in _jsonl(DATA / "MME" / "llava_mme.jsonl")]
    sqa = get_task("scienceqa").load(DATA / "scienceqa")
    want = json.loads((DATA / "scienceqa" / "llava_test_CQM-A.json").read_text())
    assert [it.prompt for it in sqa] == [r["conversations"][0]["value"].removeprefix("<image>\n")
                                         + "\nAnswer with the option's letter from the given choices directly."
                                         for r in want if r.get("image")]  # pid 4 is text-only: not asked


def test_textvqa_vizwiz_gqa_prompts_and_layouts(tmp_path: Path) -> None:
    """Literal prompts from the authors' llava_textvqa_val_v051_ocr.jsonl, vizwiz/llava_test.jsonl and
    llava_gqa_testdev_balanced.jsonl, from the official files in the layouts LLaVA's docs describe."""
    short = "Answer the question using a single word or phrase."
    textvqa = tmp_path / "textvqa"
    textvqa.mkdir()
    (textvqa / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "ocr_tokens": ["DAKOTA", "DIGITAL", "Single-Use", "Camera", "Pire", "digitat"]},
        {"question_id": 35000, "image_id": "97b1112b17015396",
         "question": "whats the lowest number yard line that you can see?", "ocr_tokens": []}]}))
    prompts = [it.prompt for it in get_task("textvqa").load(textvqa)]
    assert prompts == [
        "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, Pire, digitat\n"
        + short,
        "Whats the lowest number yard line that you can see?\nReference OCR token: \n" + short]

    vizwiz = tmp_path / "vizwiz"
    vizwiz.mkdir()
    (vizwiz / "test.json").write_text(json.dumps([
        {"image": "VizWiz_test_00000000.jpg", "question": "What is this? and what color is it?"},
        {"image": "VizWiz_test_00000001.jpg", "question": "What is this?"}]))
    task = get_task("vizwiz")
    items = task.load(vizwiz)
    assert items[0].prompt == ("What is this? and what color is it?\nWhen the provided information is insufficient, "
                               "respond with 'Unanswerable'.\n" + short)
    assert {k: v for k, v in task.llava_keys(items).items() if k.isdigit()} == {
        "0": "VizWiz_test_00000000.jpg", "1": "VizWiz_test_00000001.jpg"}

    gqa = tmp_path / "gqa"
    (gqa / "data" / "images").mkdir(parents=True)  # LLaVA's layout: gqa/data/ holds the official files
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(
        {"201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no"}}))
    [item] = get_task("gqa").load(gqa)
    assert item.prompt == "Is it overcast?\n" + short
    assert item.images[0] == gqa / "data" / "images" / "n161313.jpg"


def test_mmvet_zip_extracted_into_mmvet(tmp_path: Path) -> None:
    """docs/Evaluation.md: extract mm-vet.zip (which holds a mm-vet/ folder) to playground/data/eval/mmvet."""
    import shutil

    from vistune.eval.run import task_root

    shutil.copytree(DATA / "mm-vet", tmp_path / "mmvet" / "mm-vet")
    task = get_task("mmvet")
    items = task.load(task_root(tmp_path, task))
    assert [it.id for it in items][:2] == ["v1_0", "v1_1"]
    assert items[0].images[0] == tmp_path / "mmvet" / "mm-vet" / "images" / "v1_0.png"


def test_mmbench_cn_reads_its_tsv_from_mmbench(tmp_path: Path) -> None:
    """LLaVA's docs put mmbench_dev_cn_20231003.tsv in mmbench/, beside the English TSV."""
    import eval_fixtures

    data = tmp_path / "data"
    eval_fixtures.mmbench(data / "mmbench")
    en = sorted((data / "mmbench").glob("*.tsv"))[0]
    (data / "mmbench" / "mmbench_dev_cn_20231003.tsv").write_text(en.read_text().replace("What", "什么"))
    from vistune.eval.run import task_root

    task = get_task("mmbench_cn")
    items = task.load(task_root(data, task))
    assert items and all("什么" in it.prompt or "What" not in it.prompt for it in items)


def test_answer_files_of_another_task_fail_naming_the_answer(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="name no mme question"):
        run_eval(["mme"], None, DATA, tmp_path, task_options={"mme": {"answers": str(ANSWERS["pope"])}})
    with pytest.raises(DataError, match="result json given for task pope"):
        run_eval(["pope"], None, DATA, tmp_path, task_options={"pope": {"answers": str(ANSWERS["scienceqa"])}})


def test_recorded_reviews_and_grades_score_without_a_judge(tmp_path: Path) -> None:
    """The authors' LLaVA-Bench reviews (their three runs, questions 0-5) and MM-Vet grades (6 samples), with
    their answer files, scored with no judge given."""
    bench, mmvet = DATA / "llava-bench-in-the-wild", DATA / "mm-vet"
    options = {"llava_bench": {"answers": str(bench / "answers" / "llava-v1.5-13b.jsonl"),
                               "reviews": str(bench / "reviews" / "llava-v1.5-13b-eval1.jsonl")},
               "mmvet": {"answers": str(mmvet / "answers" / "llava-v1.5-13b.jsonl"),
                         "grades": str(mmvet / "results" / "llava-v1.5-13b_gpt-4-grade-1runs.json")}}
    m = run_eval(["llava_bench", "mmvet"], None, DATA, tmp_path, task_options=options)
    runs = {"reviews": ",".join(str(bench / "reviews" / f"llava-v1.5-13b-eval{k}.jsonl") for k in (1, 2, 3))}
    three = run_eval(["llava_bench"], None, DATA, tmp_path / "3", task_options={"llava_bench": options["llava_bench"] | runs})
    # eval2 (7, 9) (9, 6) (8, 6) (9, 8.5) (9, 2) (9, 1) -> 32.5 / 51; eval3 as eval2 but q5 (9, 2) -> 33.5 / 51;
    # the authors' number is the mean of the runs' (summarize_gpt_review.py prints each run's).
    assert three["llava_bench"]["runs"] == pytest.approx([100 * 35 / 52, 100 * 32.5 / 51, 100 * 33.5 / 51])
    assert three["llava_bench"]["all"] == pytest.approx(100 * (35 / 52 + 32.5 / 51 + 33.5 / 51) / 3)
    # tuples (reference, model): conv q0 (8, 10), q4 (9, 2), q5 (9, 2); detail q1 (9, 6.5); complex q2 (8, 6), q3 (9, 8.5)
    per = m["llava_bench"]["per_category"]
    assert per["conv"]["relative"] == pytest.approx(100 * (14 / 3) / (26 / 3))
    assert per["detail"]["relative"] == pytest.approx(100 * 6.5 / 9)
    assert per["complex"]["relative"] == pytest.approx(100 * 14.5 / 17)
    assert m["llava_bench"]["all"] == pytest.approx(100 * 35 / 52)  # summarize_gpt_review.py: mean(model) / mean(ref)
    # grades v1_0 0, v1_1 0, v1_17 1, v1_18 1, v1_37 0.5, v1_39 0.1 -> 2.6 / 6
    assert m["mmvet"]["total"] == pytest.approx(100 * 2.6 / 6) and m["mmvet"]["graded"] == 6
    replies = {json.loads(line)["id"]: json.loads(line)["reply"]
               for line in (tmp_path / "mmvet" / "predictions.jsonl").read_text().splitlines()}
    assert replies["v1_0"] == _jsonl(mmvet / "answers" / "llava-v1.5-13b.jsonl")[0]["text"]  # question_id 0 -> v1_0


def test_mmbench_answer_rounds_map_to_circular_copies() -> None:
    task = get_task("mmbench")
    assert task.llava_row_key({"question_id": 241, "round_id": 0}) == "241"
    assert task.llava_row_key({"question_id": 241, "round_id": 2}) == "2000241"


def test_mmbench_prompts_and_upload_as_the_authors(tmp_path: Path) -> None:
    """Three hint-less dev questions (rows of the authors' upload xlsx, in the TSV's columns): the prompts
    are the authors' (model_vqa_mmbench.py saves them without the --single-pred-prompt line), and the
    upload xlsx has the authors' header, numeric index and empty cells for missing options."""
    from openpyxl import load_workbook

    task = get_task("mmbench")
    items = {it.id: it for it in task.load(DATA / "mmbench")}
    answers = _jsonl(DATA / "mmbench" / "answers" / "llava-v1.5-13b.jsonl")
    for row in answers:
        assert items[str(row["question_id"])].prompt == (
            row["prompt"] + "\nAnswer with the option's letter from the given choices directly.")
    [path] = task.write_submission(list(items.values()), {str(r["question_id"]): r["text"] for r in answers}, tmp_path)
    rows = list(load_workbook(path).active.values)
    assert rows[0] == ("index", "question", "A", "B", "C", "D", "prediction", "answer", "split")  # the authors' xlsx
    assert rows[1][:7] == (293, "Which material is this spatula made of?", "rubber", "cotton", None, None, "A")


@pytest.mark.parametrize("answers", ["answers/llava-v1.5-13b.jsonl", "answers_upload/llava-v1.5-13b.json"])
def test_vizwiz_answers_rescored_into_the_authors_upload(answers: str, tmp_path: Path) -> None:
    """The authors' VizWiz answers (question_id = row of test.json) or their upload file (keyed by image name)
    give back the authors' upload file (convert_vizwiz_for_submission.py's normalisation) and the authors' prompts."""
    vizwiz = DATA / "vizwiz"
    assert [it.prompt for it in get_task("vizwiz").load(vizwiz)] == [r["text"] for r in _jsonl(vizwiz / "llava_test.jsonl")]
    run_eval(["vizwiz"], None, DATA, tmp_path, task_options={"vizwiz": {"answers": str(vizwiz / answers)}})
    upload = json.loads((tmp_path / "vizwiz" / "vizwiz_answers_upload.json").read_text())
    assert upload == json.loads((vizwiz / "answers_upload" / "llava-v1.5-13b.json").read_text())


def test_vqav2_from_llavas_question_files(tmp_path: Path) -> None:
    """docs/Evaluation.md's VQAv2 layout: eval.zip's question files and test2015/, no official questions file;
    the upload lists every test2015 id, those not asked with an empty answer."""
    root = tmp_path / "vqav2"
    root.mkdir()
    row = {"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg",
           "text": "Is the ball flying towards the batter?\nAnswer the question using a single word or phrase.",
           "category": "default"}
    (root / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text(json.dumps(row) + "\n")
    (root / "llava_vqav2_mscoco_test2015.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps(row | {"question_id": 262144001}) + "\n")
    task = get_task("vqav2")
    [item] = task.load(root)
    assert (item.id, item.prompt, item.images[0]) == ("262144000", row["text"], root / "test2015" / row["image"])
    [path] = task.write_submission([item], {"262144000": "Yes."}, tmp_path / "out")
    assert json.loads(path.read_text()) == [{"question_id": 262144000, "answer": "yes"},
                                            {"question_id": 262144001, "answer": ""}]


def test_malformed_answer_rows_fail_naming_the_row(tmp_path: Path) -> None:
    bad = tmp_path / "answers.jsonl"
    bad.write_text(json.dumps({"question_id": "abc", "text": "Yes"}) + "\n")
    with pytest.raises(DataError, match=r"answer 1 \(question_id 'abc'\) is not a pope answer"):
        run_eval(["pope"], None, DATA, tmp_path / "out", task_options={"pope": {"answers": str(bad)}})
    bad.write_text(json.dumps({"id": 1, "reply": "Yes"}) + "\n")
    with pytest.raises(DataError, match="expected LLaVA's answer layout"):
        run_eval(["pope"], None, DATA, tmp_path / "out", task_options={"pope": {"answers": str(bad)}})
