"""The stack's FHIR server as configured, without starting it: its port, the URL reporting
delivers to, the patients seeded for the demo, and where `medmesh up` says to look."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from medmesh_cli.devstack import hapi_server
from medmesh_cli.devstack.hapi_server import FhirServer, FhirServerConfig, demo_patients
from medmesh_cli.devstack.stack import (
    ServiceSpec,
    Stack,
    StackConfig,
    StackPorts,
    ready_summary,
    service_environment,
    stack_ports,
)
from medmesh_cli.devstack.studies import DEMO_STUDIES, demo_identity
from medmesh_cli.main import demo_studies, sample_events


def test_the_fhir_server_has_its_own_port_from_the_base(tmp_path: Path) -> None:
    """From a base the FHIR server listens on base+44, a port no other part of the stack takes."""
    ports = StackPorts.from_base(24000)
    assert ports.fhir_server == 24044
    assert ports.fhir_server in stack_ports(ports)
    assert astuple(ports).count(ports.fhir_server) == 1
    config = StackConfig(ports=ports, state_dir=tmp_path)
    assert config.fhir_server_url == "http://127.0.0.1:24044/fhir"


def test_reporting_delivers_to_the_stacks_fhir_server_unless_told_not_to(tmp_path: Path) -> None:
    """Every service is given the stack's FHIR server as MEDMESH_FHIR_SERVER_URL by default."""
    service = ServiceSpec("reporting", "medmesh_reporting", 24090)
    on = StackConfig(ports=StackPorts.from_base(24000), state_dir=tmp_path)
    assert service_environment(on, service)["MEDMESH_FHIR_SERVER_URL"] == on.fhir_server_url
    off = StackConfig(ports=StackPorts.from_base(24000), state_dir=tmp_path, deliver_reports=False)
    env = service_environment(off, service)
    assert env.get("MEDMESH_FHIR_SERVER_URL") != off.fhir_server_url


def test_the_seeded_patients_are_every_patient_the_demo_reports_on(tmp_path: Path) -> None:
    """Each Patient in the demo's events and each demo study's subject is seeded, and no other."""
    seeded = {f"Patient/{p['id']}" for p in demo_patients()}
    in_events = {
        f"Patient/{entry['resource']['id']}"
        for path in sample_events()
        for entry in json.loads(path.read_text()).get("entry", [])
        if entry["resource"]["resourceType"] == "Patient"
    }
    stack = SimpleNamespace(
        seeded_studies=[demo_identity(seed) for seed, _ in DEMO_STUDIES],
        config=StackConfig(ports=StackPorts.from_base(24000), state_dir=tmp_path),
    )
    studied = {s["subject"]["reference"] for s in demo_studies(cast(Stack, stack))}
    assert seeded == in_events | studied
    assert len(in_events) == 5
    assert len(studied) == 2


def test_up_names_the_console_and_the_fhir_servers_reports(tmp_path: Path) -> None:
    """The line `medmesh up` prints when ready names ingest, the console and the reports' URL."""
    config = StackConfig(ports=StackPorts.from_base(24000), state_dir=tmp_path)
    line = ready_summary(config)
    assert "http://127.0.0.1:24080/fhir" in line
    assert "console: http://127.0.0.1:24095/" in line
    assert "http://127.0.0.1:24044/fhir/DiagnosticReport" in line


def test_a_stack_without_the_fhir_server_neither_delivers_nor_names_it(tmp_path: Path) -> None:
    """with_fhir_server=False (benchmarks, the fault suite): no MEDMESH_FHIR_SERVER_URL for the
    services and no reports URL in the ready line."""
    config = StackConfig(
        ports=StackPorts.from_base(24000), state_dir=tmp_path, with_fhir_server=False
    )
    env = service_environment(config, ServiceSpec("reporting", "medmesh_reporting", 24090))
    assert "MEDMESH_FHIR_SERVER_URL" not in env
    assert "DiagnosticReport" not in ready_summary(config)


class _FakeJvm:
    """Stands for the server's process: records start and stop; ``on_start`` runs at start."""

    def __init__(self, on_start: Callable[[], None]) -> None:
        self.on_start = on_start
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True
        self.on_start()

    def stop(self, grace_s: float = 10.0) -> None:
        self.stopped = True

    def running(self) -> bool:
        return self.started and not self.stopped

    def log_tail(self) -> str:
        return ""


def _server_with_fake_jvm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_start: Callable[[FhirServer], None]
) -> tuple[FhirServer, list[_FakeJvm]]:
    made: list[_FakeJvm] = []
    # Port 1: nothing answers there, so readiness never comes.
    server = FhirServer(FhirServerConfig(state_dir=tmp_path, port=1))

    def fake_process(*_args: object, **_kwargs: object) -> _FakeJvm:
        made.append(_FakeJvm(lambda: on_start(server)))
        return made[-1]

    build = SimpleNamespace(java="java", classpath="lib/*")
    monkeypatch.setattr(hapi_server, "ensure_fhir_server", lambda: build)
    monkeypatch.setattr(hapi_server, "ManagedProcess", fake_process)
    return server, made


def test_a_server_closed_while_it_starts_does_not_stay_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() (the stack stopping) while another thread is launching the server, after the
    JVM started: the launch stops that JVM and fails instead of leaving it running."""
    server, made = _server_with_fake_jvm(tmp_path, monkeypatch, lambda s: s.close())
    with pytest.raises(RuntimeError, match="stopped while the server started"):
        server.launch()
    assert made[0].started
    assert made[0].stopped


def test_a_server_closed_before_it_starts_launches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() before the launch: no JVM is started at all; stop() alone (an outage) does not
    prevent a later launch."""
    server, made = _server_with_fake_jvm(tmp_path, monkeypatch, lambda _s: None)
    server.stop()
    with pytest.raises(RuntimeError, match="FHIR server: "):
        server.launch(timeout_s=0.2)  # launched, but the fake JVM never answers
    server.close()
    with pytest.raises(RuntimeError, match="stopped before the server started"):
        server.launch()
    assert [jvm.started for jvm in made] == [True, False]
