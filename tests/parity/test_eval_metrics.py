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
    # issue 18 item 6: only a single option letter passes the exact check (the official `--options`
    # is a list); "AB" or "BCD" were substrings of "ABCDE" and came back as the answer.
    ("AB", 4, None), ("BCD", 4, None), ("AB. cat", 4, None),
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


# --------------------------------------------------------------------------------------------------
# Official behaviour pinned after reading the tools' source (see metrics.py's docstring for the files).
# Each case is one where a plausible hand-written rule would score differently.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("3.", "3"),              # the period pattern's "(?!<=\d)" is a lookahead typo: a lookbehind would keep "3."
    ("e.g.", "eg"),           # periods not followed by a digit are deleted, not replaced by a space
    ("none", "0"),            # number map runs before the article check
    ("the one", "1"),
    ("a an the", ""),         # only articles: empty
    ("can't", "can't"),       # "'" is not in the punctuation list
    ("cant", "can't"),
    ("it's", "it 's"),        # "'s" split before the contraction lookup, so no "it's" key is needed
    ("red/blue", "red blue"),  # "/" glued to words -> a space
    ("red / blue", "red blue"),  # "/" next to a space -> deleted (double space collapses on split)
    ("(5)", "5"),
])
def test_m4c_processor_official_cases(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_soft_accuracy_is_not_the_simple_min_formula() -> None:
    # min(1, count/3) over all 10 answers would give 2/3 for 2 matches; the leave-one-out mean gives
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6, as TextVQAAccuracyEvaluator._compute_answer_scores does.
    answers = ["Two"] * 2 + ["three"] * 8
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)
    # 3 matches: 3 * (2/3) + 7 * 1 over 10 = 0.9, not 1.0.
    assert vqa_accuracy("2", ["2"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["x"] * 6) == pytest.approx(1.0)


@pytest.mark.parametrize("reply, parsed", [
    ("I know", "other"),       # "i kn": the search is in the first 4 characters only
    ("know", "no"),            # first 4 characters "know" contain "no"
    ("Yes\n", "yes"),          # calculation.py reads the reply with its newline: the prefix branch decides
    ("I'm not sure", "other"),  # a "contains no/not" rule would say no
    ("no yes", "no"),          # "no y" holds no "yes"
    (" yes", "yes"),           # no strip: " yes"[:4] still holds "yes"
    ("  yes", "other"),        # ...but "  ye" does not
    ("Answer: yes", "other"),  # only the first 4 characters count
])
def test_mme_parse_official_cases(reply: str, parsed: str) -> None:
    assert mme_parse(reply) == parsed


def test_mme_totals_use_only_the_official_subtask_lists() -> None:
    rows = [("OCR", "a.jpg", "yes", "yes"), ("OCR", "a.jpg", "no", "yes"),     # acc .5, acc+ 0 -> 50
            ("text_translation", "b.png", "yes", "yes"), ("text_translation", "b.png", "no", "no"),  # 200
            ("not_a_subtask", "c.jpg", "yes", "yes"), ("not_a_subtask", "c.jpg", "no", "no")]
    s = mme_scores(rows)
    assert s["perception"] == pytest.approx(50.0) and s["cognition"] == pytest.approx(200.0)
    assert s["tasks"]["not_a_subtask"]["score"] == pytest.approx(200.0)  # reported, but in neither total


@pytest.mark.parametrize("reply, gold, ok", [
    ("Yes...", "yes", True),                # rstrip('.') takes every trailing period
    ("Left.", "left", True),
    ("No, it is not.", "no", False),        # no first-word extraction
    ("two", "2", False),                    # no number map (unlike the VQA processor)
    ("the table", "table", False),          # no article removal
    ("yes!", "yes", False),                 # no punctuation removal beyond periods
])
def test_gqa_official_cases(reply: str, gold: str, ok: bool) -> None:
    assert gqa_match(reply, gold) is ok


@pytest.mark.parametrize("reply, ok", [
    ("B", True), ("B ", True),               # the engine strips replies as LLaVA's model_vqa_loader does
    ("(B)", False), ("B. cat", False), ("The answer is B.", False), ("b", False), ("", False),
])
def test_seed_is_exact_letter_equality(reply: str, ok: bool) -> None:
    assert seed_match(reply, "B") is ok


@pytest.mark.parametrize("reply, parsed", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("[C]", "C"), ("**D**", "D"), ("Answer: B", "B"),
    ("The answer is B.", "B"),
    ("A dog on a mat", "A"),          # the "A might be a quantifier" guard is verbose-only
    ("b", None),                      # letters are case sensitive, and "b" is no option text
    ("A or B", None),                 # two letters: the letter step fails, no option text matches
    ("B because C is wrong", None),   # a "leading letter" rule would say B
    ("I pick the cat", "C"),          # text step: exactly one option text in the reply
    ("the cat or a dog", None),       # two option texts
    ("a dog or a cat", "A"),          # "a cat" is not the option text "the cat": one match
    ("Z", None),                      # the official 'Z' (no letter), always wrong
    ("Cannot determine the answer, maybe B", None),  # refusal phrase -> 'Z'
    ("E", None),                      # not an option of a 4-option question
])
def test_mmbench_can_infer_official_cases(reply: str, parsed: str | None) -> None:
    assert mmbench_parse(reply, 4, ["a dog", "a bird", "the cat", "a fish"]) == parsed


def test_mmbench_text_step_is_skipped_for_long_replies() -> None:
    opts = ["cat", "dog"]  # 6 characters: replies over 12 characters skip the text step
    assert mmbench_parse("cat", 2, opts) == "A"
    assert mmbench_parse("it is a cat, yes", 2, opts) is None


def test_circular_group_fails_on_any_wrong_or_unread_pass() -> None:
    res = circular_accuracy([("7", True), ("7", True), ("7", True), ("7", False),
                             ("8", True), ("8", True), ("8", True), ("8", True)])
    assert res["circular_accuracy"] == pytest.approx(0.5) and res["questions"] == 2
