"""A real uvicorn server for an ASGI app, on a free loopback port, in a background thread.

The socket is bound here (port 0: the OS picks a free port) and handed to uvicorn, so there is no
race between finding a port and listening on it. The server is configured as `vistune serve`
configures it (`vistune.serve.server.Config`: read deadline, connection limits).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from vistune.serve.server import Config, ServerLimits


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serving(make_app: Callable[[str], object], timeout_s: float = 30.0,
            limits: ServerLimits = ServerLimits()) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of `make_app(base_url)` served by uvicorn."""
    sock = free_socket()
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(Config(make_app(base), "127.0.0.1", port, limits, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
