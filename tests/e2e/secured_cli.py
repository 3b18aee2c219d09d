"""Running the CLI against a secured test broker as an operator's workstation would: the
settings from a contexts file, nothing of the developer's own Kafka settings (shared by the
SASL_SSL and mutual-TLS modules)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from typer.testing import CliRunner, Result

from medmesh_cli.devstack.topics import create_topics
from medmesh_cli.main import app
from medmesh_cli.models import PRODUCER, write_change
from medmesh_cli.ops.connection import resolve
from medmesh_contracts.events import utc_now
from medmesh_contracts.lifecycle import decision, seed_deployment
from medmesh_contracts.topics import all_topics

# Variables of the developer's own Kafka settings or context, never passed to the commands.
_OWN_SETTINGS = ("MEDMESH_KAFKA_", "MEDMESH_CONTEXT")


def cli_environment(contexts: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child ``medmesh``: the contexts file, ``extra``, Rich's
    tables at a width that never folds a cell, and none of the developer's Kafka settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_SETTINGS)}
    env.update({"MEDMESH_CONTEXTS_FILE": str(contexts), "COLUMNS": "200", **(extra or {})})
    return env


def run_cli(contexts: Path, *args: str, extra: Mapping[str, str] | None = None) -> Result:
    """Run ``medmesh ARGS`` in this process (typer's CliRunner on the real app)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith(_OWN_SETTINGS)}
    env.update({"MEDMESH_CONTEXTS_FILE": str(contexts), "COLUMNS": "200", **(extra or {})})
    return CliRunner().invoke(app, list(args), env=env)


def run_cli_process(
    contexts: Path,
    *args: str,
    extra: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``medmesh ARGS`` in a child process, as the installed CLI runs."""
    return subprocess.run(
        [sys.executable, "-m", "medmesh_cli.main", *args],
        env=cli_environment(contexts, extra),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def seed_registry(
    contexts: Path, context: str, model: str, extra: Mapping[str, str] | None = None
) -> None:
    """Create the topics and register ``model`` through ``context``'s security settings."""
    connection = resolve(context, environ=cli_environment(contexts, extra))
    seeded = seed_deployment(model, {1: 100}, PRODUCER, utc_now(), connection.principal())
    audit = decision(None, seeded, "seed", seeded.changed_by, "test seed", PRODUCER, utc_now())

    async def run() -> None:
        await create_topics(
            connection.bootstrap, all_topics([], partitions=1), security=connection.security()
        )
        await write_change(connection, seeded, audit)

    asyncio.run(run())
