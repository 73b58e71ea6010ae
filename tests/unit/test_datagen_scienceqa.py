"""`vistune datagen scienceqa`: ScienceQA's files to LLaVA records, text checked against the rules of
LLaVA's convert_sqa_to_llava.py worked out by hand (quirks included), loadable by vistune's data reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vistune.cli import main
from vistune.data.records import Problems, load_samples
from vistune.datagen.scienceqa import convert_scienceqa, problem_texts
from vistune.errors import DataError

PROBLEMS = {
    "10": {"question": "Which animal is a mammal?", "choices": ["dog", "trout"], "answer": 0, "hint": "",
           "image": "image.png", "lecture": "Mammals have fur.\nBirds have feathers.",
           "solution": "A dog has fur.\\nSo A.", "split": "train"},  # a literal backslash-n in the solution
    "11": {"question": "Pick  the  odd one.", "choices": ["a", "b", "c"], "answer": 2, "hint": "Look closely. ",
           "image": None, "lecture": "", "solution": "", "split": "train"},
    "12": {"question": "Test question?", "choices": ["x", "y"], "answer": 1, "hint": "", "image": "image.png",
           "lecture": "", "solution": "", "split": "test"},
}


@pytest.fixture
def sqa(tmp_path: Path) -> Path:
    root = tmp_path / "scienceqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["10", "11"], "val": [], "test": ["12"]}))
    (root / "images" / "train" / "10").mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "images" / "train" / "10" / "image.png")
    return root


def test_qcm_lea_text_as_llavas_script_writes_it() -> None:
    assert problem_texts(PROBLEMS["10"]) == (
        "Which animal is a mammal?\nContext: N/A\nOptions: (A) dog (B) trout",
        "Mammals have fur.\nBirds have feathers. A dog has fur.\nSo A. The answer is A.")
    # empty lecture and solution leave "Answer:   The" -> one double space collapsed -> "Answer:  The";
    # deleting "Answer: " keeps the other space, as LLaVA's file has it
    assert problem_texts(PROBLEMS["11"]) == ("Pick the odd one.\nContext: Look closely.\nOptions: (A) a (B) b (C) c",
                                             " The answer is C.")


def test_other_formats_and_a_bad_one() -> None:
    assert problem_texts(PROBLEMS["10"], "CQM-A") == (
        "Context: N/A\nQuestion: Which animal is a mammal?\nOptions: (A) dog (B) trout", "The answer is A.")
    assert problem_texts(PROBLEMS["10"], "QCM-LEPA")[1] == \
        "LECTURE: Mammals have fur.\nBirds have feathers.\nSOLUTION: A dog has fur.\nSo A.\n###\nANSWER: A."
    assert problem_texts(PROBLEMS["11"], "QCM-AL")[1] == "The answer is C."  # a dangling "BECAUSE:" is dropped
    with pytest.raises(DataError, match="valid: INPUT-OUTPUT"):
        problem_texts(PROBLEMS["10"], "QMC-LEA")


def test_cli_writes_llava_records_that_vistune_trains_on(sqa: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datagen", "scienceqa", str(sqa)]) == 0
    assert "2 records (1 with an image)" in capsys.readouterr().out
    records = json.loads((sqa / "llava_train_QCM-LEA.json").read_text())
    assert records == [
        {"id": "10", "image": "10/image.png", "conversations": [
            {"from": "human", "value": "Which animal is a mammal?\nContext: N/A\nOptions: (A) dog (B) trout\n<image>"},
            {"from": "gpt", "value": "Mammals have fur.\nBirds have feathers. A dog has fur.\nSo A. The answer is A."}]},
        {"id": "11", "conversations": [
            {"from": "human", "value": "Pick the odd one.\nContext: Look closely.\nOptions: (A) a (B) b (C) c"},
            {"from": "gpt", "value": " The answer is C."}]}]
    samples = load_samples(sqa / "llava_train_QCM-LEA.json", sqa / "images" / "train", skip_bad=False,
                           problems=Problems())
    assert [s.id for s in samples] == ["10", "11"] and samples[0].images == (sqa / "images" / "train" / "10" / "image.png",)


def test_unknown_split_names_the_valid_ones(sqa: Path) -> None:
    with pytest.raises(DataError, match="valid: train, val, test"):
        convert_scienceqa(sqa, "dev")
