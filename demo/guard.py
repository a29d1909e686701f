"""The web app's front door: Host, token, Origin and body-size checks, before any route runs.

A plain ASGI middleware wrapped around the FastAPI app, so every request passes it, pages, static files, the
API and websocket upgrades alike::

    request --> Host allowed?  (403; DNS rebinding: a foreign site's name resolving to this machine)
            --> token, when one is set?  (401; header, ?token= or the cookie the page got with ?token=)
            --> Origin, when a browser sent one, equal to Host?  (403; websocket upgrades and non-GET requests)
            --> body over max_body_bytes?  (413 from Content-Length before a byte of the body is read;
                                            a body without Content-Length is read at most limit + 1 bytes)
            --> the app

Allowed host names are the loopback names (localhost, 127.0.0.1, [::1]), the address the server is bound to,
and the names given with ``allowed_hosts`` (``--allow-host``). Naming extra hosts makes the token required: a
page on another machine or under another name is reachable from the network, so holding the address is not
enough. The token is compared in constant time; a GET with a valid ``?token=`` sets an HttpOnly, SameSite=Strict
cookie, so the page's own requests and its websocket carry it without the page knowing it.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
COOKIE = "rtd_token"
ECHO_CHARS = 60  # the most characters of a rejected value any error message quotes

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was: errors never echo a whole value."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


HOST_FORM = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")


def host_name(host_header: str) -> str | None:
    """'Example.COM:8000' -> 'example.com', '[::1]:80' -> '::1'; None for anything but name-or-address[:port]."""
    if not HOST_FORM.match(host_header):
        return None  # userinfo ('evil@127.0.0.1'), paths, spaces: no browser sends them
    try:
        name = urlsplit("//" + host_header).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


@dataclass(frozen=True)
class AccessPolicy:
    """hosts: lower-case names without port; token: None = none needed; max_body_bytes: request body limit."""

    hosts: frozenset[str]
    token: str | None
    max_body_bytes: int

    @classmethod
    def build(cls, bound_host: str | None, extra_hosts: tuple[str, ...], token: str | None,
              max_body_bytes: int) -> "AccessPolicy":
        names = set(LOOPBACK_NAMES)
        if bound_host:
            names.add(host_name(bound_host if ":" not in bound_host else f"[{bound_host}]") or bound_host)
        for h in extra_hosts:
            name = host_name(h)
            if not name or name != h.strip().lower().strip("[]").rstrip("."):
                raise ValueError(f"an allowed host is a bare name or address such as 'studio.local' or "
                                 f"'192.168.1.20' or '[fe80::1]' (no scheme, port or path); got {short(h)}")
            names.add(name)
        if extra_hosts and not token:
            raise ValueError("naming extra hosts needs a token (every request must then carry it)")
        return cls(frozenset(names), token, max_body_bytes)


class Guard:
    """ASGI middleware applying an AccessPolicy (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy
        self.refused = 0
        self._logged_at = -1e9
        self._unlogged = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        problem = self._check(scope, headers)
        if problem is not None:
            status, message = problem
            self._log(f"refused {kind} {short(scope.get('path', ''))}: {message}")
            if kind == "websocket":
                await _refuse_websocket(receive, send, message)
            else:
                await _send_json(send, status, {"error": message})
            return
        set_cookie = self._token_in_query(scope) and kind == "http"
        if kind == "http" and scope.get("method") not in ("GET", "HEAD"):
            receive = await self._read_limited(headers, receive, send)
            if receive is None:
                return
        if set_cookie:
            send = _with_cookie(send, self.policy.token or "")
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        p = self.policy
        host = headers.get("host", "")
        name = host_name(host)
        if name not in p.hosts:
            allowed = ", ".join(sorted(f"[{h}]" if ":" in h else h for h in p.hosts))
            return 403, (f"host {short(host)} is not allowed: this server answers to {allowed}; "
                         f"start it with --allow-host NAME to let another name in (a token is then required)")
        if p.token is not None and not self._has_token(scope, headers):
            return 401, ("this server needs its token: open the address it printed at start (/?token=...), or "
                         "send the header 'Authorization: Bearer <token>'")
        origin = headers.get("origin")
        if origin and (scope["type"] == "websocket" or scope.get("method") not in ("GET", "HEAD")):
            if urlsplit(origin).netloc.lower() != host.lower():
                return 403, (f"cross-origin request refused: origin {short(origin)} is not this server "
                             f"({short(host)}); open the page from this server")
        return None

    def _has_token(self, scope: Scope, headers: dict[str, str]) -> bool:
        token = self.policy.token or ""
        offered = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        offered += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        for part in headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == COOKIE:
                offered.append(value)
        return any(hmac.compare_digest(o.encode(), token.encode()) for o in offered)

    def _token_in_query(self, scope: Scope) -> bool:
        token = self.policy.token
        if not token:
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return any(hmac.compare_digest(g.encode(), token.encode()) for g in given)

    async def _read_limited(self, headers: dict[str, str], receive: Receive, send: Send) -> Receive | None:
        """Read the body up to the limit and replay it to the app; None when a 413 was sent instead."""
        limit = self.policy.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _send_json(send, 400, {"error": f"Content-Length must be a whole number; got "
                                                      f"{short(declared)}"})
                return None
            if int(declared) > limit:
                await self._too_large(send, f"{int(declared)} (Content-Length)")
                return None
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                chunks = None
                break
            chunks.append(msg.get("body", b""))
            total += len(chunks[-1])
            if total > limit:
                await self._too_large(send, f"more than {limit}")
                return None
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks) if chunks is not None else b""
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _log(self, line: str) -> None:
        """One INFO line per second at most: a flood of bad requests must not flood the log."""
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at < 1.0:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more refused in the last second)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.info("%s%s", line, more)

    async def _too_large(self, send: Send, got: str) -> None:
        self._log(f"refused a request body of {got} bytes (limit {self.policy.max_body_bytes})")
        await _send_json(send, 413, {"error": f"request bodies are at most {self.policy.max_body_bytes} bytes; "
                                              f"got {got}"}, close=True)


async def _send_json(send: Send, status: int, obj: dict[str, Any], close: bool = False) -> None:
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the unread rest of the body is not worth reading: end the connection after this answer
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(receive: Receive, send: Send, reason: str) -> None:
    msg = await receive()  # websocket.connect
    if msg["type"] == "websocket.connect":
        # closing before accepting answers the upgrade with HTTP 403; the reason is for the server log and
        # for clients that read it (close reasons are at most 123 bytes)
        await send({"type": "websocket.close", "code": 1008, "reason": reason.encode()[:120].decode("utf-8",
                                                                                                   "ignore")})


def _with_cookie(send: Send, token: str) -> Send:
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

    async def wrapped(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", []), (b"set-cookie", cookie)]}
        await send(msg)

    return wrapped
