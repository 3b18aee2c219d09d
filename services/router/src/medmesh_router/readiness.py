"""Which model versions can serve: worker heartbeats from medmesh.models.status.

A version is *live* when at least one of its workers said, less than ``3 * interval_s`` ago, that
it is ready (Triton ready, circuit not open). Gating is per version and starts with the first
heartbeat ever seen for it: until then the registry's weights are authoritative (workers that do
not publish heartbeats yet still get their traffic). With ``require_heartbeats`` on, a version
must have been seen live to get traffic.
"""

from __future__ import annotations

from datetime import datetime

from medmesh_contracts.events import WorkerHeartbeat

MISSED_BEATS = 3


class Readiness:
    """The latest heartbeat of every worker instance, and what follows from them."""

    def __init__(self, *, require_heartbeats: bool = False) -> None:
        self._latest: dict[str, WorkerHeartbeat] = {}
        self._require = require_heartbeats

    def observe(self, beat: WorkerHeartbeat) -> None:
        """Keep a worker's heartbeat unless a newer one from the same instance is known."""
        known = self._latest.get(beat.instance)
        if known is None or known.sent_at <= beat.sent_at:
            self._latest[beat.instance] = beat

    def seen(self, model: str, version: int) -> bool:
        """True once any worker of this version has sent a heartbeat."""
        return any(b.model == model and b.model_version == version for b in self._latest.values())

    def live_workers(self, model: str, version: int, now: datetime) -> int:
        """How many workers of this version are ready and beat recently enough."""
        return sum(
            1
            for b in self._latest.values()
            if b.model == model
            and b.model_version == version
            and b.state == "ready"
            and b.triton_ready
            and b.circuit != "open"
            and (now - b.sent_at).total_seconds() <= MISSED_BEATS * b.interval_s
        )

    def servable(self, model: str, version: int, now: datetime) -> bool:
        """May this version get traffic now? (see the module docstring for unseen versions)."""
        if self.live_workers(model, version, now) > 0:
            return True
        return not self._require and not self.seen(model, version)
