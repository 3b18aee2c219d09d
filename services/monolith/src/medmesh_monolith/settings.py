"""Configuration of the monolith topology: the four services' settings in one class.

Every setting keeps its name and meaning from the service that owns it (MEDMESH_ prefix, listed
in .env.example), so one environment configures either topology. Only the inbound consumer
group's default differs: the monolith is a separate consumer of medmesh.fhir.inbound, and must
not take partitions away from a services topology's ingest on the same broker.
"""

from __future__ import annotations

from medmesh_inference.settings import WorkerSettings
from medmesh_ingest.settings import IngestSettings
from medmesh_reporting.settings import ReportingSettings
from medmesh_router.settings import RouterSettings

SERVICE = "monolith"  # the producer and changed_by name of what the monolith writes
MONOLITH_GROUP_ID = "medmesh-monolith"


class MonolithSettings(IngestSettings, RouterSettings, WorkerSettings, ReportingSettings):
    """Ingest's HTTP port and limits, the router's registry timeout, the workers' Triton address,
    batching and retries, and reporting's performer, for one process running all four stages."""

    ingest_group_id: str = MONOLITH_GROUP_ID
