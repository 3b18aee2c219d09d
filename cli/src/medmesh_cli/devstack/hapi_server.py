"""The local stack's FHIR server: HAPI FHIR's JPA server (FHIR R4, H2 database) on loopback.

The hospital's FHIR server that reporting delivers its reports to (``MEDMESH_FHIR_SERVER_URL``),
standing in for a real one in `medmesh up`, `make run` and the delivery tests. Its jars are
resolved by Maven from deploy/hapi-server/pom.xml into the cache the Kafka jars use
(~/.cache/medmesh, outside the repository) once, and the launcher
deploy/hapi-server/src/.../FhirServer.java (plain Spring and an embedded Jetty, no Spring Boot) is
compiled there with javac, again once per source.

R4, because HAPI's JPA server serves one FHIR version per server and R4 is the version hospitals
run; the demo's reports are R4 or R4B (the sources' versions), and an R4B report's resources are
R4's as the report builder writes them (medmesh_reporting.report). Its database lives in the
stack's state folder: ``start`` begins empty, ``restart`` (an outage) keeps what it committed.
A hospital's server holds the resources a report points at (its Patient, the Observations it was
derived from); this one creates a placeholder for each it lacks (the launcher says why), and the
stack puts the demo's patients there at start (``demo_patients``), so that a search by subject
shows who they are.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from medmesh_cli.devstack.maven import JavaLauncher, ensure_java_launcher, pom_property
from medmesh_cli.devstack.paths import cache_dir, repo_root
from medmesh_cli.devstack.process import ManagedProcess, wait_until

MAIN_CLASS = "dev.medmesh.fhirserver.FhirServer"
# 768 MiB of heap is plenty for a test server's traffic; the serial collector and the quick C1
# compiler alone start it in about half the CPU time of the defaults on a two-core machine.
JVM_OPTIONS = ("-Xmx768m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
FHIR_JSON = "application/fhir+json"
# Where the demo's events keep their Patients (the files `medmesh up --demo` sends), and the
# patients of the imaging demo, whose ImagingStudy resources name them (main.demo_studies).
DEMO_EVENT_FILES = ("vitals-bundle-*.json", "ecg-sinus.json", "ecg-af.json")
DEMO_IMAGING_PATIENTS = ("demo-cxr-clear", "demo-cxr-opacity")


def _project() -> Path:
    return repo_root() / "deploy" / "hapi-server"


def hapi_version() -> str:
    """The HAPI FHIR version pinned in deploy/hapi-server/pom.xml."""
    return pom_property(_project(), "hapi.version")


def _root() -> Path:
    return cache_dir() / f"hapi-server-{hapi_version()}"


def fhir_server_cached() -> bool:
    """Whether the server's jars are already resolved (no Maven run needed)."""
    return (_root() / "lib" / ".complete").exists()


def ensure_fhir_server() -> JavaLauncher:
    """The server, resolving its jars (Maven) and compiling its launcher (javac) on first use."""
    return ensure_java_launcher(_project(), _root(), "FHIR server (HAPI JPA)")


@dataclass(frozen=True)
class FhirServerConfig:
    """Where the server listens (127.0.0.1 only) and keeps its database and log."""

    state_dir: Path
    port: int

    @property
    def base_url(self) -> str:
        """The FHIR base URL: ``GET {base_url}/DiagnosticReport?subject=...``."""
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def database_dir(self) -> Path:
        """The H2 database's folder (per HAPI version: another version starts afresh)."""
        return self.state_dir / f"h2-{hapi_version()}"


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class FhirServer:
    """One HAPI JPA server process."""

    def __init__(self, config: FhirServerConfig, echo: bool = False) -> None:
        self.config = config
        self.echo = echo
        self._process: ManagedProcess | None = None
        # Set by close(): a start still under way in another thread (Stack starts the server
        # beside Kafka) must not leave a JVM running once the stack was stopped.
        self._closed = False
        # Seconds from launch until it answered a search, of the last (re)start.
        self.start_seconds: float | None = None

    @property
    def base_url(self) -> str:
        """The server's FHIR base URL."""
        return self.config.base_url

    def start(self, timeout_s: float = 180.0) -> None:
        """Empty the database, start the server, wait until it answers a search."""
        if _port_open(self.config.port):
            raise RuntimeError(
                f"FHIR server: port {self.config.port} is already in use; is another medmesh "
                "stack running?"
            )
        shutil.rmtree(self.config.database_dir, ignore_errors=True)
        self.config.database_dir.mkdir(parents=True)
        self.launch(timeout_s)

    def launch(self, timeout_s: float = 180.0) -> None:
        """Start the server on its existing database; wait until it answers a search."""
        build = ensure_fhir_server()
        log = self.config.state_dir / "fhir-server.log"
        if log.exists():
            # Readiness failures quote this run's log only: keep earlier runs' logs beside it.
            log.rename(self.config.state_dir / f"fhir-server-{time.time_ns()}.log")
        process = ManagedProcess(
            "fhir-server",
            [
                build.java,
                *JVM_OPTIONS,
                "-cp",
                build.classpath,
                MAIN_CLASS,
                str(self.config.port),
                str(self.config.database_dir),
            ],
            log,
            echo=self.echo,
        )
        if self._closed:
            raise RuntimeError("FHIR server: the stack was stopped before the server started")
        started = time.monotonic()
        process.start()
        self._process = process
        if self._closed:  # close() ran while this was starting: it may not have seen the process
            process.stop(grace_s=0.0)
            raise RuntimeError("FHIR server: the stack was stopped while the server started")

        def ready() -> bool:
            if not process.running():
                raise RuntimeError(
                    f"FHIR server exited with {process.returncode()}:\n{process.log_tail()}"
                )
            return self.is_ready()

        try:
            wait_until("the FHIR server (HAPI JPA)", ready, timeout_s, interval_s=0.5)
        except TimeoutError as exc:
            raise RuntimeError(f"FHIR server: {exc}\n{process.log_tail()}") from exc
        self.start_seconds = time.monotonic() - started

    def is_ready(self) -> bool:
        """Whether the server answers a search (its first /metadata takes far longer: HAPI
        builds the CapabilityStatement on demand, and nothing here needs it)."""
        try:
            response = httpx.get(f"{self.base_url}/Patient?_summary=count", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    @property
    def process(self) -> ManagedProcess:
        """The server's process (for fault-injection tests)."""
        if self._process is None:
            raise RuntimeError("the FHIR server is not started")
        return self._process

    def exited(self) -> bool:
        """Whether the server was started and no longer runs (never started: False)."""
        return self._process is not None and not self._process.running()

    def restart(self, down_s: float = 0.0, timeout_s: float = 180.0) -> None:
        """Stop the server, stay down ``down_s`` seconds, start it again with its database."""
        self.stop()
        time.sleep(down_s)
        self.launch(timeout_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (Jetty stops, H2 closes its files), SIGKILL after ``grace_s``; it may be
        launched again (an outage)."""
        if self._process is not None:
            self._process.stop(grace_s=grace_s)

    def close(self, grace_s: float = 10.0) -> None:
        """Stop for good: as ``stop``, and a start still under way in another thread stops its
        server as soon as it has launched it (or launches none)."""
        self._closed = True
        self.stop(grace_s)


def demo_patients() -> list[dict[str, Any]]:
    """The Patients of the demo's events (as the events carry them) and of its imaging studies
    (minimal ones): the hospital's server knows its patients before reports about them come."""
    fixtures = repo_root() / "tests" / "fixtures" / "fhir"
    patients: dict[str, dict[str, Any]] = {}
    for pattern in DEMO_EVENT_FILES:
        for path in sorted(fixtures.glob(pattern)):
            bundle = json.loads(path.read_text())
            for entry in bundle.get("entry", []):
                resource = entry.get("resource", {})
                if resource.get("resourceType") == "Patient":
                    patients[resource["id"]] = resource
    for patient_id in DEMO_IMAGING_PATIENTS:
        patients.setdefault(patient_id, {"resourceType": "Patient", "id": patient_id})
    return list(patients.values())


def put_patients(base_url: str, patients: Iterable[dict[str, Any]]) -> list[str]:
    """Create or update each Patient at its own id (PUT: idempotent); their references."""
    stored = []
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for patient in patients:
            reference = f"Patient/{patient['id']}"
            response = client.put(
                reference,
                content=json.dumps(patient).encode(),
                headers={"content-type": FHIR_JSON, "accept": FHIR_JSON},
            )
            if not response.is_success:
                raise RuntimeError(
                    f"FHIR server: PUT {reference} answered {response.status_code}: "
                    f"{response.text[:500]}"
                )
            stored.append(reference)
    return stored
