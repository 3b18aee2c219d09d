"""The one place a service's faststream KafkaBroker is built: durability, security, tracing.

Producers use acks=all with idempotence, so a publish that returns means the record is on every
in-sync replica, and compress their batches (``MEDMESH_KAFKA_COMPRESSION``, lz4 by default, at
``LZ4_LEVEL``); consumers commit an offset only after their handler returned (NACK_ON_ERROR
rewinds to the failed record instead), which gives at-least-once processing on every hop.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import importlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import codec as aiokafka_codec
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.security import parse_security
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from opentelemetry.sdk.trace import TracerProvider

from medmesh_contracts import headers as h
from medmesh_runtime.metrics import configure_metrics
from medmesh_runtime.settings import ServiceSettings
from medmesh_runtime.transactional import StageClients

# Every consumer in medmesh acknowledges after its handler returns and rewinds on an exception.
CONSUMER_ACK_POLICY = AckPolicy.NACK_ON_ERROR


def kafka_security(settings: ServiceSettings) -> BaseSecurity | None:
    """The faststream security object for the configured protocol (None for PLAINTEXT)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    use_ssl = protocol in ("SSL", "SASL_SSL")
    ssl_context = ssl.create_default_context() if use_ssl else None
    if protocol == "SSL":
        return BaseSecurity(ssl_context=ssl_context, use_ssl=True)
    user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
    if user is None or password is None:
        raise ValueError(f"{protocol} needs MEDMESH_KAFKA_SASL_USERNAME and _PASSWORD")
    mechanism = {
        "SCRAM-SHA-512": SASLScram512,
        "SCRAM-SHA-256": SASLScram256,
        "PLAIN": SASLPlaintext,
    }[settings.kafka_sasl_mechanism]
    return mechanism(user, password, ssl_context=ssl_context, use_ssl=use_ssl)


def _faststream_logger(service: str) -> logging.Logger:
    # faststream would otherwise log through its own coloured handler, not our JSON one; and
    # its per-message "Received"/"Processed" lines cost time on every hop while traces already
    # say the same, so only its warnings and errors are kept.
    logger = logging.getLogger(f"medmesh.{service}.faststream")
    logger.setLevel(logging.WARNING)
    return logger


# --- lz4 at a level medmesh chooses -----------------------------------------------------------
# aiokafka compresses lz4 record batches at LZ4-HC level 9 and has no setting for the level
# (upstream aio-libs/aiokafka#1028, since its move to cramjam in 0.11; fix proposed in #1121):
# a 20 kB ECG task took about 785 us to compress against 30 us at level 1, for batches about 1.3
# times smaller (issue 17; `python -m medmesh_cli.bench.worker` measures both). Levels 0 to 2
# are LZ4's fast (non-HC) compressor, what python-lz4 gave aiokafka before 0.11; the framing
# (independent blocks, no content checksum, KIP-57) and every reader are unchanged.
LZ4_LEVEL = 1
# The record-batch modules that call aiokafka.codec.lz4_encode by a name of their own (the
# Cython builders the producer uses, and the pure-Python ones of AIOKAFKA_NO_EXTENSIONS).
_LZ4_CALLERS = (
    "aiokafka.record._crecords.default_records",
    "aiokafka.record._crecords.legacy_records",
    "aiokafka.record.default_records",
    "aiokafka.record.legacy_records",
)
_AIOKAFKA_LZ4_ENCODE = aiokafka_codec.lz4_encode


def lz4_encoder(level: int) -> Callable[[Any], bytes]:
    """aiokafka's own lz4 frame encoder at ``level`` (what its record batches call)."""

    def lz4_encode(payload: Any) -> bytes:
        return bytes(_AIOKAFKA_LZ4_ENCODE(payload, level=level))

    lz4_encode.level = level  # type: ignore[attr-defined]  # read back by lz4_level
    return lz4_encode


def set_lz4_level(level: int) -> None:
    """Make every aiokafka producer of this process compress lz4 batches at ``level``.

    The one place medmesh replaces part of aiokafka: the lz4 encoder its record-batch builders
    call (they take no level). Producers built through this module get ``LZ4_LEVEL``; the
    benchmark sets 9 to measure aiokafka's own choice beside it.
    """
    encoder = lz4_encoder(level)
    for name in _LZ4_CALLERS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # the Cython builders are optional (no compiler at install)
            continue
        if not hasattr(module, "lz4_encode"):
            raise RuntimeError(f"{name} no longer calls lz4_encode: revisit set_lz4_level")
        setattr(module, "lz4_encode", encoder)  # noqa: B010 -- a module of aiokafka, untyped here


def lz4_level(module_name: str | None = None) -> int:
    """The lz4 level a record-batch module (default: the one of the builder aiokafka's producer
    uses) compresses at now; 9 is aiokafka's own encoder."""
    encoder = importlib.import_module(
        module_name or DefaultRecordBatchBuilder.__module__
    ).lz4_encode
    return int(getattr(encoder, "level", 9))


def compression_type(
    settings: ServiceSettings,
) -> Literal["gzip", "snappy", "lz4", "zstd"] | None:
    """The producers' ``compression_type`` for the configured compression (None: uncompressed).

    lz4 is compressed at ``LZ4_LEVEL``: the encoder is set (``set_lz4_level``) before the
    producer using this answer is built.
    """
    if settings.kafka_compression == "lz4" and lz4_level() != LZ4_LEVEL:
        set_lz4_level(LZ4_LEVEL)
    return None if settings.kafka_compression == "none" else settings.kafka_compression


def aiokafka_security(settings: ServiceSettings) -> dict[str, Any]:
    """The same security as keyword arguments of a plain aiokafka client (consumers and
    producers that services build themselves: batches, transactions, lag sampling)."""
    return dict(parse_security(kafka_security(settings)))


def build_broker(
    settings: ServiceSettings, service: str, tracer_provider: TracerProvider
) -> KafkaBroker:
    """A KafkaBroker with durable publishing, OpenTelemetry context in message headers,
    per-topic message metrics on the process's Prometheus endpoint, and subscribers that
    accept records with null header values."""
    meter_provider = configure_metrics(service, settings.instance_id)
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=f"medmesh-{service}-{settings.instance_id}",
        acks="all",
        enable_idempotence=True,
        compression_type=compression_type(settings),
        security=kafka_security(settings),
        parser=tolerate_null_headers,
        middlewares=(
            KafkaTelemetryMiddleware(
                tracer_provider=tracer_provider, meter_provider=meter_provider
            ),
        ),
        logger=_faststream_logger(service),
    )


def message_headers(correlation_id: str, schema: str) -> dict[str, str]:
    """The medmesh headers of one message (trace context is added by the telemetry middleware)."""
    return {h.CORRELATION_ID: correlation_id, h.SCHEMA: schema}


def encode_raw(value: bytes) -> tuple[str, Literal["utf-8", "base64"]]:
    """A message value as text for a dead-letter event: UTF-8 when it is, otherwise base64."""
    try:
        return value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(value).decode("ascii"), "base64"


def record_headers(record: Any) -> dict[str, str]:
    """A consumed record's headers as text (for trace-context extraction and correlation ids).

    Kafka allows a header without a value (null): it is left out, so every reader sees it as
    the absent header it stands for (a new correlation id, the default FHIR version, a new
    trace) rather than as an empty value no medmesh header ever has.
    """
    return {
        key: bytes(value).decode(errors="replace")
        for key, value in (record.headers or ())
        if value is not None
    }


def _without_null_headers(record: Any) -> Any:
    """The record itself, or a copy of it without its null-valued headers (rare: copied only
    then). A shallow copy keeps what faststream attaches to a record (its consumer)."""
    headers = record.headers or ()
    if all(value is not None for _key, value in headers):
        return record
    cleaned = copy.copy(record)
    cleaned.headers = [(key, value) for key, value in headers if value is not None]
    return cleaned


async def tolerate_null_headers(
    message: Any, original_parser: Callable[[Any], Awaitable[Any]]
) -> Any:
    """faststream's parser (broker-wide) for records that may hold null header values.

    faststream's own Kafka parser decodes every header value and fails on a null one, before
    any handler runs: the record (or the whole poll of a batch subscriber) was rewound and
    redelivered forever. Null-valued headers are dropped first, as ``record_headers`` does.
    """
    if isinstance(message, tuple | list):  # a batch subscriber's poll
        return await original_parser(tuple(_without_null_headers(r) for r in message))
    return await original_parser(_without_null_headers(message))


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of a topic the consumer is not subscribed to (empty: no such topic)."""
    # aiokafka has no public call for them: consumer.topics() fetches metadata but does not keep
    # it, so partitions_for_topic would still say None; read them from the fetched metadata.
    cluster = await consumer._client.fetch_all_metadata()
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]


def group_consumer(
    settings: ServiceSettings,
    client_id: str,
    group_id: str,
    *,
    session_timeout_ms: int = 10_000,
    heartbeat_interval_ms: int = 3_000,
) -> AIOKafkaConsumer:
    """An unstarted consumer-group member for a transactional stage: it commits nothing itself
    (offsets go into transactions), reads only committed records, starts a new group at the
    earliest offset, and subscribes later (with the stage's rebalance listener)."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        **aiokafka_security(settings),
    )


def transactional_producers(
    settings: ServiceSettings, client_id: str, *, transaction_timeout_ms: int = 60_000
) -> Callable[[str], AIOKafkaProducer]:
    """Builds unstarted transactional producers (acks=all, idempotent, compressed) by id.

    An open transaction of a crashed instance that nobody fences is aborted by the broker after
    ``transaction_timeout_ms``; one that is fenced (the partition's next owner started its
    producer) is aborted at once.
    """

    def make(transactional_id: str) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id=client_id,
            transactional_id=transactional_id,
            transaction_timeout_ms=transaction_timeout_ms,
            enable_idempotence=True,
            acks="all",
            compression_type=compression_type(settings),
            **aiokafka_security(settings),
        )

    return make


def stage_clients(
    settings: ServiceSettings,
    client_id: str,
    group_id: str,
    *,
    session_timeout_ms: int = 10_000,
    heartbeat_interval_ms: int = 3_000,
    transaction_timeout_ms: int = 60_000,
) -> StageClients:
    """The real Kafka clients of one transactional stage (``medmesh_runtime.transactional``)."""
    return StageClients(
        consumer=lambda: group_consumer(
            settings,
            client_id,
            group_id,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
        ),
        producer=transactional_producers(
            settings, client_id, transaction_timeout_ms=transaction_timeout_ms
        ),
    )


async def read_to_end(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    apply: Callable[[Any], bool | None],
    *,
    since_ms: int | None = None,
    starts: Mapping[TopicPartition, int | None] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Hand every record of ``partitions`` to ``apply``, in order per partition, from their
    beginning (or from the first record at or after ``since_ms``, or from the offset ``starts``
    gives a partition) up to their end at the time of the call; ``apply`` returning True stops
    the read there. The (started, unsubscribed) consumer is left assigned, so it can go on
    following. A read_committed consumer's end is the last stable offset: records of a
    transaction still open are not waited for.

    TimeoutError after ``timeout_s`` (None: no limit).
    """
    # The offsets are looked up before the partitions are assigned: an await between assign()
    # and the seek lets the fetcher reset the positions (to the end, or the committed offset)
    # before the seek, and the read then starts in the wrong place.
    end = await consumer.end_offsets(list(partitions))
    found: dict[TopicPartition, Any] = {}
    if since_ms is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
    consumer.assign(list(partitions))
    from_beginning = []
    for partition in partitions:
        given = None if starts is None else starts.get(partition)
        if given is not None:
            consumer.seek(partition, given)
        elif since_ms is not None:
            at = found.get(partition)
            consumer.seek(partition, end[partition] if at is None else at.offset)
        else:
            from_beginning.append(partition)
    if from_beginning:
        await consumer.seek_to_beginning(*from_beginning)
    async with asyncio.timeout(timeout_s):
        while any([await consumer.position(p) < end[p] for p in partitions]):
            batches = await consumer.getmany(*partitions, timeout_ms=500)
            for partition, records in batches.items():
                for record in records:
                    if record.offset < end[partition] and apply(record):
                        return
