"""Ingest as production runs it, for tests: a payload through ``IngestService`` (parse, extract,
``readings.merge``) into the answer, the requests and the patient states it would publish.

A fresh service per payload, so every patient starts without a stored state: what a payload
alone gives. Tests of readings arriving one by one merge through ``readings.merge`` directly.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from medmesh_contracts.events import (
    FhirVersion,
    PatientReadingsUpdated,
    Producer,
    RequestInference,
    SourceContext,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_ingest.outcomes import Issue
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Answer, Context, IngestService, Outgoing
from medmesh_ingest.validation import Limits

RECEIVED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
# The deployed default (MEDMESH_READINGS_LOOKBACK_MINUTES).
LOOKBACK = timedelta(minutes=240)
# How ingest names the required inputs a patient lacks (service._merge_issues).
_MISSING = re.compile(r"required inputs missing: ([^;]+);")


@dataclass(frozen=True)
class Ingested:
    """What ingest answered a payload and what it published for it."""

    answer: Answer
    states: tuple[PatientReadingsUpdated, ...]

    @property
    def requests(self) -> tuple[RequestInference, ...]:
        """The requests for a score the payload caused."""
        return self.answer.requests

    @property
    def issues(self) -> tuple[Issue, ...]:
        """The issues the sender is told of (without the summary of what was accepted)."""
        return self.answer.issues

    @property
    def missing(self) -> list[tuple[str, ...]]:
        """Per patient and model still incomplete, the required inputs it lacks (spec order)."""
        found = (_MISSING.search(i.diagnostics) for i in self.issues if i.code == "incomplete")
        return [tuple(m.group(1).split(", ")) for m in found if m is not None]


def ingest(
    raw: bytes,
    specs: Mapping[str, ModelSpec],
    *,
    fhir_version: FhirVersion = "R4B",
    received_at: datetime = RECEIVED,
) -> Ingested:
    """Hand one payload to a fresh ingest service, as an HTTP call would."""
    states: list[PatientReadingsUpdated] = []

    async def publish(
        outgoing: Sequence[Outgoing], published: Sequence[PatientReadingsUpdated], payloads: int
    ) -> list[int | None]:
        states.extend(published)
        return [None] * len(published)

    service = IngestService(
        specs=specs,
        pseudonymize=Pseudonymizer(b"0123456789abcdef0123"),
        producer=Producer(service="ingest", instance="test"),
        store=ReadingsStore(),
        publish=publish,
        limits=Limits(),
        lookback=LOOKBACK,
    )
    context = Context(SourceContext(channel="http", fhir_version=fhir_version), fhir_version)
    answer = asyncio.run(service.handle(raw, context, received_at))
    return Ingested(answer, tuple(states))
