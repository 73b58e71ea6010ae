"""The `openai:` teacher against a real chat-completions server on loopback that injects faults, and
a `vistune datagen instruct` process killed with SIGKILL and resumed.

The server is stdlib `http.server` in a thread. Its replies are a pure function of the request (the
kind, read from the system prompt, and the record's captions), so an interrupted-and-resumed run and
an uninterrupted one must write identical sets. Faults are chosen by a tag in the record's caption
("[fault=...]") and counted per (record, kind), so "fail twice, then answer" is exact.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vistune.datagen.instruct import run_instruct
from vistune.datagen.jsonl import rejects_path
from vistune.datagen.sources import Box, ImageRecord
from vistune.datagen.teachers import RetryPolicy, get_teacher

KINDS = ["conversation", "detail", "complex"]
SRC = Path(__file__).resolve().parents[2] / "src"


def _kind(system: str) -> str:
    return "conversation" if "conversation" in system else "detail" if "paragraph" in system else "complex"


def good_reply(kind: str, context: str) -> str:
    first = context.splitlines()[0]
    if kind == "conversation":
        return f"Question: What does the image show?\nAnswer: {first}\n\nQuestion: Is it outdoors?\nAnswer: Yes, it is."
    if kind == "detail":
        return f"The picture shows this scene: {first} Everything in it is clearly visible and well lit."
    return f"Question: What might happen next?\nAnswer: Given that {first.lower()} the scene will likely stay calm. Nothing suggests a change."


class FaultServer:
    """Chat completions with faults keyed by `[fault=NAME]` in the context. Records every request."""

    def __init__(self, delay: float = 0.0, key: str | None = None, models: tuple[str, ...] | None = None,
                 refuse: tuple[int, bytes] | None = None) -> None:
        self.delay = delay
        self.key = key  # when set, any other bearer token gets OpenAI's 401
        self.models = models  # when set, any other model gets OpenAI's 404 model_not_found
        self.refuse = refuse  # when set, every request gets this (status, body)
        self.attempts: dict[tuple[str, str], int] = {}
        self.times: dict[tuple[str, str], list[float]] = {}
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def send(self, h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        with self.lock:
            self.requests += 1
        if self.key is not None and h.headers.get("Authorization") != f"Bearer {self.key}":
            return self.send(h, 401, b'{"error": {"message": "Incorrect API key provided: sk-wr**ng.", '
                                     b'"type": "invalid_request_error", "code": "invalid_api_key"}}')
        if self.models is not None and body["model"] not in self.models:
            message = f"The model `{body['model']}` does not exist or you do not have access to it."
            return self.send(h, 404, json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                                           "code": "model_not_found"}}).encode())
        if self.refuse is not None:
            return self.send(h, *self.refuse)
        messages = body["messages"]
        kind = _kind(messages[0]["content"])
        context = messages[-1]["content"]
        m = re.search(r"\[fault=([\w-]+)\]", context)
        fault = m.group(1) if m else "none"
        key = (context.splitlines()[0], kind)
        with self.lock:
            n = self.attempts[key] = self.attempts.get(key, 0) + 1
            self.times.setdefault(key, []).append(time.monotonic())
        if self.delay:
            time.sleep(self.delay)
        text, finish = good_reply(kind, context), "stop"
        if fault == "429" and n == 1:
            return self.send(h, 429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0.3"})
        if fault == "500x2" and n <= 2:
            return self.send(h, 500, b'{"error": {"message": "boom"}}')
        if fault == "timeout" and n == 1:
            time.sleep(1.5)  # longer than the client's timeout
        if fault == "slow" and n <= 2:
            time.sleep(1.0)  # longer than the client's timeout, twice
        if fault == "malformed":
            return self.send(h, 200, b'{"id": "x", "choices": [{"message": ')
        if fault == "500":
            return self.send(h, 500, b'{"error": {"message": "down"}}')
        if fault == "400":
            return self.send(h, 400, b'{"error": {"message": "bad request"}}')
        if fault == "empty":
            text = ""
        if fault == "length":
            finish = "length"
        if fault == "coords" and kind == "detail":
            text = "The dog sits at [0.120, 0.400, 0.350, 0.900] near the table in the middle of the room."
        reply = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                 "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
        self.send(h, 200, json.dumps(reply).encode())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FaultServer]:
    s = FaultServer()
    yield s
    s.close()


def _records(faults: list[str]) -> list[ImageRecord]:
    return [ImageRecord(str(i), f"img/{i}.jpg", 640, 480, (f"A dog on a mat number {i}. [fault={f}]", "A small dog."),
                        (Box("dog", (0.1, 0.2, 0.5, 0.9)),)) for i, f in enumerate(faults)]


def _ids(path: Path) -> list[str]:
    """Ids of the complete lines; a run still writing may have left its last line half written."""
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().split("\n")[:-1]]


def test_faults_every_sample_written_or_rejected_once(server: FaultServer, tmp_path: Path) -> None:
    faults = ["none", "429", "500x2", "timeout", "malformed", "500", "400", "empty", "length", "coords"]
    records = _records(faults)
    teacher = get_teacher("openai:fake-model", base_url=server.url, timeout=0.5, prices=(1.0, 2.0),
                          retry=RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.05))
    out = tmp_path / "out.jsonl"
    summary = run_instruct(records, KINDS, teacher, out, concurrency=8, progress=False)
    good, bad = _ids(out), _ids(rejects_path(out))
    assert "rejects" in rejects_path(out).name
    every = {f"{r.id}-{k}" for r in records for k in KINDS}
    assert len(good) == len(set(good)) and len(bad) == len(set(bad)), "a sample was written twice"
    assert set(good) | set(bad) == every and not set(good) & set(bad)
    reasons = {json.loads(line)["id"]: json.loads(line)["reason"] for line in rejects_path(out).read_text().splitlines()}
    by_fault = {f: {reasons.get(f"{i}-{k}") for k in KINDS} for i, f in enumerate(faults)}
    for transient in ("none", "429", "500x2", "timeout"):
        assert by_fault[transient] == {None}, (transient, by_fault[transient])
    assert all(r and r.startswith("teacher error: malformed response") and r.endswith("after 4 tries")
               for r in by_fault["malformed"])
    assert by_fault["500"] == {"teacher error: http 500 after 4 tries"}
    assert by_fault["400"] == {"teacher error: http 400"}
    assert by_fault["empty"] == {"empty reply"}
    assert by_fault["length"] == {"truncated (finish_reason=length)"}
    assert by_fault["coords"] == {None, "leaks coordinates"}
    # Retry-After: 0.3 was honoured (the backoff alone would have waited <= 0.05 s); 400 was not retried.
    t = server.times[("A dog on a mat number 1. [fault=429]", "detail")]
    assert len(t) == 2 and t[1] - t[0] >= 0.28
    assert server.attempts[("A dog on a mat number 2. [fault=500x2]", "complex")] == 3
    assert server.attempts[("A dog on a mat number 6. [fault=400]", "conversation")] == 1
    assert server.attempts[("A dog on a mat number 5. [fault=500]", "conversation")] == 4
    assert summary.n_written == len(good) and summary.n_rejected == len(bad)
    assert summary.rejected["empty reply"] == 3 and summary.retries > 0
    assert summary.cost == pytest.approx((summary.prompt_tokens * 1.0 + summary.completion_tokens * 2.0) / 1e6)
    # Rerunning finds everything done: nothing is asked again, nothing written twice.
    asked = sum(server.attempts.values())
    again = run_instruct(records, KINDS, teacher, out, progress=False)
    assert again.skipped == len(every) and sum(server.attempts.values()) == asked
    assert _ids(out) == good


def _cli(args: list[str], **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OPENAI_API_KEY": "test-key"}
    return subprocess.Popen([sys.executable, "-m", "vistune.cli", "datagen", "instruct", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[arg-type]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    n = 30
    src = tmp_path / "records.jsonl"
    with src.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"im{i:03d}", "image": f"im{i:03d}.jpg", "width": 100, "height": 100,
                                "captions": [f"Scene {i}: a cat beside a lamp."],
                                "boxes": [{"category": "cat", "bbox": [10, 20, 50, 80]}]}) + "\n")
    server = FaultServer(delay=0.02)
    try:
        def args(out: Path) -> list[str]:
            return ["--jsonl", str(src), "--teacher", "openai:fake", "--base-url", server.url, "--out", str(out),
                    "--concurrency", "3", "--seed", "5", "--no-progress"]

        full = tmp_path / "full.jsonl"
        done = _cli(args(full))
        assert done.wait(60) == 0, done.stderr.read().decode()  # type: ignore[union-attr]

        out = tmp_path / "killed.jsonl"
        proc = _cli(args(out))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_ids(out)) < 15:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        partial = _ids(out)
        assert 15 <= len(partial) < 3 * n, "the kill should land mid-run"
        with out.open("ab") as f:  # and a torn last line, as a write cut short would leave
            f.write(b'{"id": "im999-detail", "image": "im9')
        resumed = _cli(args(out))
        assert resumed.wait(60) == 0, resumed.stderr.read().decode()  # type: ignore[union-attr]
        assert f"skipped (already done) {len(partial)}" in resumed.stdout.read().decode()  # type: ignore[union-attr]
    finally:
        server.close()

    def records(path: Path) -> dict[str, str]:
        lines = path.read_text().splitlines()
        ids = [json.loads(line)["id"] for line in lines]
        assert len(ids) == len(set(ids)), "duplicate sample after resume"
        return {json.loads(line)["id"]: line for line in lines}

    assert records(out) == records(full)
    assert len(records(full)) == 3 * n


# -- a teacher that refuses everything stops the run, recording nothing (issue 17 item 7) ---------

@pytest.mark.parametrize("case", ["wrong key", "unknown model", "forbidden", "no quota"])
def test_a_refusing_teacher_stops_the_run_at_once_and_records_nothing(tmp_path: Path, case: str) -> None:
    from vistune.datagen.teachers import TeacherUnusable

    refuse = {"forbidden": (403, b'{"error": {"message": "Project does not have access to model"}}'),
              "no quota": (429, b'{"error": {"message": "You exceeded your current quota", "type": '
                                b'"insufficient_quota", "code": "insufficient_quota"}}')}.get(case)
    server = FaultServer(key="right-key", models=("fake-model",), refuse=refuse)
    records = _records(["none"] * 30)
    out = tmp_path / "out.jsonl"
    try:
        def teacher(key: str, model: str):  # noqa: ANN202
            return get_teacher(f"openai:{model}", base_url=server.url, api_key=key, timeout=5,
                               retry=RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.05))

        bad = teacher("wrong-key" if case == "wrong key" else "right-key", "gpt-nope" if case == "unknown model"
                      else "fake-model")
        expect = {"wrong key": "http 401 .*check OPENAI_API_KEY", "unknown model": "http 404 .*model not found",
                  "forbidden": "http 403 .*may not use this model", "no quota": "insufficient_quota"}[case]
        with pytest.raises(TeacherUnusable, match=expect):
            run_instruct(records, KINDS, bad, out, concurrency=4, progress=False)
        assert server.requests <= 4, "the run went on after the teacher refused"
        assert _ids(out) == [] and _ids(rejects_path(out)) == []  # nothing recorded as done
        server.key, server.models, server.refuse = None, None, None  # the key, model, account fixed
        summary = run_instruct(records, KINDS, teacher("right-key", "fake-model"), out, concurrency=4, progress=False)
        assert summary.skipped == 0 and summary.n_written + summary.n_rejected == 90 and summary.n_written > 0
    finally:
        server.close()


def test_cli_wrong_key_is_one_line_and_the_rerun_does_everything(tmp_path: Path) -> None:
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps({"id": f"im{i}", "image": f"im{i}.jpg", "captions": [f"Scene {i}: a cat."]})
                           + "\n" for i in range(3)))
    server = FaultServer(key="right-key")
    try:
        args = ["--jsonl", str(src), "--teacher", "openai:fake", "--base-url", server.url, "--out",
                str(tmp_path / "o.jsonl"), "--no-progress", "--max-retries", "1"]
        proc = subprocess.run([sys.executable, "-m", "vistune.cli", "datagen", "instruct", *args], capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(SRC), "OPENAI_API_KEY": "wrong"}, timeout=60)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert "http 401" in err and "OPENAI_API_KEY" in err and "run the same command again" in err
        server.key = "test-key"  # the key `_cli` passes: the right one
        again = _cli(args)
        assert again.wait(60) == 0, again.stderr.read().decode()  # type: ignore[union-attr]
        out = again.stdout.read().decode()  # type: ignore[union-attr]
        assert "written 9, rejected 0, skipped (already done) 0" in out
    finally:
        server.close()


def test_unanswered_requests_are_left_for_the_rerun(server: FaultServer, tmp_path: Path) -> None:
    records = _records(["none", "slow"])
    teacher = get_teacher("openai:fake-model", base_url=server.url, timeout=0.3,
                          retry=RetryPolicy(max_retries=1, base_delay=0.01, max_delay=0.02))
    out = tmp_path / "out.jsonl"
    summary = run_instruct(records, KINDS, teacher, out, progress=False)
    assert summary.unfinished == 3 and "unfinished (no reply; run again to retry) 3" in summary.text()
    assert sorted(_ids(out)) == [f"0-{k}" for k in sorted(KINDS)] and _ids(rejects_path(out)) == []
    again = run_instruct(records, KINDS, teacher, out, progress=False)  # the third try is answered
    assert again.skipped == 3 and again.n_written == 3 and again.unfinished == 0


def test_nothing_listening_stops_the_run(tmp_path: Path) -> None:
    import socket

    from vistune.datagen.teachers import TeacherUnusable

    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = get_teacher("openai:fake", base_url=f"http://127.0.0.1:{port}/v1", timeout=2,
                          retry=RetryPolicy(max_retries=1, base_delay=0.01, max_delay=0.02))
    out = tmp_path / "out.jsonl"
    with pytest.raises(TeacherUnusable, match="connection failed 2 times; check that the server is running"):
        run_instruct(_records(["none"] * 5), KINDS, teacher, out, concurrency=2, progress=False)
    assert _ids(out) == [] and _ids(rejects_path(out)) == []
