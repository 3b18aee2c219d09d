"""The CLI's Kafka clients against a real broker's SSL listener that requires a client
certificate (mutual TLS, issue 20 item 1): the broker's certificate and the operator's client
certificate from a throwaway CA, the CA, certificate and key named by a context of a contexts
file, exactly as an operator's workstation would run them.

Kafka only (no Triton, no services): one broker for the module, on MEDMESH_E2E_PORT_BASE + 65
(PLAINTEXT, the broker's own), + 66 (controller) and + 67 (SSL, client certificates required);
the SASL_SSL module uses + 60..62, the end-to-end stack + 0..2, + 42, + 80..93 and the other
modules' stacks + 500 and up. The commands run in this process (typer's CliRunner on the real
app), except one refused certificate that runs as the installed CLI does (``python -m
medmesh_cli.main``), so that what an operator sees on the terminal is checked once as it is.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import Result

from medmesh_cli.devstack.kafka import KafkaConfig, KafkaServer
from medmesh_cli.devstack.tls import TlsFiles, generate_tls
from medmesh_cli.ops.dlq import DEAD_LETTER_TOPICS
from tests.e2e.conftest import E2E_PORT_BASE
from tests.e2e.secured_cli import run_cli, run_cli_process, seed_registry

MTLS_PORT_BASE = E2E_PORT_BASE + 65
CLIENT = "ops-alice"
# Kafka's SSL principal of the client certificate, as the audit trail records it.
PRINCIPAL = f"mtls:CN={CLIENT},O=medmesh devstack"
MODEL = "mtls-probe"


@dataclass(frozen=True)
class MtlsKafka:
    """The running broker's SSL address, the contexts file that names it, and the client keys
    (whose contents must never be printed)."""

    bootstrap: str
    contexts: Path
    keys: tuple[Path, ...]


def _contexts_file(path: Path, bootstrap: str, tls: TlsFiles, rogue: TlsFiles) -> None:
    common = f'bootstrap_servers = "{bootstrap}"\nsecurity_protocol = "SSL"\n'
    path.write_text(
        # t: the broker's CA and a client certificate it signed; nocert: the CA only;
        # rogue: a client certificate of another CA; swapped: the key given as the certificate.
        f'[contexts.t]\n{common}ssl_cafile = "{tls.ca_cert}"\n'
        f'ssl_certfile = "{tls.client_cert}"\nssl_keyfile = "{tls.client_key}"\n\n'
        f'[contexts.nocert]\n{common}ssl_cafile = "{tls.ca_cert}"\n\n'
        f'[contexts.rogue]\n{common}ssl_cafile = "{tls.ca_cert}"\n'
        f'ssl_certfile = "{rogue.client_cert}"\nssl_keyfile = "{rogue.client_key}"\n\n'
        f'[contexts.swapped]\n{common}ssl_cafile = "{tls.ca_cert}"\n'
        f'ssl_certfile = "{tls.client_key}"\nssl_keyfile = "{tls.client_key}"\n'
    )


def medmesh(kafka: MtlsKafka, *args: str) -> Result:
    """Run ``medmesh ARGS`` (CliRunner) with the test's contexts file."""
    return run_cli(kafka.contexts, *args)


def medmesh_process(kafka: MtlsKafka, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``medmesh ARGS`` in a child process with the test's contexts file."""
    return run_cli_process(kafka.contexts, *args)


@pytest.fixture(scope="module")
def mtls_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsKafka]:
    """One broker with an SSL listener requiring client certificates, its topics, a model."""
    folder = tmp_path_factory.mktemp("mtls-kafka")
    tls = generate_tls(folder / "tls", client=CLIENT)
    # The same client name, signed by a CA the broker does not trust.
    rogue = generate_tls(folder / "rogue", client=CLIENT)
    config = KafkaConfig(
        data_dir=folder / "kafka",
        port=MTLS_PORT_BASE,
        controller_port=MTLS_PORT_BASE + 1,
        ssl_port=MTLS_PORT_BASE + 2,
        tls=tls,
        heap="256m",
        partitions=1,
    )
    keys = tuple(k for k in (tls.client_key, rogue.client_key, tls.server_key) if k is not None)
    server = KafkaServer(config)
    started = time.monotonic()
    try:
        server.start(timeout_s=120)
        kafka = MtlsKafka(config.ssl_bootstrap, folder / "contexts.toml", keys)
        _contexts_file(kafka.contexts, kafka.bootstrap, tls, rogue)
        seed_registry(kafka.contexts, "t", MODEL)
    except Exception as exc:  # noqa: BLE001 -- re-raised as a failure naming what did not start
        server.stop()
        pytest.fail(f"Kafka with an mTLS (SSL) listener did not start: {exc}", pytrace=False)
    print(f"mTLS broker up and seeded in {time.monotonic() - started:.1f}s")  # noqa: T201 -- the timing, with -s
    yield kafka
    server.stop()


def _no_key_material(kafka: MtlsKafka, output: str) -> None:
    """No line of any private key's PEM body appears in ``output``."""
    for key in kafka.keys:
        body = [line for line in key.read_text().splitlines() if "-----" not in line]
        assert body
        assert not [line for line in body if line in output], f"{key.name} leaked"


def _fails_in_one_line(kafka: MtlsKafka, result: Result) -> str:
    """The command ended with exit 1 through typer.Exit (no exception escaped), in one line
    naming the broker and its security, with no key material."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    refused = [line for line in result.output.splitlines() if "refused or unreachable" in line]
    assert len(refused) == 1, result.output
    assert "Traceback" not in result.output
    _no_key_material(kafka, result.output)
    return refused[0]


def test_dlq_list_reads_over_mutual_tls(mtls_kafka: MtlsKafka) -> None:
    """`medmesh dlq list --context t` reads every dead-letter topic with a client certificate."""
    result = medmesh(mtls_kafka, "dlq", "list", "--context", "t")
    assert result.exit_code == 0, result.output
    for topic in DEAD_LETTER_TOPICS:
        assert topic in result.output


def test_models_list_reads_the_registry_over_mutual_tls(mtls_kafka: MtlsKafka) -> None:
    """`medmesh models list --context t` shows the model registered over mutual TLS, by the
    client certificate's subject."""
    result = medmesh(mtls_kafka, "models", "list", "--context", "t")
    assert result.exit_code == 0, result.output
    assert MODEL in result.output
    assert PRINCIPAL in result.output, result.output


def test_registry_write_records_the_certificate_principal(mtls_kafka: MtlsKafka) -> None:
    """`medmesh models route` writes over mutual TLS and `models history` names the client
    certificate's subject as the actor."""
    route = medmesh(
        mtls_kafka, "models", "route", MODEL, "--rule", "version=1,site=north", "--context", "t"
    )
    assert route.exit_code == 0, route.output
    assert f"{MODEL}: rules -> revision 2" in route.output
    history = medmesh(mtls_kafka, "models", "history", MODEL, "--context", "t")
    assert history.exit_code == 0, history.output
    rows = [line for line in history.output.splitlines() if " rules " in line]
    assert len(rows) == 1, history.output
    assert PRINCIPAL in rows[0], history.output


def test_untrusted_client_certificate_fails_in_one_line(mtls_kafka: MtlsKafka) -> None:
    """A client certificate of a CA the broker does not trust, on a terminal: exit 1, one line
    naming the broker and its SSL security, no traceback, no key material."""
    result = medmesh_process(mtls_kafka, "dlq", "list", "--context", "rogue")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    refused = [line for line in output.splitlines() if "refused or unreachable" in line]
    assert len(refused) == 1, output[-3000:]
    assert f"Kafka at {mtls_kafka.bootstrap} (context 'rogue': SSL" in refused[0], output
    assert "client certificate " in refused[0], output
    assert "Traceback" not in output, output[-3000:]
    assert "Unclosed" not in output, output[-3000:]
    _no_key_material(mtls_kafka, output)


def test_missing_client_certificate_fails_in_one_line(mtls_kafka: MtlsKafka) -> None:
    """A context with the CA but no client certificate is refused by the broker: one line."""
    line = _fails_in_one_line(
        mtls_kafka, medmesh(mtls_kafka, "models", "list", "--context", "nocert")
    )
    assert f"Kafka at {mtls_kafka.bootstrap} (context 'nocert': SSL" in line
    assert "no client certificate" in line


def test_untrusted_certificate_refuses_a_write(mtls_kafka: MtlsKafka) -> None:
    """A registry write with an untrusted client certificate fails cleanly; nothing is written."""
    _fails_in_one_line(
        mtls_kafka, medmesh(mtls_kafka, "models", "pause", MODEL, "--context", "rogue")
    )
    history = medmesh(mtls_kafka, "models", "history", MODEL, "--context", "t")
    assert history.exit_code == 0, history.output
    assert " pause " not in history.output


def test_a_key_given_as_the_certificate_is_a_usage_error_without_its_contents(
    mtls_kafka: MtlsKafka,
) -> None:
    """ssl_certfile naming the private key: exit 2 before any client, the key not printed."""
    result = medmesh(mtls_kafka, "dlq", "list", "--context", "swapped")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    _no_key_material(mtls_kafka, result.output)
