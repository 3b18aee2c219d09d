"""The demo's reports on the real FHIR server (HAPI's JPA server, R4), as `make run` delivers them.

`medmesh up --demo` sends the vitals and ECG fixtures and announces the seeded imaging studies;
reporting delivers each report to the stack's FHIR server, which holds the demo's patients (the
stack put them there at start). Here the same events go through the stack, and each report it
produced for a demo patient is delivered with reporting's Deliverer, labelled with its FHIR
version as the delivery loop labels it: HAPI must take every kind (vitals R4/R4B, ECG R4B,
imaging), and a search by subject must find each exactly once, however often it was sent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from medmesh_cli.devstack.hapi_server import demo_patients
from medmesh_cli.devstack.stack import Stack
from medmesh_cli.main import demo_studies, sample_events
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_reporting.delivery import SCHEMA_VERSIONS, Delivered, Deliverer, DeliveryBackoff
from tests.e2e.conftest import Record, TopicTap

FHIR_JSON = "application/fhir+json"


def _subject(record: Record) -> str:
    report = record.json()
    return str(report["entry"][0]["resource"]["subject"]["reference"])


async def _send_demo(stack: Stack) -> None:
    """What `medmesh up --demo` sends: the sample events, then the imaging studies."""
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=60.0) as client:
        for path in sample_events():
            response = await client.post(
                "/fhir", content=path.read_bytes(), headers={"content-type": FHIR_JSON}
            )
            assert response.status_code < 300, f"{path.name}: {response.text[:300]}"
        for study in demo_studies(stack):
            response = await client.post(
                "/fhir",
                content=json.dumps(study).encode(),
                headers={"content-type": FHIR_JSON},
            )
            assert response.status_code < 300, f"{study['id']}: {response.text[:300]}"


async def _search(base_url: str, subject: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        response = await client.get(
            f"{base_url}/DiagnosticReport", params={"subject": subject, "_count": "50"}
        )
    assert response.status_code == 200, response.text[:500]
    return [entry["resource"] for entry in response.json().get("entry", [])]


async def test_the_demos_reports_are_stored_once_and_found_by_subject(
    stack: Stack, tap: TopicTap
) -> None:
    """Every demo report is taken by HAPI (twice sent, stored once) and found by its subject."""
    subjects = {f"Patient/{p['id']}" for p in demo_patients()}
    assert set(stack.seeded_patients) == subjects
    await _send_demo(stack)

    # A report per demo patient (an earlier test may have sent the same events: ingest then
    # sends nothing new, and its reports are already on the topic).
    deadline = asyncio.get_running_loop().time() + 180.0
    while True:
        reports = tap.matching(topics.REPORTS_DIAGNOSTIC, lambda r: _subject(r) in subjects)
        if {_subject(r) for r in reports} == subjects:
            break
        missing = subjects - {_subject(r) for r in reports}
        assert asyncio.get_running_loop().time() < deadline, f"no report yet for {missing}"
        await asyncio.sleep(0.5)

    base_url = stack.config.fhir_server_url
    async with httpx.AsyncClient(timeout=60.0) as client:
        deliverer = Deliverer(client, base_url, backoff=DeliveryBackoff(0.2, 2.0, 60.0))
        for record in reports:
            version = SCHEMA_VERSIONS.get(record.headers.get(h.SCHEMA, ""))
            for _ in range(2):
                outcome = await deliverer.deliver(record.json(), version)
                assert isinstance(outcome, Delivered), (_subject(record), version, outcome)

    for subject in sorted(subjects):
        stored = await _search(base_url, subject)
        identifiers = [r["identifier"][0]["value"] for r in stored]
        assert identifiers, f"no DiagnosticReport for {subject}"
        assert len(identifiers) == len(set(identifiers)), f"a report stored twice for {subject}"
    sent = {record.json()["entry"][0]["resource"]["identifier"][0]["value"] for record in reports}
    found = {
        r["identifier"][0]["value"]
        for subject in subjects
        for r in await _search(base_url, subject)
    }
    assert sent == found
