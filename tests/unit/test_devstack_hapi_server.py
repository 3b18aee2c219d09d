"""The stack's FHIR server as configured, without starting it: its port, the URL reporting
delivers to, the patients seeded for the demo, and where `medmesh up` says to look."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from medmesh_cli.devstack.hapi_server import demo_patients
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
    others = stack_ports(ports) - {ports.fhir_server}
    assert ports.fhir_server not in others
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
    services and no reports URL in the ready line; the start does not wait for the server."""
    config = StackConfig(
        ports=StackPorts.from_base(24000), state_dir=tmp_path, with_fhir_server=False
    )
    env = service_environment(config, ServiceSpec("reporting", "medmesh_reporting", 24090))
    assert "MEDMESH_FHIR_SERVER_URL" not in env
    assert "DiagnosticReport" not in ready_summary(config)
