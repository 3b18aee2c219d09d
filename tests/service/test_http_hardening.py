"""Every service's HTTP server (medmesh_runtime.serve): deadlines, connection limit, /metrics, TLS.

Real uvicorn servers on loopback, built by ``server_config`` exactly as ``serve`` builds them,
run in a thread and talked to over raw sockets where the test is about bytes on the wire.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from medmesh_ingest.app import create_app as create_ingest_app
from medmesh_ingest.settings import IngestSettings
from medmesh_router.app import create_app as create_router_app
from medmesh_router.settings import RouterSettings
from medmesh_runtime.serve import listen_sockets, server_config
from medmesh_runtime.settings import ServiceSettings
from tests.service.conftest import SPECS_DIR


def fast(**overrides: Any) -> ServiceSettings:
    """Settings with half-second header and body deadlines."""
    return ServiceSettings(http_header_timeout_s=0.5, http_body_timeout_s=0.5, **overrides)


@dataclass
class Seen:
    """What the test app was given: the bodies it read and whether it saw a disconnect."""

    bodies: list[bytes]
    disconnects: int = 0


def echo_app(seen: Seen) -> Any:
    """An ASGI app answering each request with its body's length (after 1.2 s on /slow)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen.disconnects += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.bodies.append(body)
        if scope["path"] == "/slow":
            await asyncio.sleep(1.2)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    return app


@dataclass(frozen=True)
class Running:
    """A running server's ports (the metrics port is 0 when it has none)."""

    port: int
    metrics_port: int


@contextmanager
def running(app: Any, settings: ServiceSettings, port: int = 0) -> Iterator[Running]:
    """Serve ``app`` as ``serve`` would, in a thread, until the block ends."""
    config = server_config(app, settings, port)
    server = uvicorn.Server(config)
    sockets = listen_sockets(config, settings.metrics_port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not server.started:
            assert thread.is_alive(), "the server stopped while starting"
            assert time.monotonic() < deadline, "the server did not start in 5 s"
            time.sleep(0.01)
        yield Running(sockets[0].getsockname()[1], settings.metrics_port or 0)
    finally:
        server.should_exit = True
        thread.join(5)
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A port nothing listens on right now."""
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def connect(port: int) -> socket.socket:
    """A raw TCP connection to the server."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (5 s at most)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_client_sending_headers_too_slowly_gets_408_and_is_disconnected() -> None:
    """A request line without the rest of its headers is answered 408 at the header deadline."""
    with running(echo_app(Seen([])), fast()) as server, closing(connect(server.port)) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 1.5


def test_trickled_header_bytes_do_not_extend_the_header_deadline() -> None:
    """One header byte every 0.1 s (slowloris) is cut off at the deadline from the first byte."""
    with running(echo_app(Seen([])), fast()) as server, closing(connect(server.port)) as sock:
        sock.settimeout(0.1)
        started = time.monotonic()
        answer = b""
        for byte in b"GET / HTTP/1.1\r\n" + b"x-padding: " + b"a" * 100:
            try:
                sock.send(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed < 1.5  # the whole trickle would take 12.7 s


def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline() -> None:
    """A connection opened and left silent is closed once the header deadline passes."""
    with running(echo_app(Seen([])), fast()) as server, closing(connect(server.port)) as sock:
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed < 1.5


def test_the_next_request_on_a_kept_alive_connection_has_the_same_header_deadline() -> None:
    """After a response, a partial next request on the same connection is cut off in time."""
    with running(echo_app(Seen([])), fast()) as server, closing(connect(server.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"0\r\n\r\n"):  # the whole chunked response, not its start
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        time.sleep(0.3)  # idle, within uvicorn's keep-alive timeout
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 1.5


def test_a_body_sent_too_slowly_gets_408_and_the_app_a_disconnect() -> None:
    """A body still incomplete at the body deadline is answered 408; the app reads a disconnect."""
    seen = Seen([])
    with running(echo_app(seen), fast()) as server, closing(connect(server.port)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
        time.sleep(0.1)  # the app's task reads the disconnect on the server's loop
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 1.5
    assert seen.disconnects == 1
    assert seen.bodies == []


def test_requests_in_time_are_served_however_long_the_app_takes() -> None:
    """Timely requests on a kept-alive connection are answered, even after both deadlines pass
    while the app works: the deadlines bound the client's sending, not the answer."""
    seen = Seen([])
    with (
        running(echo_app(seen), fast()) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client,
    ):
        slow = client.post("/slow", content=b"x" * 1000)
        again = client.post("/", content=b"y" * 10)
    assert (slow.status_code, slow.text) == (200, "1000")
    assert (again.status_code, again.text) == (200, "10")
    assert seen.bodies == [b"x" * 1000, b"y" * 10]


def test_connections_beyond_the_limit_are_refused_with_503() -> None:
    """With two connections allowed, both are served and a third is answered 503 and closed
    before it sends anything; once one closes, a new connection is served again."""
    settings = ServiceSettings(http_max_connections=2, http_header_timeout_s=5.0)
    with running(echo_app(Seen([])), settings) as server:
        with closing(connect(server.port)) as first, closing(connect(server.port)) as second:
            for sock in (first, second):
                sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            with closing(connect(server.port)) as third:
                assert read_until_closed(third).startswith(b"HTTP/1.1 503 ")
        time.sleep(0.1)  # the server notices the two closed connections
        with closing(connect(server.port)) as later:
            later.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert later.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_metrics_are_open_on_a_loopback_service_port_without_a_token() -> None:
    """Listening on loopback (medmesh up, tests), /metrics is served on the service's port."""
    with running(echo_app(Seen([])), ServiceSettings()) as server:
        answer = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")


def test_metrics_ask_for_the_bearer_token_when_one_is_set() -> None:
    """With MEDMESH_METRICS_TOKEN, /metrics without (or with a wrong) token is 401."""
    settings = ServiceSettings(metrics_token=SecretStr("scrape-me"))
    with running(echo_app(Seen([])), settings) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        missing = httpx.get(url, timeout=5)
        wrong = httpx.get(url, headers={"authorization": "Bearer nope"}, timeout=5)
        right = httpx.get(url, headers={"authorization": "Bearer scrape-me"}, timeout=5)
        other = httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5)
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert right.status_code == 200
    assert other.status_code == 200  # only /metrics asks for the token


def test_metrics_live_only_on_the_metrics_port_when_one_is_set() -> None:
    """With MEDMESH_METRICS_PORT, /metrics is 404 on the service's port, served on the metrics
    port, and nothing else is served there; this holds beyond loopback without a token."""
    settings = ServiceSettings(http_host="0.0.0.0", metrics_port=free_port())  # noqa: S104
    with running(echo_app(Seen([])), settings) as server:
        public = f"http://127.0.0.1:{server.port}"
        metrics = f"http://127.0.0.1:{server.metrics_port}"
        assert httpx.get(f"{public}/metrics", timeout=5).status_code == 404
        assert httpx.get(f"{public}/", timeout=5).status_code == 200
        assert httpx.get(f"{metrics}/metrics", timeout=5).status_code == 200
        assert httpx.get(f"{metrics}/", timeout=5).status_code == 404
        assert httpx.post(f"{metrics}/metrics", timeout=5).status_code == 405


def test_the_metrics_port_has_the_same_header_deadline() -> None:
    """The metrics port is served by the same protocol: a silent connection is closed there too."""
    settings = fast(metrics_port=free_port())
    with (
        running(echo_app(Seen([])), settings) as server,
        closing(connect(server.metrics_port)) as sock,
    ):
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_server_speaks_tls_with_the_configured_certificate(tmp_path: Path) -> None:
    """With MEDMESH_TLS_CERT_FILE and MEDMESH_TLS_KEY_FILE, requests are served over HTTPS."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    settings = ServiceSettings(tls_cert_file=cert, tls_key_file=key)
    with running(echo_app(Seen([])), settings) as server:
        trusted = ssl.create_default_context(cafile=str(cert))
        answer = httpx.post(
            f"https://127.0.0.1:{server.port}/", content=b"abc", verify=trusted, timeout=5
        )
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5)
    assert (answer.status_code, answer.text) == (200, "3")


def ingest_settings(**overrides: Any) -> IngestSettings:
    """Ingest settings for an app that is built but never started."""
    return IngestSettings(model_specs_dir=SPECS_DIR, rebuild_readings_on_start=False, **overrides)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
async def test_ingest_serves_no_api_description_by_default(path: str) -> None:
    """/docs, /redoc and /openapi.json are 404 on ingest unless MEDMESH_HTTP_DOCS is set."""
    app = create_ingest_app(ingest_settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        assert (await client.get(path)).status_code == 404


async def test_ingest_serves_its_api_description_with_http_docs() -> None:
    """MEDMESH_HTTP_DOCS=true turns /docs and /openapi.json on (development)."""
    app = create_ingest_app(ingest_settings(http_docs=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "medmesh ingest"


@pytest.mark.parametrize("path", ["/docs", "/asyncapi", "/docs/asyncapi", "/openapi.json"])
async def test_a_faststream_service_serves_no_api_description(path: str) -> None:
    """The router (an AsgiFastStream app, like the workers and reporting) has no doc route."""
    app = create_router_app(RouterSettings(model_specs_dir=SPECS_DIR))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        assert (await client.get(path)).status_code == 404
