"""Bounds on the gateway's HTTP connections, against slow and half-open clients (slowloris).

* ``max_connections``: past it, a new connection is answered ``503`` and closed at once.
* ``read_timeout``: a connection must send a whole request head within it (aiohttp's keep-alive
  timer, armed when a connection opens and after each response, closes one that does not), and
  the gateway reads a request body within it (``read_body``), else ``408``.
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")
_BODY = b'{"error": {"message": "too many open connections", "type": "service_unavailable_error", ' \
        b'"param": null, "code": "too_many_connections"}}'


class _Refuse(asyncio.Protocol):
    """A connection past the limit: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REFUSED % (len(_BODY), _BODY))     # type: ignore[attr-defined]
        transport.close()


class _Counted(asyncio.Protocol):
    """A connection's protocol, counted while open (aiohttp's own count of connections lags
    behind a burst of accepts: asyncio makes the protocols of a burst before any of them
    connects)."""

    def __init__(self, inner: asyncio.Protocol, limited: "_Limited") -> None:
        self.inner, self.limited = inner, limited

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Any) -> None:
        self.limited.open -= 1
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> Any:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Limited:
    """aiohttp's ``web.Server`` (the protocol factory), refusing connections past a limit."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server, self._limit = server, limit
        self.open = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self._limit:
            return _Refuse()
        self.open += 1
        return _Counted(self._server(), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` with a connection limit and a request-head deadline."""

    def __init__(self, app: web.Application, *, max_connections: int, read_timeout: float, **kw) -> None:
        super().__init__(app, keepalive_timeout=read_timeout, **kw)
        self._max_connections = max_connections

    async def _make_server(self) -> Any:
        return _Limited(await super()._make_server(), self._max_connections)


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The request body, or 408 if it does not arrive within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the request body did not arrive within {timeout:g} s") from None
