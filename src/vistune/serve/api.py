"""The OpenAI-compatible HTTP API: `create_app(engine, ...)` builds the FastAPI app.

Routes: POST /v1/chat/completions (plain or server-sent events), GET /v1/models, GET /health (open,
status only), GET /stats (counters). The key, the page's login and the body cap are `serve.guard`'s.
Requests are validated by the pydantic models of `serve.schema`, in OpenAI's shapes; every error, from a bad
key to a model fault, is answered in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, so the official `openai` client raises its usual
exceptions with a readable message. Generation goes through `serve.batcher` to the one `Engine`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from vistune.chat.formats import IMAGE_PLACEHOLDER, Message
from vistune.errors import DataError
from vistune.infer.engine import Completion, Engine, Prompt, Sampling
from vistune.serve.batcher import Batcher, Ticket
from vistune.serve.budget import PixelBudget
from vistune.serve.guard import Guard, error_body, error_response
from vistune.serve.limits import Limits, RequestError, ServingLimits, client_safe
from vistune.serve.schema import ChatCompletionRequest, ImagePart

log = logging.getLogger("vistune.serve")


@dataclass
class Parsed:
    """A request's conversation with its images peeked (header read, limits checked, not decoded)."""

    messages: list[Message]
    images: list[Image.Image]
    wheres: list[str]  # each image's part, e.g. messages[0].content[1], for errors

    @property
    def pixels(self) -> int:
        return sum(im.width * im.height for im in self.images)


def _check_role_order(roles: list[str]) -> None:
    """An optional system message, then user and assistant turns alternating, ending with the user:
    what every conversation format renders. Its own error code (issue 17: not a label error)."""
    turns = roles[1:] if roles and roles[0] == "system" else roles
    for i, role in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            at = i + (len(roles) - len(turns))
            raise RequestError(400, f"messages[{at}] is from the {role}, expected the {want}: after an optional "
                                    "system message, user and assistant turns must alternate", "invalid_role_order",
                               f"messages[{at}].role")
    if not turns or turns[-1] != "user":
        raise RequestError(400, f"the last message is from the {roles[-1]}; it must be from the user",
                           "invalid_messages", "messages")


def _parse(req: ChatCompletionRequest, limits: Limits) -> Parsed:
    """OpenAI messages -> vistune Messages with <image> placeholders where the image parts were, and
    the images in order, peeked only. Runs in a worker thread (allowed fetches, header reads)."""
    image_parts = [(i, p) for i, m in enumerate(req.messages) if isinstance(m.content, list)
                   for p in m.content if isinstance(p, ImagePart)]
    limits.check_image_count(len(image_parts))
    roles = ["system" if m.role == "developer" else m.role for m in req.messages]
    _check_role_order(roles)
    messages, images, wheres = [], [], []
    for i, (m, role) in enumerate(zip(req.messages, roles)):
        parts = [m.content or ""] if not isinstance(m.content, list) else m.content
        texts = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + (f"[{j}]" if isinstance(m.content, list) else "")
            if isinstance(part, ImagePart):
                if role != "user":
                    raise RequestError(400, f"{where}: images can only be in user messages", "invalid_image", where)
                images.append(limits.peek_image(limits.image_bytes_from_url(part.image_url.url, where), where))
                wheres.append(where)
                texts.append(IMAGE_PLACEHOLDER)
                continue
            text = part if isinstance(part, str) else part.text
            if IMAGE_PLACEHOLDER in text:
                raise RequestError(400, f"{where}: the text contains {IMAGE_PLACEHOLDER}, which this server reserves "
                                        "for images; send images as image_url parts", "invalid_content", where)
            texts.append(text)
        messages.append(Message(role, "\n".join(texts)))
    return Parsed(messages, images, wheres)


def _prepare(engine: Engine, parsed: Parsed) -> Prompt:
    """Decode the images and make the model's inputs (worker thread, inside the pixel budget)."""
    images = [Limits.decode(im, where) for im, where in zip(parsed.images, parsed.wheres)]
    try:
        return engine.prepare(parsed.messages, images)
    except DataError as e:
        code = "context_length_exceeded" if e.reason == "prompt too long" else e.reason.replace(" ", "_")
        raise RequestError(400, client_safe(str(e)), code, "messages") from None


def _invalid_request(e: RequestValidationError) -> JSONResponse:
    """Pydantic's errors as one 400 naming the fields (loc without pydantic's type tags)."""
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        first = next(err for err in errors if err.get("type") == "json_invalid")
        return error_response(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                              code="invalid_json")

    def field(err: dict) -> str:
        return ".".join(str(x) for x in err["loc"][1:] if not (isinstance(x, str) and ("[" in x or x == "str")))

    shown = "; ".join(f"{field(err) or 'body'}: {client_safe(err['msg'])}" for err in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return error_response(400, f"invalid request: {shown}{more}", param=(field(errors[0]) if errors else None) or None,
                          code="invalid_request")


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, limits: Limits = Limits(),
               max_batch_size: int = ServingLimits.max_batch_size, max_wait_ms: float = ServingLimits.max_wait_ms,
               ui_path: str | None = None, ui_api_base: str | None = None, max_model_len: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. With ui_path, the Gradio chat page is
    mounted there (see `vistune.serve.ui`); it talks to this API over HTTP at ui_api_base
    (this server's own /v1 URL). max_model_len: a context shorter than the model's own."""
    model_max = engine.bundle.spec.model_max_length
    batcher = Batcher(engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    service = _Service(engine, model_name, limits, batcher, PixelBudget(limits.max_decode_pixels, limits.decode_wait_s),
                       max_length=min(model_max, max_model_len or model_max))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="vistune", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.batcher, app.state.budget = service.batcher, service.budget
    _answer_errors_as_openai(app)
    _add_routes(app, service)
    if ui_path is not None:
        from vistune.serve.ui import mount_ui

        if ui_api_base is None:
            raise ValueError("ui_path needs ui_api_base, the URL of this server's /v1")
        mount_ui(app, ui_path, ui_api_base, model_name, api_key=api_key, max_file_bytes=limits.max_body_bytes)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, ui_prefix=ui_path)
    return app


@dataclass
class _Service:
    """What the routes share: the engine behind its batcher, the limits, the decode budget."""

    engine: Engine
    model_name: str
    limits: Limits
    batcher: Batcher
    budget: PixelBudget
    max_length: int  # the context: the model's, or the shorter max_model_len
    created: int = field(default_factory=lambda: int(time.time()))

    async def prompt(self, req: ChatCompletionRequest) -> tuple[Prompt, int | None]:
        """The request checked and made into the model's inputs; and the max_tokens it asked for."""
        if req.model != self.model_name:
            raise RequestError(404, f"model {req.model!r} is not served here; this server serves "
                                    f"{self.model_name!r}", "model_not_found", "model")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None:
            self.limits.check_max_tokens(asked)
        parsed = await run_in_threadpool(_parse, req, self.limits)
        async with self.budget.reserve(parsed.pixels):
            prompt = await run_in_threadpool(_prepare, self.engine, parsed)
        del parsed  # the decoded images go with it; only the model's small tensors stay
        return prompt, asked

    def sampling(self, req: ChatCompletionRequest, n_prompt: int, asked: int | None) -> Sampling:
        """The request's sampling, its max_tokens fitted into the context when it asked for none."""
        max_tokens = asked if asked is not None else max(1, min(self.limits.max_tokens, self.max_length - n_prompt))
        self.limits.check_prompt(n_prompt, max_tokens, self.max_length)
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stops) > 4:
            raise RequestError(400, f"{len(stops)} stop strings; at most 4", "invalid_stop", "stop")
        return Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                        stop=tuple(s for s in stops if s), ignore_eos=req.ignore_eos)

    async def complete(self, req: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        """POST /v1/chat/completions: one answer, whole or as server-sent events."""
        prompt, asked = await self.prompt(req)
        ticket = self.batcher.submit(prompt, self.sampling(req, len(prompt.input_ids), asked), req.stream)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(ticket, rid, self.model_name, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            c = await _await_or_cancel(ticket, request)
        except Exception as e:  # the model failed on this row: answered here, so the connection stays usable
            return _fault_response(e)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": _usage(c),
        })


def _answer_errors_as_openai(app: FastAPI) -> None:
    """Every error, from a bad request to a model fault, in OpenAI's error shape."""
    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
        return error_response(e.status, e.message, e.type, e.param, e.code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _invalid_request(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def on_fault(_: Request, e: Exception) -> JSONResponse:
        return _fault_response(e)


def _add_routes(app: FastAPI, service: _Service) -> None:
    """/health, /stats, /v1/models, /v1/chat/completions, and a pointer away from /v1/completions."""
    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Open to all (load balancers, probes): nothing beyond the status."""
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """The batcher's counters and the decode budget in use (needs the key)."""
        return {"status": "ok", "model": service.model_name, **vars(service.batcher.stats),
                "decode_pixels_in_use": service.budget.in_use}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                            "owned_by": "vistune", "max_model_len": service.max_length}]}

    @app.post("/v1/completions")
    async def completions() -> JSONResponse:
        return error_response(404, "this server has no /v1/completions (text completions without a chat "
                                   "template); send the prompt as a user message to /v1/chat/completions",
                              code="not_found")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await service.complete(req, request)


def _fault_response(e: Exception) -> JSONResponse:
    log.error("server fault: %s: %s", type(e).__name__, e)
    return error_response(500, f"the server failed on this request ({type(e).__name__}); it keeps serving, "
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
