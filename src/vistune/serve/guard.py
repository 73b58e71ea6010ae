"""The server's front door: the API key, the chat page's login, and the body-size cap, before any route.

Security model (docs/serving.md says it for users): with an API key, every route needs it except
`GET /health` (status only, for load balancers) and the login form. API clients send
`Authorization: Bearer KEY`. The chat page under `ui_prefix` is a browser page, so it also accepts a
session cookie that `POST /login` sets after checking the key: the cookie holds an HMAC of the key
(not the key), is HttpOnly and SameSite=Strict (no other site can make a browser send it). Everything
under the page, its config, uploads, queue and file routes included, is refused without one of the
two; a browser asking for the page itself is sent to the login form.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.requests import cookie_parser

LOGIN_PATH = "/login"
COOKIE = "vistune_session"
OPEN_PATHS = ("/health",)  # answered without the key; /health shows nothing beyond status

_LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>vistune: sign in</title></head>
<body style="font-family:sans-serif;max-width:24em;margin:4em auto">
<h2>vistune chat</h2><p>This server needs its API key.</p>{error}
<form method="post" action="{action}"><input type="password" name="key" placeholder="API key" autofocus
 style="width:100%;padding:.5em"><button type="submit" style="margin-top:1em;padding:.5em 1em">Sign in</button>
</form></body></html>"""



class BodyTooLarge(Exception):
    """A request body grew past its limit while it was being read."""


async def read_body(receive: Callable[[], Awaitable[dict]], limit: int | None = None) -> bytes | None:
    """The whole body of an ASGI http request, or None when the client disconnected first.

    Raises BodyTooLarge as soon as more than `limit` bytes have arrived, so an oversized body is never held whole.
    """
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if limit is not None and len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def replay_once(body: bytes, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    """An ASGI receive that hands an already-read body over once, then passes on what follows (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def session_token(api_key: str) -> str:
    """The cookie value for a signed-in page: derived from the key, so the cookie never holds the key."""
    return hmac.new(api_key.encode(), b"vistune chat page session", hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: key or session check, login form, body-size cap (see module docstring).

    Pure ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps streamed
    responses in a way that hides client disconnects, which the batcher needs to see. The body is read
    here up to the cap and replayed to the app, so an oversized upload is never buffered whole.
    """

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int, ui_prefix: str | None) -> None:
        self.app, self.api_key, self.max_body, self.ui_prefix = app, api_key, max_body_bytes, ui_prefix

    def _in_ui(self, path: str) -> bool:
        return self.ui_prefix is not None and (path == self.ui_prefix or path.startswith(self.ui_prefix + "/"))

    def _authorized(self, path: str, headers: dict[bytes, bytes]) -> tuple[bool, str]:
        """(allowed, what was wrong) for a request to `path`."""
        assert self.api_key is not None
        given = headers.get(b"authorization", b"").decode("latin-1")
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return True, ""
        if self._in_ui(path):
            cookie = cookie_parser(headers.get(b"cookie", b"").decode("latin-1")).get(COOKIE, "")
            if hmac.compare_digest(cookie.encode(), session_token(self.api_key).encode()):
                return True, ""
            return False, f"the chat page needs the API key: sign in at {LOGIN_PATH}"
        return False, ("no API key was given" if not given else "the API key is not valid") + \
            "; send it as 'Authorization: Bearer KEY'"

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if scope["type"] == "websocket":  # none is served today; any that a library adds needs the key too
            if self.api_key is not None and not self._authorized(path, headers)[0]:
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        login = self.api_key is not None and self.ui_prefix is not None and path == LOGIN_PATH
        if self.api_key is not None and not login and path not in OPEN_PATHS:
            allowed, why = self._authorized(path, headers)
            if not allowed:
                if self._in_ui(path) and scope.get("method") == "GET" and path.rstrip("/") == self.ui_prefix:
                    return await RedirectResponse(LOGIN_PATH, status_code=303)(scope, receive, send)
                return await error_response(401, why, code="invalid_api_key")(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._too_large(scope, receive, send)
        try:
            body = await read_body(receive, self.max_body)
        except BodyTooLarge:
            return await self._too_large(scope, receive, send)
        if body is None:  # the client went away
            return
        if login:
            return await self._login(scope, body)(scope, receive, send)
        await self.app(scope, replay_once(body, receive), send)

    def _login(self, scope: dict, body: bytes) -> HTMLResponse | RedirectResponse:
        """GET: the form. POST key=...: a session cookie and off to the page, or the form again (401)."""
        assert self.api_key is not None and self.ui_prefix is not None
        page = _LOGIN_PAGE.replace("{action}", html.escape(LOGIN_PATH))
        if scope.get("method") != "POST":
            return HTMLResponse(page.replace("{error}", ""))
        given = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0]
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return HTMLResponse(page.replace("{error}", '<p style="color:#b00">That key is not valid.</p>'),
                                status_code=401)
        r = RedirectResponse(self.ui_prefix + "/", status_code=303)
        r.set_cookie(COOKIE, session_token(self.api_key), httponly=True, samesite="strict", path=self.ui_prefix)
        return r

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        await error_response(413, f"the request body is over this server's limit of {self.max_body:,} bytes; "
                                  "send smaller or fewer images", code="request_too_large")(scope, receive, send)
