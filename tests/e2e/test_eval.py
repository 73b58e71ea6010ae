"""`vistune eval`: every task end to end on tiny folders in its published layout, resume, sharding with merge, the judge on loopback (unparseable replies, cache), the demo."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import eval_fixtures
import pytest
from judges import FakeJudge, write_preds

from vistune.eval.metrics import pope_metrics, pope_parse, vqa_accuracy
from vistune.eval.run import evaluate_task, read_predictions, run_eval
from vistune.eval.tasks import TASKS, get_task

UNJUDGED = [t for t in eval_fixtures.WRITERS if not TASKS[t].judged]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    from vistune.infer.engine import Engine

    return Engine.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return eval_fixtures.write_all(tmp_path_factory.mktemp("evaldata"))


def test_every_task_runs_end_to_end(engine, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tasks = list(eval_fixtures.WRITERS)
    results = run_eval(tasks, None, data, out, batch_size=4, max_new_tokens=3, engine=engine)
    metrics = json.loads((out / "metrics.json").read_text())
    table = (out / "results.md").read_text()
    for name in tasks:
        items = get_task(name).load(data / eval_fixtures.WRITERS[name][0])
        preds = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert [p["id"] for p in preds] == [it.id for it in items], name
        assert {k: v for k, v in metrics[name].items() if k != "model"} == json.loads(json.dumps(results[name]))
        assert f"| {name} |" in table
    assert 0 <= metrics["vqav2"]["accuracy"] <= 100 and metrics["pope"]["n"] == 12
    assert set(metrics["mme"]["tasks"]) == {"existence", "code_reasoning"}
    assert metrics["llava_bench"]["note"].startswith("no judge")  # judged tasks without --judge: saved, not scored
    # The scores are those the metric functions give on the saved replies.
    pope_items = get_task("pope").load(data / "pope")
    replies = read_predictions(out / "pope" / "predictions.jsonl")
    adv = [it for it in pope_items if it.meta["category"] == "adversarial"]
    expected = pope_metrics([pope_parse(replies[it.id]) for it in adv], [it.answer for it in adv])["f1"]
    assert metrics["pope"]["per_category"]["adversarial"]["f1"] == pytest.approx(100 * expected)
    vqa_items = get_task("vqav2").load(data / "vqav2")
    vqa_replies = read_predictions(out / "vqav2" / "predictions.jsonl")
    assert metrics["vqav2"]["accuracy"] == pytest.approx(
        100 * sum(vqa_accuracy(vqa_replies[it.id], it.answer) for it in vqa_items) / 3)
    # Submission files in the servers' formats.
    upload = json.loads((out / "vqav2" / "vqav2_answers_upload.json").read_text())
    assert [r["question_id"] for r in upload] == [1000, 1001, 1002]
    assert {r["image"] for r in json.loads((out / "vizwiz" / "vizwiz_answers_upload.json").read_text())} == \
        {"VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"}
    from openpyxl import load_workbook

    ws = load_workbook(out / "mmbench" / "mmbench_submission.xlsx").active
    rows = list(ws.values)
    # as LLaVA's convert_mmbench_for_submission.py (and the authors' upload): prediction 7th, numeric index
    assert rows[0] == ("index", "question", "A", "B", "C", "D", "prediction", "answer") and len(rows) == 4
    assert rows[1][0] == 0 and rows[2][4] is None  # question 1 has no option C: an empty cell
    assert (out / "mme" / "mme_results" / "existence.txt").read_text().count("\n") == 4


class _CountingEngine:
    """Wraps an engine and records how many conversations it was asked."""

    def __init__(self, engine) -> None:
        self.engine, self.bundle, self.asked = engine, engine.bundle, 0

    def generate(self, convs, images, sampling):
        self.asked += len(convs)
        return self.engine.generate(convs, images, sampling)


def test_interrupted_run_resumes(engine, data: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    run_eval(["pope"], None, data, full, batch_size=4, max_new_tokens=3, engine=engine)
    lines = (full / "pope" / "predictions.jsonl").read_text().splitlines()
    cut = tmp_path / "cut"
    (cut / "pope").mkdir(parents=True)
    (cut / "pope" / "predictions.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # torn line
    counting = _CountingEngine(engine)
    run_eval(["pope"], None, data, cut, batch_size=4, max_new_tokens=3, engine=counting)
    assert counting.asked == 12 - 5
    assert (cut / "pope" / "predictions.jsonl").read_text().splitlines() == lines
    assert json.loads((cut / "metrics.json").read_text())["pope"]["f1"] == \
        json.loads((full / "metrics.json").read_text())["pope"]["f1"]


def test_shards_merge_into_the_single_process_result(engine, data: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    one = evaluate_task(get_task("mme"), engine, data, single, batch_size=2, max_new_tokens=3)
    sharded = tmp_path / "sharded"
    assert evaluate_task(get_task("mme"), engine, data, sharded, 2, 3, rank=1, world_size=2) is None
    assert (sharded / "mme" / "predictions.rank1-of-2.jsonl").read_text().count("\n") == 4
    two = evaluate_task(get_task("mme"), engine, data, sharded, 2, 3, rank=0, world_size=2)
    assert not list((sharded / "mme").glob("predictions.rank*"))
    assert [json.loads(x)["id"] for x in (sharded / "mme" / "predictions.jsonl").read_text().splitlines()] == \
        [json.loads(x)["id"] for x in (single / "mme" / "predictions.jsonl").read_text().splitlines()]
    assert one is not None and two is not None and one["tasks"] == two["tasks"]


# --- judged tasks against an OpenAI-compatible server on loopback -----------------------------------

@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    server = FakeJudge()
    yield server
    server.httpd.shutdown()


def test_judged_tasks_with_a_judge_on_loopback(data: Path, tmp_path: Path, fake_judge: FakeJudge,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from vistune.cli import main

    out = tmp_path / "out"
    write_preds(out, "llava_bench", {"0": "A square.", "1": "A red square on white.", "2": "It is not funny."})
    write_preds(out, "llava_bench_coco", {"0": "Red.", "1": "A square."})
    write_preds(out, "mmvet", {"v1_0": "red", "v1_1": "x = -1", "v1_2": "dunno"})
    argv = ["eval", "llava_bench,llava_bench_coco,mmvet", "--data", str(data), "--out", str(out),
            "--judge", "openai:judge-model", "--judge-base-url", fake_judge.url]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    wild = m["llava_bench"]
    assert wild["all"] == pytest.approx(75.0) and wild["unparsed"] == 1  # 6 / 8, the garbage review left out
    assert wild["per_category"]["complex"]["judged"] == 0 and wild["per_category"]["conv"]["relative"] == pytest.approx(75.0)
    assert m["llava_bench_coco"]["all"] == pytest.approx(75.0) and m["llava_bench_coco"]["unparsed"] == 0
    vet = m["mmvet"]
    assert vet["total"] == pytest.approx(50.0) and vet["unparsed"] == 1 and vet["graded"] == 2
    assert set(vet["per_capability"]) == {"rec", "ocr", "math"}
    assert vet["reasked"] == 1 and vet["total_official"] == pytest.approx(100 / 3)  # the unread one as 0.0
    calls = fake_judge.requests
    # one request per item, five re-asks for MM-Vet's unreadable grade, plus the retried 500
    assert calls == 3 + 2 + (3 + 5) + 1
    assert "judge calls this run: 13" in capsys.readouterr().out
    # A rerun costs nothing: every review comes from the cache.
    assert main(argv) == 0
    assert fake_judge.requests == calls
    assert "judge calls this run: 0" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["mmvet"]["total"] == pytest.approx(50.0)


def _sqa_teacher(text: str) -> str:
    """A text-only teacher: knows mammals, cannot see colours; as a judge it picks A for mammals, else C."""
    if "Two students" in text:
        return "A" if "mammal" in text else "C"
    return "A" if "mammal" in text else "I cannot see the image."


@pytest.mark.parametrize("ensemble", ["complement", "judge"])
def test_scienceqa_ensembles_with_a_text_only_teacher(data: Path, tmp_path: Path, ensemble: str) -> None:
    from vistune.eval.judge import get_judge

    server = FakeJudge(_sqa_teacher)
    server.requests = 1  # no injected 500 here
    try:
        out = tmp_path / "out"
        write_preds(out, "scienceqa", {"1": "B", "2": "C"})  # the model: wrong on the mammal, right on the colour
        teacher = get_judge("openai:teacher", server.url, cache=tmp_path / "cache.jsonl")
        m = run_eval(["scienceqa"], None, data, out, judge=teacher,
                     task_options={"scienceqa": {"ensemble": ensemble}})["scienceqa"]
    finally:
        server.httpd.shutdown()
    assert m["img_accuracy"] == 50.0 and m["teacher_accuracy"] == 50.0 and m["teacher_failed"] == 1
    # complement: teacher's A for the mammal, the model's C where the teacher declined.
    # judge: both questions disagree; the teacher picks A and C.
    assert m["ensemble_accuracy"] == 100.0
    assert teacher.calls == (2 if ensemble == "complement" else 4)


# --- the demo world ---------------------------------------------------------------------------------

def test_demo_task_gives_the_demo_evaluations_numbers(engine, tmp_path: Path) -> None:
    """`vistune eval demo` and the demo's own evaluation functions agree on the same world and model."""
    import vistune.demo.evaluate as demo_eval
    from vistune.demo.report import write_report  # noqa: F401  (the report's per_type shape is checked below)
    from vistune.demo.world import build_world
    from vistune.eval.tasks.demo import DemoTask

    world = tmp_path / "world"
    build_world(world, {"train": 2, "test": 10}, seed=0)
    ann = world / "annotations"
    names = {im["id"]: im["file_name"] for im in json.loads((ann / "captions_test.json").read_text())["images"]}
    questions = demo_eval.load_questions(ann / "vqa_questions_test.json", ann / "vqa_annotations_test.json",
                                         world / "test", names, 4, 0)
    with_image = demo_eval.score(questions, demo_eval.ask_all(engine, questions, blind=False))
    blind = demo_eval.score(questions, demo_eval.ask_all(engine, questions, blind=True))
    m = run_eval(["demo"], None, world, tmp_path / "out", batch_size=32, engine=engine,
                 task_options={"demo": {"per_type": 4, "seed": 0}})["demo"]
    assert m["accuracy_with_image"] == with_image["accuracy"] and m["accuracy_blind"] == blind["accuracy"]
    assert m["per_type"] == {t: {"with_image": r["accuracy"], "blind": blind["per_type"][t]["accuracy"], "n": r["n"],
                                 "majority": r["majority"]} for t, r in with_image["per_type"].items()}
    assert m["tiers"] == {t: {"with_image": r["accuracy"], "blind": blind["tiers"][t]["accuracy"], "n": r["n"]}
                          for t, r in with_image["tiers"].items()}
    assert m["n"] == len(questions) == len(DemoTask(per_type=4).questions(world))
