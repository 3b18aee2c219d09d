"""The worker's PACS client: WADO-RS retrieves of the instances image inputs point at.

Only PACS bases named in the worker's settings are called (``MEDMESH_PACS_URLS``): a task names
its instance's DICOMweb base, and an event must never make a worker call an arbitrary host.

- A transient failure (no connection, a timeout, 5xx, 429) is retried with backoff; when the
  retries are spent ``PacsUnavailable`` says so, and the worker treats it like Triton away: it
  rewinds the batch and pauses behind its circuit breaker, whose probe asks ``ready`` too.
- What retrying cannot fix (404, another 4xx, an answer that is not one DICOM part, more bytes
  than the model allows) is ``ImageRefusedError``: the task fails with the reason.
Reasons name no UID and no patient data.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from medmesh_contracts.events import ImageReference
from medmesh_inference.imaging import ImageRefusedError
from medmesh_runtime.dicomweb import ACCEPT_INSTANCES, DICOM_JSON, multipart_parts
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.inference.pacs")

# Bytes a multipart answer may add around the instance it frames (boundaries, part headers).
FRAMING_ALLOWANCE = 64 * 1024


class PacsUnavailable(Exception):  # noqa: N818 -- a condition, not an error of the caller
    """The PACS kept failing transiently: nothing about the image is known yet."""


class _Transient(Exception):  # noqa: N818 -- internal: one retryable attempt's failure
    pass


def normalized(url: str) -> str:
    """A DICOMweb base as compared against the allowlist (no trailing slash)."""
    return url.rstrip("/")


class Pacs:
    """WADO-RS retrieves from the allowed PACS bases, with timeouts and retries."""

    def __init__(
        self,
        allowed_urls: Sequence[str],
        *,
        timeout_s: float = 10.0,
        max_attempts: int = 3,
        backoff_s: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.allowed = frozenset(normalized(u) for u in allowed_urls)
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        # Why the last readiness probe failed (None: it did not).
        self.not_ready_because: str | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client, opened on first use (inside the running event loop)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport)
        return self._client

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def fetch(self, image: ImageReference, max_bytes: int) -> bytes:
        """The Part 10 bytes of the referenced instance (at most ``max_bytes``)."""
        base = normalized(image.dicomweb_url)
        if base not in self.allowed:
            raise ImageRefusedError("the study's PACS is not one this worker may call")
        url = (
            f"{base}/studies/{image.study_uid}/series/{image.series_uid}"
            f"/instances/{image.instance_uid}"
        )
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._max_attempts),
                wait=wait_random_exponential(multiplier=self._backoff_s, max=5 * self._backoff_s),
                retry=retry_if_exception_type(_Transient),
                reraise=True,
            ):
                with attempt:
                    return await self._retrieve(url, max_bytes)
        except _Transient as exc:
            raise PacsUnavailable(str(exc)) from exc
        raise AssertionError("tenacity either returns or raises")  # pragma: no cover

    async def _retrieve(self, url: str, max_bytes: int) -> bytes:
        try:
            async with self.client.stream(
                "GET", url, headers={"Accept": ACCEPT_INSTANCES}
            ) as response:
                _check_status(response.status_code)
                body = await _read_bounded(response, max_bytes + FRAMING_ALLOWANCE, max_bytes)
                content_type = response.headers.get("content-type", "")
        except httpx.TransportError as exc:  # connect, read and pool timeouts included
            raise _Transient(f"the PACS did not answer ({type(exc).__name__})") from exc
        try:
            parts = multipart_parts(body, content_type)
        except ValueError as exc:
            raise ImageRefusedError(f"the PACS answer is not DICOMweb multipart ({exc})") from exc
        if len(parts) != 1:
            raise ImageRefusedError(f"the PACS answered {len(parts)} parts for one instance")
        if len(parts[0]) > max_bytes:
            raise ImageRefusedError(
                f"the instance has {len(parts[0])} bytes, more than the model's limit of {max_bytes}"
            )
        return parts[0]

    async def ready(self) -> bool:
        """True when every allowed PACS answers a QIDO-RS search (one study at most)."""
        for base in sorted(self.allowed):
            try:
                response = await self.client.get(
                    f"{base}/studies", params={"limit": "1"}, headers={"Accept": DICOM_JSON}
                )
            except httpx.HTTPError as exc:
                self._not_ready(f"no answer ({type(exc).__name__})")
                return False
            if response.status_code not in (200, 204):
                self._not_ready(f"QIDO-RS answered {response.status_code}")
                return False
        self.not_ready_because = None
        return True

    def _not_ready(self, reason: str) -> None:
        if reason != self.not_ready_because:
            log.warning("PACS not ready", reason=reason)
        self.not_ready_because = reason


def _check_status(status: int) -> None:
    if status == httpx.codes.OK:
        return
    if status == httpx.codes.TOO_MANY_REQUESTS or status >= httpx.codes.INTERNAL_SERVER_ERROR:
        raise _Transient(f"the PACS answered {status}")
    if status == httpx.codes.NOT_FOUND:
        raise ImageRefusedError("the PACS has no such instance (404)")
    raise ImageRefusedError(f"the PACS refused the retrieve ({status})")


async def _read_bounded(response: httpx.Response, limit: int, max_bytes: int) -> bytes:
    """The body, read in chunks; ImageRefusedError as soon as it passes ``limit``."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageRefusedError(
            f"the instance is larger than the model's limit of {max_bytes} bytes"
        )
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ImageRefusedError(
                f"the instance is larger than the model's limit of {max_bytes} bytes"
            )
    return bytes(body)
