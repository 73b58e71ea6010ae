"""The server under attack: every request an attacker (or an unlucky client) sent in issue 17, in
plain HTTP against a real uvicorn server on loopback. Each case names the issue item it guards.

The chat page (/ui) is probed through every event its own /config declares, without the key and
with it, with a chatbot history that points at a server file (/etc/passwd and the model's weights).

Issue 17 item -> tests: 1 test_ui_* (without the key, with it, uploads, cleanup, the page still
answering); 2 test_out_of_range_sampling_*, test_edge_sampling_*, test_one_bad_request_fails_alone_*;
4 test_the_decode_budget_*; 9 test_half_sent_requests_are_cut_off; 10 test_a_lone_surrogate_is_400;
11 test_history_is_not_label_checked_*, test_prompts_encode_as_training_does_*; 15
test_errors_show_no_reprs_or_server_paths; 16 test_health_is_open_and_bare_*. Issue 21 item 12:
test_legacy_completions_*, test_serve_takes_vllms_flags. The rest held before issue 17.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import uuid
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
from vistune.infer.engine import Engine
from vistune.serve.api import create_app
from vistune.serve.limits import Limits

KEY = "abuse-key"
MODEL = "tiny"
SECRET = Path("/etc/passwd")  # a server file every Linux machine has; its first line starts "root:"


def png_bytes(w: int, h: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(text: str = "hi", **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_body_bytes=100_000, max_images=2, max_image_pixels=128 * 128, max_tokens=64,
                max_prompt_tokens=120, allowed_image_hosts=("localhost",))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return vistune.load(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def ui_base(engine: Engine) -> Iterator[str]:
    with serving(lambda base: create_app(engine, MODEL, api_key=KEY, ui_path="/ui", ui_api_base=f"{base}/v1",
                                         limits=Limits(max_body_bytes=200_000))) as url:
        yield url


# --------------------------------------------------------------------------------------------------
# Item 1: no server file leaves through the chat page.
# --------------------------------------------------------------------------------------------------


def file_data(path: str | Path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def poisoned_value(component: dict, path: str | Path) -> object:
    """What an attacker sends for one input of a page event: a server path wherever a file can go."""
    kind = component.get("type")
    history = [{"role": "user", "content": [{"type": "file", "file": file_data(path)}]},
               {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    if kind in ("chatbot", "state"):
        return history
    if kind == "multimodaltextbox":
        return {"text": "what is it?", "files": [file_data(path)]}
    if kind == "slider":
        return component.get("props", {}).get("value", 1)
    if kind == "textbox":
        return "x"
    return None


def page_events(client: httpx.Client, base: str) -> tuple[list[dict], dict[int, dict]]:
    config = client.get(f"{base}/ui/config")
    assert config.status_code == 200, config.text
    body = config.json()
    return body["dependencies"], {c["id"]: c for c in body["components"]}


def join_and_collect(client: httpx.Client, base: str, event: dict, components: dict[int, dict],
                     path: str | Path) -> str:
    """Run one page event with poisoned inputs; everything the server streamed back, as text."""
    session = uuid.uuid4().hex
    data = [poisoned_value(components.get(i, {}), path) for i in event["inputs"]]
    joined = client.post(f"{base}/ui/gradio_api/queue/join",
                         json={"data": data, "fn_index": event["id"], "session_hash": session, "event_data": None})
    if joined.status_code != 200:
        return joined.text
    seen = []
    with client.stream("GET", f"{base}/ui/gradio_api/queue/data", params={"session_hash": session},
                       timeout=60) as r:
        for line in r.iter_lines():
            seen.append(line)
            if '"process_completed"' in line or '"close_stream"' in line:
                break
    return "\n".join(seen)


def _fetch_urls(client: httpx.Client, base: str, text: str) -> list[str]:
    """GET every file URL the server handed back; their bodies."""
    bodies = []
    for token in text.replace('"', " ").split():
        if "file=" in token or "/gradio_api/file" in token:
            url = token if token.startswith("http") else f"{base}{token if token.startswith('/') else '/' + token}"
            bodies.append(client.get(url).text)
    return bodies


def test_ui_without_the_key_serves_nothing(ui_base: str, engine: Engine) -> None:
    """Item 1: with --api-key, nothing under /ui answers without it (the issue's exact request too)."""
    with httpx.Client(timeout=30) as keyed:
        login = keyed.post(f"{ui_base}/login", data={"key": KEY}, follow_redirects=False)
        assert login.status_code in (302, 303), login.text
        events, components = page_events(keyed, ui_base)
    with httpx.Client(timeout=30) as anon:
        probes = [anon.get(f"{ui_base}/ui/"), anon.get(f"{ui_base}/ui/config"),
                  anon.get(f"{ui_base}/ui/gradio_api/info"),
                  anon.get(f"{ui_base}/ui/gradio_api/file={SECRET}"),
                  anon.post(f"{ui_base}/ui/gradio_api/upload", files={"files": ("x.exe", b"MZ" * 100)})]
        for event in events:
            session = uuid.uuid4().hex
            probes.append(anon.post(f"{ui_base}/ui/gradio_api/queue/join", json={
                "data": [poisoned_value(components.get(i, {}), SECRET) for i in event["inputs"]],
                "fn_index": event["id"], "session_hash": session, "event_data": None}))
        for r in probes:
            assert r.status_code in (401, 303), (r.request.url, r.status_code, r.text[:200])
            assert "root:" not in r.text
        # The page itself sends a browser to the login form.
        assert anon.get(f"{ui_base}/ui/", follow_redirects=False).headers.get("location") == "/login"
        assert anon.post(f"{ui_base}/login", data={"key": "wrong"}).status_code == 401


def test_ui_with_the_key_reads_only_its_own_uploads(ui_base: str, engine: Engine, tiny_checkpoint: Path) -> None:
    """Item 1: even logged in, every event the page defines refuses server paths (/etc/passwd, the
    model's weights), and no file URL it hands back serves them."""
    weights = next(p for p in sorted(tiny_checkpoint.rglob("*")) if p.is_file())
    with httpx.Client(timeout=60) as client:
        client.post(f"{ui_base}/login", data={"key": KEY})
        events, components = page_events(client, ui_base)
        backend = [e for e in events if e.get("backend_fn")]
        assert backend, "the page defines no server-side events: the test would check nothing"
        for path in (SECRET, weights):
            secret = path.read_bytes()[:40]
            for event in backend:
                streamed = join_and_collect(client, ui_base, event, components, path)
                assert "root:x" not in streamed and str(path) not in streamed, (event["id"], streamed[:400])
                for body in _fetch_urls(client, ui_base, streamed):
                    assert secret.decode("latin-1") not in body
            r = client.get(f"{ui_base}/ui/gradio_api/file={path}")
            assert r.status_code != 200 or secret.decode("latin-1") not in r.text


def test_ui_uploads_are_images_under_the_cap(ui_base: str) -> None:
    """Item 1: with the key, the upload route takes images only, and only up to the body cap."""
    with httpx.Client(timeout=30) as client:
        client.post(f"{ui_base}/login", data={"key": KEY})
        ok = client.post(f"{ui_base}/ui/gradio_api/upload", files={"files": ("a.png", png_bytes(8, 8))})
        assert ok.status_code == 200, ok.text
        for name, body in (("x.exe", b"MZ" * 100), ("x.html", b"<script>alert(1)</script>"),
                           ("x.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>")):
            r = client.post(f"{ui_base}/ui/gradio_api/upload", files={"files": (name, body)})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_upload", (name, r.text)
        big = client.post(f"{ui_base}/ui/gradio_api/upload", files={"files": ("a.png", b"\x89PNG" + b"\0" * 300_000)})
        assert big.status_code == 413
        for spelling in ("/ui/gradio_api/upload/", "/ui//gradio_api/upload", "/ui/gradio_api//upload", "/ui/upload"):
            r = client.post(f"{ui_base}{spelling}", files={"files": ("x.html", b"<script>alert(1)</script>")})
            assert r.status_code != 200, (spelling, r.text)


def test_ui_uploads_are_deleted_when_the_server_stops(engine: Engine) -> None:
    """Item 1: uploads do not pile up (an hour's age limit while running, all of them at shutdown)."""
    with serving(lambda base: create_app(engine, MODEL, api_key=KEY, ui_path="/ui", ui_api_base=f"{base}/v1")) as base:
        with httpx.Client(timeout=30) as client:
            client.post(f"{base}/login", data={"key": KEY})
            colour = tuple(int(b) for b in uuid.uuid4().bytes[:3])  # content no other test uploads
            up = client.post(f"{base}/ui/gradio_api/upload", files={"files": ("c.png", png_bytes(9, 9, colour))})
            stored = Path(up.json()[0])
            assert stored.is_file()
    assert not stored.exists()


def test_ui_with_the_key_answers_about_an_upload(ui_base: str) -> None:
    """Item 1, the other side: the locked page still works for its user. Upload an image, then run the
    page's `respond` event (what the page's submit runs) on it: a streamed answer, no error."""
    with httpx.Client(timeout=60) as client:
        client.post(f"{ui_base}/login", data={"key": KEY})
        events, components = page_events(client, ui_base)
        up = client.post(f"{ui_base}/ui/gradio_api/upload", files={"files": ("a.png", png_bytes(16, 16))})
        assert up.status_code == 200, up.text
        uploaded = up.json()[0]
        respond = next(e for e in events if e.get("api_name") == "respond")
        values = [poisoned_value(components.get(i, {}), uploaded) for i in respond["inputs"]]
        session = uuid.uuid4().hex
        joined = client.post(f"{ui_base}/ui/gradio_api/queue/join", json={
            "data": values, "fn_index": respond["id"], "session_hash": session, "event_data": None})
        assert joined.status_code == 200, joined.text
        with client.stream("GET", f"{ui_base}/ui/gradio_api/queue/data", params={"session_hash": session}) as r:
            done = next(json.loads(line[6:]) for line in r.iter_lines()
                        if line.startswith("data: ") and '"process_completed"' in line)
    assert done["success"], done
    assert "API error" not in json.dumps(done["output"]) and "not a file uploaded" not in json.dumps(done["output"])


# --------------------------------------------------------------------------------------------------
# The API: hostile values, one bad row in a batch, slow clients, leaks in errors.
# --------------------------------------------------------------------------------------------------

FAULT_SEED = 666


class FaultyEngine(Engine):
    """An engine whose model fails on any batch holding a request with seed 666 (a stand-in for a
    fault that only one row's values trigger)."""

    def run(self, jobs):
        if any(j.sampling.seed == FAULT_SEED for j in jobs):
            raise RuntimeError("injected fault")
        return super().run(jobs)


@pytest.fixture(scope="module")
def api(engine: Engine) -> Iterator[str]:
    faulty = FaultyEngine(engine.bundle)
    # A long batching window, so that concurrent requests really share a batch.
    with serving(lambda _: create_app(faulty, MODEL, api_key=KEY, max_batch_size=16, max_wait_ms=300,
                                      max_model_len=200, limits=LIMITS)) as url:
        yield url


def post(base: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{base}/v1/chat/completions", content=body, timeout=timeout,
                          headers={**AUTH, "Content-Type": "application/json"})
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=timeout)


OUT_OF_RANGE = {  # item 2: each crashed its whole batch with a 500
    "seed": 18446744073709551616, "temperature": 1e-45, "top_p": 0.0, "max_tokens": 0,
}


@pytest.mark.parametrize("field", list(OUT_OF_RANGE))
def test_out_of_range_sampling_is_400_naming_the_field(api: str, field: str) -> None:
    r = post(api, ask(**{field: OUT_OF_RANGE[field]}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_edge_sampling_values_are_served(api: str) -> None:
    """The ends of each range are valid and answered (a tiny top_p keeps the likeliest token)."""
    for extra in ({"seed": 2**63 - 1, "temperature": 1.0}, {"seed": 0, "temperature": 0.01}, {"top_p": 1e-300},
                  {"temperature": 0}, {"temperature": 2.0, "seed": 3}):
        assert post(api, ask(**extra)).status_code == 200, extra


def test_one_bad_request_fails_alone_in_its_batch(api: str) -> None:
    """Item 2: eight normal requests sent together with an out-of-range one and one that makes the
    model fail: the eight are answered, the out-of-range one is a 400, the faulty row a 500."""
    bodies = [ask(f"What colour is thing {i}?") for i in range(8)]
    bodies += [ask(seed=18446744073709551616, temperature=1.0), ask(seed=FAULT_SEED, temperature=1.0)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(api, b), bodies))
    assert [r.status_code for r in answers] == [200] * 8 + [400, 500], [r.text[:120] for r in answers]
    stats = httpx.get(f"{api}/stats", headers=AUTH).json()
    assert stats["largest_batch"] >= 3 and stats["running"] == 0  # they did share a batch


def test_a_lone_surrogate_is_400(api: str) -> None:
    """Item 10: "\\ud800" is valid JSON but not valid Unicode text."""
    for body in (ask("hi \ud800 there"), ask(stop=["\udfff"]),
                 {**ask(), "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}):
        r = post(api, json.dumps(body).encode())
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
        assert "surrogate" in r.json()["error"]["message"]


def test_history_is_not_label_checked_and_role_order_has_its_own_code(api: str) -> None:
    """Item 11: any assistant text in the history is fine; a wrong role order is invalid_role_order."""
    for said in ("blue </s> red", "blue <|im_end|> red", "  spaced  "):
        r = post(api, {**ask(), "messages": [{"role": "user", "content": "Name colours."},
                                             {"role": "assistant", "content": said},
                                             {"role": "user", "content": "More?"}]})
        assert r.status_code == 200, (said, r.text)
    for roles in (["user", "user"], ["assistant", "user"], ["user", "system", "user"],
                  ["system", "assistant", "user"]):
        r = post(api, {**ask(), "messages": [{"role": role, "content": "hi"} for role in roles]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_role_order", (roles, r.text)


def test_errors_show_no_reprs_or_server_paths(api: str, ui_base: str) -> None:
    """Item 15: an undecodable image's error had `<_io.BytesIO object at 0x...>` in it."""
    for junk in (b"not an image at all", png_bytes(40, 40)[:-30], b"GIF89a" + b"\0" * 20):
        body = {**ask(), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_uri(junk)}}, {"type": "text", "text": "what?"}]}]}
        r = post(api, body)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and " at 0x" not in message and "<_io" not in message, message
    with httpx.Client(timeout=30) as client:  # the page's upload route, refused files
        client.post(f"{ui_base}/login", data={"key": KEY})
        r = client.post(f"{ui_base}/ui/gradio_api/upload", files={"files": ("x.png", b"junk")})
        assert r.status_code == 400 and "/tmp" not in r.text and " at 0x" not in r.text


def test_health_is_open_and_bare_and_stats_need_the_key(api: str) -> None:
    """Item 16: /health for probes, without the key and without counters; /stats behind the key."""
    r = httpx.get(f"{api}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(f"{api}/stats").status_code == 401
    stats = httpx.get(f"{api}/stats", headers=AUTH).json()
    assert {"completed", "failed", "queued", "running"} <= set(stats)


def test_legacy_completions_point_to_chat_and_max_model_len_holds(api: str) -> None:
    """Issue 21 item 12: /v1/completions is a 404 that says where to go; --max-model-len is the context."""
    r = httpx.post(f"{api}/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=AUTH)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    models = httpx.get(f"{api}/v1/models", headers=AUTH).json()
    assert models["data"][0]["max_model_len"] == 200
    r = post(api, ask("the dog " * 120))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def _closed_within(base: str, data: bytes, seconds: float) -> bool:
    """Send `data` (an unfinished request) and say whether the server hangs up within `seconds`."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(data)
        s.settimeout(seconds)
        try:
            while s.recv(4096):
                pass  # a 408 or similar before the close is fine
            return True
        except (TimeoutError, socket.timeout):
            return False
        except ConnectionResetError:
            return True


def test_half_sent_requests_are_cut_off(engine: Engine) -> None:
    """Item 9: half the headers, or the headers and half the body, then silence: closed."""
    from vistune.serve.server import ServerLimits

    with serving(lambda _: create_app(engine, MODEL), limits=ServerLimits(request_timeout_s=1.0)) as base:
        start = time.monotonic()
        assert _closed_within(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty", 5)
        assert _closed_within(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
                                    b"Content-Type: application/json\r\n\r\n{\"model\": ", 5)
        assert time.monotonic() - start < 8
        assert httpx.post(f"{base}/v1/chat/completions", json=ask()).status_code == 200  # whole requests still go


def test_the_decode_budget_is_shared_and_answers_503_with_retry_after(engine: Engine) -> None:
    """Item 4: decoding is bounded across requests. While the budget is taken, an image request waits
    `decode_wait_s` and gets a 503 with Retry-After; text-only requests and, once freed, image
    requests are served. A request larger than the whole budget still runs when alone."""
    limits = Limits(max_image_pixels=64 * 64, max_decode_pixels=48 * 48, decode_wait_s=0.3)
    app = create_app(engine, MODEL, limits=limits)
    body = {**ask(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_uri(png_bytes(64, 64))}}, {"type": "text", "text": "what?"}]}]}
    with serving(lambda _: app) as base:
        assert post(base, body).status_code == 200  # 4,096 pixels over a 2,304 budget: alone, it runs
        budget = app.state.budget
        budget.in_use = budget.total  # as if other requests were decoding
        try:
            busy = post(base, body)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy", busy.text
            assert int(busy.headers["Retry-After"]) >= 1
            assert post(base, ask()).status_code == 200  # no image, no decoding
        finally:
            budget.in_use = 0
        assert post(base, body).status_code == 200
        assert budget.in_use == 0  # every reservation was given back


def test_the_decode_budget_admits_up_to_its_total_at_once() -> None:
    """Item 4, the budget alone: reservations add up to at most the total; the next waits its turn."""
    import asyncio

    from vistune.serve.budget import PixelBudget
    from vistune.serve.limits import RequestError

    async def scenario() -> list[str]:
        budget, log = PixelBudget(100, wait_s=5.0), []

        async def job(name: str, pixels: int, hold_s: float) -> None:
            async with budget.reserve(pixels):
                log.append(f"{name}+{budget.in_use}")
                await asyncio.sleep(hold_s)
            log.append(f"{name}-")

        await asyncio.gather(job("a", 60, 0.2), job("b", 60, 0.0))
        short = PixelBudget(10, wait_s=0.05)
        async with short.reserve(10):
            try:
                async with short.reserve(1):
                    log.append("never")
            except RequestError as e:
                log.append(f"{e.status}:{e.retry_after_s}")
        return log

    assert asyncio.run(scenario()) == ["a+60", "a-", "b+60", "b-", "503:1"]


def test_prompts_encode_as_training_does_without_the_label_check(engine: Engine) -> None:
    """Item 11: skipping the label check changes no token of an ordinary prompt."""
    from vistune.chat.formats import Message

    conv = [Message("system", "Be brief."), Message("user", "<image>\nWhat colour?"), Message("assistant", "Red."),
            Message("user", "And the sky?")]
    checked = engine.encoder.encode(conv, "s", add_generation_prompt=True)
    unchecked = engine.encoder.encode(conv, "s", add_generation_prompt=True, check_labels=False)
    assert unchecked.input_ids == checked.input_ids and unchecked.n_supervised == 0


def test_serve_takes_vllms_flags(engine: Engine, tmp_path: Path) -> None:
    """Issue 21 item 12: --dtype, --chat-template (a file or the Jinja itself), --max-model-len."""
    from vistune.cli import parse
    from vistune.errors import VistuneError
    from vistune.serve.template import use_chat_template

    args = parse(["serve", "m", "--dtype", "bfloat16", "--chat-template", "t.jinja", "--max-model-len", "2048"]).keywords
    assert (args["dtype"], args["chat_template"], args["max_model_len"]) == ("bfloat16", "t.jinja", 2048)
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    for given in (template, str(tmp_path / "t.jinja")):
        served = use_chat_template(engine, given)
        prompt = served.prepare([{"role": "user", "content": "Hello there"}])
        assert served.tokenizer.decode(prompt.input_ids).endswith("USER: Hello there\nASSISTANT:")
    assert engine.tokenizer.chat_template != template  # the engine it was given is untouched
    with pytest.raises(VistuneError, match="chat-template"):
        use_chat_template(engine, "{% for %}")
    with pytest.raises(VistuneError, match="no such file"):
        use_chat_template(engine, str(tmp_path / "missing.jinja"))


# --------------------------------------------------------------------------------------------------
# The cases that already held before issue 17 (moved here from test_serve.py): the key, image URLs,
# every per-request limit, malformed bodies.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0, timeout=60)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def bomb_header(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR declaring a w x h canvas, with no pixel data at all (~60 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def image_message(url: str, text: str = "What colour is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_wrong_or_missing_key_is_401(api: str) -> None:
    bad = openai.OpenAI(base_url=f"{api}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # No key at all (the openai client refuses to send none), and every route but /health.
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/stats"),
                             ("GET", "/docs")):
            r = httpx.request(method, f"{api}{path}", headers=headers, json={})
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


LIMIT_CASES = {
    "body size": (413, "request_too_large", lambda: image_message(png_uri(b"\0" * 120_000)), {}),
    "image count": (400, "too_many_images",
                    lambda: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri(png_bytes(8, 8))}}] * 3}], {}),
    "image pixels": (400, "image_too_large", lambda: image_message(png_uri(png_bytes(200, 100))), {}),
    "decompression bomb": (400, "image_too_large", lambda: image_message(png_uri(bomb_header(100_000, 100_000))), {}),
    "max_tokens": (400, "max_tokens_exceeded", lambda: [{"role": "user", "content": "hi"}], {"max_tokens": 65}),
    "prompt length": (400, "context_length_exceeded", lambda: [{"role": "user", "content": "the dog " * 100}], {}),
    "undecodable image": (400, "invalid_image", lambda: image_message(png_uri(b"not an image at all")), {}),
    "bad base64": (400, "invalid_image_url", lambda: image_message("data:image/png;base64,@@@"), {}),
    "truncated image": (400, "invalid_image", lambda: image_message(png_uri(png_bytes(40, 40)[:-30])), {}),
    "unknown role": (400, "invalid_request", lambda: [{"role": "tool", "content": "hi"}], {}),
    "last turn not user": (400, "invalid_messages", lambda: [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "Hello"}], {}),
    "unknown model": (404, "model_not_found", lambda: [{"role": "user", "content": "hi"}], {"model": "gpt-4o"}),
    "n > 1": (400, "invalid_request", lambda: [{"role": "user", "content": "hi"}], {"n": 2}),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_each_limit_and_bad_input_is_a_4xx_in_openai_shape(client: openai.OpenAI, api: str, case: str) -> None:
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
def test_malformed_json_is_400(api: str, body: bytes) -> None:
    r = httpx.post(f"{api}/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_without_content_length_is_413(api: str) -> None:
    """A chunked upload (no Content-Length) is cut off at the cap too."""
    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b" " * 10_000
    r = httpx.post(f"{api}/v1/chat/completions", content=chunks(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
