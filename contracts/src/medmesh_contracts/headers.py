"""Kafka header names carried on every medmesh message."""

from __future__ import annotations

# W3C trace context (https://www.w3.org/TR/trace-context/), written by the OpenTelemetry propagator.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# One id per clinical request, stable across every hop; also the id of the final report.
CORRELATION_ID = "medmesh-correlation-id"
# The schema id of the message value, e.g. "medmesh.RunInference/1" or "fhir.R4B+json".
SCHEMA = "medmesh-schema"

# Routing attributes of a RequestInference, copied from its value by ingest so that the router
# routes on the key (the patient pseudonym) and these headers without parsing the value.
MODEL = "medmesh-model"
SITE = "medmesh-site"
WARD = "medmesh-ward"
SOURCE_SYSTEM = "medmesh-source-system"

# Schema ids for payloads that are FHIR rather than medmesh events.
FHIR_R4_JSON = "fhir.R4+json"
FHIR_R4B_JSON = "fhir.R4B+json"
FHIR_R5_JSON = "fhir.R5+json"
