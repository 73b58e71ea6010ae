"""What a request may ask of the server, and the checks that enforce it before any real work.

Every check raises `RequestError` (an HTTP status, a message and an OpenAI error `code`/`param`),
which the API turns into OpenAI's error shape. Images are the dangerous input: a few KB of PNG can
declare a 100,000 x 100,000 canvas (a decompression bomb), so the pixel count is read from the
header (`Image.open` is lazy) and checked before anything is decoded; only common formats are
opened at all; remote URLs are fetched only from hosts an operator allowed, without redirects,
with a byte cap and a timeout.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

MIB = 1024 * 1024

#: Formats a client may send. PIL can open many more (EPS via Ghostscript, ...): no reason to let them in.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.ASCII)


class RequestError(Exception):
    """A request the server will not serve; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error", retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.retry_after_s = retry_after_s  # sent as Retry-After with 429/503


_INTERNALS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|(?<![\w:/])/(?:[\w.-]+/)+[\w.-]*")


def client_safe(text: str) -> str:
    """`text` without object reprs (`<_io.BytesIO object at 0x...>`) or absolute server paths, which
    library messages carry and a client must not see."""
    return _INTERNALS.sub("...", text)


@dataclass(frozen=True)
class Limits:
    """Per-request limits of the API (the CLI sets them through `ServingLimits`)."""

    max_body_bytes: int = 20 * MIB  # a few base64 images; base64 adds a third
    max_images: int = 4  # per request; each costs the model's image tokens (576 for LLaVA-1.5)
    max_image_pixels: int = 4096 * 4096  # width x height, checked from the header before decoding
    max_tokens: int = 1024  # the most a request may ask for with max_tokens
    max_prompt_tokens: int | None = None  # None: the model's model_max_length
    allowed_image_hosts: tuple[str, ...] = field(default=())  # hosts whose http(s) image URLs may be fetched
    fetch_timeout_s: float = 10.0
    # Pixels decoded at once across all requests (see serve.budget): one request of max_images at
    # max_image_pixels, about 1 GiB at the peak. Requests over it wait up to decode_wait_s, then 503.
    max_decode_pixels: int = 4 * 4096 * 4096
    decode_wait_s: float = 10.0

    def check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens > self.max_tokens:
            raise RequestError(400, f"max_tokens is {max_tokens}, over this server's limit of {self.max_tokens}; "
                                    "ask for fewer", "max_tokens_exceeded", "max_tokens")

    def check_prompt(self, prompt_tokens: int, max_tokens: int, model_max_length: int) -> None:
        limit = min(self.max_prompt_tokens or model_max_length, model_max_length)
        if prompt_tokens > limit:
            raise RequestError(400, f"the prompt is {prompt_tokens} tokens (images included), over the limit of "
                                    f"{limit}; shorten the conversation or send fewer images",
                               "context_length_exceeded", "messages")
        if prompt_tokens + max_tokens > model_max_length:
            raise RequestError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over the "
                                    f"model's context of {model_max_length} tokens; lower max_tokens",
                               "context_length_exceeded", "max_tokens")

    def check_image_count(self, n: int) -> None:
        if n > self.max_images:
            raise RequestError(400, f"the request has {n} images, over this server's limit of {self.max_images}",
                               "too_many_images", "messages")

    def open_image(self, data: bytes, where: str) -> Image.Image:
        """Decode image bytes after checking format and pixel count; `where` names the part in errors."""
        return self.decode(self.peek_image(data, where), where)

    def peek_image(self, data: bytes, where: str) -> Image.Image:
        """The image with its header read and its format and pixel count checked; nothing decoded yet."""
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        except Image.DecompressionBombError as e:  # PIL's own cap (about 179 MP) fires inside open()
            raise RequestError(400, f"{where}: {client_safe(str(e))}", "image_too_large", where) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise RequestError(400, f"{where}: not a readable image in any of {', '.join(IMAGE_FORMATS)}",
                               "invalid_image", where) from None
        w, h = im.size
        if w * h > self.max_image_pixels:
            raise RequestError(400, f"{where}: image is {w}x{h} = {w * h:,} pixels, over this server's limit of "
                                    f"{self.max_image_pixels:,}", "image_too_large", where)
        return im

    @staticmethod
    def decode(im: Image.Image, where: str) -> Image.Image:
        """Decode a peeked image to RGB (the memory-heavy step; see `serve.budget`)."""
        try:
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")  # no second copy of an RGB image
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RequestError(400, f"{where}: the image cannot be decoded ({client_safe(str(e))})", "invalid_image",
                               where) from None

    def image_bytes_from_url(self, url: str, where: str) -> bytes:
        """The bytes behind an image_url: a base64 data: URI, or an http(s) URL on an allowed host."""
        if url.startswith("data:"):
            m = _DATA_URI.match(url)
            if m is None or not m.group("b64"):
                raise RequestError(400, f"{where}: a data: URI must look like data:image/png;base64,...",
                                   "invalid_image_url", where)
            if m.group("mime") and not m.group("mime").startswith("image/"):
                raise RequestError(400, f"{where}: data: URI of type {m.group('mime')}, not an image",
                                   "invalid_image_url", where)
            try:
                return base64.b64decode(url[m.end():], validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, f"{where}: the data: URI is not valid base64", "invalid_image_url",
                                   where) from None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RequestError(400, f"{where}: image URLs must be data: URIs (or http(s) URLs on an allowed host), "
                                    f"not {parts.scheme or 'a bare path'}", "invalid_image_url", where)
        host = (parts.hostname or "").lower()
        if host not in self.allowed_image_hosts:
            raise RequestError(400, f"{where}: fetching images from {host or '(no host)'} is not allowed on this "
                                    "server; send the image as a data: URI (the operator can allow hosts with "
                                    "--allow-image-host)", "image_url_not_allowed", where)
        return self._fetch(url, where)

    def _fetch(self, url: str, where: str) -> bytes:
        import httpx

        # No redirects: a redirect could lead to any host, and the allow-list is about hosts.
        try:
            with httpx.stream("GET", url, timeout=self.fetch_timeout_s, follow_redirects=False) as r:
                if r.status_code != 200:
                    raise RequestError(400, f"{where}: {url} answered HTTP {r.status_code}", "image_fetch_failed",
                                       where)
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise RequestError(400, f"{where}: {url} is over {self.max_body_bytes:,} bytes",
                                           "image_too_large", where)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as e:
            raise RequestError(400, f"{where}: fetching {url} failed ({type(e).__name__}: {client_safe(str(e))})",
                               "image_fetch_failed", where) from None


@dataclass(frozen=True)
class ServerLimits:
    """Connection limits of the HTTP server (`serve.server`; the CLI sets them through `ServingLimits`)."""

    request_timeout_s: float = 30.0  # the whole request (headers and body) must arrive within this
    timeout_keep_alive_s: int = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
    limit_concurrency: int = 256  # open connections and tasks; more are answered 503
    max_header_bytes: int = 16 * 1024  # h11's default: request line and headers together


# The one place the CLI's limits are declared, for `serve` and `ui` alike: the request limits become
# `Limits`, the connection limits `ServerLimits`, the batch size and wait go to the batcher, and every
# default those hold too is read from them. `ui` had its own batch of 8: it is `serve --ui` on another
# port and its page runs on the same batched API, so it now gets serve's 32 (the documented default), a
# cap under load and no cost at one user, since a batch holds only the requests waiting.
@dataclass(frozen=True)
class ServingLimits:
    """Serving limits: batching, per-request limits, connection limits."""

    max_batch_size: int = 32  # requests per generate call (1 = no batching)
    max_wait_ms: float = 5.0  # how long a batch waits to fill up
    max_body_mb: float = Limits.max_body_bytes / MIB  # request body limit, MiB
    max_images: int = Limits.max_images  # images per request
    max_image_pixels: int = Limits.max_image_pixels  # width x height per image
    max_tokens: int = Limits.max_tokens  # the largest max_tokens a request may ask for
    max_prompt_tokens: int | None = Limits.max_prompt_tokens  # None: the model's model_max_length
    allow_image_host: tuple[str, ...] = ()
    """fetch http(s) image URLs from this host; by default no URL is fetched"""
    max_decode_pixels: int | None = None
    """image pixels decoded at once across requests (None: max-images x max-image-pixels)"""
    decode_wait_s: float = Limits.decode_wait_s
    """how long a request waits for decode budget before a 503 with Retry-After"""
    request_timeout_s: float = ServerLimits.request_timeout_s
    """a request's headers and body must arrive within this (slow clients are cut off)"""
    timeout_keep_alive_s: int = ServerLimits.timeout_keep_alive_s  # idle keep-alive connections close after this
    limit_concurrency: int = ServerLimits.limit_concurrency  # open connections; more are answered 503

    def request_limits(self) -> Limits:
        """The per-request limits these flags set."""
        return Limits(max_body_bytes=int(self.max_body_mb * MIB), max_images=self.max_images,
                      max_image_pixels=self.max_image_pixels, max_tokens=self.max_tokens,
                      max_prompt_tokens=self.max_prompt_tokens,
                      allowed_image_hosts=tuple(h.lower() for h in self.allow_image_host),
                      max_decode_pixels=self.max_decode_pixels or self.max_images * self.max_image_pixels,
                      decode_wait_s=self.decode_wait_s)

    def server_limits(self) -> ServerLimits:
        """The connection limits these flags set."""
        return ServerLimits(request_timeout_s=self.request_timeout_s, timeout_keep_alive_s=self.timeout_keep_alive_s,
                            limit_concurrency=self.limit_concurrency)
