"""The medmesh wire contract, version 1: every event and command that crosses a Kafka topic.

Rules: every message is a frozen pydantic model with an explicit ``schema`` id; changes within a
version are additive only; consumers ignore unknown fields.
Commands are imperative (``RequestInference``, ``RunInference``), events past tense
(``InferenceCompleted``, ``InferenceFailed``, ``FhirEventRejected``, ``MessageDeadLettered``).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from medmesh_contracts import headers as h

# The FHIR versions medmesh speaks: what a source sends in, and what its reports are written in.
# R4 (4.0.1) was added within contract v1 (additive: a new value of the enum).
FhirVersion = Literal["R4", "R4B", "R5"]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh random id for an event or a clinical request."""
    return str(uuid.uuid4())


class WireModel(BaseModel):
    """Base of every wire model: immutable, and tolerant of fields added by newer producers."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Producer(WireModel):
    """Which service instance wrote an event."""

    service: str
    instance: str


class Envelope(WireModel):
    """Fields every event carries, whatever its schema."""

    event_id: str = Field(default_factory=new_id)
    correlation_id: str
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    producer: Producer


class SourceContext(WireModel):
    """Where a clinical event came from; used by routing rules and by reporting."""

    channel: Literal["http", "kafka"]
    fhir_version: FhirVersion = "R4B"
    site: str | None = None
    source_system: str | None = None
    ward: str | None = None


class BodySiteCoding(WireModel):
    """The anatomy an image shows, as the announcing ImagingStudy's series coded it (a FHIR
    Coding, e.g. SNOMED CT 51185008 Thoracic structure)."""

    system: str
    code: str
    display: str | None = None


class ImageReference(WireModel):
    """Where one DICOM instance of an imaging study is: the claim check of an image input.

    Pixels never ride Kafka. The worker fetches the instance with WADO-RS from ``dicomweb_url``
    (which must be a PACS its settings allow: an event never makes a worker call an arbitrary
    host) and preprocesses it there; the SHA-256 of the bytes it read is reported with the
    result. The UIDs identify images, not patients, and still stay out of logs. ``body_site``
    is the series' bodySite as announced (None: not coded), for the findings' Observation.bodySite.
    """

    dicomweb_url: str
    study_uid: str
    series_uid: str
    instance_uid: str
    body_site: BodySiteCoding | None = None


class ModelInput(WireModel):
    """One model input value, already converted to the unit the model spec expects.

    A waveform input (a spec input with ``waveform``) also carries its ``samples`` in ``unit``,
    already resampled to the spec's rate and length, ``period_ms`` apart, and ``duration_s``, how
    long the signal received lasted (before cropping or padding). Its ``value`` stays a value in
    ``unit``: the last sample, the signal's most recent value, so a reader that knows only
    scalar inputs still reads a true (if partial) value of the signal.

    An image input (a spec input with ``image``) carries ``image``, where its instance is; its
    ``value`` is 1 (one image) and ``source_reference`` names the ImagingStudy.
    """

    name: str
    value: float
    unit: str
    observed_at: AwareDatetime | None = None
    # Reference to the FHIR resource the value came from (for derivedFrom / Provenance.entity).
    source_reference: str | None = None
    samples: tuple[float, ...] | None = None
    period_ms: float | None = None
    duration_s: float | None = None
    image: ImageReference | None = None


class RequestInference(Envelope):
    """Command from ingest to the router: score this patient with this model."""

    schema_id: Literal["medmesh.RequestInference/1"] = Field(
        default="medmesh.RequestInference/1", alias="schema"
    )
    model: str
    patient_pseudonym: str
    # The patient reference as the source wrote it; needed for the report's subject. It is
    # patient data: it travels inside the trust boundary (Kafka) and never into logs.
    subject_reference: str
    encounter_reference: str | None = None
    based_on_reference: str | None = None
    inputs: tuple[ModelInput, ...]
    effective_at: AwareDatetime
    received_at: AwareDatetime
    source: SourceContext

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


def routing_headers(request: RequestInference) -> dict[str, str]:
    """The routing attributes of a request as headers (model, and site, ward, source system
    where the source gave them); the key carries the pseudonym. They name no patient."""
    found = {
        h.MODEL: request.model,
        h.SITE: request.source.site,
        h.WARD: request.source.ward,
        h.SOURCE_SYSTEM: request.source.source_system,
    }
    return {name: value for name, value in found.items() if value is not None}


class RouteDecision(WireModel):
    """Why the router sent a request to the version it chose."""

    reason: Literal["static-table", "rule", "bucket", "shadow"]
    detail: str = ""


class RunInference(Envelope):
    """Command from the router to one model version's workers."""

    schema_id: Literal["medmesh.RunInference/1"] = Field(
        default="medmesh.RunInference/1", alias="schema"
    )
    model_version: int
    route: RouteDecision
    routed_at: AwareDatetime
    request: RequestInference

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


def run_inference_wire(
    request_wire: bytes,
    correlation_id: str,
    model_version: int,
    route: RouteDecision,
    producer: Producer,
    routed_at: datetime,
) -> bytes:
    """A RunInference as wire bytes around a RequestInference that is already wire bytes.

    The router routes on headers and does not validate the request as a model: its bytes
    (checked by the caller to be one JSON object agreeing with the headers) are embedded as
    the ``request`` member verbatim. The result parses to the same RunInference as
    ``to_wire(RunInference(...))`` would (field order, the UTC offset's spelling and fields
    unknown to this version may differ), without a validation and re-serialization per request.
    """
    if routed_at.tzinfo is None:
        raise ValueError("routed_at must be timezone-aware")
    head = {
        "event_id": new_id(),
        "correlation_id": correlation_id,
        "occurred_at": routed_at.isoformat(),
        "producer": producer.model_dump(),
        "schema": "medmesh.RunInference/1",
        "model_version": model_version,
        "route": route.model_dump(),
        "routed_at": routed_at.isoformat(),
    }
    return b"".join(
        (json.dumps(head, separators=(",", ":")).encode()[:-1], b',"request":', request_wire, b"}")
    )


class InferenceCompleted(Envelope):
    """Event from a worker: Triton ran the model version on the request's inputs."""

    schema_id: Literal["medmesh.InferenceCompleted/1"] = Field(
        default="medmesh.InferenceCompleted/1", alias="schema"
    )
    task: RunInference
    triton_model: str
    triton_version: str
    # Output tensors by name, one row (flattened) per request.
    outputs: dict[str, tuple[float, ...]]
    device_kind: str
    batch_size: int
    inference_ms: float
    completed_at: AwareDatetime
    # Image inputs: the SHA-256 of the DICOM instance bytes the worker read, by input name (what
    # the report's provenance names as the pixels scored; added within version 1, issue 19).
    input_digests: dict[str, str] = Field(default_factory=dict)

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class InferenceFailed(Envelope):
    """Event from a worker: the request could not be scored, and why."""

    schema_id: Literal["medmesh.InferenceFailed/1"] = Field(
        default="medmesh.InferenceFailed/1", alias="schema"
    )
    task: RunInference
    # invalid-output: the model answered, but with values its spec's outputs cannot read (NaN, a
    # wrong shape, an unknown band); added within version 1 with the model spec version 2.
    error_kind: Literal["invalid-input", "invalid-output", "retries-exhausted", "model-unavailable"]
    reason: str
    attempts: int

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class FhirEventRejected(Envelope):
    """Event from ingest: a message on the inbound topic was not valid FHIR or not usable."""

    schema_id: Literal["medmesh.FhirEventRejected/1"] = Field(
        default="medmesh.FhirEventRejected/1", alias="schema"
    )
    source_topic: str
    source_partition: int
    source_offset: int
    # The raw message value: text when it was UTF-8, otherwise base64.
    raw_value: str
    raw_encoding: Literal["utf-8", "base64"]
    operation_outcome: dict[str, Any]
    # Added within version 1 as in MessageDeadLettered: whether raw_value is only the start of the
    # value, and the size and SHA-256 of the whole value.
    raw_truncated: bool = False
    raw_size: int | None = None
    raw_sha256: str | None = None

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class MessageDeadLettered(Envelope):
    """Event from any consumer: a message it could not process, kept whole for replay."""

    schema_id: Literal["medmesh.MessageDeadLettered/1"] = Field(
        default="medmesh.MessageDeadLettered/1", alias="schema"
    )
    source_topic: str
    source_partition: int
    source_offset: int
    raw_value: str
    raw_encoding: Literal["utf-8", "base64"]
    reason: str
    # Added within version 1: a dead letter must fit in one Kafka record, so a value too large
    # for that keeps only its start (raw_truncated: true, not replayable as it is), with the
    # size in bytes and the hex SHA-256 of the whole value; both are set on every dead letter
    # medmesh writes (absent on older ones).
    raw_truncated: bool = False
    raw_size: int | None = None
    raw_sha256: str | None = None

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class WorkerHeartbeat(Envelope):
    """Event from an inference worker, every few seconds: is this model version servable here?

    Published on medmesh.models.status keyed by the worker instance. The router routes only to
    versions with at least one ready worker whose last heartbeat is younger than
    ``3 * interval_s``.
    """

    schema_id: Literal["medmesh.WorkerHeartbeat/1"] = Field(
        default="medmesh.WorkerHeartbeat/1", alias="schema"
    )
    model: str
    model_version: int
    instance: str
    state: Literal["starting", "ready", "degraded", "stopping"]
    triton_ready: bool
    circuit: Literal["closed", "open", "half-open"] = "closed"
    device_kind: str = "unknown"
    interval_s: float
    sent_at: AwareDatetime

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class IngestedReading(WireModel):
    """One model input's latest reading as ingest keeps it, with the FHIR version it came from."""

    name: str
    value: float
    unit: str
    observed_at: AwareDatetime
    source_reference: str | None = None
    # meta.versionId of the source resource: the same id and version is the same reading.
    source_version: str | None = None
    # A waveform reading's samples, their spacing and its duration (see ModelInput).
    samples: tuple[float, ...] | None = None
    period_ms: float | None = None
    duration_s: float | None = None
    # An image reading's claim check (see ModelInput); added within version 1 (issue 19).
    image: ImageReference | None = None


class PatientReadingsUpdated(Envelope):
    """Event from ingest: the latest readings of one patient for one model (its state).

    Published on medmesh.ingest.readings (compacted) keyed by ``<pseudonym>|<model>`` and
    partitioned by the pseudonym alone, so each patient's state sits on one partition; ingest
    rebuilds its state from this topic on start.
    """

    schema_id: Literal["medmesh.PatientReadingsUpdated/1"] = Field(
        default="medmesh.PatientReadingsUpdated/1", alias="schema"
    )
    model: str
    patient_pseudonym: str
    # Needed to build the request when the last missing reading arrives (see RequestInference).
    subject_reference: str
    encounter_reference: str | None = None
    readings: tuple[IngestedReading, ...]
    # Fingerprint of the inputs of the last request sent, so an unchanged set is not sent again.
    last_request_fingerprint: str | None = None
    # ServiceRequests (``ServiceRequest/<id>[|version]``) already answered with a request.
    fulfilled_orders: tuple[str, ...] = ()
    updated_at: AwareDatetime

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class ReportUndeliverable(Envelope):
    """Event from reporting: a report the hospital's FHIR server refused or never took.

    Published on medmesh.reports.undeliverable keyed by the patient pseudonym, with the report
    Bundle whole (for replay) and the server's answer (its OperationOutcome when it sent one).
    """

    schema_id: Literal["medmesh.ReportUndeliverable/1"] = Field(
        default="medmesh.ReportUndeliverable/1", alias="schema"
    )
    fhir_server: str
    report: dict[str, Any]
    status_code: int | None = None
    operation_outcome: dict[str, Any] | None = None
    reason: str
    attempts: int
    # The report's FHIR version, when known (added within v1): a replay delivers it labelled so.
    fhir_version: FhirVersion | None = None

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class DeliverReport(Envelope):
    """Command to reporting: deliver this report to the hospital's FHIR server again.

    Published on medmesh.reports.delivery-requests keyed by the patient pseudonym, e.g. by
    ``medmesh dlq replay medmesh.reports.undeliverable`` once the cause is fixed. The report is
    never published on medmesh.reports.diagnostic again (no second report for its readers), and
    delivery creates conditionally on identifiers (no second copy on the server).
    """

    schema_id: Literal["medmesh.DeliverReport/1"] = Field(
        default="medmesh.DeliverReport/1", alias="schema"
    )
    report: dict[str, Any]
    # Where the command comes from, e.g. "medmesh.reports.undeliverable/0/42".
    replay_of: str | None = None
    # The report's FHIR version, when known (added within v1): the delivery's content type
    # names it (``fhirVersion=4.0`` for R4); None: the server's default.
    fhir_version: FhirVersion | None = None

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class EventNumberRange(WireModel):
    """Event numbers ``first`` to ``last`` of a subscription (SubscriptionEventsHandled)."""

    first: int = Field(ge=0)
    last: int = Field(ge=0)


class SubscriptionEventsHandled(Envelope):
    """Event from ingest: a source's Subscription has had its events handled up to
    ``highest_event_number`` (its notifications' ``eventNumber``s).

    Published on medmesh.ingest.subscriptions (compacted) keyed by ``<source>|<subscription>``
    once what those events caused is committed; ingest reads it back on start, so a gap in a
    subscription's event numbers that spans a restart is still found and asked for.
    """

    schema_id: Literal["medmesh.SubscriptionEventsHandled/1"] = Field(
        default="medmesh.SubscriptionEventsHandled/1", alias="schema"
    )
    # The source system's name (MEDMESH_INGEST_SOURCES; "default" for an unnamed source).
    source_system: str
    # The Subscription's reference as the source's notifications give it (no patient data).
    subscription: str
    highest_event_number: int = Field(ge=0)
    # Events at or below the highest number that were never handled: missed, and the source
    # could not give them again ($events). A late notification carrying one is processed, not
    # taken for a duplicate. Added within version 1: absent (older producers) means none.
    unrecovered: tuple[EventNumberRange, ...] = Field(default=(), max_length=32)
    # How often the subscription's counting started again (a handshake for a subscription
    # already seen: re-created, or its source restored, numbering from 0 again). A record with
    # more restarts replaces the number held, even a higher one. Added within version 1.
    counting_restarts: int = Field(default=0, ge=0)

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


ALL_EVENTS: tuple[type[Envelope], ...] = (
    RequestInference,
    RunInference,
    InferenceCompleted,
    InferenceFailed,
    FhirEventRejected,
    MessageDeadLettered,
    WorkerHeartbeat,
    PatientReadingsUpdated,
    ReportUndeliverable,
    DeliverReport,
    SubscriptionEventsHandled,
)


def schema_of(model: type[Envelope]) -> str:
    """The schema id (``name/version``) a wire model declares."""
    default = model.model_fields["schema_id"].default
    if not isinstance(default, str):
        raise TypeError(f"{model.__name__} declares no schema id")
    return default


def to_wire(event: Envelope) -> bytes:
    """Serialize an event as JSON bytes, using the wire field names (``schema``)."""
    return event.model_dump_json(by_alias=True).encode()
