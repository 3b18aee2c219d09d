"""Uvicorn's h11 protocol with the limits uvicorn lacks: a deadline for a request's headers, one
for its body, and a hard cap on open connections.

Uvicorn bounds idle time between requests (timeout_keep_alive) and header size (h11's 16 KiB),
and answers 503 to requests beyond limit_concurrency, but nothing bounds how long a client takes
to send a request: its keep-alive timer is cancelled by any byte, so a client sending one byte
every few seconds holds a connection, and a fresh connection that sends nothing is never timed
out at all. An ASGI middleware cannot help with headers (the app is called once they are in),
so the deadlines live in the protocol, the one place that sees every byte.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.http")


def _answer(status: int, reason: str, text: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, as raw bytes."""
    body = text.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        "connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# Written straight to the transport, not through h11: the connection is closed right after, and
# h11 cannot send a response before it has read a request.
HEADERS_TOO_SLOW = _answer(408, "Request Timeout", "request headers not received in time")
BODY_TOO_SLOW = _answer(408, "Request Timeout", "request body not received in time")
TOO_MANY_CONNECTIONS = _answer(503, "Service Unavailable", "too many connections")


class DeadlineProtocol(H11Protocol):
    """H11Protocol whose requests must arrive in time, with at most ``max_connections`` open.

    Configure a subclass with ``deadline_protocol``: uvicorn builds one instance per connection
    and passes it only its own Config.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        # The part of the request the deadline is for: h11.IDLE (headers) or h11.SEND_BODY.
        self._awaiting: type[h11.IDLE] | type[h11.SEND_BODY] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            # Refused before its request is read: waiting for headers would hold the socket up
            # to the header deadline for an answer that can only be 503.
            log.warning("connection refused: too many open", limit=self.max_connections)
            self._close_with(TOO_MANY_CONNECTIONS)
            return
        self._expect(h11.IDLE)

    def data_received(self, data: bytes) -> None:
        if self._awaiting is None and self.conn.their_state is h11.IDLE:
            # The first byte of the next request on a kept-alive connection: until now only the
            # keep-alive timeout applied (and any byte cancels that one).
            self._expect(h11.IDLE)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()
        if self._awaiting is None and self.conn.trailing_data[0]:
            # Part of a pipelined request is already buffered: its headers are under way.
            self._expect(h11.IDLE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Move the deadline along with the request: headers, then body, then none."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._awaiting is not h11.SEND_BODY:
                self._expect(h11.SEND_BODY)
        elif state is not h11.IDLE:
            # The request is in (or the connection is ending): the app's time is not limited.
            self._cancel()

    def _expect(self, part: type[h11.IDLE] | type[h11.SEND_BODY]) -> None:
        self._cancel()
        self._awaiting = part
        if part is h11.IDLE:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)
        else:
            self._deadline = self.loop.call_later(self.body_timeout_s, self._body_late)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._awaiting = None

    def _headers_late(self) -> None:
        self._deadline = None
        log.warning("request headers not received in time", seconds=self.header_timeout_s)
        self._close_with(HEADERS_TOO_SLOW)

    def _body_late(self) -> None:
        self._deadline = None
        log.warning("request body not received in time", seconds=self.body_timeout_s)
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            self._close_with(b"")  # the app has answered already: only the connection ends
            return
        # The app's receive() now gets http.disconnect, and whatever it sends next is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        self._close_with(BODY_TOO_SLOW)

    def _close_with(self, answer: bytes) -> None:
        self._cancel()
        if self.transport.is_closing():
            return
        if answer:
            self.transport.write(answer)
        self.transport.close()


def deadline_protocol(
    *, header_timeout_s: float, body_timeout_s: float, max_connections: int
) -> type[DeadlineProtocol]:
    """A DeadlineProtocol class with these limits, for uvicorn's ``http`` option."""
    return type(
        "ConfiguredDeadlineProtocol",
        (DeadlineProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
        },
    )
