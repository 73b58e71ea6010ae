"""A loopback OpenAI-compatible judge and predictions files, shared by the eval tests of every layer.

`FakeJudge` answers chat completions on a free 127.0.0.1 port in a background thread, as the judge
server `vistune eval --judge openai:...` talks to; `write_preds` writes a task's predictions.jsonl as
`vistune eval` does, so scoring can be tested from known replies without a model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def write_preds(out: Path, task: str, replies: dict[str, str]) -> None:
    (out / task).mkdir(parents=True, exist_ok=True)
    (out / task / "predictions.jsonl").write_text("".join(json.dumps({"id": k, "prompt": "", "reply": v}) + "\n"
                                                          for k, v in replies.items()))


class FakeJudge:
    """Chat completions: LLaVA-Bench reviews "8 6", MM-Vet grades "0.5"; garbage when the request
    mentions "[unparseable]"; a 500 on the first request (the client must retry)."""

    def __init__(self, answer: Callable[[str], str] | None = None) -> None:
        self.answer = answer
        self.requests = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests += 1
                    first = judge.requests == 1
                text = body["messages"][-1]["content"]
                if first:
                    status, payload = 500, {"error": {"message": "try again"}}
                else:
                    reply = judge.answer(text) if judge.answer else ("no idea" if "[unparseable]" in text else
                             "0.5" if "Correctness" in text else "8 6\nAssistant 2 is less detailed.")
                    status, payload = 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                            "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": reply}}],
                                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
