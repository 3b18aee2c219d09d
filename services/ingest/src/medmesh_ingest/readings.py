"""One reading at a time: each patient's latest readings per model, and when to ask for a score.

Bedside monitors send one Observation per call. Ingest keeps, per patient and model, the latest
reading of every input (``PatientReadingsUpdated``, the state kept in the compacted topic
medmesh.ingest.readings) and asks for a score when the set is complete and differs from the set
last sent. ``merge`` is the whole decision, a plain function; ``ReadingsStore`` only holds the
latest state per key in memory (rebuilt from the topic on start).

Rules:
- a reading replaces the stored one of its input when it is at least as recent, or when it is a
  new version of the same resource (a correction); the same resource and ``meta.versionId`` again
  changes nothing;
- readings older than the lookback window, counted back from the patient's newest reading, expire;
- a complete set whose fingerprint equals the last request's is not sent again (duplicates,
  re-sent Bundles); an order (ServiceRequest) is answered once per id and version;
- a stored state is combined with each newer one (``combine``), so two instances that merged
  readings of one patient at the same moment lose neither's readings;
- an image input (an ImagingStudy) is sent only with its claim check (``ModelInput.image``):
  that of the study in the payload (an order's ``pinned`` study first), else the one the
  state kept (``IngestedReading.image``, added within version 1), so an order arriving without
  its study scores the study announced before.

Memory is bounded twice: states not updated within the retention are forgotten
(``forget_older_than``), and the store holds at most ``max_bytes`` of states (an estimate,
``state_bytes``), evicting the least recently updated first (see ``ReadingsStore``).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from opentelemetry.metrics import Counter

from medmesh_contracts.events import (
    ImageReference,
    IngestedReading,
    ModelInput,
    PatientReadingsUpdated,
    Producer,
    new_id,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_ingest.extraction import Order, PatientReadings, Reading, model_input
from medmesh_runtime.logging import get_logger
from medmesh_runtime.metrics import meter

log = get_logger("medmesh.ingest.readings")

# How many answered orders a patient's state remembers (older ones could be answered again).
_REMEMBERED_ORDERS = 32

# What one stored state costs in memory, by part, as measured with tracemalloc on CPython 3.11
# and pydantic 2 (python -m medmesh_cli.bench.state_memory, docs/deployment.md "State memory"),
# rounded up: a state read back from the topic (the larger form) with its store entries, a
# reading without its strings and samples, one sample (a tuple slot and a float object), one
# remembered order without its text, and a string's object header.
_STATE_BYTES = 3_000
_READING_BYTES = 1_200
_SAMPLE_BYTES = 32
_ORDER_BYTES = 64
_STR_BYTES = 49
# The longest a log of evictions is held back, so that steady pressure logs once a minute.
_EVICTION_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Merged:
    """The result of merging a payload's readings (and order) into a patient's state."""

    state: PatientReadingsUpdated
    # The new state must be stored (readings or answered orders changed).
    changed: bool
    # Inputs to send for scoring now, in spec order; None when nothing is to be sent.
    inputs: tuple[ModelInput, ...] | None
    effective_at: datetime | None
    based_on_reference: str | None
    # Required inputs the patient has no reading of (within the window).
    missing: tuple[str, ...]
    # The complete set was already sent (or the order already answered): nothing new to score.
    duplicate: bool


def state_key(pseudonym: str, model: str) -> str:
    """The Kafka key (and store key) of one patient's state for one model."""
    return f"{pseudonym}|{model}"


def merge(
    previous: PatientReadingsUpdated | None,
    *,
    spec: ModelSpec,
    pseudonym: str,
    found: PatientReadings | None,
    order: Order | None,
    received_at: datetime,
    lookback: timedelta,
    producer: Producer,
) -> Merged:
    """Merge new readings (and an order) into the state; decide whether to ask for a score."""
    subject, encounter = _subject_and_encounter(previous, found, order)
    stored = {r.name: r for r in previous.readings} if previous is not None else {}
    readings = dict(stored)
    images = {name: image for name, r in stored.items() if (image := _image_of(r)) is not None}
    for name, reading in (found.readings if found is not None else {}).items():
        held = readings.get(name)
        kept = _newer(held, reading, received_at)
        readings[name] = kept
        image = reading.input.image
        if image is not None and (kept is not held or _same_resource(kept, reading)):
            images[name] = image
    readings = _unexpired(readings, lookback)
    # What an order names (its supportingInfo's study) is scored, whatever the state holds.
    pinned = {r.input.name: r for r in order.pinned} if order is not None else {}
    scored = {**readings, **{n: _newer(None, r, received_at) for n, r in pinned.items()}}
    images.update({n: r.input.image for n, r in pinned.items() if r.input.image is not None})
    missing = tuple(
        i.name
        for i in spec.inputs
        if i.required and (i.name not in scored or (i.image is not None and i.name not in images))
    )
    fulfilled = previous.fulfilled_orders if previous is not None else ()
    last_fingerprint = previous.last_request_fingerprint if previous is not None else None
    inputs: tuple[ModelInput, ...] | None = None
    based_on: str | None = None
    duplicate = False
    if not missing:
        candidate = _inputs(spec, scored, images)
        based_on = order.based_on_reference if order is not None else None
        fingerprint = _fingerprint(candidate, based_on)
        if (order is not None and order.key in fulfilled) or (
            order is None and fingerprint == last_fingerprint
        ):
            duplicate = True
        else:
            inputs = candidate
            last_fingerprint = fingerprint
            if order is not None:
                fulfilled = (*fulfilled, order.key)[-_REMEMBERED_ORDERS:]
    ordered = sorted(readings.values(), key=lambda r: r.name)
    changed = previous is None or (
        tuple(ordered) != tuple(sorted(previous.readings, key=lambda r: r.name))
        or inputs is not None
        or encounter != previous.encounter_reference
    )
    state = PatientReadingsUpdated(
        correlation_id=previous.correlation_id if previous is not None else new_id(),
        producer=producer,
        model=spec.name,
        patient_pseudonym=pseudonym,
        subject_reference=subject,
        encounter_reference=encounter,
        readings=tuple(ordered),
        last_request_fingerprint=last_fingerprint,
        fulfilled_orders=fulfilled,
        # Never earlier than the state it was merged on: a payload received earlier but
        # applied later (a poll prepared before an HTTP payload of the same patient, or another
        # instance's clock) must not make its successor look older to ``combine``.
        updated_at=max(received_at, previous.updated_at) if previous is not None else received_at,
    )
    effective_at = max((r.observed_at for r in scored.values()), default=None)
    return Merged(
        state=state if changed or previous is None else previous,
        changed=changed,
        inputs=inputs,
        effective_at=effective_at,
        based_on_reference=based_on if inputs is not None else None,
        missing=missing,
        duplicate=duplicate,
    )


def _subject_and_encounter(
    previous: PatientReadingsUpdated | None,
    found: PatientReadings | None,
    order: Order | None,
) -> tuple[str, str | None]:
    if found is not None:
        subject, encounter = found.subject_reference, found.encounter_reference
    elif order is not None:
        subject, encounter = order.subject_reference, order.encounter_reference
    elif previous is not None:
        subject, encounter = previous.subject_reference, previous.encounter_reference
    else:
        raise ValueError("merge needs readings, an order or a previous state")
    if encounter is None and previous is not None:
        encounter = previous.encounter_reference
    return subject, encounter


def _newer(
    stored: IngestedReading | None, reading: Reading, received_at: datetime
) -> IngestedReading:
    """The reading to keep for an input: the stored one, or the new one."""
    new = IngestedReading(
        image=reading.input.image,
        name=reading.input.name,
        value=reading.input.value,
        unit=reading.input.unit,
        # An untimed reading counts as taken when it arrived.
        observed_at=reading.input.observed_at or received_at,
        source_reference=reading.input.source_reference,
        source_version=reading.source_version,
        samples=reading.input.samples,
        period_ms=reading.input.period_ms,
        duration_s=reading.input.duration_s,
    )
    if stored is None:
        return new
    if _same_resource(stored, reading):
        if stored.source_version is not None and stored.source_version == new.source_version:
            return stored  # the same version again: a duplicate
        return new  # another version of the same resource: a correction
    return new if new.observed_at >= stored.observed_at else stored


def _same_resource(stored: IngestedReading, reading: Reading) -> bool:
    """Whether a stored reading came from the resource a new reading comes from."""
    return (
        stored.source_reference is not None
        and stored.source_reference == reading.input.source_reference
    )


def _image_of(reading: IngestedReading) -> ImageReference | None:
    """The stored reading's claim check (None: not an image reading)."""
    return reading.image


def _unexpired(
    readings: Mapping[str, IngestedReading], lookback: timedelta
) -> dict[str, IngestedReading]:
    """The readings within ``lookback`` of the newest one."""
    if not readings:
        return {}
    newest = max(r.observed_at for r in readings.values())
    return {name: r for name, r in readings.items() if r.observed_at >= newest - lookback}


def _inputs(
    spec: ModelSpec,
    readings: Mapping[str, IngestedReading],
    images: Mapping[str, ImageReference],
) -> tuple[ModelInput, ...]:
    inputs: list[ModelInput] = []
    for input_spec in spec.inputs:
        reading = readings.get(input_spec.name)
        if reading is None:
            default = input_spec.default if input_spec.default is not None else 0.0
            inputs.append(ModelInput(name=input_spec.name, value=default, unit=input_spec.unit))
        else:
            inputs.append(
                model_input(reading.name, reading.unit, reading, images.get(reading.name))
            )
    return tuple(inputs)


def _fingerprint(inputs: Sequence[ModelInput], based_on: str | None) -> str:
    """A digest of what a request would carry: the same digest means the same request."""
    material = [
        [i.name, i.value, i.unit, i.observed_at.isoformat() if i.observed_at else None]
        # A waveform counts by a digest of its samples, and by its duration.
        + (
            [hashlib.sha256(json.dumps(i.samples).encode()).hexdigest(), i.duration_s]
            if i.samples
            else []
        )
        # An image counts by the instance it names (two studies may share a start time).
        + ([i.image.model_dump(mode="json")] if i.image is not None else [])
        for i in inputs
    ]
    digest = hashlib.sha256(json.dumps([material, based_on]).encode())
    return digest.hexdigest()[:32]


def combine(
    held: PatientReadingsUpdated | None, incoming: PatientReadingsUpdated
) -> PatientReadingsUpdated:
    """The state that keeps what both states know: per input the later reading, the answered
    orders of both, and the rest from the more recently updated state.

    Two ingest instances that merge readings of one patient at the same moment each write a
    state without the other's readings; keeping only the newer state lost the other's readings
    for good (the set then never completed). Combining is the same from either side
    (``combine(a, b)`` and ``combine(b, a)`` hold the same readings), so every instance that
    follows the topic converges. Without such a race, ``incoming`` was merged on top of
    ``held`` and combining gives ``incoming``'s readings (plus any it let expire, which the
    next merge expires again).
    """
    if held is None:
        return incoming
    newer, older = (incoming, held) if _later_state(incoming, held) else (held, incoming)
    readings = {r.name: (r, older.updated_at) for r in older.readings}
    for reading in newer.readings:
        kept = readings.get(reading.name)
        if kept is None or _prefer((reading, newer.updated_at), kept):
            readings[reading.name] = (reading, newer.updated_at)
    combined = tuple(r for r, _ in sorted(readings.values(), key=lambda item: item[0].name))
    orders = tuple(dict.fromkeys((*older.fulfilled_orders, *newer.fulfilled_orders)))
    if combined == newer.readings and orders == newer.fulfilled_orders:
        return newer
    return newer.model_copy(
        update={"readings": combined, "fulfilled_orders": orders[-_REMEMBERED_ORDERS:]}
    )


def _later_state(a: PatientReadingsUpdated, b: PatientReadingsUpdated) -> bool:
    """Whether ``a`` is the later state; ties are broken by the writer, then by content, so
    that both sides agree on which one is later."""
    if (a.updated_at, a.producer.instance) != (b.updated_at, b.producer.instance):
        return (a.updated_at, a.producer.instance) > (b.updated_at, b.producer.instance)
    return a.model_dump_json() >= b.model_dump_json()


def _prefer(
    candidate: tuple[IngestedReading, datetime], kept: tuple[IngestedReading, datetime]
) -> bool:
    """Whether to keep ``candidate`` over ``kept`` (each a reading and its state's update time):
    another version of the same resource from the later state (a correction, whatever its
    time); otherwise the later observation. Ties are broken by content, the same from either
    side."""
    (new, new_at), (old, old_at) = candidate, kept
    if new == old:
        return False
    same_resource = (
        new.source_reference is not None and new.source_reference == old.source_reference
    )
    first = (new_at, new.observed_at) if same_resource else (new.observed_at, new_at)
    second = (old_at, old.observed_at) if same_resource else (old.observed_at, old_at)
    if first != second:
        return first > second
    return new.model_dump_json() > old.model_dump_json()


def _text_bytes(text: str | None) -> int:
    """What a string costs: its header and one byte per character (up to four when not ASCII)."""
    if text is None:
        return 0
    return _STR_BYTES + (len(text) if text.isascii() else 4 * len(text))


def state_bytes(state: PatientReadingsUpdated) -> int:
    """An estimate of the memory one stored state takes, from its sizes alone (no traversal of
    objects): at or above what tracemalloc measures for the vitals and ECG models' states."""
    size = (
        _STATE_BYTES
        # The pseudonym is held twice, in the state and in the store's key.
        + 2 * _text_bytes(state.patient_pseudonym)
        + _text_bytes(state.subject_reference)
        + _text_bytes(state.encounter_reference)
    )
    for reading in state.readings:
        size += (
            _READING_BYTES
            + _text_bytes(reading.source_reference)
            + _text_bytes(reading.source_version)
            + _SAMPLE_BYTES * len(reading.samples or ())
        )
    for order in state.fulfilled_orders:
        size += _ORDER_BYTES + _text_bytes(order)
    return size


@functools.cache
def _evictions() -> Counter:
    # Built once: OpenTelemetry's proxy meter binds it to the provider once metrics are set up.
    return meter("medmesh.ingest").create_counter(
        "medmesh.ingest.readings_evicted",
        unit="{state}",
        description="Patients' readings states evicted from memory to keep under "
        "MEDMESH_READINGS_MAX_BYTES",
    )


class ReadingsStore:
    """The latest state per (patient pseudonym, model), in memory; the topic is the record.

    With ``max_bytes``, the states held never take more than that (by ``state_bytes``): storing
    a state beyond it evicts the least recently updated states (by ``updated_at``, so a rebuild
    from the topic, whose partitions arrive interleaved, evicts the same ones) until the rest
    fit, counts them (``evicted`` and the metric ``medmesh_ingest_readings_evicted_total``) and
    logs how many, never which patients. An evicted state stays on the topic until its
    retention, but this instance no longer knows it: the patient's next reading merges as if it
    were the first (a request waits for a complete set of new readings), an unchanged set
    re-sent is no longer recognised as sent, and an answered order could be answered again. A
    state alone larger than ``max_bytes`` is not kept either.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._states: dict[str, PatientReadingsUpdated] = {}
        self._sizes: dict[str, int] = {}
        # (updated_at, order of storing, key) of every state stored, oldest first: a heap, so
        # that storing and evicting cost log(states). Entries of states since replaced or
        # dropped are skipped when met, and cleared out when they outnumber the states.
        self._by_age: list[tuple[datetime, int, str]] = []
        self._stored = itertools.count()
        self._bytes = 0
        self.max_bytes = max_bytes
        self.evicted = 0
        self._unlogged = 0
        self._logged_at: float | None = None
        # The offset of this instance's latest acknowledged write per key, so that the follower
        # skips reading its own records back (parsing each cost ~7 % of ingest's CPU).
        self._written: dict[str, int] = {}

    def get(self, pseudonym: str, model: str) -> PatientReadingsUpdated | None:
        """The stored state, if any."""
        return self._states.get(state_key(pseudonym, model))

    def put(
        self, state: PatientReadingsUpdated, based_on: PatientReadingsUpdated | None = None
    ) -> None:
        """Store a state, combined with the one already here (see ``combine``); a state merged
        on top of the one still here (``based_on``) simply replaces it."""
        key = state_key(state.patient_pseudonym, state.model)
        held = self._states.get(key)
        stored = state if held is not None and held is based_on else combine(held, state)
        size = state_bytes(stored)
        self._bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        self._states[key] = stored
        heapq.heappush(self._by_age, (stored.updated_at, next(self._stored), key))
        if len(self._by_age) > 2 * len(self._states) + 1024:
            self._by_age = [(s.updated_at, next(self._stored), k) for k, s in self._states.items()]
            heapq.heapify(self._by_age)
        if self.max_bytes is not None and self._bytes > self.max_bytes:
            self._evict(self.max_bytes)

    def _current(self, entry: tuple[datetime, int, str]) -> bool:
        """Whether an age entry is that of the state now held under its key."""
        state = self._states.get(entry[2])
        return state is not None and state.updated_at == entry[0]

    def _evict(self, max_bytes: int) -> None:
        """Evict the least recently updated states until the rest take at most ``max_bytes``."""
        evicted = 0
        while self._bytes > max_bytes and self._by_age:
            entry = heapq.heappop(self._by_age)
            if not self._current(entry):
                continue
            del self._states[entry[2]]
            self._drop(entry[2])
            evicted += 1
        self.evicted += evicted
        _evictions().add(evicted)
        self._unlogged += evicted
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= _EVICTION_LOG_INTERVAL_S:
            log.warning(
                "readings states evicted to stay under MEDMESH_READINGS_MAX_BYTES",
                evicted=self._unlogged,
                kept=len(self._states),
                bytes=self._bytes,
                max_bytes=max_bytes,
            )
            self._unlogged = 0
            self._logged_at = now

    def _drop(self, key: str) -> None:
        self._bytes -= self._sizes.pop(key)
        self._written.pop(key, None)

    def forget_older_than(self, cutoff: datetime) -> int:
        """Drop the states last updated before ``cutoff``; how many were dropped."""
        stale = [key for key, state in self._states.items() if state.updated_at < cutoff]
        for key in stale:
            del self._states[key]
            self._drop(key)
        return len(stale)

    @property
    def bytes(self) -> int:
        """The estimated memory of the states held (``state_bytes`` summed)."""
        return self._bytes

    def written(self, key: str, offset: int) -> None:
        """Note that this instance's write of ``key`` was acknowledged at ``offset``."""
        self._written[key] = offset

    def wrote(self, key: str, offset: int) -> bool:
        """Whether the record of ``key`` at ``offset`` is this instance's own latest write."""
        return self._written.get(key) == offset

    def __iter__(self) -> Iterator[PatientReadingsUpdated]:
        """The states held."""
        return iter(list(self._states.values()))

    def __len__(self) -> int:
        return len(self._states)
