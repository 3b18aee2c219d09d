"""Ingest's HTTP entrypoint: ``POST /fhir``, ``POST /fhir/{resourceType}`` and
``GET /fhir/metadata``.

It authenticates, checks the transport (media type, FHIR version, size), hands the payload to
the ``IngestService`` and translates its ``Answer``: an OperationOutcome, or for a batch or
transaction Bundle a batch-response / transaction-response Bundle (``bundle_response``). A 2xx
is sent only after every message the payload caused (its requests and patient states) was
committed to Kafka in one transaction (acks=all); otherwise 503 with Retry-After.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from opentelemetry import trace

from medmesh_contracts import headers as h
from medmesh_contracts.events import SourceContext, utc_now
from medmesh_ingest.capability import capability_statement, metadata_version
from medmesh_ingest.outcomes import TOO_LARGE, FhirRejected, Issue, outcome, too_large_outcome
from medmesh_ingest.parts import Ingest
from medmesh_ingest.service import Context, KafkaUnavailableError, SourceUnavailableError
from medmesh_ingest.transport import requested_version
from medmesh_runtime.logging import get_logger
from medmesh_runtime.telemetry import trace_id_hex

FHIR_JSON = "application/fhir+json"
log = get_logger("medmesh.ingest")


def fhir_routes(ingest: Ingest) -> APIRouter:
    """The FHIR endpoints over ``ingest``."""
    routes = APIRouter()

    @routes.post("/fhir")
    async def post_bundle(request: Request) -> Response:
        return await on_http(ingest, request, None)

    @routes.get("/fhir/metadata")
    async def metadata(request: Request) -> Response:
        settings = ingest.settings
        version = metadata_version(request.headers.get("accept"), settings.default_fhir_version)
        if version is None:
            issue = Issue(
                "error",
                "not-supported",
                "the CapabilityStatement is available in R4 (fhirVersion=4.0), R4B (4.3) and R5 "
                "(5.0)",
            )
            return JSONResponse(outcome((issue,)), status_code=406, media_type=FHIR_JSON)
        statement = capability_statement(
            ingest.specs.values(),
            utc_now(),
            tokens=ingest.auth.required,
            tls=settings.tls_cert_file is not None,
            fhir_version=version,
        )
        return JSONResponse(statement, media_type=FHIR_JSON)

    @routes.post("/fhir/{resource_type}")
    async def post_resource(resource_type: str, request: Request) -> Response:
        return await on_http(ingest, request, resource_type)

    return routes


async def on_http(ingest: Ingest, request: Request, resource_type: str | None) -> Response:
    """One HTTP POST: a 2xx is sent after Kafka acknowledged everything it caused."""
    # The request's SERVER span is the FastAPI instrumentation's (app.py): named by the route,
    # continuing the caller's trace context, with OpenTelemetry's HTTP attributes and metrics.
    trace_id = trace_id_hex(trace.get_current_span())
    source = ingest.auth.source(request.headers.get("authorization"))
    if source is None:
        return unauthorized(trace_id)
    try:
        version = requested_version(request.headers.get("content-type"), source.fhir_version)
        raw = await read_body(request, ingest.settings.max_payload_bytes)
    except FhirRejected as problem:
        return fhir_response(problem.status, problem.outcome, trace_id)
    context = Context(
        SourceContext(
            channel="http",
            fhir_version=version,
            site=source.site,
            source_system=None if source.name == "default" else source.name,
        ),
        version,
        resource_type,
        ingest.fetcher(source),
        ingest.recoverer(source),
        answer_bundles=True,
    )
    try:
        answer = await ingest.handle(raw, context)
    except (KafkaUnavailableError, SourceUnavailableError) as exc:
        return unavailable(exc, trace_id, ingest.settings.retry_after_s)
    log.info(
        "http payload handled",
        status=answer.status,
        requests=len(answer.requests),
        issues=len(answer.issues),
    )
    return fhir_response(
        answer.status,
        answer.body,
        trace_id,
        correlation_ids=[r.correlation_id for r in answer.requests],
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than ``limit`` bytes (413 beyond it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FhirRejected(TOO_LARGE, too_large_outcome())
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FhirRejected(TOO_LARGE, too_large_outcome())
        chunks.append(chunk)
    return b"".join(chunks)


def unavailable(exc: Exception, trace_id: str, retry_after_s: int) -> Response:
    """503 with Retry-After: nothing (or not all) of the payload is durably taken."""
    if isinstance(exc, KafkaUnavailableError):
        log.error("publishing to Kafka failed; answering 503", error=str(exc))
        text = f"could not store the request durably ({exc}); retry later"
    else:
        log.warning("the source FHIR server failed; answering 503", error=str(exc))
        text = f"could not fetch the notification's resources from the source: {exc}"
    response = fhir_response(503, outcome((Issue("error", "transient", text),)), trace_id)
    response.headers["retry-after"] = str(retry_after_s)
    return response


def unauthorized(trace_id: str) -> Response:
    """401 with an OperationOutcome and the bearer challenge."""
    issue = Issue("error", "login", "a valid bearer token is required (Authorization: Bearer ...)")
    response = fhir_response(401, outcome((issue,)), trace_id)
    response.headers["www-authenticate"] = 'Bearer realm="medmesh"'
    return response


def fhir_response(
    status: int,
    body: dict[str, Any],
    trace_id: str,
    correlation_ids: list[str] | None = None,
) -> JSONResponse:
    """A FHIR JSON answer with the trace id and correlation ids as headers."""
    headers = {"medmesh-trace-id": trace_id}
    if correlation_ids:
        headers[h.CORRELATION_ID] = ",".join(correlation_ids)
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)
