"""The official tools' judge rules on a loopback OpenAI-compatible server: MMBench's GPT option
matcher (VLMEvalKit) and MM-Vet's re-ask with rising temperature (mm-vet_evaluator.py)."""

from __future__ import annotations

import json
from pathlib import Path

import eval_fixtures
import pytest
from judges import FakeJudge, write_preds

from vistune.eval.judge import get_judge
from vistune.eval.mmbench_judge import mmbench_judge_letter, mmbench_matcher_prompt
from vistune.eval.run import run_eval
from vistune.eval.tasks import get_task
from vistune.eval.tasks.judged import grade_mmvet


def test_matcher_prompt_is_vlmevalkits() -> None:
    prompt = mmbench_matcher_prompt("What colour is the square?", ["green", "blue"], "crimson")
    assert prompt.startswith("You are an AI assistant who will help me to match an answer with several options")
    # the template's own "?" after the question, the options as build_option_str lists them
    assert prompt.endswith("Example 3: \nQuestion: What colour is the square??\nOptions: There are several options: \n"
                           "A. green\nB. blue\n\nAnswer: crimson\nYour output: ")
    assert mmbench_matcher_prompt("图中是什么颜色?", ["红"], "红色").startswith("你是一个帮助我匹配答案")
    assert mmbench_judge_letter("B", ["x", "y"]) == "B" and mmbench_judge_letter("Z", ["x", "y"]) == "Z"
    assert mmbench_judge_letter("I cannot tell", ["x", "y"]) is None


class _Matcher:
    """The judge's side: the crimson reply is D, but only on the second ask; 'no idea at all' is Z."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, text: str) -> str:
        self.asked.append(text)
        if "crimson" in text:
            return "D" if sum("crimson" in t for t in self.asked) >= 2 else "Hmm, hard to say."
        return "Z" if "no idea at all" in text else "A"


def test_mmbench_asks_the_judge_only_for_unread_passes_of_open_questions(tmp_path: Path) -> None:
    data = eval_fixtures.mmbench(tmp_path / "mmbench")
    replies = {"0": "A", "1000000": "I think it is the crimson one", "2000000": "C", "3000000": "B",  # q0: judge -> D
               "1": "B", "1000001": "no idea at all",  # q1: judge -> Z, wrong
               "2": "A", "1000002": "hmm", "2000002": "hmm"}  # q2: a read pass is wrong: no judge call
    matcher = _Matcher()
    server = FakeJudge(matcher)
    server.requests = 1  # no injected 500 here
    try:
        out = tmp_path / "out"
        write_preds(out, "mmbench", replies)
        exact = run_eval(["mmbench"], None, data, out)["mmbench"]
        judge = get_judge("openai:matcher", server.url, cache=tmp_path / "cache.jsonl")
        m = run_eval(["mmbench"], None, data, out, judge=judge)["mmbench"]
        assert len(matcher.asked) == 3 and judge.calls == 3  # crimson twice (first reply unreadable), no-idea once
        assert "Options: There are several options: \nA. green\nB. blue\nC. yellow\nD. red\n" in matcher.asked[0]
        # a rerun replays both attempts from the cache
        again = get_judge("openai:matcher", server.url, cache=tmp_path / "cache.jsonl")
        assert run_eval(["mmbench"], None, data, out, judge=again)["mmbench"]["circular_accuracy"] == m["circular_accuracy"]
        assert again.calls == 0 and len(matcher.asked) == 3
    finally:
        server.httpd.shutdown()
    assert exact["circular_accuracy"] == 0.0 and exact["unparsed"] == 4 and exact["matcher"].startswith("exact")
    assert m["circular_accuracy"] == pytest.approx(100 / 3) and m["judge_matched"] == 1
    assert m["unparsed"] == 3 and m["unread_by_rules"] == 4  # q1's Z, q2's two unasked passes


class _Grader:
    """MM-Vet grades: item 'a' fine at once; 'b' readable on the third re-ask; 'c' never."""

    def __init__(self) -> None:
        self.temperatures: dict[str, list[float]] = {"a": [], "b": [], "c": []}

    def __call__(self, text: str, body: dict) -> str:
        key = next(k for k in "abc" if f"question-{k} |" in text)
        self.temperatures[key].append(body["temperature"])
        if key == "a":
            return "0.8"
        if key == "b" and len(self.temperatures["b"]) == 4:
            return "0.6"
        return "seems right"


class _BodyJudge(FakeJudge):
    def __init__(self, grader: _Grader) -> None:
        self.last: dict = {}
        super().__init__(lambda text: grader(text, self.last))


def test_mmvet_reasks_with_rising_temperature_then_gives_up(tmp_path: Path) -> None:
    grader = _Grader()
    server = _BodyJudge(grader)
    server.requests = 1
    seen: list[dict] = []

    class Recording:
        """Wraps the real cached judge to see each request's temperature (the fake server sees bodies)."""

        def __init__(self, inner) -> None:
            self.inner = inner

        def complete(self, messages, temperature=0.0, max_tokens=1024, attempt=0):
            server.last = {"temperature": temperature}
            seen.append({"temperature": temperature, "reask": messages[-1]["content"].endswith("(digit): ")})
            return self.inner.complete(messages, temperature=temperature, max_tokens=max_tokens, attempt=attempt)

    try:
        inner = get_judge("openai:grader", server.url, cache=tmp_path / "cache.jsonl")
        judge = Recording(inner)
        values = {k: grade_mmvet(judge, f"PROMPT\nquestion-{k} | truth | pred | ") for k in "abc"}
        assert inner.calls == 1 + 4 + 6
        cached = Recording(get_judge("openai:grader", server.url, cache=tmp_path / "cache.jsonl"))
        assert {k: grade_mmvet(cached, f"PROMPT\nquestion-{k} | truth | pred | ") for k in "abc"} == values
        assert cached.inner.calls == 0
    finally:
        server.httpd.shutdown()
    assert values == {"a": (0.8, 1), "b": (0.6, 4), "c": (None, 6)}
    assert grader.temperatures["b"] == [0.0, 0.0, 0.5, 1.0]
    assert grader.temperatures["c"] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert [s["reask"] for s in seen[:11]] == [False] + [False, True, True, True] + [False] + [True] * 5


def test_mmvet_task_reports_unparsed_and_the_official_reading(tmp_path: Path) -> None:
    items = get_task("mmvet").load(eval_fixtures.mmvet(tmp_path / "mm-vet"))

    class Fixed:
        def complete(self, messages, temperature=0.0, max_tokens=1024, attempt=0):
            return "nonsense" if "[unparseable]" in messages[-1]["content"] else "1.0"

    m = get_task("mmvet").score(items, {it.id: "x" for it in items}, Fixed())  # type: ignore[arg-type]
    assert m["total"] == 100.0 and m["graded"] == 2 and m["unparsed"] == 1 and m["reasked"] == 1
    assert m["total_official"] == pytest.approx(200 / 3)
    assert json.dumps(m)  # serialisable into metrics.json
