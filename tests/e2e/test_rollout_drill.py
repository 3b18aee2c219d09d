"""The model owner's walkthrough (README, "roll out a new version") on a real stack.

A separate stack serves the early-warning model with the broken-v4 drill overlay
(deploy/drills/broken-v4). Through the same `medmesh models deploy` command the README shows,
a healthy v2 is rolled out 5 -> 10 -> 25 -> 50 -> 100 % and promoted with no manual step, then
the broken v4 (its real Triton version fails every request) is rolled back by the controller.
Traffic is steady RequestInference on the requests topic, with the headers ingest writes.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable

import pytest
from typer.testing import CliRunner

from medmesh_cli.devstack.overlay import with_overlay
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig
from medmesh_cli.main import app
from medmesh_contracts import topics
from tests.e2e.conftest import E2E_PORT_BASE, Record, TopicTap, e2e_ports
from tests.e2e.router_view import wait_for_view
from tests.e2e.traffic import steady_traffic

DRILL_PORT_BASE = E2E_PORT_BASE + 600
MODEL = "deterioration"
RATE_PER_S = 40


@pytest.fixture(scope="module")
async def drill_stack() -> AsyncIterator[Stack]:
    """A stack serving the spec's versions of the early-warning model and the broken v4."""
    state = run_dir("e2e-rollout-drill")
    shutil.rmtree(state / "kafka", ignore_errors=True)  # a fresh registry for the walkthrough
    config = with_overlay(
        StackConfig(
            ports=e2e_ports(DRILL_PORT_BASE),
            state_dir=state,
            partitions=1,
            with_fhir_server=False,  # the drill reads the audit and results; no delivery here
        ),
        repo_root() / "deploy" / "drills" / "broken-v4",
    )
    stack = Stack(config)
    try:
        await asyncio.to_thread(stack.start, 120)
    except Exception as exc:  # noqa: BLE001 -- re-raised as a failure that names the broken part
        pytest.fail(f"the drill stack did not start: {exc}", pytrace=False)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


async def _deploy(stack: Stack, version: int) -> None:
    """`medmesh models deploy` as the README shows it, with short steps for the test."""
    ports = stack.config.ports
    arguments = [
        "models",
        "deploy",
        str(stack.config.specs_dir / f"{MODEL}.yaml"),
        "--version",
        str(version),
        "--steps",
        "5,10,25,50,100",
        "--interval",
        "1.5",
        "--min-requests",
        "5",
        "--max-error-rate",
        "0.05",
        "--max-p99-ms",
        "10000",
        "--triton-url",
        f"http://127.0.0.1:{ports.triton_http}",
        "--bootstrap",
        stack.config.bootstrap,
    ]
    result = await asyncio.to_thread(CliRunner().invoke, app, arguments)
    assert result.exit_code == 0, result.output


def _audit_of(version: int, action: str) -> Callable[[Record], bool]:
    return lambda r: r.json()["version"] == version and r.json()["action"] == action


async def test_a_healthy_version_is_promoted_through_every_step(drill_stack: Stack) -> None:
    """v2 goes 5 -> 10 -> 25 -> 50 -> 100 % by itself and becomes stable, each step audited."""
    tap = TopicTap(drill_stack.config.bootstrap, (topics.MODELS_AUDIT,))
    await tap.start()
    try:
        async with steady_traffic(drill_stack, RATE_PER_S, "drill"):
            await _deploy(drill_stack, 2)
            promoted = await tap.wait_for(
                topics.MODELS_AUDIT, _audit_of(2, "promote"), timeout_s=150
            )
        await wait_for_view(
            drill_stack,
            MODEL,
            lambda view: view["effective_weights"] == {"2": 100},
            "100 % v2",
        )
        steps = [
            r.json()["weights_after"]["2"]
            for r in tap.matching(topics.MODELS_AUDIT, _audit_of(2, "step"))
        ]
        assert steps == [5, 10, 25, 50]  # the last step, 100 %, is the promotion itself
        assert promoted.json()["weights_after"] == {"2": 100}
        assert promoted.json()["figures"][0]["requests"] >= 5
        assert promoted.json()["figures"][0]["error_rate"] == 0.0
    finally:
        await tap.stop()


async def test_a_broken_version_rolls_itself_back(drill_stack: Stack) -> None:
    """v4 fails every request in Triton: the controller rolls it back, v2 keeps 100 %, and
    `medmesh models history` shows why."""
    tap = TopicTap(drill_stack.config.bootstrap, (topics.MODELS_AUDIT, topics.INFERENCE_FAILED))
    await tap.start()
    try:
        async with steady_traffic(drill_stack, RATE_PER_S, "drill"):
            await _deploy(drill_stack, 4)
            rollback = await tap.wait_for(
                topics.MODELS_AUDIT, _audit_of(4, "rollback"), timeout_s=120
            )
            await wait_for_view(
                drill_stack,
                MODEL,
                lambda view: view["effective_weights"] == {"2": 100},
                "100 % v2 after the rollback",
            )
        audit = rollback.json()
        assert audit["actor"].startswith("controller:")
        assert "error rate" in audit["reason"]
        assert audit["weights_after"] == {"2": 100}
        failed = tap.matching(
            topics.INFERENCE_FAILED, lambda r: r.json()["task"]["model_version"] == 4
        )
        assert failed
        assert "8" in failed[0].json()["reason"]  # Triton's error names v4's expected shape
        history = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            ["models", "history", MODEL, "--bootstrap", drill_stack.config.bootstrap],
            env={"COLUMNS": "200"},
        )
        assert history.exit_code == 0, history.output
        assert "rollback" in history.output
        assert "error rate 100.0 %" in history.output
    finally:
        await tap.stop()
