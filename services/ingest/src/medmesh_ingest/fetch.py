"""Fetching the resources an id-only Subscription notification names, and the events a
subscription's source sent but ingest missed (the backport IG's ``$events``), from the sender's
server.

Only references on the configured FHIR base URL (or relative ``Type/id`` ones, resolved against
it) are fetched, with the source's own token or SMART Backend Services client
(``medmesh_runtime.smart``): a notification cannot make ingest call anywhere
else (such a reference is a 422). A failure of the server is a ``SourceUnavailableError``: the
notification is answered 503 and the sender retries it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from medmesh_ingest.outcomes import INVALID_FHIR, rejected
from medmesh_ingest.service import Fetch, Recover, SourceRefusedError, SourceUnavailableError

# Statuses that may pass when asked again (a timeout, too many requests); every other 4xx, and
# 501 (the operation not implemented), will not.
_MAY_PASS = frozenset({408, 429})

_RELATIVE = re.compile(
    r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def resource_url(base_url: str, reference: str) -> str | None:
    """The URL of a referenced resource on the source server, or None when it is elsewhere."""
    base = base_url.rstrip("/")
    if reference.startswith(base + "/"):
        reference = reference[len(base) + 1 :]
    if not _RELATIVE.match(reference):
        return None
    return f"{base}/{reference}"


@dataclass(frozen=True)
class SourceServer:
    """A source's FHIR server as ingest calls it: its base URL, the source's bearer ``token``
    or ``auth`` (SMART Backend Services) when given, and the bounds of every call."""

    base_url: str
    token: str | None
    timeout_s: float
    max_bytes: int
    client: httpx.AsyncClient
    auth: httpx.Auth | None = None

    async def get(self, url: str, what: str, params: Mapping[str, str] | None = None) -> bytes:
        """The body of a 200 answer to GET ``url``; SourceUnavailableError naming ``what``
        (the server unreachable, another status), SourceRefusedError when asking again will
        not help (a 4xx but 408 and 429, 501, a body over ``max_bytes``)."""
        headers = {"accept": "application/fhir+json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        too_large = SourceRefusedError(f"the source's answer to {what} exceeds the size limit")
        try:
            # Streamed, so that an answer over the limit is stopped there, not held whole.
            async with self.client.stream(
                "GET",
                url,
                params=params,
                headers=headers,
                timeout=self.timeout_s,
                auth=self.auth or httpx.USE_CLIENT_DEFAULT,
            ) as response:
                status = response.status_code
                if status != 200:
                    refused = (400 <= status < 500 and status not in _MAY_PASS) or status == 501
                    error = SourceRefusedError if refused else SourceUnavailableError
                    raise error(f"the source answered {status} to {what}")
                declared = response.headers.get("content-length", "")
                if declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
                    raise too_large
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise too_large
        except httpx.HTTPError as exc:
            raise SourceUnavailableError(f"{what} failed: {type(exc).__name__}") from exc
        return bytes(body)


def http_fetcher(server: SourceServer) -> Fetch:
    """A Fetch reading each reference from the source's server."""

    async def fetch(references: Sequence[str]) -> list[bytes]:
        bodies: list[bytes] = []
        for reference in references:
            url = resource_url(server.base_url, reference)
            if url is None:
                raise rejected(
                    INVALID_FHIR,
                    "not-supported",
                    "the notification names a resource outside the source's FHIR server; "
                    "ingest fetches only from the server configured for the source",
                )
            bodies.append(await server.get(url, "fetching a notification's resource"))
        return bodies

    return fetch


def events_url(base_url: str, subscription: str) -> str | None:
    """The ``$events`` URL of a Subscription on the source server (``[base]/Subscription/[id]/
    $events``), or None when the reference names no Subscription there."""
    url = resource_url(base_url, subscription)
    if url is None or "/_history/" in url or url.rsplit("/", 2)[-2] != "Subscription":
        return None
    return f"{url}/$events"


def http_recoverer(server: SourceServer) -> Recover:
    """A Recover asking the source's server for a subscription's events ``first`` to ``last``
    with full resources (``GET [base]/Subscription/[id]/$events?eventsSinceNumber=..
    &eventsUntilNumber=..&content=full-resource``)."""

    async def recover(subscription: str, first: int, last: int) -> bytes:
        url = events_url(server.base_url, subscription)
        if url is None:
            raise SourceRefusedError(
                "the notification's subscription is not on the source's FHIR server"
            )
        params = {
            "eventsSinceNumber": str(first),
            "eventsUntilNumber": str(last),
            "content": "full-resource",
        }
        return await server.get(url, "$events", params)

    return recover
