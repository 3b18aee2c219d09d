"""Stack.start reports its steps through ``on_step`` (``medmesh up`` shows them as progress):
every component first as waiting, in start order, then starting and ready; without a callback it
starts exactly as before.

Nothing is started: Kafka, Orthanc, Triton, the topics and the service processes are stand-ins.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from medmesh_cli.devstack import stack as stack_module
from medmesh_cli.devstack.stack import (
    INFRASTRUCTURE_STEPS,
    READY,
    STARTING,
    WAITING,
    Stack,
    StackConfig,
    StackPorts,
    service_specs,
)


class FakeProcess:
    """A service process that runs from start() on."""

    def __init__(self, name: str, argv: list[str], log_path: Path, **kwargs: Any) -> None:
        self.name = name
        self.alive = False

    def start(self) -> None:
        self.alive = True

    def running(self) -> bool:
        return self.alive

    def stop(self, grace_s: float = 10.0) -> None:
        self.alive = False


def _stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jars_cached: bool = True
) -> tuple[Stack, list[str]]:
    """A Stack whose parts start instantly; the list records what was started, in order."""
    started: list[str] = []
    lock = threading.Lock()

    def record(what: str) -> Any:
        def done(*_args: Any, **_kwargs: Any) -> Any:
            with lock:
                started.append(what)
            return []

        return done

    async def topics(*_args: Any) -> None:
        started.append("topics")

    monkeypatch.setattr(stack_module, "ManagedProcess", FakeProcess)
    monkeypatch.setattr(stack_module, "orthanc_binary", lambda: Path("/bin/true"))
    monkeypatch.setattr(stack_module, "dicomweb_plugin", lambda: Path("/bin/true"))
    monkeypatch.setattr(stack_module, "kafka_jars_cached", lambda: jars_cached)
    monkeypatch.setattr(stack_module, "ensure_kafka_jars", record("jars"))
    monkeypatch.setattr(stack_module, "seed_demo_studies", record("studies"))
    monkeypatch.setattr(stack_module, "create_topics", topics)
    # Every service answers /readyz at once.
    monkeypatch.setattr(httpx, "get", lambda *_a, **_k: httpx.Response(204))
    stack = Stack(StackConfig(ports=StackPorts.from_base(31000), state_dir=tmp_path))
    monkeypatch.setattr(stack.kafka, "start", record("kafka"))
    monkeypatch.setattr(stack.orthanc, "start", record("orthanc"))
    monkeypatch.setattr(stack.triton, "start", record("triton"))
    monkeypatch.setattr(stack_module, "fhir_server_cached", lambda: True)
    monkeypatch.setattr(stack_module, "ensure_fhir_server", lambda: None)
    monkeypatch.setattr(stack_module, "put_patients", lambda *_a: [])
    monkeypatch.setattr(stack.fhir_server, "start", record("fhir-server"))
    return stack, started


def test_start_reports_every_component_waiting_then_starting_then_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All components are announced as waiting in start order before any starts; each then
    goes starting -> ready, Kafka before Orthanc before the studies before the topics, and the
    services after Triton is ready."""
    stack, _ = _stack(tmp_path, monkeypatch)
    steps: list[tuple[str, str]] = []
    lock = threading.Lock()

    def on_step(component: str, state: str) -> None:
        with lock:
            steps.append((component, state))

    stack.on_step = on_step
    stack.start()

    names = [*INFRASTRUCTURE_STEPS, *(s.name for s in service_specs(stack.config))]
    assert steps[: len(names)] == [(name, WAITING) for name in names]
    later = steps[len(names) :]
    for name in names:
        assert [s for c, s in later if c == name] == [STARTING, READY], name
    order = [c for c, s in later if s == READY]
    assert order.index("kafka") < order.index("orthanc") < order.index("studies")
    assert order.index("studies") < order.index("topics")
    first_service = names[len(INFRASTRUCTURE_STEPS)]
    assert later.index(("triton", READY)) < later.index((first_service, STARTING))


def test_a_first_run_says_the_broker_jars_are_being_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without cached jars, Kafka's step tells that Maven fetches them before the broker starts."""
    stack, started = _stack(tmp_path, monkeypatch, jars_cached=False)
    steps: list[tuple[str, str]] = []
    stack.on_step = lambda component, state: steps.append((component, state))
    stack.start()

    kafka = [s for c, s in steps if c == "kafka"]
    assert kafka[:2] == [WAITING, STARTING]
    assert "Maven" in kafka[2]
    assert kafka[3:] == [READY]
    assert started.index("jars") < started.index("kafka")


def test_without_a_callback_the_stack_starts_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No on_step: every part starts, in the same order, and every service process runs."""
    stack, started = _stack(tmp_path, monkeypatch)
    stack.start()

    in_threads = ("triton", "fhir-server")
    assert [p for p in started if p not in in_threads] == ["kafka", "orthanc", "studies", "topics"]
    assert set(in_threads) <= set(started)
    assert set(stack.services) == {s.name for s in service_specs(stack.config)}
    assert all(p.running() for p in stack.services.values())


def test_a_stack_without_the_fhir_server_neither_starts_nor_announces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """with_fhir_server=False: the FHIR server is never started nor shown as a step, and the
    rest of the stack starts as usual."""
    stack, started = _stack(tmp_path, monkeypatch)
    stack.config = replace(stack.config, with_fhir_server=False)
    steps: list[tuple[str, str]] = []
    stack.on_step = lambda component, state: steps.append((component, state))
    stack.start()
    assert "fhir-server" not in started
    assert "fhir-server" not in {component for component, _ in steps}
    assert {"kafka", "orthanc", "triton"} <= set(started)
