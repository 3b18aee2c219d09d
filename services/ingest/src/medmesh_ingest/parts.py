"""The ingest process's parts, shared by its two entrypoints (``http`` and ``inbound``): the
``IngestService`` with its publish function and fetcher, the sources' authentication, the
patients' readings, and how an inbound event is prepared. Built once by ``app.create_app``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import httpx
from faststream.kafka import KafkaBroker
from opentelemetry import context as otel_context
from opentelemetry.trace import Tracer

from medmesh_contracts import topics
from medmesh_contracts.events import (
    FhirVersion,
    PatientReadingsUpdated,
    Producer,
    SourceContext,
    SubscriptionEventsHandled,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.auth import Authenticator, Source
from medmesh_ingest.fetch import SourceServer, http_fetcher, http_recoverer
from medmesh_ingest.inbound import DeliverRequests
from medmesh_ingest.outcomes import TOO_LARGE, FhirRejected, too_large_outcome
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.records import Records
from medmesh_ingest.service import (
    Answer,
    Context,
    Fetch,
    IngestService,
    KafkaUnavailableError,
    Outgoing,
    Prepared,
    Recover,
)
from medmesh_ingest.settings import IngestSettings
from medmesh_ingest.transport import requested_version
from medmesh_ingest.validation import Limits
from medmesh_runtime.kafka import message_headers, record_headers
from medmesh_runtime.transactional import GroupCommit

SERVICE = "ingest"


class Ingest:
    """One IngestService, its publishers and clients, for both entrypoints."""

    def __init__(
        self,
        settings: IngestSettings,
        tracer: Tracer,
        *,
        publish_requests: DeliverRequests | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer
        # None: requests are produced to medmesh.inference.requests with the patient states.
        self.publish_requests = publish_requests
        self.specs = load_specs(settings.model_specs_dir)
        self.auth = Authenticator(settings)
        self.producer = Producer(service=SERVICE, instance=settings.instance_id)
        self.records = Records(tracer, self.producer, settings.dead_letter_max_bytes)
        # Set when the app starts: commits the HTTP path's requests and states together.
        self.group_commit: GroupCommit | None = None
        # Set when the app starts: writes the subscriptions' event numbers.
        self.broker: KafkaBroker | None = None
        self.store = ReadingsStore(max_bytes=settings.readings_max_bytes)
        self.ready = False
        self.http_client: httpx.AsyncClient | None = None
        self.service = IngestService(
            specs=self.specs,
            pseudonymize=Pseudonymizer(settings.pseudonym_key.get_secret_value().encode()),
            producer=self.producer,
            store=self.store,
            publish=self.publish,
            limits=Limits(
                settings.max_json_depth,
                settings.max_bundle_entries,
                settings.max_waveform_samples,
                max_waveform_seconds=settings.max_waveform_seconds,
                max_nodes=settings.max_json_nodes,
            ),
            lookback=timedelta(minutes=settings.readings_lookback_minutes),
            max_fetched=settings.max_fetched_resources,
            publish_timeout_s=settings.publish_timeout_s,
            pacs=settings.pacs_policy(),
            record_progress=self.record_progress,
        )

    async def publish(
        self,
        requests: Sequence[Outgoing],
        states: Sequence[PatientReadingsUpdated],
        payloads: int,
    ) -> list[int | None]:
        """Commit an HTTP payload's requests and patient states in one transaction (shared with
        concurrent payloads: group commit); each state's offset on its topic. With
        ``publish_requests``, the requests are handed to it first and only the states commit."""
        if self.publish_requests is not None:
            await self.publish_requests(requests)
            requests = ()
        if self.group_commit is None:
            raise KafkaUnavailableError("ingest has not started its Kafka producer")
        written = await self.group_commit.publish(
            [*self.records.requests(requests), *self.records.states(states)]
        )
        return [getattr(w, "offset", None) for w in written[len(requests) :]]

    async def record_progress(self, handled: SubscriptionEventsHandled) -> None:
        """Keep a subscription's highest handled event number on medmesh.ingest.subscriptions
        (compacted: the key's latest record is its number)."""
        if self.broker is None:
            raise KafkaUnavailableError("ingest has not started its Kafka producer")
        await self.broker.publish(
            to_wire(handled),
            topic=topics.INGEST_SUBSCRIPTIONS,
            key=f"{handled.source_system}|{handled.subscription}".encode(),
            headers=message_headers(handled.correlation_id, schema_of(SubscriptionEventsHandled)),
        )

    def source_server(self, source: Source) -> SourceServer | None:
        """The source's FHIR server, for id-only fetches and missed notifications ($events)
        alike (None: none configured)."""
        if source.base_url is None or self.http_client is None:
            return None
        return SourceServer(
            source.base_url,
            source.fetch_token,
            timeout_s=self.settings.fetch_timeout_s,
            max_bytes=self.settings.max_payload_bytes,
            client=self.http_client,
            auth=source.fetch_auth,
        )

    def fetcher(self, source: Source) -> Fetch | None:
        """How to fetch id-only notification content for this source (None: not configured)."""
        server = self.source_server(source)
        return None if server is None else http_fetcher(server)

    def recoverer(self, source: Source) -> Recover | None:
        """How to ask this source for missed notifications ($events; None: not configured)."""
        server = self.source_server(source)
        return None if server is None else http_recoverer(server)

    async def handle(self, raw: bytes, context: Context) -> Answer:
        """The service's answer to one payload, inside a span."""
        with self.tracer.start_as_current_span("ingest.handle"):
            return await self.service.handle(raw, context, utc_now())

    async def prepare_inbound(self, record: Any) -> Prepared | Answer:
        """One event from medmesh.fhir.inbound, parsed and checked (an Answer: not to merge)."""
        raw: bytes = record.value or b""
        source = self.auth.default_source
        try:
            version = self.inbound_version(record, raw, source)
        except FhirRejected as problem:
            return Answer(problem.status, problem.outcome)
        with self.tracer.start_as_current_span("ingest.handle"):
            context = Context(
                SourceContext(channel="kafka", fhir_version=version),
                version,
                fetch=self.fetcher(source),
                recover=self.recoverer(source),
                trace=otel_context.get_current(),  # its requests are published in this span
            )
            return await self.service.prepare(raw, context, utc_now())

    def inbound_version(self, record: Any, raw: bytes, source: Source) -> FhirVersion:
        """The FHIR version of an inbound event (its content-type header, else the default).

        Raises FhirRejected for an event over the size limit or of a version not spoken.
        """
        if len(raw) > self.settings.max_payload_bytes:
            raise FhirRejected(TOO_LARGE, too_large_outcome())
        content_type = record_headers(record).get("content-type", "")
        if "fhirversion" not in content_type.lower():
            # Kafka clients set content types of their own (or none): only a FHIR one counts.
            return source.fhir_version
        return requested_version(content_type, source.fhir_version)
