"""The CLI's Kafka clients against a real broker's SASL_SSL listener (issue 20 item 1): SCRAM-SHA-512
over TLS, the broker's certificate from a throwaway CA, the settings from a context of a contexts
file, the password from a variable, exactly as an operator's workstation would run them.

Kafka only (no Triton, no services): one broker for the module, on MEDMESH_E2E_PORT_BASE + 60
(PLAINTEXT, the broker's own), + 61 (controller) and + 62 (SASL_SSL); the end-to-end stack uses
+0..2, +42, +80..93 and the other modules' stacks +500 and up. The commands run in this process
(typer's CliRunner on the real app: a child process costs seconds of imports each), except one
refused login that runs as the installed CLI does (``python -m medmesh_cli.main``), so that what
an operator would see on the terminal, a traceback included, is checked once as it is.
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
from medmesh_cli.devstack.tls import generate_tls
from medmesh_cli.ops.dlq import DEAD_LETTER_TOPICS
from tests.e2e.conftest import E2E_PORT_BASE
from tests.e2e.secured_cli import run_cli, run_cli_process, seed_registry

SASL_PORT_BASE = E2E_PORT_BASE + 60
USER = "ops"
# Test-only secrets of a broker that lives as long as this module; distinct enough to be
# searched for in every output.
PASSWORD = "Sasl-right-7f3c1"  # noqa: S105 -- the throwaway broker's test user
WRONG_PASSWORD = "Sasl-wrong-9b2e4"  # noqa: S105 -- a wrong one, on purpose
PASSWORD_VARIABLE = "MEDMESH_TEST_KAFKA_PASSWORD"  # noqa: S105 -- a variable's name
MODEL = "sasl-probe"


@dataclass(frozen=True)
class SaslKafka:
    """The running broker's SASL_SSL address and the contexts file that names it."""

    bootstrap: str
    contexts: Path


def _contexts_file(path: Path, bootstrap: str, ca: Path) -> None:
    common = (
        f'bootstrap_servers = "{bootstrap}"\n'
        'security_protocol = "SASL_SSL"\n'
        'sasl_mechanism = "SCRAM-SHA-512"\n'
        f'sasl_username = "{USER}"\n'
        f'sasl_password_env = "{PASSWORD_VARIABLE}"\n'
    )
    path.write_text(
        # t: the broker's CA given; system: the same without it (the system store, which does
        # not hold the throwaway CA).
        f'[contexts.t]\n{common}ssl_cafile = "{ca}"\n\n[contexts.system]\n{common}'
    )


def medmesh(kafka: SaslKafka, *args: str, password: str = PASSWORD) -> Result:
    """Run ``medmesh ARGS`` (CliRunner) with the test's contexts file and password."""
    return run_cli(kafka.contexts, *args, extra={PASSWORD_VARIABLE: password})


def medmesh_process(
    kafka: SaslKafka, *args: str, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    """Run ``medmesh ARGS`` in a child process with the test's contexts file and password."""
    return run_cli_process(kafka.contexts, *args, extra={PASSWORD_VARIABLE: password})


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaslKafka]:
    """One broker with a SASL_SSL listener (user ops), its topics, and a registered model."""
    folder = tmp_path_factory.mktemp("sasl-kafka")
    tls = generate_tls(folder / "tls")
    config = KafkaConfig(
        data_dir=folder / "kafka",
        port=SASL_PORT_BASE,
        controller_port=SASL_PORT_BASE + 1,
        sasl_ssl_port=SASL_PORT_BASE + 2,
        sasl_users={USER: PASSWORD},
        tls=tls,
        heap="256m",
        partitions=1,
    )
    server = KafkaServer(config)
    started = time.monotonic()
    try:
        server.start(timeout_s=120)
        kafka = SaslKafka(config.sasl_ssl_bootstrap, folder / "contexts.toml")
        _contexts_file(kafka.contexts, kafka.bootstrap, tls.ca_cert)
        seed_registry(kafka.contexts, "t", MODEL, {PASSWORD_VARIABLE: PASSWORD})
    except Exception as exc:  # noqa: BLE001 -- re-raised as a failure naming what did not start
        server.stop()
        pytest.fail(f"Kafka with a SASL_SSL listener did not start: {exc}", pytrace=False)
    print(f"SASL_SSL broker up and seeded in {time.monotonic() - started:.1f}s")  # noqa: T201 -- the timing, with -s
    yield kafka
    server.stop()


def _fails_cleanly(result: Result) -> str:
    """The command ended with exit 1 (typer.Exit, no exception escaped); its output, checked to
    hold neither password."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert PASSWORD not in result.output
    assert WRONG_PASSWORD not in result.output
    return result.output


def test_dlq_list_reads_over_sasl_ssl(sasl_kafka: SaslKafka) -> None:
    """`medmesh dlq list --context t` reads every dead-letter topic through SCRAM over TLS."""
    result = medmesh(sasl_kafka, "dlq", "list", "--context", "t")
    assert result.exit_code == 0, result.output
    for topic in DEAD_LETTER_TOPICS:
        assert topic in result.output
    assert PASSWORD not in result.output


def test_models_list_reads_the_registry_over_sasl_ssl(sasl_kafka: SaslKafka) -> None:
    """`medmesh models list --context t` shows the model registered over SASL_SSL, by sasl:ops."""
    result = medmesh(sasl_kafka, "models", "list", "--context", "t")
    assert result.exit_code == 0, result.output
    assert MODEL in result.output
    assert f"sasl:{USER}" in result.output


def test_registry_write_records_the_sasl_principal(sasl_kafka: SaslKafka) -> None:
    """`medmesh models route` writes over SASL_SSL and `models history` names actor sasl:ops."""
    route = medmesh(
        sasl_kafka, "models", "route", MODEL, "--rule", "version=1,site=north", "--context", "t"
    )
    assert route.exit_code == 0, route.output
    assert f"{MODEL}: rules -> revision 2" in route.output
    history = medmesh(sasl_kafka, "models", "history", MODEL, "--context", "t")
    assert history.exit_code == 0, history.output
    rows = [line for line in history.output.splitlines() if " rules " in line]
    assert len(rows) == 1, history.output
    assert f"sasl:{USER}" in rows[0], history.output


def test_wrong_password_fails_clearly_without_the_secret(sasl_kafka: SaslKafka) -> None:
    """A wrong SCRAM password, on a terminal: exit 1, the broker and the refused SCRAM login
    named, no traceback, neither password."""
    result = medmesh_process(sasl_kafka, "dlq", "list", "--context", "t", password=WRONG_PASSWORD)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert f"Kafka at {sasl_kafka.bootstrap} (context 't': SASL_SSL, SCRAM-SHA-512 as ops" in output
    assert "SaslAuthenticationFailed" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Unclosed" not in output, output[-3000:]
    assert PASSWORD not in output
    assert WRONG_PASSWORD not in output


def test_wrong_password_refuses_a_write(sasl_kafka: SaslKafka) -> None:
    """A registry write with a wrong password fails cleanly, and nothing is written."""
    output = _fails_cleanly(
        medmesh(sasl_kafka, "models", "pause", MODEL, "--context", "t", password=WRONG_PASSWORD)
    )
    assert "SaslAuthenticationFailed" in output, output
    history = medmesh(sasl_kafka, "models", "history", MODEL, "--context", "t")
    assert history.exit_code == 0, history.output
    assert " pause " not in history.output


def test_without_the_ca_the_tls_handshake_fails_clearly(sasl_kafka: SaslKafka) -> None:
    """A context without ssl_cafile (the system store) fails certificate verification, said so
    with the broker and where the CA was looked for."""
    output = _fails_cleanly(medmesh(sasl_kafka, "dlq", "list", "--context", "system"))
    assert f"Kafka at {sasl_kafka.bootstrap} (context 'system'" in output, output
    assert "CA of the system store" in output, output
    assert "CERTIFICATE_VERIFY_FAILED" in output, output
