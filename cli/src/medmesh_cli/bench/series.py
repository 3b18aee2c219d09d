"""Which benchmark series `medmesh bench` runs (pure)."""

from __future__ import annotations

ALL_SERIES = (
    "worker",
    "hop",
    "pipeline",
    "batching",
    "imaging",
    "router",
    "ingest",
    "topology",
    "tracing",
    # Last: it leaves the other services working through the backlogs it left (see scaling.py).
    "scaling",
)
# Series measured in process, without the bench stack (run first, before it starts).
STACKLESS = frozenset({"worker"})


def parse_series(text: str) -> list[str]:
    """The series named in a comma-separated list, in run order; raises ValueError on unknown."""
    names = {n.strip().lower() for n in text.split(",") if n.strip()}
    if not names or "all" in names:
        return list(ALL_SERIES)
    unknown = names - set(ALL_SERIES)
    if unknown:
        raise ValueError(f"unknown series {sorted(unknown)}; choose from {', '.join(ALL_SERIES)}")
    return [s for s in ALL_SERIES if s in names]
