"""structlog JSON logging with trace and correlation ids, and redaction of patient data.

Every line a service writes (its own, faststream's, aiokafka's, uvicorn's) goes through one
stdlib handler rendered by structlog as JSON, so the processors below apply to all of them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from pydantic import ValidationError

REDACTED = "[redacted]"

# FHIR element names (and common variants) that carry patient data. Values under these keys are
# dropped wherever they appear in a log event, however deeply nested.
PATIENT_DATA_KEYS = frozenset(
    {
        "name",
        "given",
        "family",
        "identifier",
        "birthdate",
        "birth_date",
        "address",
        "telecom",
        "phone",
        "email",
        "subject",
        "subject_reference",
        "patient",
        "patient_reference",
        "contact",
    }
)

# Free-text shapes that are patient data whatever key they are logged under.
_PATTERNS = (
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),  # dates (birth dates)
    re.compile(r"\+?\d(?:[\s()-]?\d){8,}"),  # phone numbers (9+ digits, no dots: not IPs)
    re.compile(r"\b[A-Za-z-]*\d{6,}\w*"),  # identifiers: tokens with 6+ digits in a row (MRNs)
    re.compile(r"\bPatient/[A-Za-z0-9\-.]{1,64}"),  # raw patient references
    re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+"),  # e-mail addresses
)

# Keys whose values are medmesh's own ids and timestamps: never patient data.
_SAFE_KEYS = frozenset(
    {
        "timestamp",
        "trace_id",
        "span_id",
        "correlation_id",
        "event_id",
        "level",
        "logger",
        "patient_pseudonym",
    }
)


def is_patient_data_key(key: str) -> bool:
    """Whether values under this key are patient data (dropped whatever they hold).

    The rule logs and spans share (medmesh_runtime.telemetry drops span attributes by it).
    """
    return key.lower() in PATIENT_DATA_KEYS


def redact_text(text: str) -> str:
    """Free text with every patient-data shape replaced by ``[redacted]``; a serialized JSON
    value is redacted by key instead, like a structured one.

    The rule logs and spans share (medmesh_runtime.telemetry scrubs exception events by it).
    """
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        # A serialized resource logged as text: redact it by key like any structured value.
        try:
            return json.dumps(_scrub(json.loads(text)))
        except ValueError:
            pass  # not JSON after all: fall through to the text patterns
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def error_reason(exc: BaseException) -> str:
    """An error as a log field or a dead letter's reason, without patient data: a pydantic
    ValidationError by the paths and kinds of its errors (its own message quotes the input),
    any other error by its kind and its text with patient-data shapes redacted."""
    if isinstance(exc, ValidationError):
        where = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['type']}" for e in exc.errors()
        )
        return f"ValidationError: {exc.error_count()} errors at {where}"[:2000]
    return redact_text(f"{type(exc).__name__}: {exc}")[:2000]


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if is_patient_data_key(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    return value


def redact_patient_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop patient-data keys and scrub patient-data shapes from every value of a log event."""
    for key in list(event_dict):
        if key in _SAFE_KEYS:
            continue
        if is_patient_data_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def add_trace_ids(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add the current OpenTelemetry trace id and span id (W3C hex form) when a span is active."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def _shared_processors(service: str) -> list[structlog.typing.Processor]:
    def add_service(
        _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
        add_trace_ids,
        structlog.processors.format_exc_info,
        redact_patient_data,
    ]


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route structlog and stdlib logging through one JSON renderer on stderr."""
    shared = _shared_processors(service)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every transient coordinator hiccup at WARNING/ERROR; keep those, drop DEBUG.
    logging.getLogger("aiokafka").setLevel(max(logging.INFO, root.level))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger; its lines go through the processors configured above."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


# A dead letter's reason quotes an exception, which can quote a large input: its log line keeps
# only the start (the dead letter itself keeps more, medmesh_runtime.deadletter.REASON_MAX_CHARS).
DEAD_LETTER_LOG_REASON_CHARS = 500


def log_dead_letter(
    logger: structlog.stdlib.BoundLogger, what: str, record: Any, reason: str, **fields: Any
) -> None:
    """Warn that one consumed record (``what``: "record", "request", "task", ...) was
    dead-lettered: where it was (topic, partition, offset), the start of the reason and any
    ``fields``. Every stage logs its dead letters through here, so they read and search alike.
    """
    logger.warning(
        f"{what} dead-lettered",
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=reason[:DEAD_LETTER_LOG_REASON_CHARS],
        **fields,
    )
