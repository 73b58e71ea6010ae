"""The web chat: a Gradio page that is a client of the OpenAI-compatible API.

It holds no model: every turn is a streamed `/v1/chat/completions` request made with the official
`openai` client, so the page shows exactly what any API client would get, errors included (the API's
own message, shown in a Gradio error toast). When the server requires a key, the whole page sits
behind the login of `serve.guard` and its turns carry the server's key. Analytics are off: the page
must not reach the network.

What the page may read (issue 17, a page that served /etc/passwd): only files uploaded through it.
Uploads are images only (checked from their bytes and name before Gradio stores them), capped at the
API's body limit, and deleted after an hour; Gradio's own check that event inputs name uploaded
files is switched on (see `mount_ui`); the answer handler reads a path only if it lies in Gradio's
upload folder, and its errors never echo a path.
"""

from __future__ import annotations

import base64
import io
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from vistune.serve.guard import error_response, read_body, replay_once
from vistune.serve.limits import IMAGE_FORMATS

UI_DEFAULTS = {"temperature": 0.2, "top_p": 1.0, "max_tokens": 256}  # LLaVA's demo uses 0.2
ERROR_TITLE = "API error"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")  # the names IMAGE_FORMATS go by
UPLOAD_MAX_AGE_S = 3600  # uploads older than this are deleted (checked every 10 minutes) and at shutdown


class NotAnUpload(ValueError):
    """A message names a file that was not uploaded through the page."""


def image_part(path: str | Path, uploads: Path | None = None) -> dict[str, Any]:
    """An OpenAI image_url part carrying a local file as a base64 data: URI. With `uploads`, only a
    file inside that folder (the page's upload folder) is read; anything else is `NotAnUpload`."""
    if uploads is not None and not Path(path).resolve().is_relative_to(uploads.resolve()):
        raise NotAnUpload("an attachment is not a file uploaded through this page; attach it again")
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _parts(content: Any, uploads: Path | None) -> list[dict[str, Any]]:
    """Gradio message content (a string, a file dict, or a list of typed parts) -> OpenAI parts."""
    items = content if isinstance(content, list) else [content]
    parts: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, dict) and item.get("type") == "text":
            parts.append({"type": "text", "text": item["text"]})
        elif isinstance(item, dict) and (item.get("type") == "file" or "path" in item):
            path = item["file"]["path"] if "file" in item else item["path"]
            parts.append(image_part(path, uploads))
    return parts


def _is_error(turn: dict[str, Any]) -> bool:
    return turn["role"] == "assistant" and (turn.get("metadata") or {}).get("title") == ERROR_TITLE


def to_openai_messages(message: dict[str, Any], history: list[dict[str, Any]],
                       uploads: Path | None = None) -> list[dict[str, Any]]:
    """Gradio's multimodal message and history -> OpenAI chat messages (consecutive turns of one
    role, as Gradio stores an upload and its text, are merged into one message). Error replies, and
    the user turns that led to them, are left out: the model never saw them. With `uploads`, files
    outside that folder raise `NotAnUpload`."""
    kept: list[dict[str, Any]] = []
    for h in history:
        if _is_error(h):
            while kept and kept[-1]["role"] == "user":
                kept.pop()
        else:
            kept.append(h)
    out: list[dict[str, Any]] = []
    turns = [(h["role"], _parts(h["content"], uploads)) for h in kept]
    turns.append(("user", [image_part(f if isinstance(f, str) else f["path"], uploads)
                           for f in message.get("files") or []]
                  + ([{"type": "text", "text": message["text"]}] if message.get("text") else [])))
    for role, parts in turns:
        if out and out[-1]["role"] == role:
            out[-1]["content"] += parts
        else:
            out.append({"role": role, "content": list(parts)})
    for m in out:  # assistant turns as plain strings, as every server expects
        if m["role"] == "assistant":
            m["content"] = "".join(p.get("text", "") for p in m["content"])
    return out


def build_ui(api_base: str, model: str, api_key: str | None, uploads: Path):
    """The Gradio Blocks of the chat page, talking to the API at `api_base` (e.g. http://127.0.0.1:8000/v1)
    with the server's key (whoever reaches the page has signed in with it), reading only `uploads`."""
    import gradio as gr
    import openai

    def error(text: str) -> Any:
        gr.Warning(text)
        return gr.ChatMessage(content=text, metadata={"title": ERROR_TITLE})

    async def respond(message: dict[str, Any], history: list[dict[str, Any]], temperature: float, top_p: float,
                      max_tokens: float) -> AsyncIterator[Any]:
        try:
            messages = to_openai_messages(message, history, uploads)
        except NotAnUpload as e:
            yield error(str(e))
            return
        except OSError:  # e.g. an upload deleted after an hour; the path itself is not for the client
            yield error("an attachment is no longer on the server; attach it again")
            return
        client = openai.AsyncOpenAI(base_url=api_base, api_key=api_key or "none", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True,
                temperature=temperature, top_p=top_p, max_tokens=int(max_tokens))
            text = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    yield text
            if not text:
                yield "(the model gave an empty reply)"
        # Errors become a marked reply (and a toast), not gr.Error: after gr.Error, Gradio 6 leaves
        # the input box disabled, and the user could not try again.
        except openai.APIStatusError as e:
            detail = (e.body or {}).get("message") if isinstance(e.body, dict) else None
            yield error(f"{ERROR_TITLE} {e.status_code}: {detail or e.message}")
        except openai.APIConnectionError as e:
            yield error(f"cannot reach the API at {api_base}: {e}")
        finally:
            await client.close()

    inputs = [gr.Slider(0.0, 2.0, UI_DEFAULTS["temperature"], step=0.05, label="Temperature (0 = greedy)"),
              gr.Slider(0.05, 1.0, UI_DEFAULTS["top_p"], step=0.05, label="Top-p"),
              gr.Slider(1, 4096, UI_DEFAULTS["max_tokens"], step=1, label="Max new tokens")]
    return gr.ChatInterface(
        respond, multimodal=True, additional_inputs=inputs, title=f"vistune: {model}",
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple",
                                     placeholder="Ask about an image (attach it with the clip)"),
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
        analytics_enabled=False, flagging_mode="never", delete_cache=(600, UPLOAD_MAX_AGE_S))


class ImageUploadsOnly:
    """ASGI middleware in front of the page's upload route: every file must be an image (its bytes
    open as one of IMAGE_FORMATS, its name ends in an image suffix, so Gradio never serves it as
    HTML); anything else is a 400 and is never stored. Gradio checks file types only when an event
    runs, by which time its upload route has already stored the file."""

    def __init__(self, app: Callable, ui_prefix: str) -> None:
        self.app, self.ui_prefix = app, ui_prefix

    def _is_upload(self, path: str) -> bool:
        # Any spelling that could reach the upload route (a doubled or trailing slash, ...).
        segments = [s for s in path.split("/") if s]
        return path.startswith(self.ui_prefix + "/") and bool(segments) and segments[-1] == "upload"

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not self._is_upload(scope.get("path", "")):
            return await self.app(scope, receive, send)
        body = await read_body(receive)  # already capped by the Guard in front of this
        if body is None:  # the client went away
            return
        problem = await _upload_problem(Request(scope, replay_once(body, receive)))
        if problem is not None:
            return await error_response(400, problem, code="invalid_upload")(scope, receive, send)
        await self.app(scope, replay_once(body, receive), send)


async def _upload_problem(request: Request) -> str | None:
    """Why an upload request is refused, or None when every file in it is an image."""
    try:
        form = await request.form(max_files=16, max_fields=16)
    except (HTTPException, ValueError):  # Starlette answers a malformed form with HTTPException(400)
        return "the upload is not a valid multipart form"
    try:
        files = [v for v in form.values() if not isinstance(v, str)]
        if not files:
            return "the upload has no file"
        for f in files:
            if not (f.filename or "").lower().endswith(IMAGE_SUFFIXES):
                return f"only images can be uploaded ({', '.join(IMAGE_SUFFIXES)})"
            try:
                Image.open(io.BytesIO(await f.read()), formats=IMAGE_FORMATS).verify()
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                return f"an uploaded file is not a readable image ({', '.join(IMAGE_FORMATS)})"
        return None
    finally:
        await form.close()


def mount_ui(app: FastAPI, path: str, api_base: str, model: str, api_key: str | None, max_file_bytes: int) -> None:
    """Mount the chat page on `app` at `path`, calling the API at `api_base` (its own server's /v1).
    Uploads are capped like API bodies and must be images; no server-side rendering (it would start Node)."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    blocks = build_ui(api_base, model, api_key, Path(get_upload_folder()))
    gr.mount_gradio_app(app, blocks, path=path, max_file_size=max_file_bytes, ssr_mode=False, show_error=False,
                        allowed_paths=[])
    # Gradio checks that event inputs name only uploaded files (and not blocked paths) only once its
    # Blocks "has launched", which `launch()` sets and `mount_gradio_app` does not; without it any
    # client could have Gradio copy /etc/passwd into its cache and serve it (issue 17). Setting the
    # flag Gradio's own launch sets turns that check on.
    blocks.has_launched = True
    app.add_middleware(ImageUploadsOnly, ui_prefix=path)
