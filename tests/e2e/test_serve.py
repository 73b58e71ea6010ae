"""vistune serve end to end: a real uvicorn server on loopback, driven by the official `openai` client
(and raw httpx where a client cannot send the request): answers equal the engine's, streaming,
images, batching, a server fault, and a streaming client that hangs up. Hostile input (the key,
image URLs, every limit, malformed bodies, the chat page) is test_serve_abuse.py's."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
