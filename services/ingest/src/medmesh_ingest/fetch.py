"""Fetching the resources an id-only Subscription notification names, from the sender's server.

Only references on the configured FHIR base URL (or relative ``Type/id`` ones, resolved against
it) are fetched, with the source's own token or SMART Backend Services client
(``medmesh_runtime.smart``): a notification cannot make ingest call anywhere
else (such a reference is a 422). A failure of the server is a ``SourceUnavailableError``: the
notification is answered 503 and the sender retries it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import httpx

from medmesh_ingest.outcomes import INVALID_FHIR, rejected
from medmesh_ingest.service import Fetch, SourceUnavailableError

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


def http_fetcher(
    base_url: str,
    token: str | None,
    *,
    timeout_s: float,
    max_bytes: int,
    client: httpx.AsyncClient,
    auth: httpx.Auth | None = None,
) -> Fetch:
    """A Fetch reading each reference from ``base_url`` with the bearer ``token``, or with
    ``auth`` (SMART Backend Services) when given."""
    headers = {"accept": "application/fhir+json"}
    if token:
        headers["authorization"] = f"Bearer {token}"

    async def fetch(references: Sequence[str]) -> list[bytes]:
        bodies: list[bytes] = []
        for reference in references:
            url = resource_url(base_url, reference)
            if url is None:
                raise rejected(
                    INVALID_FHIR,
                    "not-supported",
                    "the notification names a resource outside the source's FHIR server; "
                    "ingest fetches only from the server configured for the source",
                )
            try:
                response = await client.get(
                    url, headers=headers, timeout=timeout_s, auth=auth or httpx.USE_CLIENT_DEFAULT
                )
            except httpx.HTTPError as exc:
                raise SourceUnavailableError(
                    f"fetching from the source failed: {type(exc).__name__}"
                ) from exc
            if response.status_code != 200:
                raise SourceUnavailableError(
                    f"the source answered {response.status_code} for a notification's resource"
                )
            if len(response.content) > max_bytes:
                raise SourceUnavailableError("a fetched resource exceeds the size limit")
            bodies.append(response.content)
        return bodies

    return fetch
