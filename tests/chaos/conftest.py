"""The fault suite's own stack: Kafka, Triton and the four services on ports derived from
MEDMESH_CHAOS_PORT_BASE (default 23000), so that faults never touch the end-to-end stack.

The stack lives for this folder's tests only (module scope), and is stopped before the end-to-end
tests start theirs. If Kafka or Triton cannot start, every test here errors with the reason.

Sizes come from the environment: MEDMESH_CHAOS_EVENTS events per fault (default 40, the short
form `make test` runs) at MEDMESH_CHAOS_RATE events per second (default 5); `make chaos` runs the
full form and sets MEDMESH_CHAOS_DOC to the Markdown file that gets the results table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from medmesh_cli.bench.soak import machine_info
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig
from tests.chaos.harness import markdown_table
from tests.e2e.conftest import e2e_ports

CHAOS_PORT_BASE = int(os.environ.get("MEDMESH_CHAOS_PORT_BASE", "23000"))
CHAOS_EVENTS = int(os.environ.get("MEDMESH_CHAOS_EVENTS", "40"))
CHAOS_RATE = float(os.environ.get("MEDMESH_CHAOS_RATE", "5"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test here that uses the fault suite's stack chaos, and e2e too (it needs the
    real broker and Triton); the pure tests of the soak's arithmetic stay unmarked."""
    for item in items:
        if "tests/chaos/" in str(item.path) and "chaos" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.e2e)


@dataclass
class ChaosRun:
    """The fault suite's stack, the thread that restarts its parts, and the result rows."""

    stack: Stack
    # Restarts run on this one long-lived thread: a child started from a thread gets
    # PR_SET_PDEATHSIG when that thread ends, so the thread must outlive the stack.
    restarter: ThreadPoolExecutor
    events: int
    rate_per_s: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def results_dir(self) -> Path:
        """Where the JSON and Markdown results go (the stack's run directory)."""
        return self.stack.config.state_dir

    def record(self, row: dict[str, Any]) -> None:
        """Add one fault's row and rewrite the result files with every row so far."""
        self.rows.append(row)
        report = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "events_per_fault": self.events,
            "rate_per_s": self.rate_per_s,
            "machine": machine_info(),
            "rows": self.rows,
        }
        (self.results_dir / "chaos-results.json").write_text(json.dumps(report, indent=2) + "\n")
        markdown = results_markdown(report)
        (self.results_dir / "chaos-results.md").write_text(markdown)
        doc = os.environ.get("MEDMESH_CHAOS_DOC")
        if doc:
            path = Path(doc) if Path(doc).is_absolute() else repo_root() / doc
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(markdown)


def results_markdown(report: dict[str, Any]) -> str:
    """The fault suite's results page."""
    m = report["machine"]
    return (
        "# medmesh fault suite (issue 9 item 4, issue 16, issue 19)\n\n"
        f"Run {report['when']}: {report['events_per_fault']} events per fault at "
        f"{report['rate_per_s']:g} events/s over HTTP, on {m['nproc']} CPUs ({m['cpu_model']}), "
        f"{m['memory_gib']} GiB memory; broker, Triton and services share those cores.\n\n"
        "Command: `make chaos` (full form) or `pytest tests/chaos` (short form, in `make test`); "
        "sizes from MEDMESH_CHAOS_EVENTS and MEDMESH_CHAOS_RATE.\n\n"
        "Each event is a vital-signs Bundle of a fresh patient, except in the PACS row, where it "
        "is an ImagingStudy of a fresh patient announcing a chest radiograph stored in Orthanc "
        "(fetched by WADO-RS, scored by the chest-opacity CNN, reported). Mid-way through the "
        "load the fault is injected and the component restarted; events answered 503 or not "
        "answered are sent again (Retry-After honoured up to 2 s) until a 2xx. Reports are read with a "
        "read_committed consumer. lost = accepted events without a report; duplicates = reports "
        "beyond one per event; longest stall = longest time without any report from the fault "
        "on (the outage it caused); recovery = fault to the end of that stall; drained = fault "
        "to the last report; restart = how long the part took to be back (down time included); "
        "pacs stopped = Orthanc stopped (SIGTERM), left down, started again with its studies."
        "\n\n"
        "SIGSTOP rows: a second instance of the service runs beside it (same consumer group, "
        "started before the load); the first is stopped with SIGSTOP and resumed with SIGCONT "
        "once the group has expelled it (past its session timeout) and reports flow from the "
        "second instance, which has fenced the stopped one's transactional producers; restart = "
        "how long it was stopped. The second instance is stopped before the duplicates are "
        "counted. Poison row: one record of each kind (not JSON, JSON of no medmesh schema, null "
        "header values, a value over 1 MiB) is produced straight to each topic a service "
        "consumes (ingest's inbound topic also gets two ECG waveforms its bounds refuse); each "
        "must get exactly one dead letter with a reason on its service's dead-letter topic, and "
        "reports may not stop for more than 5 s."
        "\n\n" + markdown_table(report["rows"])
    )


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosRun]:
    """The fault suite's own stack, started once for this folder and stopped after it."""
    config = StackConfig(
        ports=e2e_ports(CHAOS_PORT_BASE),
        state_dir=run_dir(f"chaos-{CHAOS_PORT_BASE}"),
        kafka_heap="512m",
        partitions=2,
        # Losses and duplicates are counted on Kafka; the FHIR server is not among the faults.
        with_fhir_server=False,
    )
    stack = Stack(config)
    restarter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chaos-restarter")
    try:
        restarter.submit(stack.start, 240).result()
    except Exception as exc:  # noqa: BLE001 -- re-raised as a failure that names the broken part
        restarter.shutdown()
        pytest.fail(
            f"the fault suite's stack did not start (Kafka, Triton or a service): {exc}",
            pytrace=False,
        )
    yield ChaosRun(stack, restarter, CHAOS_EVENTS, CHAOS_RATE)
    restarter.submit(stack.stop).result()
    restarter.shutdown()
