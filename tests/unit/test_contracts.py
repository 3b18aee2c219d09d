"""The wire contract: schema ids, round trips, topic names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from medmesh_contracts.events import (
    ALL_EVENTS,
    InferenceCompleted,
    RequestInference,
    schema_of,
    to_wire,
)
from medmesh_contracts.schemas import event_schemas, render
from medmesh_contracts.topics import STATIC_TOPICS, model_task_topic
from tests.factories import make_completed, make_request


def test_every_event_declares_a_versioned_schema_id() -> None:
    """Each wire model has a schema id of the form medmesh.<Name>/<version>."""
    for event in ALL_EVENTS:
        name, _, version = schema_of(event).partition("/")
        assert name == f"medmesh.{event.__name__}"
        assert version.isdigit()


def test_events_round_trip_through_json_with_the_schema_field() -> None:
    """to_wire writes 'schema' and the same model parses back equal."""
    completed = make_completed()
    wire = to_wire(completed)
    assert json.loads(wire)["schema"] == "medmesh.InferenceCompleted/1"
    assert InferenceCompleted.model_validate_json(wire) == completed


def test_consumers_ignore_fields_added_later() -> None:
    """An unknown field from a newer producer is ignored, not an error."""
    data = json.loads(to_wire(make_request()))
    data["added_in_a_later_minor_version"] = 1
    assert RequestInference.model_validate(data).model == "deterioration"


def test_wrong_schema_id_is_rejected() -> None:
    """A message with another schema id does not parse as this event."""
    data = json.loads(to_wire(make_request()))
    data["schema"] = "medmesh.RequestInference/2"
    with pytest.raises(ValidationError):
        RequestInference.model_validate(data)


def test_events_are_immutable() -> None:
    """Wire models are frozen."""
    request = make_request()
    with pytest.raises(ValidationError):
        request.model = "other"  # type: ignore[misc]  # assigning is the point of the test


def test_task_topic_names() -> None:
    """Task topics are named per model version and validated."""
    assert model_task_topic("deterioration", 2) == "medmesh.model.deterioration.v2.tasks"
    with pytest.raises(ValueError, match="model name"):
        model_task_topic("Bad Name", 1)
    with pytest.raises(ValueError, match="version"):
        model_task_topic("deterioration", 0)


def test_static_topics_are_unique_and_namespaced() -> None:
    """Every static topic starts with medmesh. and none is declared twice."""
    names = [t.name for t in STATIC_TOPICS]
    assert len(names) == len(set(names))
    assert all(n.startswith("medmesh.") for n in names)


def test_committed_json_schemas_match_the_models() -> None:
    """contracts/schemas holds exactly the JSON Schema the models generate (no drift)."""
    directory = Path(__file__).resolve().parents[2] / "contracts" / "schemas"
    expected = {name: render(schema) for name, schema in event_schemas().items()}
    committed = {p.name: p.read_text() for p in directory.glob("*.schema.json")}
    assert committed == expected, "run: python -m medmesh_contracts.schemas contracts/schemas"
