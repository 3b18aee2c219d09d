"""The whole local stack: Kafka, Triton, Orthanc (the PACS), HAPI FHIR (the hospital's FHIR
server, which reporting delivers its reports to) and the four services, each its own OS process.

Used by ``medmesh up`` and by the end-to-end test fixtures, so tests run exactly what users run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from medmesh_cli.devstack.hapi_server import (
    FhirServer,
    FhirServerConfig,
    demo_patients,
    ensure_fhir_server,
    fhir_server_cached,
    put_patients,
)
from medmesh_cli.devstack.kafka import (
    KafkaConfig,
    KafkaServer,
    ensure_kafka_jars,
    kafka_jars_cached,
)
from medmesh_cli.devstack.model_repository import version_folders
from medmesh_cli.devstack.orthanc import (
    OrthancConfig,
    OrthancServer,
    dicomweb_plugin,
    orthanc_binary,
)
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.process import ManagedProcess, stop_all, wait_until
from medmesh_cli.devstack.studies import StudyIdentity, seed_demo_studies
from medmesh_cli.devstack.topics import create_topics
from medmesh_cli.devstack.triton import TritonPorts, TritonServer, detect_gpu_count
from medmesh_contracts.modelspec import load_specs
from medmesh_contracts.topics import all_topics

Topology = Literal["services", "monolith"]

# How Stack.start tells its caller what it is doing (``medmesh up`` shows it as progress; the
# devstack stays free of any terminal library): ``on_step(component, state)``, every component
# first WAITING (in start order), then STARTING, READY; any other state is a detail of a long
# step (fetching the broker jars). Triton starts in a thread: its calls come from that thread.
StepCallback = Callable[[str, str], None]
WAITING, STARTING, READY = "waiting", "starting", "ready"
# The components besides the services, in the order Stack.start reports them.
INFRASTRUCTURE_STEPS = ("kafka", "orthanc", "studies", "topics", "triton", "fhir-server")

# Stack.stop: how long services, then Triton and Kafka, get to stop on SIGTERM before SIGKILL.
# Together with the SIGKILL waits they fit the promise that `medmesh up` stops within 15 s.
SERVICES_STOP_GRACE_S = 6.0
INFRA_STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class StackPorts:
    """Every port the local stack listens on (loopback only)."""

    kafka: int = 9092
    kafka_controller: int = 9093
    triton_http: int = 8000
    triton_grpc: int = 8001
    triton_metrics: int = 8002
    ingest: int = 8080
    router: int = 8181
    first_worker: int = 8182
    reporting: int = 8184
    console: int = 8190
    # Not Orthanc's usual 8042: a machine may run the orthanc package's own service there.
    orthanc_http: int = 8242
    # HAPI FHIR's JPA server: the FHIR server reports are delivered to.
    fhir_server: int = 8244

    @classmethod
    def from_base(cls, base: int) -> StackPorts:
        """Every port derived from one base, so that stacks (tests, benchmarks) sit side by side."""
        return cls(
            kafka=base + 92,
            kafka_controller=base + 93,
            triton_http=base,
            triton_grpc=base + 1,
            triton_metrics=base + 2,
            ingest=base + 80,
            router=base + 81,
            first_worker=base + 82,
            reporting=base + 90,
            console=base + 95,
            orthanc_http=base + 42,
            fhir_server=base + 44,
        )


@dataclass(frozen=True)
class ServiceSpec:
    """One service process: its module, health port and extra environment."""

    name: str
    module: str
    port: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StackConfig:
    """What to start and where its state goes."""

    ports: StackPorts = field(default_factory=StackPorts)
    state_dir: Path = field(default_factory=lambda: run_dir("stack"))
    echo: bool = False
    kafka_heap: str = "512m"
    partitions: int = 3
    extra_env: dict[str, str] = field(default_factory=dict)
    # Other model specs / another Triton model repository (tests that add a model); None: deploy/.
    specs_dir_override: Path | None = None
    model_repository_override: Path | None = None
    # "services": one process per service; "monolith": the four stages in one process
    # (medmesh_monolith) on ingest's port, with Kafka only at the edges.
    topology: Topology = "services"
    # Reporting delivers every report to the stack's FHIR server (MEDMESH_FHIR_SERVER_URL).
    deliver_reports: bool = True
    # The stack's HAPI FHIR server. Benchmarks and the fault suite leave it out: a JVM with a
    # 768 MB heap whose start and CPU are not the pipeline's (and nothing is delivered then).
    with_fhir_server: bool = True

    @property
    def specs_dir(self) -> Path:
        """The model specs the services serve."""
        if self.specs_dir_override is not None:
            return self.specs_dir_override
        return repo_root() / "deploy" / "models"

    @property
    def model_repository(self) -> Path:
        """The Triton model repository."""
        if self.model_repository_override is not None:
            return self.model_repository_override
        return repo_root() / "deploy" / "triton" / "models"

    @property
    def trace_file(self) -> Path:
        """Where every service appends its finished spans."""
        return self.state_dir / "spans.jsonl"

    @property
    def ingest_url(self) -> str:
        """Base URL of ingest's FHIR endpoint."""
        return f"http://127.0.0.1:{self.ports.ingest}"

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap address."""
        return f"127.0.0.1:{self.ports.kafka}"

    @property
    def orthanc(self) -> OrthancConfig:
        """The stack's PACS: where it listens and keeps its studies."""
        return OrthancConfig(
            state_dir=self.state_dir / "orthanc", http_port=self.ports.orthanc_http
        )

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the PACS's DICOMweb API (QIDO-RS, WADO-RS, STOW-RS)."""
        return self.orthanc.dicomweb_url

    @property
    def fhir_server(self) -> FhirServerConfig:
        """The stack's FHIR server: where it listens and keeps its database."""
        return FhirServerConfig(
            state_dir=self.state_dir / "fhir-server", port=self.ports.fhir_server
        )

    @property
    def fhir_server_url(self) -> str:
        """Base URL of the stack's FHIR server (the delivered reports are searchable there)."""
        return self.fhir_server.base_url

    @property
    def console_url(self) -> str:
        """The operator console's page."""
        return f"http://127.0.0.1:{self.ports.console}/"


def ready_summary(config: StackConfig) -> str:
    """Where to go once the stack is up: FHIR in, the console, the reports on the FHIR server."""
    reports = (
        f"reports: {config.fhir_server_url}/DiagnosticReport; "
        if config.with_fhir_server and config.deliver_reports
        else ""
    )
    return (
        f"POST FHIR to {config.ingest_url}/fhir; console: {config.console_url}; "
        f"{reports}logs: `medmesh logs NAME` (files in {config.state_dir})"
    )


def service_specs(config: StackConfig) -> list[ServiceSpec]:
    """ingest, router, one worker per deployed model version, reporting and the console (or the
    monolith alone)."""
    ports = config.ports
    if config.topology == "monolith":
        return [ServiceSpec("monolith", "medmesh_monolith", ports.ingest)]
    services = [
        ServiceSpec("ingest", "medmesh_ingest", ports.ingest),
        ServiceSpec("router", "medmesh_router", ports.router),
    ]
    port = ports.first_worker
    for spec in load_specs(config.specs_dir).values():
        for version in spec.versions:
            services.append(
                ServiceSpec(
                    f"{spec.name}-v{version.version}",
                    "medmesh_inference",
                    port,
                    {
                        "MEDMESH_WORKER_MODEL": spec.name,
                        "MEDMESH_WORKER_MODEL_VERSION": str(version.version),
                        "MEDMESH_WORKER_PORT": str(port),
                    },
                )
            )
            port = next_free_port(port + 1, stack_ports(ports))
    services.append(ServiceSpec("reporting", "medmesh_reporting", ports.reporting))
    router_url = f"http://127.0.0.1:{ports.router}"
    services.append(
        ServiceSpec(
            "console",
            "medmesh_console",
            ports.console,
            {"MEDMESH_CONSOLE_PORT": str(ports.console), "MEDMESH_ROUTER_URL": router_url},
        )
    )
    return services


def stack_ports(ports: StackPorts) -> set[int]:
    """The ports of the stack's fixed parts (a worker's port is never one of them)."""
    return {
        ports.kafka,
        ports.kafka_controller,
        ports.triton_http,
        ports.triton_grpc,
        ports.triton_metrics,
        ports.ingest,
        ports.router,
        ports.reporting,
        ports.console,
        ports.orthanc_http,
        ports.fhir_server,
    }


# The variable each service module reads its health port from (a second instance needs its own).
PORT_VARIABLES = {
    "medmesh_ingest": "MEDMESH_INGEST_PORT",
    "medmesh_router": "MEDMESH_ROUTER_PORT",
    "medmesh_inference": "MEDMESH_WORKER_PORT",
    "medmesh_reporting": "MEDMESH_REPORTING_PORT",
    "medmesh_console": "MEDMESH_CONSOLE_PORT",
}


def next_free_port(candidate: int, taken: set[int]) -> int:
    """``candidate``, or the first port after it that is not ``taken``."""
    while candidate in taken:
        candidate += 1
    return candidate


def service_environment(config: StackConfig, service: ServiceSpec) -> dict[str, str]:
    """The environment of one service process: the MEDMESH_ settings of this stack."""
    ports = config.ports
    env = dict(os.environ)
    env.update(
        {
            "MEDMESH_KAFKA_BOOTSTRAP_SERVERS": config.bootstrap,
            "MEDMESH_TRITON_GRPC_URL": f"127.0.0.1:{ports.triton_grpc}",
            # The stack's Orthanc: the one PACS ingest and the workers may read images from.
            "MEDMESH_PACS_URLS": config.dicomweb_url,
            "MEDMESH_MODEL_SPECS_DIR": str(config.specs_dir),
            "MEDMESH_TRACE_FILE": str(config.trace_file),
            "MEDMESH_INGEST_PORT": str(ports.ingest),
            "MEDMESH_ROUTER_PORT": str(ports.router),
            "MEDMESH_REPORTING_PORT": str(ports.reporting),
            "MEDMESH_INSTANCE_ID": f"{service.name}-1",
            # A local stack: ingest may start with the development pseudonym key.
            "MEDMESH_ENVIRONMENT": "development",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if config.deliver_reports and config.with_fhir_server:
        env["MEDMESH_FHIR_SERVER_URL"] = config.fhir_server_url
    env.update(config.extra_env)
    env.update(service.env)
    return env


class Stack:
    """Start and stop the whole local stack."""

    def __init__(self, config: StackConfig, on_step: StepCallback | None = None) -> None:
        self.config = config
        # Told each step of start (and each service that becomes ready); None: nobody listens.
        self.on_step = on_step
        self.kafka = KafkaServer(
            KafkaConfig(
                data_dir=config.state_dir / "kafka",
                port=config.ports.kafka,
                controller_port=config.ports.kafka_controller,
                heap=config.kafka_heap,
                partitions=config.partitions,
            ),
            echo=config.echo,
        )
        self.triton = self._new_triton()
        self.orthanc = OrthancServer(config.orthanc, echo=config.echo)
        self.fhir_server = FhirServer(config.fhir_server, echo=config.echo)
        # The Patients put on the FHIR server at start (the demo's), as references.
        self.seeded_patients: list[str] = []
        # The studies seeded into the PACS at start (their UIDs are the same on every start).
        self.seeded_studies: list[StudyIdentity] = []
        self.services: dict[str, ManagedProcess] = {}
        # How each service was started (its port may differ from service_specs' for a worker
        # added while the stack runs).
        self.running: dict[str, ServiceSpec] = {}
        self._tailers: list[threading.Thread] = []
        self._stopping = threading.Event()

    def _new_triton(self) -> TritonServer:
        config = self.config
        return TritonServer(
            config.model_repository,
            ports=TritonPorts(
                config.ports.triton_http, config.ports.triton_grpc, config.ports.triton_metrics
            ),
            gpu_count=detect_gpu_count(),
            log=config.state_dir / "triton.log",
            work_dir=config.state_dir / "triton",
        )

    def start(self, timeout_s: float = 180.0) -> None:
        """Start everything and wait until every service answers /readyz; stop all on failure."""
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        for stale in (self.config.trace_file, state / "triton.log"):
            stale.unlink(missing_ok=True)
        try:
            self._start_all(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _step(self, component: str, state: str) -> None:
        if self.on_step is not None:
            self.on_step(component, state)

    def _start_all(self, timeout_s: float) -> None:
        # Before anything starts: a machine without Orthanc learns how to get it at once.
        orthanc_binary()
        dicomweb_plugin()
        services = service_specs(self.config)
        infrastructure = [
            step
            for step in INFRASTRUCTURE_STEPS
            if self.config.with_fhir_server or step != "fhir-server"
        ]
        for component in (*infrastructure, *(s.name for s in services)):
            self._step(component, WAITING)
        triton_error: list[BaseException] = []
        triton_thread = threading.Thread(
            target=self._start_triton, args=(triton_error,), name="triton-start", daemon=True
        )
        triton_thread.start()
        # HAPI starts in a JVM of its own for tens of seconds, beside Kafka and Triton.
        fhir_error: list[BaseException] = []
        fhir_thread = threading.Thread(
            target=self._start_fhir_server, args=(fhir_error,), name="fhir-start", daemon=True
        )
        if self.config.with_fhir_server:
            fhir_thread.start()
        self._step("kafka", STARTING)
        if not kafka_jars_cached():
            self._step("kafka", "fetching the broker jars (Maven, first run only)")
            ensure_kafka_jars()
        self.kafka.start()
        self._step("kafka", READY)
        self._step("orthanc", STARTING)
        self.orthanc.start()
        self._step("orthanc", READY)
        self._step("studies", STARTING)
        self.seeded_studies = seed_demo_studies(self.orthanc.dicomweb_url)
        self._step("studies", READY)
        self._step("topics", STARTING)
        specs = load_specs(self.config.specs_dir)
        versions = [(s.name, v.version) for s in specs.values() for v in s.versions]
        asyncio.run(
            create_topics(self.config.bootstrap, all_topics(versions, self.config.partitions))
        )
        self._step("topics", READY)
        triton_thread.join()
        if triton_error:
            raise RuntimeError(f"Triton did not start: {triton_error[0]}") from triton_error[0]
        if self.config.with_fhir_server:
            fhir_thread.join()
        if fhir_error:
            raise RuntimeError(f"the FHIR server did not start: {fhir_error[0]}") from fhir_error[0]
        for service in services:
            self._step(service.name, STARTING)
            self._start_service(service)
        self._wait_ready(timeout_s)

    def _start_triton(self, errors: list[BaseException]) -> None:
        self._step("triton", STARTING)
        try:
            self.triton.start()
        except BaseException as exc:  # noqa: BLE001 -- handed to the starting thread, which raises it
            errors.append(exc)
            return
        self._step("triton", READY)
        if self.config.echo:
            self._tail(self.config.state_dir / "triton.log", "triton")

    def _start_fhir_server(self, errors: list[BaseException]) -> None:
        self._step("fhir-server", STARTING)
        try:
            if not fhir_server_cached():
                self._step("fhir-server", "fetching HAPI's jars (Maven, first run only)")
            ensure_fhir_server()
            self.fhir_server.start()
            self.seeded_patients = put_patients(self.fhir_server.base_url, demo_patients())
        except BaseException as exc:  # noqa: BLE001 -- handed to the starting thread, which raises it
            errors.append(exc)
            return
        self._step("fhir-server", READY)

    def reconcile(self) -> list[str]:
        """Take in what was added while the stack runs (a hot deploy, locally): render every
        Triton model folder new to the served repository, or with a new version folder (a later
        `load` serves it; nothing is loaded here) and start a worker for every spec version that has none. What it did.

        `medmesh up` calls this every few seconds; compose and Kubernetes do the same with a
        new worker service / Deployment per version (deploy/k8s/generate.py).
        """
        done: list[str] = []
        served = self.triton.served_repository
        if served is not None:
            for config in sorted(self.config.model_repository.glob("*/config.pbtxt")):
                name = config.parent.name
                if name in self.triton.added_models:
                    continue
                rendered = served / name
                if not rendered.is_dir() or version_folders(config.parent) != version_folders(
                    rendered
                ):
                    # A new model, or a model with a new version folder: rendered for the
                    # next `load` (the versions Triton serves now keep serving).
                    self.triton.render_model(name)
                    done.append(f"rendered Triton model {name}")
        if self.config.topology != "services":
            return done
        taken = stack_ports(self.config.ports) | {s.port for s in self.running.values()}
        for service in service_specs(self.config):
            if service.name in self.services:
                continue
            port = next_free_port(service.port, taken)
            taken.add(port)
            self._start_service(
                ServiceSpec(
                    service.name,
                    service.module,
                    port,
                    {**service.env, "MEDMESH_WORKER_PORT": str(port)},
                )
            )
            done.append(f"started {service.name} on port {port}")
        return done

    def _start_service(self, service: ServiceSpec) -> None:
        process = ManagedProcess(
            service.name,
            [sys.executable, "-m", service.module],
            self.config.state_dir / f"{service.name}.log",
            env=service_environment(self.config, service),
            cwd=repo_root(),
            echo=self.config.echo,
        )
        process.start()
        self.services[service.name] = process
        self.running[service.name] = service

    def _wait_ready(self, timeout_s: float, only: dict[str, int] | None = None) -> None:
        pending = (
            dict(only) if only is not None else {s.name: s.port for s in service_specs(self.config)}
        )

        def all_ready() -> bool:
            for name, port in list(pending.items()):
                process = self.services[name]
                if not process.running():
                    raise RuntimeError(
                        f"service {name} exited with {process.returncode()}:\n{process.log_tail()}"
                    )
                try:
                    response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2.0)
                except httpx.HTTPError:
                    continue
                if response.status_code == 204:
                    del pending[name]
                    self._step(name, READY)
            return not pending

        try:
            wait_until("every service to be ready", all_ready, timeout_s, interval_s=0.5)
        except TimeoutError as exc:
            tails = "\n".join(f"--- {n}:\n{self.services[n].log_tail(15)}" for n in pending)
            raise RuntimeError(f"{exc}; not ready: {sorted(pending)}\n{tails}") from exc

    def _tail(self, path: Path, name: str) -> None:
        def follow() -> None:
            with path.open(errors="replace") as log:
                while not self._stopping.is_set():
                    line = log.readline()
                    if line:
                        sys.stdout.write(f"{name:>10} | {line}")
                        sys.stdout.flush()
                    else:
                        time.sleep(0.2)

        thread = threading.Thread(target=follow, name=f"tail-{name}", daemon=True)
        thread.start()
        self._tailers.append(thread)

    def kill_service(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal (default SIGKILL) to one service, for fault-injection tests."""
        self.services[name].signal(sig)

    def start_instance(
        self,
        name: str,
        instance: int,
        env: dict[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> str:
        """Start another instance of the running service ``name`` beside it (another member of its
        consumer group): its own instance id ``<name>-<instance>``, log and health port, and
        ``env`` on top of the service's environment; wait until it is ready. The name it runs
        under (``stop_instance`` stops it)."""
        spec = self.running[name]
        variable = PORT_VARIABLES.get(spec.module)
        if variable is None:
            raise ValueError(f"{name} ({spec.module}) cannot run as a second instance")
        extra = f"{name}-{instance}"
        if extra in self.services:
            raise ValueError(f"{extra} is already running")
        taken = stack_ports(self.config.ports) | {s.port for s in self.running.values()}
        port = next_free_port(spec.port + 1, taken)
        self._start_service(
            ServiceSpec(
                extra,
                spec.module,
                port,
                {
                    **spec.env,
                    variable: str(port),
                    "MEDMESH_INSTANCE_ID": extra,
                    **(env or {}),
                },
            )
        )
        self._wait_ready(timeout_s, only={extra: port})
        return extra

    def stop_instance(self, extra: str, grace_s: float = 10.0) -> None:
        """Stop an instance ``start_instance`` started (SIGTERM, then SIGKILL after ``grace_s``)
        and forget it, so that ``exited`` does not report it."""
        self.services.pop(extra).stop(grace_s=grace_s)
        del self.running[extra]

    def restart_service(self, name: str, timeout_s: float = 60.0) -> None:
        """Stop (if still running) and start one service again; wait until it is ready."""
        self.services[name].stop(grace_s=10)
        spec = self.running[name]
        self._start_service(spec)
        self._wait_ready(timeout_s, only={spec.name: spec.port})

    def switch_topology(self, topology: Topology, timeout_s: float = 120.0) -> None:
        """Stop the running service processes and start the other topology's on the same
        broker, Triton and ports (the benchmark compares both on one stack)."""
        for process in reversed(list(self.services.values())):
            process.stop(grace_s=10)
        self.services.clear()
        self.running.clear()
        self.config.topology = topology
        for service in service_specs(self.config):
            self._start_service(service)
        self._wait_ready(timeout_s)

    def restart_kafka(self, down_s: float = 0.0) -> None:
        """Stop the broker and start it again with its data (services reconnect by themselves)."""
        self.kafka.restart(down_s)

    def restart_triton(self, down_s: float = 0.0) -> None:
        """Stop Triton and start it again on the same ports (workers must ride this out); models
        it was given from folders outside the repository (``render_model(source=...)``) come back
        with it."""
        added = dict(self.triton.added_models)
        self.triton.stop()
        time.sleep(down_s)
        self.triton = self._new_triton()
        self.triton.added_models.update(added)
        self.triton.start()

    def restart_orthanc(self, down_s: float = 0.0) -> None:
        """Stop the PACS and start it again with its studies, on the same port."""
        self.orthanc.restart(down_s)

    def restart_fhir_server(self, down_s: float = 0.0) -> None:
        """Stop the FHIR server and start it again with its database, on the same port (an
        outage that reporting's delivery must ride out)."""
        self.fhir_server.restart(down_s)

    def exited(self) -> list[str]:
        """Names of the stack's processes that have exited on their own."""
        dead = [name for name, process in self.services.items() if not process.running()]
        if not self.kafka.process.running():
            dead.append("kafka")
        if not self.triton.is_running():
            dead.append("triton")
        if self.orthanc.exited():
            dead.append("orthanc")
        if self.fhir_server.exited():
            dead.append("fhir-server")
        return dead

    def stop(self) -> None:
        """Stop services first (they flush to Kafka), then Triton, Orthanc, the FHIR server and
        Kafka together.
        Each step sends SIGTERM to all its processes at once and SIGKILL to those still running
        after its grace, so the whole stop ends within about ``SERVICES_STOP_GRACE_S +
        INFRA_STOP_GRACE_S`` plus the SIGKILL waits. Calling it again finishes a stop that was
        cut short; processes already stopped are left alone."""
        self._stopping.set()
        stop_all(list(self.services.values()), SERVICES_STOP_GRACE_S)
        triton = threading.Thread(
            target=self.triton.stop,
            kwargs={"grace_s": INFRA_STOP_GRACE_S},
            name="triton-stop",
            daemon=True,
        )
        triton.start()
        orthanc = threading.Thread(
            target=self.orthanc.stop,
            kwargs={"grace_s": INFRA_STOP_GRACE_S},
            name="orthanc-stop",
            daemon=True,
        )
        orthanc.start()
        fhir_server = threading.Thread(
            target=self.fhir_server.close,
            kwargs={"grace_s": INFRA_STOP_GRACE_S},
            name="fhir-server-stop",
            daemon=True,
        )
        fhir_server.start()
        self.kafka.stop(grace_s=INFRA_STOP_GRACE_S)
        triton.join()
        orthanc.join()
        fhir_server.join()
