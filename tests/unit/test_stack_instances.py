"""Stack.start_instance / stop_instance: a second instance of a running service (the fault suite
stalls one and lets the other take over) gets its own instance id, health port and log, and is
forgotten once stopped.

No process is started: ManagedProcess is replaced by a stand-in that records how it was built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medmesh_cli.devstack import stack as stack_module
from medmesh_cli.devstack.stack import Stack, StackConfig, StackPorts, service_specs, stack_ports


class FakeProcess:
    """Records its construction; running until stopped."""

    def __init__(self, name: str, argv: list[str], log_path: Path, **kwargs: Any) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env: dict[str, str] = kwargs["env"]
        self.alive = False

    def start(self) -> None:
        self.alive = True

    def running(self) -> bool:
        return self.alive

    def stop(self, grace_s: float = 10.0) -> None:
        self.alive = False


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setattr(stack_module, "ManagedProcess", FakeProcess)
    monkeypatch.setattr(Stack, "_wait_ready", lambda self, timeout_s, only=None: None)
    config = StackConfig(ports=StackPorts.from_base(31000), state_dir=tmp_path)
    stack = Stack(config)
    for service in service_specs(config):
        stack._start_service(service)
    return stack


def _worker(stack: Stack) -> str:
    return next(n for n, s in stack.running.items() if s.module == "medmesh_inference")


@pytest.mark.parametrize("service", ["reporting", "router", "worker"])
def test_a_second_instance_has_its_own_id_port_and_log(stack: Stack, service: str) -> None:
    """The second instance runs the same module on a port no part of the stack uses, with
    instance id <name>-2 and its own log; the first keeps running untouched."""
    name = _worker(stack) if service == "worker" else service
    first = stack.services[name]
    taken = stack_ports(stack.config.ports) | {s.port for s in stack.running.values()}

    extra = stack.start_instance(name, 2)

    assert extra == f"{name}-2"
    process = stack.services[extra]
    spec = stack.running[extra]
    assert spec.module == stack.running[name].module
    assert spec.port not in taken
    variable = stack_module.PORT_VARIABLES[spec.module]
    assert process.env[variable] == str(spec.port)
    assert process.env["MEDMESH_INSTANCE_ID"] == extra
    assert first.env["MEDMESH_INSTANCE_ID"] == f"{name}-1"
    assert process.log_path == stack.config.state_dir / f"{extra}.log"
    assert stack.services[name] is first


def test_a_worker_instance_serves_the_same_model_version(stack: Stack) -> None:
    """A worker's second instance keeps its model and version (it joins the same group)."""
    name = _worker(stack)
    extra = stack.start_instance(name, 2)
    env, original = stack.services[extra].env, stack.services[name].env
    for key in ("MEDMESH_WORKER_MODEL", "MEDMESH_WORKER_MODEL_VERSION"):
        assert env[key] == original[key]


def test_extra_environment_is_applied_last(stack: Stack) -> None:
    """A second router can be told not to run the rollout controller."""
    extra = stack.start_instance("router", 2, env={"MEDMESH_ROUTER_CONTROLLER": "false"})
    assert stack.services[extra].env["MEDMESH_ROUTER_CONTROLLER"] == "false"


def test_a_stopped_instance_is_forgotten(stack: Stack) -> None:
    """stop_instance stops the process and removes it (exited() names only the services left)."""
    extra = stack.start_instance("reporting", 2)
    process = stack.services[extra]
    stack.stop_instance(extra)
    assert not process.running()
    assert extra not in stack.services
    assert extra not in stack.running
    assert stack.services["reporting"].running()


def test_the_same_instance_twice_or_an_unknown_kind_is_refused(stack: Stack) -> None:
    """Instance 2 cannot be started twice; a service without a known port variable is refused."""
    stack.start_instance("reporting", 2)
    with pytest.raises(ValueError, match="already running"):
        stack.start_instance("reporting", 2)
    stack.running["odd"] = stack_module.ServiceSpec("odd", "medmesh_monolith", 1)
    with pytest.raises(ValueError, match="second instance"):
        stack.start_instance("odd", 2)
