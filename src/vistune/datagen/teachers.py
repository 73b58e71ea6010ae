"""Teachers: whatever writes the replies. Exact keys: `template`, `openai:MODEL`, `hf:PATH`.

A teacher gets a `Request` (the chat messages built from `prompts/`, plus the record and kind, which
only the template teacher reads) and returns a `Reply` with the text, the finish reason and token
usage. Failures that outlast the retries raise `TeacherError`; the pipeline records them as
rejections with the error as reason (5xx, malformed bodies, other 4xx), except timeouts, which no
reply ever answered: those are left undone for a rerun. A teacher that refuses every request alike
(a wrong key, no access, an unknown model, no quota, nothing listening) raises `TeacherUnusable`,
which stops the run at once with nothing recorded for the requests it did not answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vistune.datagen.sources import ImageRecord
from vistune.datagen.template import TemplateTeacher as _Rules
from vistune.errors import RegistryKeyError, VistuneError


@dataclass(frozen=True)
class Request:
    id: str  # the sample id, e.g. "139-detail"
    kind: str
    messages: list[dict[str, str]]  # OpenAI chat format: system, few-shot pairs, the record's context
    record: ImageRecord
    seed: int = 0


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


class TeacherError(VistuneError):
    """The teacher gave no usable response even after retries; `reason` is what the summary counts.
    `unanswered`: no reply came at all (timeouts), so the sample is left for a rerun, not rejected."""

    def __init__(self, reason: str, unanswered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unanswered = unanswered


class TeacherUnusable(VistuneError):
    """Every request would fail alike (wrong key, no access, unknown model, no quota, no server): stop the run."""


# Statuses that say the key, the account or the model is wrong, not this one request.
_FATAL_STATUS = {
    401: "the API key was refused: check OPENAI_API_KEY (or the key the server expects)",
    402: "payment required: check the account's billing",
    403: "the API key may not use this model or endpoint: check its permissions",
    404: "model or endpoint not found: check the model name after `openai:` and that --base-url ends in /v1",
}


def _fatal_reason(error: Any) -> str | None:
    """What to tell the user when an HTTP error means no request can succeed; None for a per-request error."""
    status, code = error.status_code, str(getattr(error, "code", None) or "")
    body = error.body if isinstance(error.body, dict) else {}
    text = " ".join(str(body.get("message", "")).split())[:200]  # the server's words, one line, bounded
    if code == "insufficient_quota":  # OpenAI sends it as a 429, but waiting does not help
        return f"http {status} insufficient_quota ({text}): the account has no quota left"
    if code == "model_not_found" or (status == 400 and "model" in text.lower()
                                     and ("not found" in text.lower() or "does not exist" in text.lower())):
        return f"http {status} ({text}): model not found: check the model name after `openai:`"
    if status in _FATAL_STATUS:
        return f"http {status}{f' ({text})' if text else ''}: {_FATAL_STATUS[status]}"
    return None


class Teacher(Protocol):
    name: str
    prices: tuple[float, float] | None  # per 1M prompt tokens, per 1M completion tokens

    async def complete(self, request: Request) -> Reply: ...


class TemplateTeacher:
    """Offline and deterministic: the same (seed, sample id) always gives the same reply."""

    name = "template"
    prices = None

    def __init__(self, conversation_boxes: bool = True) -> None:
        self.rules = _Rules(conversation_boxes=conversation_boxes)

    async def complete(self, request: Request) -> Reply:
        rng = random.Random(f"{request.seed}:{request.id}:template")  # str seeds hash stably (sha512)
        return Reply(self.rules.reply(request.record, request.kind, rng))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter; `Retry-After` wins when the server sends it."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0  # a longer Retry-After is capped here rather than obeyed blindly

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after)
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** attempt))


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) / scale
            except ValueError:
                return None  # an HTTP date: rare from APIs; fall back to backoff
    return None


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions endpoint, through the `openai` AsyncOpenAI client.

    Retries are ours, with the client's own turned off (`max_retries=0`): the client's backoff
    constants are module-level (0.5 s to 8 s) and cannot be set per client (tests need milliseconds,
    a night-long run may want minutes), and it does not retry a 200 whose body is malformed or has no
    choices. Our loop retries 408/409/429/5xx, timeouts, connection errors and malformed bodies.
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 temperature: float = 0.2, max_tokens: int = 1024, timeout: float = 120.0,
                 retry: RetryPolicy | None = None, prices: tuple[float, float] | None = None,
                 seed: int = 0) -> None:
        import openai

        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url is None:
                raise VistuneError("openai teacher: set OPENAI_API_KEY (or give --base-url for a local server)")
            key = "none"  # local servers (vLLM, llama.cpp, Ollama) ignore it, the client insists on one
        self.name = f"openai:{model}"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retry = retry or RetryPolicy()
        self.prices = prices
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self._where = f" at {base_url}" if base_url else ""
        self._rng = random.Random(seed)  # jitter only; never affects the data

    async def complete(self, request: Request) -> Reply:
        import openai

        last = "unknown error"
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                resp = await self.client.chat.completions.create(
                    model=self.model, messages=request.messages,  # type: ignore[arg-type]
                    temperature=self.temperature, max_tokens=self.max_tokens)
                if not resp.choices:
                    raise ValueError("response has no choices")
                choice = resp.choices[0]
                usage = resp.usage
                return Reply(choice.message.content or "", choice.finish_reason,
                             usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, attempt)
            except openai.APIStatusError as e:
                status = e.status_code
                last = f"http {status}"
                fatal = _fatal_reason(e)
                if fatal is not None:
                    raise TeacherUnusable(f"teacher {self.name}{self._where}: {fatal}; stopped, nothing recorded "
                                          "for unanswered requests: fix it and run the same command again") from None
                if status not in (408, 409, 429) and status < 500:
                    raise TeacherError(f"teacher error: http {status}") from None  # our request is wrong
                retry_after = _retry_after(e.response.headers)
            except openai.APITimeoutError:  # before APIConnectionError, its parent class
                last = "timeout"
            except openai.APIConnectionError:
                last = "connection error"
            except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError) as e:
                # A 200 with a body that is not a chat completion (JSON decode errors are ValueErrors).
                last = f"malformed response ({type(e).__name__})"
            if attempt < self.retry.max_retries:
                await asyncio.sleep(self.retry.delay(attempt, retry_after, self._rng))
        tries = self.retry.max_retries + 1
        if last == "connection error":  # nothing listens there: every other request would fail the same way
            raise TeacherUnusable(f"teacher {self.name}{self._where}: connection failed {tries} times; check that the "
                                  "server is running and --base-url; stopped, run the same command again to continue")
        raise TeacherError(f"teacher error: {last} after {tries} tries", unanswered=last == "timeout")


class HFTeacher:
    """A local Hugging Face causal LM run in-process (a folder, or a GGUF file) with its chat template.

    Generation runs in a worker thread, one request at a time (a lock), so the event loop stays free
    and concurrency > 1 just queues."""

    prices = None

    def __init__(self, path: str, gguf_file: str | None = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, repetition_penalty: float | None = None, device: str | None = None) -> None:
        from vistune.model.llm import load_llm, load_tokenizer

        p = Path(path)
        if gguf_file is None and p.suffix == ".gguf":
            p, gguf_file = p.parent, p.name
        self.name = f"hf:{path}"
        self.tokenizer = load_tokenizer(p, gguf_file)
        if self.tokenizer.chat_template is None:
            raise VistuneError(f"hf teacher: the tokenizer of {path} has no chat template; use an instruct model")
        self.model = load_llm(p, gguf_file).eval()
        if device:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty  # small greedy models loop; 1.2-1.3 curbs it
        self._lock = threading.Lock()

    def _generate(self, request: Request) -> Reply:
        import torch

        ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        ids = ids.to(self.model.device)  # [1, T]
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if self.temperature > 0:
            kwargs["temperature"] = self.temperature
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{request.seed}:{request.id}".encode()))
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        stopped = len(out) > 0 and int(out[-1]) in eos_ids
        finish = "stop" if stopped or len(out) < self.max_new_tokens else "length"
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return Reply(text, finish, int(ids.shape[1]), len(out))

    async def complete(self, request: Request) -> Reply:
        return await asyncio.to_thread(self._generate, request)


TEACHERS = {"template": "template", "openai": "openai:MODEL", "hf": "hf:PATH"}


def get_teacher(spec: str, **options: Any) -> Teacher:
    """`template`, `openai:MODEL` (options: base_url, api_key, temperature, max_tokens, timeout, retry,
    prices) or `hf:PATH` (options: gguf_file, max_new_tokens, temperature, repetition_penalty, device)."""
    kind, _, arg = spec.partition(":")
    if kind == "template" and not arg:
        return TemplateTeacher(**options)
    if kind == "openai" and arg:
        return OpenAITeacher(arg, **options)
    if kind == "hf" and arg:
        return HFTeacher(arg, **options)
    raise RegistryKeyError(f"unknown teacher {spec!r}; valid: {', '.join(TEACHERS.values())}")
