"""The OpenAI-compatible HTTP API: `create_app(engine, ...)` builds the FastAPI app.

Routes: POST /v1/chat/completions (plain or server-sent events), GET /v1/models, GET /health.
Requests are validated by the pydantic models below, in OpenAI's shapes; every error, from a bad
key to a model fault, is answered in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, so the official `openai` client raises its usual
exceptions with a readable message. Generation goes through `serve.batcher` to the one `Engine`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vistune.chat.formats import IMAGE_PLACEHOLDER, Message
from vistune.errors import DataError
from vistune.infer.engine import Completion, Engine, Sampling
from vistune.serve.batcher import Batcher, Ticket
from vistune.serve.limits import Limits, RequestError

log = logging.getLogger("vistune.serve")

# ---------------------------------------------------------------------------------------------------
# Request models: the subset of OpenAI's chat-completions request that a vistune model can honour.
# Unknown extra fields are ignored (clients send e.g. `user`); fields we cannot honour are rejected.
# ---------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; one resolution per model


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; send 0 for greedy decoding
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension (pass it in extra_body): fixed-length replies for benchmarks


# ---------------------------------------------------------------------------------------------------


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


class Guard:
    """ASGI middleware: the API key and the body-size cap, before any route runs.

    Pure ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps streamed
    responses in a way that hides client disconnects, which the batcher needs to see. The body is read
    here up to the cap and replayed to the app, so an oversized upload is never buffered whole.
    Paths under `open_prefix` (the web UI, which asks its user for the key) skip the key check.
    """

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int, open_prefix: str | None) -> None:
        self.app, self.api_key, self.max_body, self.open_prefix = app, api_key, max_body_bytes, open_prefix

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        is_open = self.open_prefix is not None and (path == self.open_prefix or path.startswith(self.open_prefix + "/"))
        if self.api_key is not None and not is_open:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "no API key was given" if not given else "the API key is not valid"
                return await _error_response(401, f"{what}; send it as 'Authorization: Bearer KEY'",
                                             code="invalid_api_key")(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        await _error_response(413, f"the request body is over this server's limit of {self.max_body:,} bytes; "
                                   "send smaller or fewer images", code="request_too_large")(scope, receive, send)


def _messages_and_images(req: ChatCompletionRequest, limits: Limits) -> tuple[list[Message], list]:
    """OpenAI messages -> vistune Messages with <image> placeholders where the image parts were, and
    the decoded images in order. Runs in a worker thread (image decoding, allowed fetches)."""
    image_parts = [(i, p) for i, m in enumerate(req.messages) if isinstance(m.content, list)
                   for p in m.content if isinstance(p, ImagePart)]
    limits.check_image_count(len(image_parts))
    messages, images = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        parts = [m.content or ""] if not isinstance(m.content, list) else m.content
        texts = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + (f"[{j}]" if isinstance(m.content, list) else "")
            if isinstance(part, ImagePart):
                if role != "user":
                    raise RequestError(400, f"{where}: images can only be in user messages", "invalid_image", where)
                data = limits.image_bytes_from_url(part.image_url.url, where)
                images.append(limits.open_image(data, where))
                texts.append(IMAGE_PLACEHOLDER)
                continue
            text = part if isinstance(part, str) else part.text
            if IMAGE_PLACEHOLDER in text:
                raise RequestError(400, f"{where}: the text contains {IMAGE_PLACEHOLDER}, which this server reserves "
                                        "for images; send images as image_url parts", "invalid_content", where)
            texts.append(text)
        messages.append(Message(role, "\n".join(texts)))
    if messages[-1].role != "user":
        raise RequestError(400, f"the last message is from the {messages[-1].role}; it must be from the user",
                           "invalid_messages", "messages")
    return messages, images


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, limits: Limits = Limits(),
               max_batch_size: int = 32, max_wait_ms: float = 5.0, ui_path: str | None = None,
               ui_api_base: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. With ui_path, the Gradio chat page is
    mounted there (see `vistune.serve.ui`); it talks to this API over HTTP at ui_api_base
    (this server's own /v1 URL)."""
    batcher = Batcher(engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    max_length = engine.bundle.spec.model_max_length
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="vistune", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, e: RequestError) -> JSONResponse:
        return _error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            first = next(err for err in errors if err.get("type") == "json_invalid")
            return _error_response(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                                   code="invalid_json")
        shown = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        param = ".".join(str(x) for x in errors[0]["loc"][1:]) if errors else None
        return _error_response(400, f"invalid request: {shown}{more}", param=param or None, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def on_fault(_: Request, e: Exception) -> JSONResponse:
        return _fault_response(e)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **vars(batcher.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "vistune", "max_model_len": max_length}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        if req.model != model_name:
            raise RequestError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                               "model_not_found", "model")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None:
            limits.check_max_tokens(asked)
        messages, images = await run_in_threadpool(_messages_and_images, req, limits)
        try:
            prompt = await run_in_threadpool(engine.prepare, messages, images)
        except DataError as e:
            code = "context_length_exceeded" if e.reason == "prompt too long" else e.reason.replace(" ", "_")
            raise RequestError(400, str(e), code, "messages") from None
        n_prompt = len(prompt.input_ids)
        max_tokens = asked if asked is not None else max(1, min(limits.max_tokens, max_length - n_prompt))
        limits.check_prompt(n_prompt, max_tokens, max_length)
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stops) > 4:
            raise RequestError(400, f"{len(stops)} stop strings; at most 4", "invalid_stop", "stop")
        sampling = Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                            stop=tuple(s for s in stops if s), ignore_eos=req.ignore_eos)
        ticket = batcher.submit(prompt, sampling, req.stream)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(ticket, rid, model_name, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            c = await _await_or_cancel(ticket, request)
        except Exception as e:  # the model failed on this batch: answered here, so the connection stays usable
            return _fault_response(e)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": _usage(c),
        })

    if ui_path is not None:
        from vistune.serve.ui import mount_ui

        if ui_api_base is None:
            raise ValueError("ui_path needs ui_api_base, the URL of this server's /v1")
        mount_ui(app, ui_path, ui_api_base, model_name, key_required=api_key is not None,
                 max_file_bytes=limits.max_body_bytes)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, open_prefix=ui_path)
    return app


def _fault_response(e: Exception) -> JSONResponse:
    log.error("server fault: %s: %s", type(e).__name__, e)
    return _error_response(500, f"the server failed on this request ({type(e).__name__}); it keeps serving, "
                                "retry or report it", "server_error", code="internal_error")


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


async def _await_or_cancel(ticket: Ticket, request: Request) -> Completion:
    """The ticket's completion; if the client hangs up first, cancel the request (its row ends)."""
    result = asyncio.ensure_future(ticket.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=0.5)
            if done:
                return result.result()
            if await request.is_disconnected():
                ticket.cancel.set()
                return await result
    finally:
        if not result.done():
            result.cancel()
            ticket.cancel.set()


async def _sse(ticket: Ticket, rid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format. When the client disconnects, Starlette cancels this
    generator; `finally` then cancels the request so its row stops generating."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                                if choices else []}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for item in ticket.pieces():
            if isinstance(item, str):
                yield chunk({"content": item})
            else:
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield chunk({}, usage=_usage(item), choices=False)
        yield "data: [DONE]\n\n"
    except Exception as e:  # a model fault after the 200 went out: say so in the stream (the client raises)
        log.error("server fault while streaming: %s: %s", type(e).__name__, e)
        yield "data: " + json.dumps(error_body(f"the server failed on this request ({type(e).__name__})",
                                                "server_error", code="internal_error")) + "\n\n"
    finally:
        if not ticket.finished:
            ticket.cancel.set()
