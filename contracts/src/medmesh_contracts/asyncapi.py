"""The AsyncAPI 3.0 document of medmesh's event contract, generated from the contract itself.

Channels are the topics of ``topics`` (each model version's task topic as one parameterised
channel), with their partitions and retention as Kafka bindings; each channel's messages are the
schema ids its ``TopicSpec.carries``, and each medmesh message's payload is the JSON Schema of
its wire model (the same models as contracts/schemas/). FHIR payloads are described, not
schematised: FHIR's own definitions are their schema.

Why not faststream's generated document: the stages consume and produce through the transactional
loop (medmesh_runtime.transactional), not faststream subscribers and publishers, so a document
generated from the services' brokers would miss most of the pipeline. The contract knows every
topic and every message.

``python -m medmesh_contracts.asyncapi docs/asyncapi.yaml`` writes it; tests/unit/test_asyncapi.py
fails when the committed document and the contract disagree, and validates it against the
AsyncAPI 3.0.0 JSON Schema (deploy/schemas/asyncapi-3.0.0.json).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic.json_schema import models_json_schema

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import ALL_EVENTS, Envelope, schema_of
from medmesh_contracts.lifecycle import LIFECYCLE_EVENTS

Document = dict[str, Any]

# The contract's version: events are versioned one by one (medmesh.<Name>/<version>); the topics
# and headers change only additively within this one.
CONTRACT_VERSION = "1"
# The parameterised channel of every model version's task topic.
TASK_CHANNEL = "medmesh.model.{model}.v{version}.tasks"
KAFKA_BINDING_VERSION = "0.5.0"
FHIR_SPECIFICATION = {
    "R4": "https://hl7.org/fhir/R4/",
    "R4B": "https://hl7.org/fhir/R4B/",
    "R5": "https://hl7.org/fhir/R5/",
}


def message_name(schema_id: str) -> str:
    """``medmesh.RunInference/1`` -> ``RunInference.v1``; ``fhir.R4B+json`` -> ``fhir.R4B``."""
    if schema_id.startswith("fhir."):
        return schema_id.removesuffix("+json")
    name, version = schema_id.removeprefix("medmesh.").split("/")
    return f"{name}.v{version}"


def _events() -> dict[str, type[Envelope]]:
    return {schema_of(event): event for event in (*ALL_EVENTS, *LIFECYCLE_EVENTS)}


def _headers(schema_id: str) -> Document:
    """The Kafka headers a message of ``schema_id`` carries."""
    properties: Document = {
        h.SCHEMA: {"type": "string", "const": schema_id, "description": "the value's schema id"},
        h.CORRELATION_ID: {
            "type": "string",
            "description": "one id per clinical request, stable across every hop",
        },
        h.TRACEPARENT: {"type": "string", "description": "W3C trace context"},
        h.TRACESTATE: {"type": "string", "description": "W3C trace context"},
    }
    if schema_id == "medmesh.RequestInference/1":
        for name, what in (
            (h.MODEL, "the model asked for"),
            (h.SITE, "the source's site"),
            (h.WARD, "the ward"),
            (h.SOURCE_SYSTEM, "the source system"),
        ):
            properties[name] = {"type": "string", "description": f"routing: {what}"}
    return {"type": "object", "properties": properties}


def _fhir_message(schema_id: str) -> Document:
    version = schema_id.removeprefix("fhir.").removesuffix("+json")
    return {
        "name": message_name(schema_id),
        "title": f"FHIR {version} JSON",
        "summary": f"A FHIR {version} resource or Bundle, as a hospital system sent it or as"
        " reporting wrote it (a collection Bundle: DiagnosticReport, Observations, Device,"
        " Provenance). Contains patient data.",
        "contentType": "application/fhir+json",
        "headers": _headers(schema_id),
        "payload": {"type": "object", "required": ["resourceType"]},
        "externalDocs": {"url": FHIR_SPECIFICATION.get(version, "https://hl7.org/fhir/")},
    }


def _channel(spec: topics.TopicSpec, address: str) -> Document:
    config = spec.config
    topic_configuration: Document = {}
    if "cleanup.policy" in config:
        topic_configuration["cleanup.policy"] = config["cleanup.policy"].split(",")
    if "retention.ms" in config:
        topic_configuration["retention.ms"] = int(config["retention.ms"])
    binding: Document = {
        "partitions": spec.partitions,
        "bindingVersion": KAFKA_BINDING_VERSION,
    }
    if topic_configuration:
        binding["topicConfiguration"] = topic_configuration
    if "{" not in address:
        binding["topic"] = address
    return {
        "address": address,
        "messages": {
            message_name(s): {"$ref": f"#/components/messages/{message_name(s)}"}
            for s in spec.carries
        },
        "bindings": {"kafka": binding},
    }


def asyncapi_document() -> Document:
    """The AsyncAPI 3.0.0 document of every topic, message and payload schema."""
    events = _events()
    channels: Document = {spec.name: _channel(spec, spec.name) for spec in topics.STATIC_TOPICS}
    task = topics.task_topic_spec("model", 1)
    channels["medmesh.model.tasks"] = _channel(task, TASK_CHANNEL) | {
        "parameters": {
            "model": {"description": "the model's name (deploy/models/<model>.yaml)"},
            "version": {"description": "the deployed version number"},
        }
    }
    carried = sorted({s for spec in [*topics.STATIC_TOPICS, task] for s in spec.carries})
    unknown = [s for s in carried if not s.startswith("fhir.") and s not in events]
    if unknown:
        raise ValueError(f"topics carry schema ids no wire model declares: {unknown}")
    _, definitions = models_json_schema(
        [(events[s], "serialization") for s in carried if s in events],
        by_alias=True,
        ref_template="#/components/schemas/{model}",
    )
    messages: Document = {}
    for schema_id in carried:
        if schema_id.startswith("fhir."):
            messages[message_name(schema_id)] = _fhir_message(schema_id)
            continue
        model = events[schema_id]
        messages[message_name(schema_id)] = {
            "name": message_name(schema_id),
            "title": schema_id,
            "summary": (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "),
            "contentType": "application/json",
            "headers": _headers(schema_id),
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "medmesh event contract",
            "version": CONTRACT_VERSION,
            "description": "Every Kafka topic medmesh's services use, what each carries and the"
            " JSON Schema of every medmesh message (generated by medmesh_contracts.asyncapi"
            " from contracts/; do not edit). Keys are patient pseudonyms where a topic is keyed"
            " by patient; values of medmesh messages are JSON with a 'schema' field equal to the"
            " medmesh-schema header.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {
            "messages": messages,
            "schemas": definitions.get("$defs", {}),
        },
    }


def render(document: Document) -> str:
    """The committed text of the document (YAML, keys in the document's order)."""
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def main() -> None:
    """Write the document to the path given as the only argument."""
    Path(sys.argv[1]).write_text(render(asyncapi_document()))


if __name__ == "__main__":
    main()
