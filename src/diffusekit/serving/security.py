"""Security by default: loopback binding unless a key (or ``--insecure``) is given, Bearer keys, a
Host/Origin check against other web sites, and a cap on request bodies. A plain ASGI middleware so
it runs before anything reads the request."""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import HTTPException

#: Paths anyone may read: the health check and the page's static files (no data in them).
PUBLIC_PATHS = ("/health", "/")
PUBLIC_PREFIX = "/static/"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """ValueError when binding ``host`` would expose an open server."""
    if not is_loopback(host) and not api_key and not insecure:
        raise ValueError(f"--host {host}: serving beyond this machine needs --api-key KEY "
                         "(or --insecure to serve without one)")


def _host_name(value: str) -> str:
    """``[::1]:7860`` -> ``::1``; ``localhost:7860`` -> ``localhost``."""
    return urlsplit(f"//{value}").hostname or ""


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)


class Guard:
    """ASGI middleware: Host/Origin check, Bearer key, body size cap; answers JSON errors."""

    def __init__(self, app: Callable, bind_host: str, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.loopback_only = is_loopback(bind_host)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._problem(scope["path"], headers)
        if problem is not None:
            return await _answer(send, *problem)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _answer(send, 413, "body", f"the request body is over {self.max_body} bytes")
        await self.app(scope, self._capped(receive, send), send)

    def _problem(self, path: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = headers.get("host", "")
        if self.loopback_only and not is_loopback(_host_name(host)):
            return 403, "Host", f"Host {host!r} is not this machine; a local server answers local names only"
        origin = headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != host:
            return 403, "Origin", f"requests from {origin} are refused (another site than this server's page)"
        if self.api_key and not _is_public(path):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return 401, "Authorization", "this server needs the header Authorization: Bearer KEY"
        return None

    def _capped(self, receive: Callable, send: Callable) -> Callable:
        """``receive`` that stops a body growing past the cap (chunked bodies carry no length)."""
        seen = 0

        async def capped() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge(self.max_body)
            return message

        return capped


class BodyTooLarge(HTTPException):
    """A body past the cap, found while reading it: answered 413 naming ``body``."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body: the request body is over {limit} bytes")


async def _answer(send: Callable, status: int, field: str, message: str) -> None:
    body = json.dumps(error_body("forbidden" if status == 403 else "unauthorized" if status == 401
                                 else "too_large", message, field)).encode()
    extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The one shape of every error answer: ``{"error": {"code", "message", "field"}}``."""
    return {"error": {"code": code, "message": message, "field": field}}
