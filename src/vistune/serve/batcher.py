"""Dynamic batching: concurrent requests become one `Engine.run` (one `generate`) at a time.

One worker thread owns the model. It waits for a request, then gathers whatever else arrives within
`max_wait_ms` (up to `max_batch_size`), and runs them as one batch; requests that arrive meanwhile
wait for the next batch. Each reply is handed back the moment its own row ends (not when the whole
batch ends), and streamed text is handed over piece by piece. Clients that go away set their
request's cancel flag: a queued request is dropped, a running row ends at the next token, so a
disconnected stream stops costing compute and its slot is free for the next batch.

Results cross from the worker thread to the asyncio event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vistune.infer.engine import Completion, Engine, Job, Prompt, Sampling
from vistune.serve.limits import RequestError

log = logging.getLogger("vistune.serve")


@dataclass
class Ticket:
    """One submitted request: its events arrive on `events` in the event loop's thread."""

    prompt: Prompt
    sampling: Sampling
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) | ("done", Completion) | ("error", exc)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # set by the worker once "done" or "error" was sent
    streamed: bool = False  # set by the worker once a piece of text was sent (a rerun would repeat it)

    def _send(self, kind: str, value: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    async def result(self) -> Completion:
        """The completion of a non-streamed request (raises what the worker raised)."""
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return value  # type: ignore[return-value]
            if kind == "error":
                raise value  # type: ignore[misc]

    async def pieces(self) -> AsyncIterator[str | Completion]:
        """Text pieces as they come, then the Completion."""
        while True:
            kind, value = await self.events.get()
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
            if kind == "done":
                return


@dataclass
class Stats:
    """Counters shown by GET /stats."""

    queued: int = 0
    running: int = 0
    batches: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    largest_batch: int = 0


class Batcher:
    """Collects requests into batches for one engine on one worker thread."""

    def __init__(self, engine: Engine, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 512) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = Stats()
        self._lock = threading.Lock()  # guards stats
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="vistune-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, prompt: Prompt, sampling: Sampling, stream: bool) -> Ticket:
        """Queue a request; call from the event loop's thread. 429 when the queue is full."""
        with self._lock:
            if self.stats.queued >= self.max_queue:
                raise RequestError(429, f"the server has {self.stats.queued} requests waiting; retry later",
                                   "server_busy", type_="rate_limit_error", retry_after_s=1)
            self.stats.queued += 1
        ticket = Ticket(prompt, sampling, stream, asyncio.get_running_loop())
        self._queue.put(ticket)
        return ticket

    def _next_batch(self) -> list[Ticket] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                t = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0)) if self.max_wait_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if t is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(t)
        with self._lock:
            self.stats.queued -= len(batch)
        live = []
        for t in batch:
            if t.cancel.is_set():  # the client left while queued
                self._count("cancelled")
                t.finished = True
            else:
                live.append(t)
        return live

    def _count(self, outcome: str) -> None:
        with self._lock:
            if outcome == "completed":
                self.stats.completed += 1
            elif outcome == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.failed += 1

    def _job(self, t: Ticket) -> Job:
        def on_finish(c: Completion) -> None:
            t.finished = True
            with self._lock:
                self.stats.running -= 1
            self._count("cancelled" if c.finish_reason == "cancelled" else "completed")
            t._send("done", c)

        def on_text(piece: str) -> None:
            t.streamed = True
            t._send("text", piece)

        return Job(t.prompt, t.sampling, on_text if t.stream else None, t.cancel, on_finish)

    def _fail(self, t: Ticket, e: Exception) -> None:
        t.finished = True
        with self._lock:
            self.stats.running -= 1
        self._count("failed")
        t._send("error", e)

    def _run(self, batch: list[Ticket]) -> None:
        """Run a batch. If the model fails on it, rerun its unfinished rows one by one, so that only the
        row at fault fails (issue 17: one bad request failed its whole batch); a row that has already
        streamed text cannot be rerun without repeating it, so it fails with the batch."""
        try:
            self.engine.run([self._job(t) for t in batch])
        except Exception as e:  # a fault in the model: keep serving the others and the next batches
            log.exception("batch of %d failed", len(batch))
            for t in [t for t in batch if not t.finished]:
                if len(batch) > 1 and not t.streamed and not t.cancel.is_set():
                    self._run([t])
                else:
                    self._fail(t, e)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            with self._lock:
                self.stats.running += len(batch)
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self._run(batch)
