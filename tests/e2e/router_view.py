"""What the e2e lifecycle tests read back: the router's /models view and the registry record."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from medmesh_cli.devstack.stack import Stack
from medmesh_cli.models import read_registry
from medmesh_contracts.lifecycle import ModelDeployment

View = dict[str, Any]


async def router_view(stack: Stack, model: str) -> View:
    """The router's live view of one model (GET /models on the router's port)."""
    async with httpx.AsyncClient(timeout=5) as client:
        answer = await client.get(f"http://127.0.0.1:{stack.config.ports.router}/models")
    view: View = answer.json()["models"][model]
    return view


async def wait_for_view(
    stack: Stack, model: str, check: Callable[[View], bool], what: str, timeout_s: float = 30
) -> View:
    """Poll the router's view until ``check`` holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: View = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError):
            last = await router_view(stack, model)
            if check(last):
                return last
        await asyncio.sleep(0.2)
    pytest.fail(
        f"router never showed {what} within {timeout_s:.0f}s; last: {last.get('effective_weights')}"
    )


async def current_deployment(stack: Stack, model: str) -> ModelDeployment:
    """The model's registry record, waiting for the router to seed it at start."""
    for _ in range(100):
        found = (await read_registry(stack.config.bootstrap)).get(model)
        if found is not None:
            return found
        await asyncio.sleep(0.2)
    pytest.fail("the router never seeded the registry")
