"""Eval tasks without a model: the registry's error, LLaVA-1.5's prompts read from each published layout, and
scores from hand-written predictions files (numbers worked out by hand)."""

from __future__ import annotations

from pathlib import Path

import eval_fixtures
import pytest
from judges import write_preds

from vistune.errors import RegistryKeyError
from vistune.eval.run import run_eval
from vistune.eval.tasks import get_task
from vistune.eval.tasks.base import (
    LETTER_ANSWER,
    LETTER_ANSWER_CN,
    SHORT_ANSWER,
    VIZWIZ_UNANSWERABLE,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return eval_fixtures.write_all(tmp_path_factory.mktemp("evaldata"))


def test_registry_fails_listing_valid_keys() -> None:
    with pytest.raises(RegistryKeyError, match="valid: vqav2, gqa"):
        get_task("vqa2")


def test_prompts_follow_llava_1_5(data: Path) -> None:
    items = {name: get_task(name).load(data / folder) for name, (folder, _) in eval_fixtures.WRITERS.items()}
    assert items["vqav2"][0].prompt == f"What color is it?\n{SHORT_ANSWER}"
    assert items["vizwiz"][0].prompt == f"What is this?\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"
    # as the authors' llava_textvqa_val_v051_ocr.jsonl: capitalised, and the OCR line even when it is empty
    assert items["textvqa"][0].prompt == f"What is the brand?\nReference OCR token: nikon, d50\n{SHORT_ANSWER}"
    assert items["textvqa"][1].prompt == f"What number is shown?\nReference OCR token: \n{SHORT_ANSWER}"
    sqa = items["scienceqa"]
    assert [it.id for it in sqa] == ["1", "2"]  # test split, with an image only
    assert sqa[1].prompt == f"Context: Look at the picture.\nWhich color is shown?\nA. red\nB. blue\nC. green\n{LETTER_ANSWER}"
    assert sqa[0].prompt.startswith("Which is a mammal?\nA. dog")  # empty hint: no context line
    mmb = items["mmbench"]
    assert len(mmb) == 4 + 2 + 3  # one pass per circular shift of each question's options
    assert mmb[1].prompt == f"What colour is the square?\nA. green\nB. blue\nC. yellow\nD. red\n{LETTER_ANSWER}"
    assert mmb[1].answer == "D" and mmb[1].id == "1000000"
    assert mmb[4].prompt.startswith("Count them.\nHow many shapes?\nA. one\nB. two\n")
    assert items["mmbench_cn"][0].prompt.endswith(LETTER_ANSWER_CN)
    assert [it.id for it in items["seed"]] == ["101", "102"]  # image questions only
    assert items["pope"][0].id == "adversarial/1" and len(items["pope"]) == 12
    assert len(items["mme"]) == 8 and items["mme"][0].answer == "yes"


def test_scores_from_known_replies(data: Path, tmp_path: Path) -> None:
    """Hand-written predictions files, scored without a model: numbers worked out by hand."""
    out = tmp_path / "out"
    write_preds(out, "vqav2", {"1000": "Red.", "1001": "two", "1002": "no"})
    write_preds(out, "pope", {f"{c}/{k}": r for c in ("adversarial", "popular", "random")
                               for k, r in zip((1, 2, 3, 4), ("Yes", "No.", "No, there is not.", "Not sure"))})
    write_preds(out, "scienceqa", {"1": "A", "2": "The answer is D."})  # D is out of range for 3 choices
    mme_replies = {"existence/exis0.jpg/0": "Yes", "existence/exis0.jpg/1": "No", "existence/exis1.jpg/0": "yes",
                   "existence/exis1.jpg/1": "yes", "code_reasoning/code0.png/0": "No", "code_reasoning/code0.png/1": "no",
                   "code_reasoning/code1.png/0": "maybe", "code_reasoning/code1.png/1": "no"}
    write_preds(out, "mme", mme_replies)
    mmb = {"0": "A", "1000000": "D", "2000000": "C", "3000000": "A",  # shift 3 wrong (red is B there) -> question 0 fails
           "1": "B", "1000001": "A.", "2": "C", "1000002": "B", "2000002": "(A) circle"}
    write_preds(out, "mmbench", mmb)
    write_preds(out, "seed", {"101": "A", "102": "C."})
    write_preds(out, "gqa", {"201": "No.", "202": "a cup"})
    m = run_eval(["vqav2", "pope", "scienceqa", "mme", "mmbench", "seed", "gqa"], None, data, out)
    # vqav2: "red" 1.0; "two" -> "2", 7 + 1 ("two" normalises to 2 as well) = 8 of 10 -> 1.0; "no" 1 of 10 -> 0.3
    assert m["vqav2"]["accuracy"] == pytest.approx(100 * (1 + 1 + 0.3) / 3)
    assert m["vqav2"]["per_type"]["yes/no"] == pytest.approx(30.0)
    # pope per category: preds yes,no,no,yes vs labels yes,no,yes,no -> TP1 FP1 TN1 FN1
    assert m["pope"]["f1"] == pytest.approx(50.0) and m["pope"]["accuracy"] == pytest.approx(50.0)
    assert m["pope"]["yes_ratio"] == pytest.approx(50.0)
    assert m["scienceqa"]["img_accuracy"] == pytest.approx(50.0) and m["scienceqa"]["failed"] == 1
    # mme existence: acc 3/4, acc+ 1/2 -> 125; code_reasoning: "No" vs Yes wrong, no right; other wrong, no right
    assert m["mme"]["perception"] == pytest.approx(125.0) and m["mme"]["cognition"] == pytest.approx(50.0)
    assert m["mmbench"]["circular_accuracy"] == pytest.approx(200 / 3)
    assert m["mmbench"]["single_pass_accuracy"] == pytest.approx(100.0)
    assert m["seed"]["accuracy"] == pytest.approx(50.0)  # "C." is not "C": SEED compares exactly
    assert m["gqa"]["accuracy"] == pytest.approx(50.0)   # "a cup" is not "cup"
