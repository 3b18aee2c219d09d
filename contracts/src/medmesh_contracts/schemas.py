"""JSON Schema of every wire event (and of the model spec), as committed under contracts/schemas/ for non-Python peers.

``python -m medmesh_contracts.schemas DIR`` writes them; a unit test fails when the committed
files and the models disagree, so the published contract never drifts from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from medmesh_contracts.events import ALL_EVENTS, schema_of
from medmesh_contracts.lifecycle import LIFECYCLE_EVENTS
from medmesh_contracts.modelspec import SPEC_SCHEMA, ModelSpec


def file_name(schema_id: str) -> str:
    """``medmesh.RunInference/1`` -> ``medmesh.RunInference.v1.schema.json``."""
    name, version = schema_id.split("/")
    return f"{name}.v{version}.schema.json"


def event_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema (wire field names) for every event."""
    schemas: dict[str, dict[str, Any]] = {}
    for event in (*ALL_EVENTS, *LIFECYCLE_EVENTS):
        schema_id = schema_of(event)
        schema = event.model_json_schema(by_alias=True, mode="serialization")
        schema["$id"] = f"https://medmesh.dev/schemas/{file_name(schema_id)}"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schemas[file_name(schema_id)] = schema
    # The model spec is a document model owners write (YAML), not an event: its schema is the
    # validation form, for editors (yaml-language-server) and other tools.
    spec_schema = ModelSpec.model_json_schema(by_alias=True, mode="validation")
    spec_schema["$id"] = f"https://medmesh.dev/schemas/{file_name(SPEC_SCHEMA)}"
    spec_schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schemas[file_name(SPEC_SCHEMA)] = spec_schema
    return schemas


def render(schema: dict[str, Any]) -> str:
    """The committed text of a schema file."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write every schema into the directory given as the only argument."""
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    for name, schema in event_schemas().items():
        (target / name).write_text(render(schema))


if __name__ == "__main__":
    main()
