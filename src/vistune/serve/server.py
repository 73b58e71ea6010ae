"""The HTTP server around the app: uvicorn with connection limits that a public server needs.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`), the header size (h11's
`max_incomplete_event_size`) and concurrent connections (`limit_concurrency`, answered 503), but it
has no timeout for reading a request: a client that sends half its headers or half its body holds
the connection, and a task, for as long as it likes (issue 17; "slowloris"). `ReadTimeoutH11` adds
one: every request must arrive whole, headers and body, within `request_timeout_s` of the
connection opening or of the previous response, or the connection is closed. It is passed to
uvicorn as its `http` protocol class (uvicorn's own way to choose one); the CLI and the tests'
servers both build their server here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vistune.serve.limits import ServerLimits


class ReadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request (see module docstring)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.request_timeout_s = config.request_timeout_s if isinstance(config, Config) \
            else ServerLimits.request_timeout_s
        self._read_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.request_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request arrived whole; the app's own time is not bounded here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this keep-alive connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app, if it was reading the body, sees a disconnect


class Config(uvicorn.Config):
    """uvicorn's Config for `app` with `limits` and the read deadline (uvicorn hands its Config to each
    protocol it makes, so the deadline travels on it)."""

    def __init__(self, app: Any, host: str, port: int, limits: ServerLimits = ServerLimits(),
                 log_level: str = "info") -> None:
        super().__init__(app, host=host, port=port, log_level=log_level, lifespan="on", http=ReadTimeoutH11,
                         timeout_keep_alive=limits.timeout_keep_alive_s, limit_concurrency=limits.limit_concurrency,
                         h11_max_incomplete_event_size=limits.max_header_bytes)
        self.request_timeout_s = limits.request_timeout_s
