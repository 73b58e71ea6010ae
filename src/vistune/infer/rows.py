"""Per-row decoding controls for one batched `generate` call.

transformers' `generate` applies one set of sampling settings and stop rules to a whole batch. A
server batches requests that each carry their own temperature, top-p, seed, `max_tokens`, stop
strings and a client that may hang up, so these two hooks make those settings per row:

- `RowSampler` (a LogitsProcessor) draws each row's next token with that row's temperature and
  top-p (transformers' own warpers, applied to the row) from that row's seeded `torch.Generator`,
  and hands `generate` a one-hot score row, so `generate` runs greedy and takes exactly that token.
  A seeded request thus gets the same reply whatever else shares its batch.
- `RowTracker` (a StoppingCriteria) follows every row: stop tokens, stop strings, its own token cap,
  cancellation; it decodes the row's text as it grows and hands out the pieces that are final
  (never half a UTF-8 character, never the start of a stop string).
Nothing in transformers does either per row (its warpers and `StopStringCriteria` are batch-wide).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria, TopPLogitsWarper


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. temperature 0 means greedy.

    stop: strings that end the reply (not included in it); ignore_eos: keep going past the model's
    end-of-turn token up to max_new_tokens (for benchmarks with fixed reply lengths).
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class Completion:
    """A finished reply. finish_reason: "stop" (end of turn or a stop string), "length", "cancelled"."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Row:
    """What `RowTracker` knows about one row of the batch while it decodes."""

    sampling: Sampling
    on_text: Callable[[str], None] | None = None  # called with each final piece of text, in order
    cancel: threading.Event | None = None  # set it to end the row early (a client went away)
    on_finish: Callable[[Completion], None] | None = None  # called once, as soon as this row ends
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    emitted: int = 0  # characters of `text` already handed to on_text
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" once finished
    n_generated: int = 0  # tokens the model produced for this row, a stop token included

    def completion(self) -> Completion:
        return Completion(self.text, self.finish_reason or "length", self.prompt_tokens, self.n_generated)


class RowSampler(LogitsProcessor):
    """Each row's next token from its own temperature, top-p and generator (see module docstring)."""

    def __init__(self, samplings: Sequence[Sampling], device: torch.device) -> None:
        self.samplings = list(samplings)
        self.generators: list[torch.Generator | None] = []
        for s in self.samplings:
            if s.greedy:
                self.generators.append(None)
                continue
            g = torch.Generator(device=device)
            if s.seed is None:
                g.seed()  # a fresh non-deterministic seed
            else:
                g.manual_seed(s.seed)
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)  # [B]
        for i, (s, g) in enumerate(zip(self.samplings, self.generators)):
            row = scores[i : i + 1]  # [1, V]
            if g is None:
                chosen[i] = row.argmax(-1)[0]
                continue
            row = row / s.temperature
            if s.top_p < 1.0:
                row = TopPLogitsWarper(s.top_p)(input_ids[i : i + 1], row)
            probs = torch.softmax(row.float(), dim=-1)  # [1, V]
            chosen[i] = torch.multinomial(probs, 1, generator=g)[0, 0]
        out = torch.full_like(scores, float("-inf"))  # [B, V]
        return out.scatter_(1, chosen[:, None], 0.0)


class RowTracker(StoppingCriteria):
    """Ends rows one by one and streams their text (see module docstring)."""

    def __init__(self, rows: Sequence[Row], tokenizer: Any, stop_ids: Sequence[int]) -> None:
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.offset: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.offset is None:  # first call: one token has been generated
            self.offset = input_ids.shape[1] - 1
        last = input_ids[:, -1].tolist()  # [B]
        for row, token in zip(self.rows, last):
            if row.finish_reason is not None:
                continue
            row.n_generated += 1
            if token in self.stop_ids and not row.sampling.ignore_eos:
                self.finish(row, "stop")
                continue
            row.tokens.append(token)
            if row.cancel is not None and row.cancel.is_set():
                self.finish(row, "cancelled")
            elif not self._update(row) and row.n_generated >= row.sampling.max_new_tokens:
                self.finish(row, "length")
        return torch.tensor([r.finish_reason is not None for r in self.rows], device=input_ids.device)

    def _update(self, row: Row) -> bool:
        """Decode the row, emit what is final; True if a stop string ended it."""
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in row.sampling.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            self.finish(row, "stop", text[:cut])
            return True
        row.text = text
        safe = len(text)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            safe = len(text.rstrip("\ufffd"))
        for s in row.sampling.stop:  # hold back a tail that may be the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        self._emit(row, safe)
        return False

    def finish(self, row: Row, reason: str, text: str | None = None) -> None:
        """End a row; its text is `text` (cut at a stop string) or all its tokens decoded."""
        row.finish_reason = reason
        row.text = text if text is not None else self.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()
        self._emit(row, len(row.text))
        if row.on_finish is not None:
            row.on_finish(row.completion())

    @staticmethod
    def _emit(row: Row, end: int) -> None:
        if end > row.emitted and row.on_text is not None:
            row.on_text(row.text[row.emitted : end])
        row.emitted = max(row.emitted, end)
