"""The fault suite (issue 9 item 4, issue 16, issue 19): under steady HTTP load, kill -9 each
service, restart Triton, restart the Kafka broker, stop and restart the PACS (Orthanc), stall
reporting, the router and a worker with SIGSTOP past their session timeout beside a second
instance, and produce poison records to every consumed topic; no event accepted with a 2xx may be
lost, no report duplicated.

Each test sends its own fresh patients at a steady rate (vital-signs Bundles; for the PACS fault,
ImagingStudy resources announcing a study already stored in Orthanc, each fetched by WADO-RS and
scored by the chest-opacity CNN), injects its fault half-way through and restarts the part, keeps
sending (events answered 503 or not answered are sent again), then reads the reports with a
read_committed consumer. Its result row (with recovery time) is printed and written to
var/chaos-<base>/chaos-results.{json,md}.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from medmesh_cli.bench.common import group_state
from medmesh_cli.devstack.stack import Stack, service_specs
from medmesh_cli.devstack.studies import StudyIdentity, imaging_study
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_inference.settings import WorkerSettings
from medmesh_reporting.settings import ReportingSettings
from medmesh_router.settings import RouterSettings
from medmesh_runtime.settings import PRODUCER_MAX_REQUEST_SIZE
from tests.chaos.conftest import ChaosRun
from tests.chaos.harness import (
    Arrival,
    DeadLetterReader,
    Event,
    FaultResult,
    Poison,
    ReportReader,
    common_poisons,
    produce_poisons,
    send_until_accepted,
    summarize,
)
from tests.e2e.conftest import fixture_with_new_patient

BUNDLE = "vitals-bundle-high.json"
# How long a stopped Triton, broker or PACS stays down before it is started again. The broker
# stays down longer than ingest's publish timeout (10 s), so that ingest has to answer 503. The
# PACS stays down 8 s: a stopped Orthanc refuses connections at once, so the worker's fetches
# fail fast (its 10 s fetch timeout never comes into it) and its circuit opens within a second;
# its probes back off exponentially (up to 5 s), so 8 s spans several failed probes and a
# rewound batch retried while the PACS is still away, yet keeps the short form short.
DOWN_S = {"triton": 5.0, "kafka": 12.0, "pacs": 8.0}
# After the last planned send: how long events may keep being retried, and reports awaited.
ACCEPT_WITHIN_S = 90.0
REPORTS_WITHIN_S = 90.0
# After the last expected report, how long to keep reading for duplicates.
DUPLICATE_GRACE_S = 3.0
SERVICES = ("ingest", "router", "worker", "reporting")


def _vitals_event() -> tuple[bytes, str]:
    """A vital-signs Bundle of a fresh patient (payload, patient id)."""
    return fixture_with_new_patient(BUNDLE)


async def _serving_worker(
    stack: Stack, reader: ReportReader, make_event: Callable[[], tuple[bytes, str]] = _vitals_event
) -> str:
    """Send one event and wait for its report: the pipeline works, and the report names the
    model version (so the worker that serves the traffic) that produced it."""
    payload, patient = make_event()
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post(
            "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
        )
    assert response.status_code == 202, response.text
    await reader.wait_for_all({patient}, timeout_s=REPORTS_WITHIN_S, grace_s=0)
    reports = reader.of({patient})
    assert reports, f"the warm-up event got no report; logs in {stack.config.state_dir}"
    version = reports[0].model_version
    assert version is not None, "the warm-up report names no model version"
    return version.replace("/", "-")  # "deterioration/v1" -> the service "deterioration-v1"


def _inject(stack: Stack, fault: str, worker: str) -> float:
    """Inject one fault and bring the part back; how long until it was back (seconds)."""
    started = time.monotonic()
    if fault in SERVICES:
        name = worker if fault == "worker" else fault
        stack.kill_service(name)  # SIGKILL
        stack.restart_service(name, timeout_s=120)
    elif fault == "triton":
        stack.restart_triton(down_s=DOWN_S[fault])
    elif fault == "kafka":
        stack.restart_kafka(down_s=DOWN_S[fault])
    elif fault == "pacs":
        stack.restart_orthanc(down_s=DOWN_S[fault])
    else:
        raise ValueError(f"unknown fault {fault}")
    return time.monotonic() - started


# Kafka stopped longer than ingest's publish timeout once duplicated reports: ingest answered
# 503, the producer delivered the request when the broker was back, and the sender's retry made
# a second one. Ingest now keeps such a publish in doubt (IngestService._publish_durably).
FAULTS = [*SERVICES, "triton", "kafka"]


@dataclass
class LoadRun:
    """One run of the steady load with a fault injected half-way through."""

    events: list[Event]
    started: float
    fault_at: float
    restart_s: float


async def _load_with_fault(
    chaos: ChaosRun,
    inject: Callable[[], Awaitable[float]],
    patients: int | None = None,
    make_event: Callable[[], tuple[bytes, str]] = _vitals_event,
) -> LoadRun:
    """Send fresh patients' events (``make_event()``: payload, patient id) at the steady rate;
    half-way through, await ``inject()`` (it returns how long the part was away) while the sends
    go on; return once every event was accepted or given up."""
    count = chaos.events if patients is None else patients
    events = [
        Event(patient=patient, payload=payload)
        for payload, patient in (make_event() for _ in range(count))
    ]
    started = time.monotonic()
    for i, event in enumerate(events):
        event.planned_at = started + 0.2 + i / chaos.rate_per_s
    fault_at = started + 0.2 + (len(events) // 2) / chaos.rate_per_s
    give_up_at = events[-1].planned_at + ACCEPT_WITHIN_S
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    async with httpx.AsyncClient(
        base_url=chaos.stack.config.ingest_url, timeout=20, limits=limits
    ) as client:
        sending = asyncio.gather(*(send_until_accepted(client, e, give_up_at) for e in events))
        await asyncio.sleep(max(0.0, fault_at - time.monotonic()))
        fault_at = time.monotonic()
        restart_s = await inject()
        await sending
    return LoadRun(events, started, fault_at, restart_s)


@pytest.mark.parametrize("fault", FAULTS)
async def test_fault_under_load_loses_no_accepted_event_and_duplicates_no_report(
    chaos: ChaosRun, fault: str
) -> None:
    """Under load and one fault, every 2xx-accepted event gets exactly one committed report."""
    stack = chaos.stack
    assert stack.exited() == [], f"parts of the stack are down before the fault: {stack.exited()}"
    reader = ReportReader(stack.config.bootstrap)
    await reader.start()
    try:
        worker = await _serving_worker(stack, reader)
        loop = asyncio.get_running_loop()
        run = await _load_with_fault(
            chaos, lambda: loop.run_in_executor(chaos.restarter, _inject, stack, fault, worker)
        )
        accepted = {e.patient for e in run.events if e.accepted_at is not None}
        await reader.wait_for_all(accepted, REPORTS_WITHIN_S, DUPLICATE_GRACE_S)
        arrivals = reader.of({e.patient for e in run.events})
    finally:
        await reader.stop()
    title = f"kill -9 {worker}" if fault == "worker" else _title(fault)
    await _record(chaos, title, run, arrivals, [])


# --- the PACS: stopped and started while studies are announced ----------------------------------

IMAGING_WORKER = "chest-opacity-v1"


def _study_event(stack: Stack, study: StudyIdentity) -> tuple[bytes, str]:
    """An ImagingStudy of a fresh patient (and a fresh resource id, so ingest sees new content)
    announcing ``study``, stored in the stack's PACS (payload, patient id)."""
    patient = f"chaos-img-{uuid.uuid4().hex[:12]}"
    resource = imaging_study(
        study, f"cxr-{uuid.uuid4().hex[:12]}", patient, stack.config.dicomweb_url
    )
    return json.dumps(resource).encode(), patient


async def test_pacs_stopped_under_imaging_load_loses_no_study_and_duplicates_no_report(
    chaos: ChaosRun,
) -> None:
    """Under imaging load the PACS stopped and started: every accepted study gets one report."""
    stack = chaos.stack
    assert stack.exited() == [], f"parts of the stack are down before the fault: {stack.exited()}"
    assert stack.seeded_studies, "the stack stored no demo study in its PACS"
    make_event = functools.partial(_study_event, stack, stack.seeded_studies[0])
    reader = ReportReader(stack.config.bootstrap)
    await reader.start()
    try:
        worker = await _serving_worker(stack, reader, make_event)
        assert worker == IMAGING_WORKER, f"the warm-up study was scored by {worker}"
        loop = asyncio.get_running_loop()
        run = await _load_with_fault(
            chaos,
            lambda: loop.run_in_executor(chaos.restarter, _inject, stack, "pacs", worker),
            make_event=make_event,
        )
        accepted = {e.patient for e in run.events if e.accepted_at is not None}
        await reader.wait_for_all(accepted, REPORTS_WITHIN_S, DUPLICATE_GRACE_S)
        arrivals = reader.of({e.patient for e in run.events})
    finally:
        await reader.stop()
    more = [
        f"a report of {a.patient} names {a.model_version}, not chest-opacity/v1"
        for a in arrivals
        if a.model_version != "chest-opacity/v1"
    ]
    await _record(chaos, _title("pacs"), run, arrivals, more)


async def _record(
    chaos: ChaosRun,
    title: str,
    run: LoadRun,
    arrivals: list[Arrival],
    more: list[str],
    details: dict[str, Any] | None = None,
) -> None:
    """Summarize one fault run, add its row (with what went wrong, ``more`` included, and the
    fault's own ``details`` for the JSON results) and fail the test if anything did."""
    stack = chaos.stack
    result = summarize(
        title, run.events, arrivals, chaos.rate_per_s, run.fault_at, run.restart_s, run.started
    )
    not_ready = await _not_ready(stack)
    problems = _problems(result, len(run.events), stack.exited(), not_ready) + more
    problems += [f"{name}'s last log events: {_last_events(stack, name)}" for name in not_ready]
    duplicates_after_503 = _duplicates_after_503(run.events, arrivals)
    if result.duplicates:
        problems.append(
            f"{result.duplicates} duplicates ({duplicates_after_503} of events answered 503 first)"
        )
    chaos.record(result.as_dict() | (details or {}) | {"verdict": "; ".join(problems) or "ok"})
    print(f"\nchaos {result.as_dict()} {problems}")  # noqa: T201 -- shown with pytest -s
    assert problems == [], f"{result}; {problems}; logs under {stack.config.state_dir}"


def _problems(
    result: FaultResult, events: int, exited: list[str], not_ready: list[str]
) -> list[str]:
    """What went wrong in one fault run, duplicates aside (empty: nothing)."""
    checks = [
        (result.other_non_2xx > 0, f"{result.other_non_2xx} answers other than 2xx/503"),
        (result.accepted < events, f"{events - result.accepted} events never accepted"),
        (result.missing > 0, f"{result.missing} accepted events without a report (lost)"),
        (
            result.correlation_mismatches > result.duplicates,
            "reports carry the correlation id of another attempt",
        ),
        (bool(exited), f"exited after the fault: {exited}"),
        (bool(not_ready), f"not ready after the fault: {not_ready}"),
    ]
    return [text for failed, text in checks if failed]


# An idle worker that waited out Triton is ready again within its longest probe wait (5 s), its
# channel's reconnect (1 s) and the next heartbeat that closes its half-open circuit (3 s); the
# margin is for a loaded 2-core CI machine. A stuck service stays unready however long we wait.
READY_AFTER_FAULT_S = 20.0


async def _not_ready(stack: Stack, within_s: float = READY_AFTER_FAULT_S) -> list[str]:
    """Services whose /readyz does not answer 204 within ``within_s`` (alive but stuck)."""
    pending = {s.name: s.port for s in service_specs(stack.config)}
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=2) as client:
        while pending and time.monotonic() < deadline:
            for name, port in list(pending.items()):
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/readyz")
                except httpx.HTTPError:
                    continue
                if response.status_code == 204:
                    del pending[name]
            if pending:
                await asyncio.sleep(0.5)
    return sorted(pending)


def _duplicates_after_503(events: list[Event], arrivals: list[Arrival]) -> int:
    """Surplus reports of events that were answered 503 before they were accepted."""
    counts = Counter(a.patient for a in arrivals)
    refused = {e.patient for e in events if e.refused}
    return sum(n - 1 for p, n in counts.items() if n > 1 and p in refused)


def _title(fault: str) -> str:
    if fault in SERVICES:
        return f"kill -9 {fault}"
    return f"{fault} stopped {DOWN_S[fault]:g} s, started"


# --- stalls: SIGSTOP past the session timeout, a second instance takes over, SIGCONT -------------

# A stalled instance keeps its partitions until the group expels it, after its consumer session
# timeout (reporting: MEDMESH_REPORTING_SESSION_TIMEOUT_MS, 6 s; the router and workers:
# medmesh_runtime.kafka's default, 10 s); with no peer nobody would take them. So each stall
# fault runs a second instance of the service beside it (started before the load: a service
# process takes seconds to start on a busy machine, which is no part of the fault). The first
# is stopped half-way through the load and resumed only once the group has expelled it and the
# second instance reports for its partitions too, so that it comes back as a zombie whose
# partitions' producers the second instance has fenced.
STALLED = ("reporting", "router", "worker")
# Longest wait for the group to settle: two members before the stall, the stalled one expelled
# (the session timeout and a rebalance, with room) and reports flowing after that.
SETTLE_WITHIN_S = 60.0
# After the expulsion: how long to look for a report of the second instance before resuming.
FLOW_WITHIN_S = 15.0
# A second router must not run the rollout controller too (one replica only: RouterSettings).
SECOND_INSTANCE_ENV = {"router": {"MEDMESH_ROUTER_CONTROLLER": "false"}}
# Log lines of an instance whose partition's producer another one fenced, and of a producer
# dropped without being stopped.
FENCED = "this one was fenced"
UNCLOSED = "Unclosed AIOKafkaProducer"


@dataclass
class Stall:
    """What happened during one stall (seconds from SIGSTOP)."""

    instance: str = ""  # the stalled instance's id (its client ids end with it)
    stopped_at: float = 0.0
    expelled_s: float | None = None  # the group is stable without the stalled member
    flowing_s: float | None = None  # the first report after that
    reports_while_stopped: int = 0  # reports between SIGSTOP and the expulsion
    resumed_at: float = 0.0  # when SIGCONT was sent


def _group_of(stack: Stack, name: str) -> str:
    """The consumer group of a stage service (its settings' default group id)."""
    spec = stack.running[name]
    if spec.module == "medmesh_reporting":
        return str(ReportingSettings.model_fields["reporting_group_id"].default)
    if spec.module == "medmesh_router":
        return str(RouterSettings.model_fields["router_group_id"].default)
    worker = WorkerSettings.model_construct(
        worker_model=spec.env["MEDMESH_WORKER_MODEL"],
        worker_model_version=int(spec.env["MEDMESH_WORKER_MODEL_VERSION"]),
    )
    return worker.group_id


def _members_of(instance: str, clients: list[str]) -> int:
    """How many of a group's members (by client id) belong to ``instance``."""
    return sum(1 for client in clients if client.endswith(f"-{instance}"))


async def _settled(
    bootstrap: str, group: str, settled: Callable[[list[str]], bool], deadline: float
) -> bool:
    """Wait until the group is Stable with members for which ``settled(client_ids)`` holds."""
    while time.monotonic() < deadline:
        state, members = await group_state(bootstrap, group)
        if state == "Stable" and members and settled(members):
            return True
        await asyncio.sleep(0.25)
    return False


async def _second_instance(chaos: ChaosRun, name: str, stall: Stall) -> str:
    """Start ``name``'s second instance and wait until the group is stable with both (each then
    owns a partition); the stalled one's instance id goes into ``stall``."""
    stack = chaos.stack
    bootstrap, group = stack.config.bootstrap, _group_of(stack, name)
    stall.instance = stack.services[name].env["MEDMESH_INSTANCE_ID"]
    start = functools.partial(
        stack.start_instance, name, 2, SECOND_INSTANCE_ENV.get(name), SETTLE_WITHIN_S
    )
    extra = await asyncio.get_running_loop().run_in_executor(chaos.restarter, start)
    deadline = time.monotonic() + SETTLE_WITHIN_S
    both = await _settled(
        bootstrap,
        group,
        lambda m: len(m) == 2 and _members_of(stall.instance, m) == 1 == _members_of(extra, m),
        deadline,
    )
    if not both:
        raise AssertionError(f"{group} did not settle with {name} and {extra} as its members")
    return extra


async def _stall(chaos: ChaosRun, name: str, reader: ReportReader, stall: Stall) -> float:
    """SIGSTOP ``name``, wait until the group has expelled it and reports flow after that,
    SIGCONT; how long it was stopped."""
    stack = chaos.stack
    bootstrap, group = stack.config.bootstrap, _group_of(stack, name)
    stack.kill_service(name, signal.SIGSTOP)
    stall.stopped_at = stopped = time.monotonic()
    deadline = stopped + SETTLE_WITHIN_S
    try:
        if await _settled(
            bootstrap, group, lambda m: _members_of(stall.instance, m) == 0, deadline
        ):
            expelled_at = time.monotonic()
            stall.expelled_s = round(expelled_at - stopped, 2)
            stall.reports_while_stopped = sum(
                1 for a in reader.arrivals if stopped <= a.at < expelled_at
            )
            # The takeover's reports may all arrive before the group is seen stable (its
            # state is polled): then none comes after, and waiting longer proves nothing.
            flow_deadline = min(deadline, time.monotonic() + FLOW_WITHIN_S)
            while time.monotonic() < flow_deadline:
                if any(a.at >= expelled_at for a in reader.arrivals):
                    stall.flowing_s = round(time.monotonic() - stopped, 2)
                    break
                await asyncio.sleep(0.1)
    finally:
        stack.kill_service(name, signal.SIGCONT)
        stall.resumed_at = time.monotonic()
    return stall.resumed_at - stopped


def _log_count(stack: Stack, name: str, text: str) -> int:
    """How many lines of a service's log contain ``text``."""
    log = stack.config.state_dir / f"{name}.log"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text(errors="replace").splitlines() if text in line)


def _last_events(stack: Stack, name: str, count: int = 6) -> list[str]:
    """The last ``count`` log events of a service (their "event" field): why it is not ready,
    readable in CI's output after the run's logs are gone."""
    log = stack.config.state_dir / f"{name}.log"
    if not log.exists():
        return []
    events = []
    for line in log.read_text(errors="replace").splitlines()[-200:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") != "batch scored":
            events.append(f"{entry.get('timestamp', '')[11:23]} {str(entry.get('event'))[:80]}")
    return events[-count:]


def _waited_for_resume(stall: Stall, events: list[Event], arrivals: list[Arrival]) -> int:
    """Events accepted before the stalled instance resumed whose report came only after: the
    second instance did not take their partition over."""
    first: dict[str, float] = {}
    for arrival in arrivals:
        first[arrival.patient] = min(first.get(arrival.patient, arrival.at), arrival.at)
    return sum(
        1
        for e in events
        if e.accepted_at is not None
        and e.accepted_at < stall.resumed_at
        and first.get(e.patient, 0.0) > stall.resumed_at
    )


def _stall_problems(
    name: str, extra: str, stall: Stall, fenced_extra: int, unclosed: int, waited: int
) -> list[str]:
    """What went wrong in a stall beyond loss and duplicates (empty: nothing)."""
    problems = []
    if stall.expelled_s is None:
        problems.append(f"the group did not expel the stopped {name} within {SETTLE_WITHIN_S} s")
    if waited:
        problems.append(
            f"{waited} events accepted during the stall were reported only after {name} "
            f"resumed: {extra} did not take its partitions over"
        )
    if stall.reports_while_stopped == 0:
        problems.append(f"no report from {extra}'s partitions while {name} was stopped")
    # Only the stalled instance may be fenced: the one that took over was never stalled, so a
    # fence there means two producers of one partition in the same instance.
    if fenced_extra:
        problems.append(f"{extra} (never stalled) was fenced {fenced_extra} times")
    if unclosed:
        problems.append(f"{unclosed} transactional producers dropped unstopped ({UNCLOSED})")
    return problems


@pytest.mark.parametrize("stalled", STALLED)
async def test_a_stall_past_the_session_timeout_loses_no_event_and_duplicates_no_report(
    chaos: ChaosRun, stalled: str
) -> None:
    """A stage stopped past its session timeout while its second instance takes over, then
    resumed: reports flow during the stall and every accepted event gets exactly one."""
    stack = chaos.stack
    assert stack.exited() == [], f"parts of the stack are down before the fault: {stack.exited()}"
    reader = ReportReader(stack.config.bootstrap)
    await reader.start()
    stall = Stall()
    loop = asyncio.get_running_loop()
    extra: str | None = None
    try:
        worker = await _serving_worker(stack, reader)
        name = worker if stalled == "worker" else stalled
        # Logs are appended to across runs and instances: only this run's lines count.
        before = {
            (log, text): _log_count(stack, log, text)
            for log in (name, f"{name}-2")
            for text in (FENCED, UNCLOSED)
        }
        extra = await _second_instance(chaos, name, stall)
        run = await _load_with_fault(chaos, lambda: _stall(chaos, name, reader, stall))
        accepted = {e.patient for e in run.events if e.accepted_at is not None}
        await reader.wait_for_all(accepted, REPORTS_WITHIN_S, DUPLICATE_GRACE_S)
        fenced_extra = _log_count(stack, extra, FENCED) - before[extra, FENCED]
        unclosed = sum(
            _log_count(stack, log, UNCLOSED) - before[log, UNCLOSED] for log in (name, extra)
        )
        # The second instance leaves too (its partitions go back to the resumed one): any
        # duplicate of that hand-over is counted as well.
        await loop.run_in_executor(chaos.restarter, stack.stop_instance, extra)
        extra_name, extra = extra, None
        await asyncio.sleep(DUPLICATE_GRACE_S)
        arrivals = reader.of({e.patient for e in run.events})
    finally:
        if extra is not None:
            await loop.run_in_executor(chaos.restarter, stack.stop_instance, extra)
        await reader.stop()
    fenced = _log_count(stack, name, FENCED) - before[name, FENCED]
    print(  # noqa: T201 -- shown with pytest -s
        f"\nstall {name}: expelled after {stall.expelled_s} s, {stall.reports_while_stopped} "
        f"reports before that, reports after it {stall.flowing_s} s from SIGSTOP, stopped "
        f"{run.restart_s:.1f} s; {name} fenced after resuming: {fenced}; {extra_name} fenced: "
        f"{fenced_extra}; unclosed producers: {unclosed}"
    )
    await _record(
        chaos,
        f"SIGSTOP {name} past its session timeout beside a 2nd instance, SIGCONT",
        run,
        arrivals,
        _stall_problems(
            name,
            extra_name,
            stall,
            fenced_extra,
            unclosed,
            _waited_for_resume(stall, run.events, arrivals),
        ),
        {
            "expelled_s": stall.expelled_s,
            "flowing_s": stall.flowing_s,
            "reports_while_stopped": stall.reports_while_stopped,
            "stalled_fenced": fenced,
            "second_fenced": fenced_extra,
            "unclosed_producers": unclosed,
        },
    )


# --- poison records under load --------------------------------------------------------------------

# Poison isolation holds a stage only briefly (a failed poll's records are handled one by one,
# a poison tried 3 times with 0.2 s and 0.4 s pauses before its dead letter), so under the steady
# load reports never stop for long: the longest gap after the poison may not exceed this (a
# stall fault's gap is the 6-10 s session timeout and more).
POISON_STALL_LIMIT_S = 5.0
DEAD_LETTERS_WITHIN_S = 60.0
DEAD_LETTER_TOPICS = [
    topics.FHIR_INVALID,
    topics.ROUTER_DEADLETTER,
    topics.INFERENCE_DEADLETTER,
    topics.REPORTING_DEADLETTER,
]
ECG_BUNDLE = "ecg-sinus.json"
UCUM = "http://unitsofmeasure.org"


def _ecg_poison(kind: str, reason_has: str, **sampled_data: Any) -> tuple[Poison, str]:
    """An ECG Bundle of a fresh patient whose lead's SampledData is changed, as a poison of the
    inbound topic (and its patient, who must get no report)."""
    payload, patient = fixture_with_new_patient(ECG_BUNDLE)
    bundle = json.loads(payload)
    bundle["entry"][1]["resource"]["component"][0]["valueSampledData"].update(sampled_data)
    value = json.dumps(bundle).encode()
    return Poison(kind, topics.FHIR_INBOUND, value, topics.FHIR_INVALID, reason_has=reason_has), (
        patient
    )


def _poisons(stack: Stack, worker: str) -> tuple[list[Poison], set[str]]:
    """Every poison record: the common kinds on each consumed topic, and for ingest's inbound
    topic the two waveforms its bounds refuse; and the patients of those waveforms."""
    env = stack.running[worker].env
    tasks = topics.model_task_topic(
        env["MEDMESH_WORKER_MODEL"], int(env["MEDMESH_WORKER_MODEL_VERSION"])
    )
    consumed = [
        (topics.FHIR_INBOUND, topics.FHIR_INVALID),
        (topics.INFERENCE_REQUESTS, topics.ROUTER_DEADLETTER),
        (tasks, topics.INFERENCE_DEADLETTER),
        (topics.INFERENCE_RESULTS, topics.REPORTING_DEADLETTER),
    ]
    poisons = [poison for topic, dlq in consumed for poison in common_poisons(topic, dlq)]
    overflow, first = _ecg_poison(
        "waveform origin 1e308 V",
        "origin.value",
        origin={"value": 1e308, "unit": "V", "system": UCUM, "code": "V"},
    )
    slow, second = _ecg_poison("waveform period 20 s", "valueSampledData.period", period=20_000)
    return [*poisons, overflow, slow], {first, second}


def _dead_letter_problems(poisons: list[Poison], dead_letters: DeadLetterReader) -> list[str]:
    """What is wrong with the poisons' dead letters (empty: each has exactly one, on its
    service's dead-letter topic, with a reason; an oversized one truncated with its size)."""
    problems = []
    for poison in poisons:
        where = f"{poison.kind} on {poison.topic}"
        letters = dead_letters.of(poison.source)
        if len(letters) != 1:
            problems.append(f"{where}: {len(letters)} dead letters, not 1")
            continue
        (letter,) = letters
        if letter.topic != poison.dead_letter_topic:
            problems.append(f"{where}: dead-lettered on {letter.topic}")
        if not letter.reason.strip() or poison.reason_has not in letter.reason:
            problems.append(f"{where}: reason {letter.reason[:200]!r}")
        if len(poison.value) > PRODUCER_MAX_REQUEST_SIZE and not (
            letter.raw_truncated and letter.raw_size == len(poison.value)
        ):
            problems.append(
                f"{where}: dead letter not truncated with the size "
                f"(truncated {letter.raw_truncated}, size {letter.raw_size})"
            )
    if dead_letters.unreadable:
        problems.append(f"{dead_letters.unreadable} unreadable dead letters")
    return problems


async def test_poison_records_on_every_consumed_topic_are_dead_lettered_and_stall_nothing(
    chaos: ChaosRun,
) -> None:
    """Under load, each kind of poison record on each consumed topic gets one dead letter with a
    reason, every accepted event exactly one report, and reports never stop for long."""
    stack = chaos.stack
    assert stack.exited() == [], f"parts of the stack are down before the fault: {stack.exited()}"
    reader = ReportReader(stack.config.bootstrap)
    dead_letters = DeadLetterReader(stack.config.bootstrap, DEAD_LETTER_TOPICS)
    await reader.start()
    await dead_letters.start()
    try:
        worker = await _serving_worker(stack, reader)
        poisons, refused_patients = _poisons(stack, worker)
        # Null header values are no poison by themselves: a valid Bundle with them is scored.
        payload, null_header_patient = fixture_with_new_patient(BUNDLE)
        valid = Poison(
            "valid Bundle, null header values",
            topics.FHIR_INBOUND,
            payload,
            topics.FHIR_INVALID,
            headers=[(h.CORRELATION_ID, None), ("content-type", None)],
        )

        async def inject() -> float:
            started = time.monotonic()
            await produce_poisons(stack.config.bootstrap, [*poisons, valid])
            return time.monotonic() - started

        run = await _load_with_fault(chaos, inject)
        accepted = {e.patient for e in run.events if e.accepted_at is not None}
        await reader.wait_for_all(
            accepted | {null_header_patient}, REPORTS_WITHIN_S, DUPLICATE_GRACE_S
        )
        await dead_letters.wait_for({p.source for p in poisons}, DEAD_LETTERS_WITHIN_S)
        arrivals = reader.of({e.patient for e in run.events})
        others = Counter(a.patient for a in reader.of({null_header_patient, *refused_patients}))
    finally:
        await dead_letters.stop()
        await reader.stop()
    problems = _dead_letter_problems(poisons, dead_letters)
    for poison in poisons:
        reasons = [f"{d.topic}: {d.reason[:100]}" for d in dead_letters.of(poison.source)]
        print(f"\npoison {poison.kind} on {poison.topic} -> {reasons}")  # noqa: T201 -- with -s
    if dead_letters.of(valid.source):
        problems.append(f"the valid Bundle with null headers was dead-lettered: {valid.source}")
    if others[null_header_patient] != 1:
        problems.append(
            f"the valid Bundle with null headers got {others[null_header_patient]} reports"
        )
    problems += [
        f"a refused waveform got {others[p]} reports" for p in refused_patients if others[p]
    ]
    gap = summarize("", run.events, arrivals, chaos.rate_per_s, run.fault_at, 0, 0).stall_s
    if gap is None or gap > POISON_STALL_LIMIT_S:
        problems.append(
            f"reports stopped for {gap} s after the poison (limit {POISON_STALL_LIMIT_S})"
        )
    await _record(
        chaos,
        f"{len(poisons)} poison records on the 4 consumed topics",
        run,
        arrivals,
        problems,
        {"dead_letters": len(dead_letters.letters)},
    )
