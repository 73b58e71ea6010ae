"""Each task read from its lmms-lab parquet snapshot gives the items and scores of its JSON layout."""

from __future__ import annotations

import json
from pathlib import Path

import eval_fixtures
import eval_parquet_fixtures
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vistune.errors import DataError
from vistune.eval.run import run_eval
from vistune.eval.tasks import get_task
from vistune.eval.tasks.base import decode_image

TASKS = list(eval_parquet_fixtures.WRITERS)
NO_IDS = {"scienceqa"}  # the parquet has no problem id: items are numbered test/{row}
NO_CONTEXT = {"llava_bench_coco"}  # the parquet has captions but no boxes


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    js = eval_fixtures.write_all(tmp_path_factory.mktemp("json"))
    pq_root = tmp_path_factory.mktemp("parquet")
    for name, writer in eval_parquet_fixtures.WRITERS.items():
        folder = eval_fixtures.WRITERS[name][0]
        writer(js / folder, pq_root / folder)
    return js, pq_root


def _pixels(ref: object) -> np.ndarray:
    image = decode_image(ref)  # type: ignore[arg-type]
    if isinstance(image, Path):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(image)


def _replies(items: list) -> list[str]:
    """Right on every other item (the reference's first answer or letter), a miss elsewhere."""
    out = []
    for k, it in enumerate(items):
        answer = it.answer[0] if isinstance(it.answer, list) else it.answer
        out.append(str(answer) if k % 2 == 0 and answer is not None else "Not sure")
    return out


class _StubJudge:
    """Duck-typed judge: LLaVA-Bench reviews "8 6", MM-Vet grades "0.5"."""

    calls = 0

    def complete(self, messages: list[dict[str, str]], temperature: float = 0.0, max_tokens: int = 1024,
                 attempt: int = 0) -> str:
        self.calls += 1
        return "0.5" if "Correctness" in messages[-1]["content"] else "8 6\nfine"


@pytest.mark.parametrize("name", TASKS)
def test_parquet_layout_yields_the_json_layouts_items_and_scores(folders: tuple[Path, Path], name: str) -> None:
    js, pq_root = folders
    folder = eval_fixtures.WRITERS[name][0]
    from_json, from_parquet = get_task(name).load(js / folder), get_task(name).load(pq_root / folder)
    assert len(from_parquet) == len(from_json) > 0
    for a, b in zip(from_json, from_parquet):
        assert b.id == (f"test/{from_parquet.index(b)}" if name in NO_IDS else a.id)
        assert (b.prompt, b.answer) == (a.prompt, a.answer)
        drop = {"context"} if name in NO_CONTEXT else set()
        assert {k: v for k, v in b.meta.items() if k not in drop} == {k: v for k, v in a.meta.items() if k not in drop}
        assert all(isinstance(ref, bytes) for ref in b.images) and len(b.images) == len(a.images)
        for ra, rb in zip(a.images, b.images):
            assert np.array_equal(_pixels(ra), _pixels(rb))
    judge = _StubJudge()
    replies = _replies(from_json)
    task_j, task_p = get_task(name), get_task(name)
    task_j.load(js / folder), task_p.load(pq_root / folder)
    m_json = task_j.score(from_json, {it.id: r for it, r in zip(from_json, replies)}, judge)
    m_parquet = task_p.score(from_parquet, {it.id: r for it, r in zip(from_parquet, replies)}, judge)
    assert m_parquet == m_json
    assert m_json.get("n") == len(from_json)


def test_parquet_questions_run_through_the_engine(engine, folders: tuple[Path, Path], tmp_path: Path) -> None:
    """Image bytes from the parquet are decoded at batch time and the run scores like the JSON layout's."""
    js, pq_root = folders
    m_p = run_eval(["pope"], None, pq_root, tmp_path / "p", batch_size=4, max_new_tokens=2, engine=engine)["pope"]
    m_j = run_eval(["pope"], None, js, tmp_path / "j", batch_size=4, max_new_tokens=2, engine=engine)["pope"]
    assert (tmp_path / "p" / "pope" / "predictions.jsonl").read_text() == \
        (tmp_path / "j" / "pope" / "predictions.jsonl").read_text()
    assert {k: v for k, v in m_p.items() if k != "submission_files"} == \
        {k: v for k, v in m_j.items() if k != "submission_files"}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    from vistune.infer.engine import Engine

    return Engine.load(tiny_checkpoint, device="cpu")


def test_a_parquet_without_a_needed_column_names_the_file_and_column(tmp_path: Path) -> None:
    shard = tmp_path / "data" / "test-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question_id": "1", "question": "q?", "answer": "yes", "category": "random"}]),
                   shard)
    with pytest.raises(DataError, match=r"test-00000-of-00001\.parquet has no column\(s\) image"):
        get_task("pope").load(tmp_path)


def test_vqav2_testdev_snapshot_lists_the_full_test_ids_in_the_upload(tmp_path: Path) -> None:
    png = {"bytes": _png_bytes(), "path": None}
    pq.write_table(pa.Table.from_pylist([{"question_id": 7, "question": "What?", "image": png, "answers": None,
                                          "answer_type": None}]), _mk(tmp_path / "data" / "testdev-00000-of-00001.parquet"))
    pq.write_table(pa.Table.from_pylist([{"question_id": q, "question": "x", "image": png} for q in (7, 8, 9)]),
                   _mk(tmp_path / "data" / "test-00000-of-00001.parquet"))
    task = get_task("vqav2")
    items = task.load(tmp_path)
    assert [it.id for it in items] == ["7"] and items[0].answer is None
    assert task.score(items, {"7": "yes"})["scored"] == 0
    (path,) = task.write_submission(items, {"7": "Two."}, tmp_path / "out")
    assert json.loads(path.read_text()) == [{"question_id": 7, "answer": "2"}, {"question_id": 8, "answer": ""},
                                            {"question_id": 9, "answer": ""}]


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()
