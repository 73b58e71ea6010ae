"""An LLM judge behind any OpenAI-compatible chat-completions endpoint, retried and cached on disk.

`--judge openai:MODEL --judge-base-url URL` builds one. Transport errors (429, 5xx, timeouts,
refused connections) are retried by the openai client itself with exponential backoff. Every reply is
appended to a JSON-lines cache keyed by a hash of the full request, so a rerun, or a run resumed
after a crash, asks only what it has not asked yet; a torn last line (a crash mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from vistune.errors import DataError, RegistryKeyError

JUDGE_KINDS = ("openai",)


class Judge:
    """Chat completions with a disk cache. `calls` counts requests that reached the endpoint."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 cache: Path | None = None, max_retries: int = 6, timeout: float = 120.0) -> None:
        from openai import OpenAI

        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             max_retries=max_retries, timeout=timeout)
        self.cache_path = cache
        self.calls = 0
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}
        if cache is not None and cache.is_file():
            for line in cache.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of an interrupted run
                self._cache[row["key"]] = row["reply"]

    def complete(self, messages: list[dict[str, str]], temperature: float = 0.0, max_tokens: int = 1024,
                 attempt: int = 0) -> str:
        """The judge's reply to `messages` (from the cache when this exact request was made before).

        `attempt` > 0 asks the same request again as a fresh call with its own cache entry (an
        official tool's retry of an unreadable reply), so a rerun replays every attempt for free."""
        request = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        keyed = {**request, "attempt": attempt} if attempt else request  # attempt 0 keeps the keys of earlier caches
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if key in self._cache:
            return self._cache[key]
        from openai import OpenAIError

        try:
            response = self.client.chat.completions.create(**request)  # type: ignore[arg-type]
        except OpenAIError as e:
            raise DataError(f"judge {self.model}: request failed after retries ({e})", "judge error") from None
        reply = response.choices[0].message.content or ""
        with self._lock:
            self.calls += 1
            self._cache[key] = reply
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "model": self.model, "reply": reply}, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        return reply


def get_judge(spec: str, base_url: str | None = None, cache: Path | None = None, max_retries: int = 6) -> Judge:
    """A judge from `KIND:MODEL`; the only kind is `openai` (any OpenAI-compatible endpoint)."""
    kind, _, model = spec.partition(":")
    if kind not in JUDGE_KINDS or not model:
        raise RegistryKeyError(f"unknown judge {spec!r}; valid: {', '.join(k + ':MODEL' for k in JUDGE_KINDS)}")
    return Judge(model, base_url=base_url, cache=cache, max_retries=max_retries)
