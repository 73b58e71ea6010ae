"""A budget on decoded image pixels, shared by all requests: image decoding cannot exhaust memory.

Each image passes the per-image pixel limit, but many at once still add up: in issue 17, eight
concurrent requests of four 4096x4096 one-colour PNGs (58 KB each on the wire) took the server from
0.6 GB to 9.2 GB resident. A request now reserves the pixels of all its images (read from the
headers, before any decoding) and holds them until its images are preprocessed into the model's
small tensors. When the budget is taken, it waits up to `wait_s` for others to finish, then is
refused with 503 and `Retry-After` (the server is busy, not the request wrong). A request larger
than the whole budget waits until it is alone and then runs, so one request at the per-request
limits is always served.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from vistune.serve.limits import RequestError

class PixelBudget:
    """Pixels that may be decoded at once across all requests (call from the event loop)."""

    def __init__(self, total: int, wait_s: float = 10.0) -> None:
        if total < 1:
            raise ValueError("the decode budget must be at least one pixel")
        self.total, self.wait_s, self.in_use = total, wait_s, 0
        self._freed: asyncio.Condition | None = None  # made in the event loop on first use

    @asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` of the budget for the block; 503 with Retry-After if none frees up in time."""
        need = min(pixels, self.total)
        if need <= 0:
            yield
            return
        if self._freed is None:
            self._freed = asyncio.Condition()
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: self.in_use + need <= self.total), self.wait_s)
            except TimeoutError:
                raise RequestError(503, f"the server is decoding {self.in_use:,} image pixels for other requests, "
                                        f"its limit is {self.total:,}; retry shortly", "server_busy",
                                   type_="server_error", retry_after_s=max(1, math.ceil(self.wait_s / 2))) from None
            self.in_use += need
        try:
            yield
        finally:
            async with self._freed:
                self.in_use -= need
                self._freed.notify_all()
