"""The web chat: a Gradio page that is a client of the OpenAI-compatible API.

It holds no model and no key: every turn is a streamed `/v1/chat/completions` request made with the
official `openai` client, so the page shows exactly what any API client would get, errors included
(the API's own message, shown in a Gradio error toast). When the server requires a key, the page has
a key field and sends what its user types. Analytics are off: the page must not reach the network.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

UI_DEFAULTS = {"temperature": 0.2, "top_p": 1.0, "max_tokens": 256}  # LLaVA's demo uses 0.2
ERROR_TITLE = "API error"


def image_part(path: str | Path) -> dict[str, Any]:
    """An OpenAI image_url part carrying a local file as a base64 data: URI."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _parts(content: Any) -> list[dict[str, Any]]:
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
            parts.append(image_part(path))
    return parts


def _is_error(turn: dict[str, Any]) -> bool:
    return turn["role"] == "assistant" and (turn.get("metadata") or {}).get("title") == ERROR_TITLE


def to_openai_messages(message: dict[str, Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gradio's multimodal message and history -> OpenAI chat messages (consecutive turns of one
    role, as Gradio stores an upload and its text, are merged into one message). Error replies, and
    the user turns that led to them, are left out: the model never saw them."""
    kept: list[dict[str, Any]] = []
    for h in history:
        if _is_error(h):
            while kept and kept[-1]["role"] == "user":
                kept.pop()
        else:
            kept.append(h)
    out: list[dict[str, Any]] = []
    turns = [(h["role"], _parts(h["content"])) for h in kept]
    turns.append(("user", [image_part(f if isinstance(f, str) else f["path"]) for f in message.get("files") or []]
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


def build_ui(api_base: str, model: str, key_required: bool):
    """The Gradio Blocks of the chat page, talking to the API at `api_base` (e.g. http://127.0.0.1:8000/v1)."""
    import gradio as gr
    import openai

    def error(text: str) -> Any:
        gr.Warning(text)
        return gr.ChatMessage(content=text, metadata={"title": ERROR_TITLE})

    async def respond(message: dict[str, Any], history: list[dict[str, Any]], temperature: float, top_p: float,
                      max_tokens: float, api_key: str = "") -> AsyncIterator[Any]:
        client = openai.AsyncOpenAI(base_url=api_base, api_key=api_key or "none", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model=model, messages=to_openai_messages(message, history), stream=True,
                temperature=temperature, top_p=top_p, max_tokens=int(max_tokens))
            text = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    yield text
            if not text:
                yield "(the model gave an empty reply)"
        # Errors become a marked reply (and a toast), not gr.Error: after gr.Error, Gradio 6 leaves
        # the input box disabled, and the user could not try again (e.g. with the right key).
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
    if key_required:
        inputs.append(gr.Textbox(label="API key", type="password"))
    return gr.ChatInterface(
        respond, multimodal=True, additional_inputs=inputs, title=f"vistune: {model}",
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple",
                                     placeholder="Ask about an image (attach it with the clip)"),
        additional_inputs_accordion=gr.Accordion("Settings", open=key_required),
        analytics_enabled=False, flagging_mode="never")


def mount_ui(app: FastAPI, path: str, api_base: str, model: str, key_required: bool, max_file_bytes: int) -> None:
    """Mount the chat page on `app` at `path`, calling the API at `api_base` (its own server's /v1).
    Uploads to the page are capped like API bodies; no server-side rendering (it would start Node)."""
    import gradio as gr

    gr.mount_gradio_app(app, build_ui(api_base, model, key_required), path=path, max_file_size=max_file_bytes,
                        ssr_mode=False)
