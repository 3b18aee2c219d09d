"""SMART Backend Services for medmesh's outbound FHIR calls (report delivery, the fetch of an
id-only notification's resources): OAuth2 client credentials with a signed JWT assertion.

As the SMART App Launch guide's backend-services profile asks
(hl7.org/fhir/smart-app-launch/backend-services.html): the client signs a short-lived JWT
(``iss`` = ``sub`` = its client id, ``aud`` = the token endpoint, ``exp`` at most five minutes
ahead, a fresh ``jti``) with its private key (RS384 or ES384, the key id in the header), posts it
to the token endpoint with ``grant_type=client_credentials`` and the scopes it needs, and sends
the access token as a bearer token. ``SmartAuth`` is an ``httpx.Auth``: the token is cached
until shortly before it expires; a 401 gets one refresh and one resend (a token revoked or
rotated early); a second 401 is the server's answer. A token endpoint that fails raises
``TokenUnavailableError``, which callers treat like a server that cannot be reached.

``retry_after_s`` reads a ``Retry-After`` answer (seconds or an HTTP date) for the callers'
backoff.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Literal

import httpx
import jwt
from pydantic import BaseModel, Field

# The assertion type SMART Backend Services requires (RFC 7523).
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# How long a signed assertion is valid: the guide allows at most five minutes.
ASSERTION_LIFETIME_S = 300


class SmartClientSettings(BaseModel):
    """One SMART Backend Services client registration (from the environment as JSON)."""

    token_url: str
    client_id: str
    # PEM file of the private key registered with the authorization server (its JWKS).
    private_key_file: Path
    key_id: str | None = None
    algorithm: Literal["RS384", "ES384"] = "RS384"
    scope: str
    # A cached token is replaced this long before it expires.
    refresh_margin_s: float = Field(default=30.0, ge=0)


class TokenUnavailableError(httpx.HTTPError):
    """The token endpoint did not issue an access token (unreachable, or it refused)."""


class SmartAuth(httpx.Auth):
    """Bearer tokens from a SMART Backend Services token endpoint, cached and refreshed."""

    def __init__(
        self,
        settings: SmartClientSettings,
        *,
        private_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._key = (
            private_key if private_key is not None else settings.private_key_file.read_bytes()
        )
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self.tokens_issued = 0

    def assertion(self) -> str:
        """A freshly signed client assertion."""
        now = int(self._clock())
        claims = {
            "iss": self._settings.client_id,
            "sub": self._settings.client_id,
            "aud": self._settings.token_url,
            "exp": now + ASSERTION_LIFETIME_S,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers = {"kid": self._settings.key_id} if self._settings.key_id else None
        return jwt.encode(claims, self._key, algorithm=self._settings.algorithm, headers=headers)

    def _token_request(self) -> httpx.Request:
        return httpx.Request(
            "POST",
            self._settings.token_url,
            data={
                "grant_type": "client_credentials",
                "scope": self._settings.scope,
                "client_assertion_type": JWT_BEARER,
                "client_assertion": self.assertion(),
            },
            headers={"accept": "application/json"},
        )

    def _adopt(self, response: httpx.Response) -> None:
        """Keep the token of a token endpoint's answer; raise when it issued none."""
        if response.status_code != 200:
            raise TokenUnavailableError(f"the token endpoint answered {response.status_code}")
        try:
            body = response.json()
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenUnavailableError(
                f"the token endpoint's answer holds no access token ({type(exc).__name__})"
            ) from exc
        self._token = token
        self._expires_at = self._clock() + lifetime - self._settings.refresh_margin_s
        self.tokens_issued += 1

    def _fresh(self) -> bool:
        return self._token is not None and self._clock() < self._expires_at

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send ``request`` with a valid token; after a 401, once more with a new one."""
        if not self._fresh():
            token_response = yield self._token_request()
            await token_response.aread()
            self._adopt(token_response)
        request.headers["authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code != 401:
            return
        token_response = yield self._token_request()
        await token_response.aread()
        self._adopt(token_response)
        request.headers["authorization"] = f"Bearer {self._token}"
        yield request


def smart_auth(settings: SmartClientSettings | None) -> SmartAuth | None:
    """The auth of a configured client registration (None: not configured)."""
    return None if settings is None else SmartAuth(settings)


def retry_after_s(response: httpx.Response, now: datetime | None = None) -> float | None:
    """How long a ``Retry-After`` header asks to wait (seconds or an HTTP date); None without
    one, or when it cannot be read."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
