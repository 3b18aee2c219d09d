"""The router's followers: the registry and worker heartbeats it owns the meaning of, and the
results and failures it only observes as the rollout controller's evidence.

Each follower skips what the start-up read already (``startup.Loaded.offsets``). A registry
record or heartbeat that does not parse is dead-lettered; an outcome that does not parse is
reporting's dead letter, so here it is logged and counted (``GET /models``:
``unreadable_outcomes``) without a second dead letter.

Every follower receives the consumed record itself (``record_of``, the subscribers' decoder),
never faststream's ``KafkaMessage``: a handler parameter resolved from faststream's context costs
one thread-pool round trip per message (fast-depends resolves it with a synchronous ``use()``
through ``anyio.to_thread``), paid here once per result, shadow result and failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker
from faststream.message import StreamMessage
from pydantic import ValidationError

from medmesh_contracts import topics
from medmesh_contracts.events import InferenceCompleted, InferenceFailed, WorkerHeartbeat, utc_now
from medmesh_contracts.lifecycle import ModelDeployment
from medmesh_router.analysis import Analysis
from medmesh_router.rollout import Rollout
from medmesh_router.state import RouterState
from medmesh_runtime.deadletter import DeadLetters
from medmesh_runtime.logging import get_logger

Outcome = TypeVar("Outcome", InferenceCompleted, InferenceFailed)
log = get_logger("medmesh.router")
Record: TypeAlias = ConsumerRecord[bytes, bytes]


async def record_of(message: StreamMessage[Any]) -> Any:
    """The subscribers' decoder: the consumed record as aiokafka gave it (topic, partition,
    offset, value), so that a handler takes it as its body, with no context to resolve."""
    return message.raw_message


class Followers:
    """Applies followed records to the state, readiness and the rollout's figures."""

    def __init__(
        self,
        state: RouterState,
        analysis: Analysis,
        rollout: Rollout,
        dead_letters: DeadLetters,
        learn: Callable[[ModelDeployment], None],
    ) -> None:
        self.state = state
        self.analysis = analysis
        self.rollout = rollout
        self.dead_letters = dead_letters
        self.learn = learn
        # Last offset read at start, per (topic, partition): skipped when followed.
        self.loaded: dict[tuple[str, int], int] = {}
        self.unreadable_outcomes = 0

    def subscribe(self, broker: KafkaBroker) -> None:
        """Register the followers on ``broker``."""
        broker.subscriber(
            topics.MODELS_REGISTRY,
            auto_offset_reset="earliest",
            title="model registry (follow)",
            decoder=record_of,
        )(self.on_registry)
        broker.subscriber(
            topics.MODELS_STATUS,
            auto_offset_reset="earliest",
            title="worker heartbeats",
            decoder=record_of,
        )(self.on_heartbeat)
        # read_committed: outcomes are produced in transactions; an aborted one is not evidence.
        observed = (
            (topics.INFERENCE_RESULTS, "results (observed)", self.on_result),
            (topics.INFERENCE_SHADOW_RESULTS, "shadow results (observed)", self.on_result),
            (topics.INFERENCE_FAILED, "failures (observed)", self.on_failed),
        )
        for topic, title, handler in observed:
            broker.subscriber(
                topic, isolation_level="read_committed", title=title, decoder=record_of
            )(handler)

    async def on_registry(self, record: Record) -> None:
        """A registry record written after the start: applied when newer than the held one."""
        if self._seen_at_start(record) or not record.value:
            return  # read at start already (or a tombstone)
        try:
            deployment = ModelDeployment.model_validate_json(record.value)
        except ValidationError as exc:
            await self.dead_letters.send(record, f"{type(exc).__name__}: {exc}")
            return
        self.learn(deployment)
        if self.state.apply(deployment, utc_now()):
            log.info(
                "registry changed",
                model=deployment.model,
                revision=deployment.revision,
                weights=deployment.weights,
                by=deployment.changed_by,
            )

    async def on_heartbeat(self, record: Record) -> None:
        """A worker heartbeat: readiness, audited at once when the beat is fresh."""
        if self._seen_at_start(record) or not record.value:
            return
        try:
            beat = WorkerHeartbeat.model_validate_json(record.value)
        except ValidationError as exc:
            await self.dead_letters.send(record, f"{type(exc).__name__}: {exc}")
            return
        self.state.readiness.observe(beat)
        now = utc_now()
        if (now - beat.sent_at).total_seconds() <= beat.interval_s:
            # A fresh beat takes effect now; old ones replayed at start wait for the tick,
            # so the replay does not audit every intermediate state.
            await self.rollout.audit_readiness(now)

    async def on_result(self, record: Record) -> None:
        """A result (or shadow result) counted in its version's figures."""
        self._observe(record, InferenceCompleted, self.analysis.completed)

    async def on_failed(self, record: Record) -> None:
        """A failure counted in its version's figures."""
        self._observe(record, InferenceFailed, self.analysis.failed)

    def _observe(
        self, record: Record, model: type[Outcome], apply: Callable[[Outcome], None]
    ) -> None:
        try:
            event = model.model_validate_json(record.value or b"")
        except ValidationError as exc:
            self.unreadable_outcomes += 1
            log.warning(
                "an outcome the rollout controller cannot read was skipped",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                errors=exc.error_count(),
            )
            return
        apply(event)

    def _seen_at_start(self, record: Record) -> bool:
        loaded = self.loaded.get((record.topic, record.partition), -1)
        return bool(record.offset <= loaded)
