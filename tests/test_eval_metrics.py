"""Scoring functions against cases worked out by hand from the official tools' rules."""

from __future__ import annotations

import pytest

from vistune.eval.metrics import (
    circular_accuracy,
    gqa_match,
    mmbench_parse,
    mme_parse,
    mme_scores,
    normalize_vqa_answer,
    parse_mmvet_score,
    parse_review_scores,
    pope_metrics,
    pope_parse,
    relative_scores,
    scienceqa_parse,
    seed_match,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),                      # number word, final period
    ("The Red", "red"),                 # article, case
    ("a dog", "dog"), ("an apple", "apple"),
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"),  # the table stops at ten
    ("dont", "don't"), ("isnt", "isn't"), ("Im", "im"),  # contractions restored; "Im" is lowercased before the lookup, so it stays "im"
    ("3.5", "3.5"),                     # a period before a digit stays
    ("yes!", "yes"), ("left-hand", "left hand"),  # punctuation glued to words becomes a space...
    ("red ,blue", "red blue"),          # ...a comma is removed outright by the tokenizer step
    ("hello - world", "hello world"),   # punctuation next to a space is deleted
    ("1,000", "1000"),                  # digit-grouping comma
    ("the man's hat", "man 's hat"),    # "'s" split off
    ("What?", "what"),
    ("", ""), ("   ", ""),              # empty answers
    ("line\nbreak\ttab", "line break tab"),
    ("Not sure", "not sure"),
])
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_period_strip_keeps_the_official_count_quirk() -> None:
    # The official call strips at most 32 periods (re.UNICODE passed as `count`).
    assert normalize_vqa_answer("." * 40) == "." * 8


def test_vqa_accuracy_is_leave_one_out_over_ten_answers() -> None:
    ten = ["2"] * 3 + ["3"] * 7
    # 3 annotators said "2": leaving out one of them leaves 2 matches (2/3), leaving out another leaves 3 (1).
    assert vqa_accuracy("two", ten) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert vqa_accuracy("Three.", ten) == 1.0
    assert vqa_accuracy("four", ten) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(9 * (1 / 3) / 10)  # 0.3, as the official evaluator gives
    two = ["cat"] * 2 + ["dog"] * 8
    assert vqa_accuracy("the cat", two) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("", ["", *["x"] * 9]) == pytest.approx(0.3)  # empty answers compare like any other
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_gqa_and_seed_matching() -> None:
    assert gqa_match("Yes.", "yes") and gqa_match("left", "left")
    assert not gqa_match("the left", "left")  # GQA does not drop articles
    assert seed_match(" B ", "B") and not seed_match("B.", "B") and not seed_match("b", "B")


@pytest.mark.parametrize("reply, parsed", [
    ("Yes", "yes"), ("No", "no"), ("No.", "no"), ("no, there is not", "no"),
    ("Yes, there is a dog. No other animals.", "yes"),  # only the first sentence counts
    ("There is not a dog", "no"), ("Not sure", "yes"),  # case-sensitive "not": the official quirk
    ("NO", "yes"), ("", "yes"), ("Nope", "yes"), ("no.", "no"),
])
def test_pope_parse(reply: str, parsed: str) -> None:
    assert pope_parse(reply) == parsed


def test_pope_metrics() -> None:
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # TP 2, FP 1, TN 1, FN 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 5)
    none_yes = pope_metrics(["no", "no"], ["yes", "no"])  # the official script divides by zero here
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


@pytest.mark.parametrize("reply, parsed", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("not sure", "no"),
    ("none", "no"), ("The answer is yes", "other"), ("", "other"), ("Maybe", "other"), ("nyes", "yes"),
])
def test_mme_parse(reply: str, parsed: str) -> None:
    assert mme_parse(reply) == parsed


def test_mme_scores_sum_acc_and_acc_plus() -> None:
    rows = [("existence", "1.jpg", "Yes", "Yes"), ("existence", "1.jpg", "No", "No"),   # both right
            ("existence", "2.jpg", "Yes", "Yes"), ("existence", "2.jpg", "No", "maybe"),  # other = wrong
            ("code_reasoning", "3.png", "Yes", "no"), ("code_reasoning", "3.png", "No", "No")]
    s = mme_scores(rows)
    assert s["tasks"]["existence"]["acc"] == 0.75 and s["tasks"]["existence"]["acc_plus"] == 0.5
    assert s["tasks"]["existence"]["score"] == pytest.approx(125.0)
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == pytest.approx(50.0)


@pytest.mark.parametrize("reply, n, parsed", [
    ("A", 4, "A"), ("B. Paris", 4, "B"), ("The answer is C.", 4, "C"),
    ("E", 2, None),                       # a letter beyond the choices: wrong
    ("C", 2, None), ("The answer is D.", 3, None),
    ("I think A or B", 4, None),          # FAILED
    ("The answer is A. The answer is B.", 4, None),  # two matches: FAILED
    ("a", 4, None), ("", 4, None), ("B.Paris", 4, None),  # "X. " needs the space
    ("FAILED", 4, None),
])
def test_scienceqa_parse(reply: str, n: int, parsed: str | None) -> None:
    assert scienceqa_parse(reply, n) == parsed


def test_mmbench_parse_and_circular() -> None:
    assert mmbench_parse("B", 4) == "B" and mmbench_parse("(C) a cat", 4) == "C"
    assert mmbench_parse("D", 3) is None and mmbench_parse("a cat", 2, ["a dog", "a cat"]) == "B"
    assert mmbench_parse("The answer is B", 4) == "B" and mmbench_parse("hmm", 4) is None
    res = circular_accuracy([("1", True), ("1", True), ("2", True), ("2", False), ("3", False)])
    assert res["circular_accuracy"] == pytest.approx(1 / 3) and res["single_pass_accuracy"] == pytest.approx(2 / 3)


def test_review_scores_and_relative_score() -> None:
    assert parse_review_scores("8 7\nbecause") == (8.0, 7.0)
    assert parse_review_scores("8,7") == (8.0, 7.0)
    assert parse_review_scores("8, 7") is None  # "8  7" splits into 3 parts: the official script's -1 case
    assert parse_review_scores("8 7 6") is None and parse_review_scores("Assistant 1: 8") is None
    assert parse_review_scores("eight seven") is None
    rel = relative_scores([("conv", (8.0, 6.0)), ("conv", (10.0, 9.0)), ("detail", None), ("detail", (5.0, 5.0))])
    assert rel["conv"]["relative"] == pytest.approx(15 / 18 * 100)
    assert rel["detail"]["relative"] == pytest.approx(100.0) and rel["detail"]["unparsed"] == 1
    assert rel["all"]["relative"] == pytest.approx(20 / 23 * 100) and rel["all"]["judged"] == 3
    assert parse_mmvet_score("0.7") == 0.7 and parse_mmvet_score("1.5") is None and parse_mmvet_score("good") is None
