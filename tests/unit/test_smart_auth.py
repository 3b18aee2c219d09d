"""SMART Backend Services for outbound FHIR calls (medmesh_runtime.smart), and its use by report
delivery and the id-only notification fetch; Retry-After honoured by delivery."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from medmesh_ingest.fetch import SourceServer, http_fetcher
from medmesh_ingest.service import SourceUnavailableError
from medmesh_reporting.delivery import Delivered, Deliverer, DeliveryBackoff, Refused
from medmesh_runtime.smart import (
    JWT_BEARER,
    SmartAuth,
    SmartClientSettings,
    TokenUnavailableError,
    retry_after_s,
)

TOKEN_URL = "https://auth.hospital.example/token"  # noqa: S105 -- a URL, not a secret
FHIR = "https://fhir.hospital.example/fhir"
CLIENT_ID = "medmesh-reporting"
SCOPE = "system/DiagnosticReport.write system/Observation.write"


def _keys(algorithm: str) -> tuple[bytes, bytes]:
    """A fresh private key (PEM) for ``algorithm`` and its public key (PEM)."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS384":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP384R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, public


@dataclass
class AuthServer:
    """A token endpoint that checks each assertion as the SMART guide asks, and a FHIR server
    that takes only the tokens it issued and has not revoked."""

    public_key: bytes
    algorithm: str
    lifetime_s: int = 300
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    token_status: int = 200
    assertions: list[dict[str, object]] = field(default_factory=list)
    seen_by_fhir: list[str | None] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            return self._token(request)
        authorization = request.headers.get("authorization")
        self.seen_by_fhir.append(authorization)
        token = (authorization or "").removeprefix("Bearer ")
        if token not in self.issued or token in self.revoked:
            return httpx.Response(401)
        return httpx.Response(200, json={"resourceType": "Observation", "id": "o-1"})

    def _token(self, request: httpx.Request) -> httpx.Response:
        if self.token_status != 200:
            return httpx.Response(self.token_status, json={"error": "invalid_client"})
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == JWT_BEARER
        assert form["scope"] == SCOPE
        claims = jwt.decode(
            form["client_assertion"],
            self.public_key,
            algorithms=[self.algorithm],
            audience=TOKEN_URL,
            leeway=3600,  # the tests' clock runs ahead of the real one
        )
        header = jwt.get_unverified_header(form["client_assertion"])
        assert header["kid"] == "key-1"
        self.assertions.append(claims)
        token = f"token-{len(self.issued) + 1}"
        self.issued.append(token)
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.lifetime_s}
        return httpx.Response(200, json=body)


class Clock:
    """A settable clock (seconds since the epoch)."""

    def __init__(self) -> None:
        # Starts at the real time: the token endpoint checks iat and exp against it.
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _auth(
    algorithm: str = "RS384", lifetime_s: int = 300
) -> tuple[SmartAuth, AuthServer, httpx.AsyncClient, Clock]:
    private, public = _keys(algorithm)
    server = AuthServer(public, algorithm, lifetime_s)
    settings = SmartClientSettings(
        token_url=TOKEN_URL,
        client_id=CLIENT_ID,
        private_key_file=Path("unused.pem"),
        key_id="key-1",
        algorithm="RS384" if algorithm == "RS384" else "ES384",
        scope=SCOPE,
    )
    clock = Clock()
    auth = SmartAuth(settings, private_key=private, clock=clock)
    client = httpx.AsyncClient(transport=httpx.MockTransport(server.handle), auth=auth)
    return auth, server, client, clock


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
async def test_a_signed_assertion_buys_a_token_that_the_fhir_call_carries(algorithm: str) -> None:
    """The assertion verifies with the registered public key (iss = sub = client id, aud = the
    token endpoint, at most five minutes, a jti) and its token is sent as a bearer token."""
    _, server, client, clock = _auth(algorithm)
    response = await client.get(f"{FHIR}/Observation/o-1")
    assert response.status_code == 200
    (claims,) = server.assertions
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert isinstance(claims["exp"], int)
    assert 0 < claims["exp"] - clock.now <= 300
    assert claims["jti"]
    assert server.seen_by_fhir == ["Bearer token-1"]


async def test_the_token_is_cached_until_shortly_before_it_expires() -> None:
    """Calls within the token's life reuse it; one past (its life minus the margin) gets a new
    one, with a new jti."""
    auth, server, client, clock = _auth(lifetime_s=300)
    await client.get(f"{FHIR}/Observation/o-1")
    clock.now += 200
    await client.get(f"{FHIR}/Observation/o-1")
    assert auth.tokens_issued == 1
    clock.now += 80  # 280 s: inside the 30 s margin
    await client.get(f"{FHIR}/Observation/o-1")
    assert auth.tokens_issued == 2
    assert server.seen_by_fhir == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]
    assert server.assertions[0]["jti"] != server.assertions[1]["jti"]


async def test_a_401_refreshes_the_token_once_and_resends() -> None:
    """A token revoked early: the call gets one new token and succeeds on the resend."""
    _, server, client, _ = _auth()
    await client.get(f"{FHIR}/Observation/o-1")
    server.revoked.add("token-1")
    response = await client.get(f"{FHIR}/Observation/o-1")
    assert response.status_code == 200
    assert server.seen_by_fhir[-2:] == ["Bearer token-1", "Bearer token-2"]


async def test_a_second_401_is_the_answer() -> None:
    """When the new token is refused too, the 401 is returned (no loop of refreshes)."""
    auth, server, client, _ = _auth()
    server.revoked.update({"token-1", "token-2", "token-3"})
    response = await client.get(f"{FHIR}/Observation/o-1")
    assert response.status_code == 401
    assert auth.tokens_issued == 2


async def test_a_token_endpoint_that_refuses_raises_token_unavailable() -> None:
    """No token issued: TokenUnavailableError, and the FHIR server is not called."""
    _, server, client, _ = _auth()
    server.token_status = 400
    with pytest.raises(TokenUnavailableError, match="answered 400"):
        await client.get(f"{FHIR}/Observation/o-1")
    assert server.seen_by_fhir == []


def test_retry_after_is_read_in_seconds_or_as_a_date() -> None:
    """Retry-After: 7 is 7 s; an HTTP date 30 s ahead is 30 s; none or garbage is None."""
    now = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    assert retry_after_s(httpx.Response(503, headers={"retry-after": "7"})) == 7.0
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_s(httpx.Response(503, headers={"retry-after": date}), now) == 30.0
    assert retry_after_s(httpx.Response(503)) is None
    assert retry_after_s(httpx.Response(503, headers={"retry-after": "soon"})) is None


REPORT = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {
            "fullUrl": "urn:uuid:1",
            "resource": {
                "resourceType": "DiagnosticReport",
                "id": "r-1",
                "identifier": [{"system": "urn:medmesh", "value": "r-1"}],
            },
        }
    ],
}


def _deliverer(
    handler: Callable[[httpx.Request], httpx.Response], auth: httpx.Auth | None = None
) -> tuple[Deliverer, list[float]]:
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=auth)
    backoff = DeliveryBackoff(initial_s=0.5, max_s=30.0, give_up_after_s=600.0)
    return Deliverer(client, FHIR, backoff=backoff, sleep=sleep), pauses


async def test_delivery_waits_as_long_as_retry_after_asks() -> None:
    """A 503 with Retry-After: 20 pauses 20 s (not the 0.5 s backoff), then delivers."""
    answers = iter([httpx.Response(503, headers={"retry-after": "20"}), httpx.Response(200)])
    deliverer, pauses = _deliverer(lambda _request: next(answers))
    outcome = await deliverer.deliver(REPORT)
    assert outcome == Delivered(200, 2)
    assert pauses == [20.0]


async def test_delivery_gives_up_when_retry_after_outlasts_its_window() -> None:
    """A Retry-After beyond the give-up window ends delivery as refused, naming the answer."""
    deliverer, pauses = _deliverer(lambda _r: httpx.Response(429, headers={"retry-after": "9000"}))
    outcome = await deliverer.deliver(REPORT)
    assert isinstance(outcome, Refused)
    assert "429" in outcome.reason
    assert pauses == []


async def test_delivery_with_smart_retries_while_no_token_is_issued() -> None:
    """A token endpoint failing is retried like an unreachable server; the report is delivered
    with the token once one is issued."""
    private, public = _keys("RS384")
    server = AuthServer(public, "RS384")
    server.token_status = 503
    settings = SmartClientSettings(
        token_url=TOKEN_URL,
        client_id=CLIENT_ID,
        private_key_file=Path("unused.pem"),
        key_id="key-1",
        scope=SCOPE,
    )
    auth = SmartAuth(settings, private_key=private)

    def handler(request: httpx.Request) -> httpx.Response:
        response = server.handle(request)
        server.token_status = 200  # the endpoint recovers after its first failure
        return response

    deliverer, pauses = _deliverer(handler, auth)
    outcome = await deliverer.deliver(REPORT)
    assert outcome == Delivered(200, 2)
    assert len(pauses) == 1
    assert server.seen_by_fhir == ["Bearer token-1"]


async def test_the_notification_fetch_uses_the_sources_smart_client() -> None:
    """An id-only notification's resource is fetched with a SMART token; a token endpoint that
    refuses makes the fetch a SourceUnavailableError (the sender gets 503 and retries)."""
    auth, server, client, _ = _auth()
    fetch = http_fetcher(
        SourceServer(FHIR, None, timeout_s=5, max_bytes=10_000, client=client, auth=auth)
    )
    (body,) = await fetch(["Observation/o-1"])
    assert json.loads(body)["id"] == "o-1"
    assert server.seen_by_fhir == ["Bearer token-1"]
    server.revoked.add("token-1")
    server.token_status = 400
    with pytest.raises(SourceUnavailableError):
        await fetch(["Observation/o-1"])
