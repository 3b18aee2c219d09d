"""docs/asyncapi.yaml: the AsyncAPI document of the event contract, generated, valid and whole."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medmesh_contracts import topics
from medmesh_contracts.asyncapi import asyncapi_document, message_name, render
from medmesh_contracts.events import ALL_EVENTS, schema_of
from medmesh_contracts.lifecycle import LIFECYCLE_EVENTS

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"
SCHEMA = json.loads((ROOT / "deploy" / "schemas" / "asyncapi-3.0.0.json").read_text())


def _errors(document: dict[str, Any]) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(document)]


def test_the_committed_document_is_the_contracts() -> None:
    """docs/asyncapi.yaml equals what the contract generates (regenerate: python -m
    medmesh_contracts.asyncapi docs/asyncapi.yaml)."""
    assert COMMITTED.read_text() == render(asyncapi_document())


def test_the_document_is_valid_asyncapi_3() -> None:
    """The document validates against the AsyncAPI 3.0.0 JSON Schema; a misspelt key does not."""
    document = yaml.safe_load(COMMITTED.read_text())
    assert _errors(document) == []
    broken = copy.deepcopy(document)
    broken["chanels"] = broken.pop("channels")
    assert _errors(broken) != []


def test_every_topic_and_every_event_is_in_the_document() -> None:
    """Each topic is a channel (task topics as one parameterised channel) carrying at least one
    message, and every wire event rides some channel."""
    document = asyncapi_document()
    addresses = {c["address"] for c in document["channels"].values()}
    assert {t.name for t in topics.STATIC_TOPICS} | {"medmesh.model.{model}.v{version}.tasks"} == (
        addresses
    )
    assert all(c["messages"] for c in document["channels"].values())
    carried = {n for c in document["channels"].values() for n in c["messages"]}
    events = {message_name(schema_of(e)) for e in (*ALL_EVENTS, *LIFECYCLE_EVENTS)}
    assert events <= carried


def test_every_reference_resolves() -> None:
    """Every $ref in the document names a message or schema of its components."""
    text = COMMITTED.read_text()
    components = yaml.safe_load(text)["components"]
    references = re.findall(r"\$ref: '#/components/(\w+)/([^']+)'", text)
    assert references
    assert [r for r in references if r[1] not in components[r[0]]] == []
