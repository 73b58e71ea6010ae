"""vistune serve end to end: a real uvicorn server on loopback, driven by the official `openai` client
(and raw httpx where a client cannot send the request): answers equal the engine's, streaming,
images, batching, the API key, image URLs, every limit, malformed input, a server fault, and a
streaming client that hangs up."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from servers import serving

import vistune
from vistune.infer.engine import Engine, Sampling
from vistune.serve.api import create_app
from vistune.serve.limits import Limits

KEY = "test-key"
MODEL = "tiny"
LIMITS = Limits(max_body_bytes=100_000, max_images=2, max_image_pixels=128 * 128, max_tokens=64,
                max_prompt_tokens=120, allowed_image_hosts=("localhost",))


class FaultyEngine(Engine):
    """An engine whose model fails on requests with seed 666: a stand-in for a real server fault."""

    def run(self, jobs):
        if any(j.sampling.seed == 666 for j in jobs):
            raise RuntimeError("injected fault")
        return super().run(jobs)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return FaultyEngine(vistune.load(str(tiny_checkpoint), device="cpu").bundle)


@pytest.fixture(scope="module")
def base(engine: Engine) -> Iterator[str]:
    with serving(lambda _: create_app(engine, MODEL, api_key=KEY, limits=LIMITS, max_batch_size=8)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def bomb_header(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR declaring a w x h canvas, with no pixel data at all (~60 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def image_message(url: str, text: str = "What colour is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_models_health_and_stats(client: openai.OpenAI, base: str) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # open, and nothing beyond the status
    stats = httpx.get(f"{base}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["status"] == "ok" and stats["model"] == MODEL and "completed" in stats


def test_plain_equals_engine(client: openai.OpenAI, engine: Engine, dataset_dir: Path) -> None:
    """Greedy text through HTTP is the engine's own answer; usage counts the prompt's tokens."""
    msgs = image_message(data_uri(dataset_dir / "images" / "img_1.png"))
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12)
    conv = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}]
    image = Image.open(dataset_dir / "images" / "img_1.png").convert("RGB")
    assert r.choices[0].message.content == engine.chat(conv, [image], Sampling(max_new_tokens=12))
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(engine.prepare(conv, [image]).input_ids)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_plain(client: openai.OpenAI, dataset_dir: Path) -> None:
    msgs = image_message(data_uri(dataset_dir / "images" / "img_2.png"))
    kw = {"model": MODEL, "messages": msgs, "temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 == plain.usage.completion_tokens


def test_seed_stop_and_multi_turn(client: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And another one?"}]
    kw = {"model": MODEL, "messages": msgs, "temperature": 1.0, "top_p": 0.9, "max_tokens": 12,
          "extra_body": {"ignore_eos": True}}
    a, b = (client.chat.completions.create(**kw, seed=7).choices[0].message.content for _ in range(2))
    assert a == b
    word = a.split()[1] if len(a.split()) > 1 else a[1:]
    stopped = client.chat.completions.create(**kw, seed=7, stop=[word]).choices[0]
    assert stopped.finish_reason == "stop" and word not in stopped.message.content
    assert a.startswith(stopped.message.content.rstrip())


def test_concurrent_requests_are_batched(client: openai.OpenAI, base: str) -> None:
    questions = [f"What colour is the {w}?" for w in ("sky", "grass", "shape", "dog", "cow", "fish")]

    def ask(q: str) -> str:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                              temperature=0, max_tokens=10).choices[0].message.content
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert together == [ask(q) for q in questions]  # batched replies equal one-at-a-time replies
    assert httpx.get(f"{base}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["largest_batch"] > 1


def test_wrong_or_missing_key_is_401(base: str) -> None:
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # No key at all (the openai client refuses to send none), and every route but /health.
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/stats"),
                             ("GET", "/docs")):
            r = httpx.request(method, f"{base}{path}", headers=headers, json={})
            assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}, path


@pytest.fixture(scope="module")
def image_host(dataset_dir: Path) -> Iterator[int]:
    """A plain HTTP file server on loopback serving the dataset's images; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler,
                                                           directory=str(dataset_dir / "images")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_remote_urls_only_from_allowed_hosts(client: openai.OpenAI, image_host: int, dataset_dir: Path) -> None:
    for url in (f"http://127.0.0.1:{image_host}/img_0.png", "https://example.com/cat.png",
                "file:///etc/passwd", "ftp://localhost/x.png"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=4)
        assert e.value.code in ("image_url_not_allowed", "invalid_image_url"), url
    # localhost is on the allow-list: the server fetches it and answers as for the same data: URI.
    allowed = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                             messages=image_message(f"http://localhost:{image_host}/img_0.png"))
    inline = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                            messages=image_message(data_uri(dataset_dir / "images" / "img_0.png")))
    assert allowed.choices[0].message.content == inline.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:  # allowed host, missing file: a 400 that says so
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=image_message(f"http://localhost:{image_host}/nope.png"))
    assert e.value.code == "image_fetch_failed" and "404" in e.value.message


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


LIMIT_CASES = {
    "body size": (413, "request_too_large", lambda: image_message(_png_uri(b"\0" * 120_000)), {}),
    "image count": (400, "too_many_images",
                    lambda: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_uri(png_bytes(8, 8))}}] * 3}], {}),
    "image pixels": (400, "image_too_large", lambda: image_message(_png_uri(png_bytes(200, 100))), {}),
    "decompression bomb": (400, "image_too_large", lambda: image_message(_png_uri(bomb_header(100_000, 100_000))), {}),
    "max_tokens": (400, "max_tokens_exceeded", lambda: [{"role": "user", "content": "hi"}], {"max_tokens": 65}),
    "prompt length": (400, "context_length_exceeded", lambda: [{"role": "user", "content": "the dog " * 100}], {}),
    "undecodable image": (400, "invalid_image", lambda: image_message(_png_uri(b"not an image at all")), {}),
    "bad base64": (400, "invalid_image_url", lambda: image_message("data:image/png;base64,@@@"), {}),
    "truncated image": (400, "invalid_image", lambda: image_message(_png_uri(png_bytes(40, 40)[:-30])), {}),
    "unknown role": (400, "invalid_request", lambda: [{"role": "tool", "content": "hi"}], {}),
    "last turn not user": (400, "invalid_messages", lambda: [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "Hello"}], {}),
    "unknown model": (404, "model_not_found", lambda: [{"role": "user", "content": "hi"}], {"model": "gpt-4o"}),
    "n > 1": (400, "invalid_request", lambda: [{"role": "user", "content": "hi"}], {"n": 2}),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_each_limit_and_bad_input_is_a_4xx_in_openai_shape(client: openai.OpenAI, base: str, case: str) -> None:
    status, code, messages, extra = LIMIT_CASES[case]
    kwargs = {"model": MODEL, "messages": messages(), "max_tokens": 8, **extra}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == status and e.value.code == code, e.value.message
    body = e.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    # ... and the server still answers.
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body", [b'{"model": "tiny", "messages": [', b"not json", b""])
def test_malformed_json_is_400(base: str, body: bytes) -> None:
    r = httpx.post(f"{base}/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_without_content_length_is_413(base: str) -> None:
    """A chunked upload (no Content-Length) is cut off at the cap too."""
    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b" " * 10_000
    r = httpx.post(f"{base}/v1/chat/completions", content=chunks(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_server_fault_is_500_and_the_server_keeps_serving(client: openai.OpenAI, base: str) -> None:
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, seed=666)
    assert e.value.status_code == 500 and e.value.type == "server_error"
    with pytest.raises(openai.APIError, match="server failed"):  # mid-stream: an error event, the client raises
        list(client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, seed=666, stream=True))
    assert client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4).choices[0].message is not None
    stats = httpx.get(f"{base}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["failed"] >= 2 and stats["running"] == 0


def test_a_disconnected_stream_frees_its_slot(tiny_checkpoint: Path) -> None:
    """One slot (no batching): a stream asked for 1,500 tokens (tens of seconds on this CPU) is dropped
    after its first pieces; its row stops, and the next request is answered at once."""
    engine = vistune.load(str(tiny_checkpoint), device="cpu")
    with serving(lambda _: create_app(engine, MODEL, limits=Limits(max_tokens=1500), max_batch_size=1)) as base:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 1500,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got: list[dict] = []
            for line in lines:
                if line.startswith("data: {"):
                    got.append(json.loads(line[6:]))
                if len(got) >= 4:
                    break
        assert len(got) == 4
        start = time.monotonic()
        r = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and time.monotonic() - start < 10
        stats = httpx.get(f"{base}/stats").json()
        assert stats["cancelled"] == 1 and stats["running"] == 0 and stats["completed"] == 1
