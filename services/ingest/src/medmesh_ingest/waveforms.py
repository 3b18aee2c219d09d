"""From FHIR SampledData (R4B or R5) to the fixed-length sample row a waveform input needs.

A SampledData holds one signal as text: ``data`` is space-separated decimals, each read as
``origin.value + factor * decimal`` in the unit of ``origin``; ``E`` marks a point with no valid
data, ``L`` and ``U`` a point below ``lowerLimit`` or above ``upperLimit``. FHIR (R4B and R5)
defines these limits only as "the lower (upper) limit of detection of the measured points" and
says ``origin`` "provides the units of the entire measurement series"; it does not say whether a
limit is a raw data value or a measured one. We read each limit as a measured value in the unit
of ``origin`` (``origin.value`` included, ``factor`` not applied): our interpretation, not FHIR's
text. R4B gives the spacing as ``period`` (milliseconds); R5 as ``interval`` in ``intervalUnit``
(a UCUM time unit), or as ``offsets``, which we do not read.

The rules of one input (``WaveformSpec``): values are converted to the input's unit, ``E`` points
are interpolated from their neighbours (too many make the signal unusable), the signal is
resampled by linear interpolation to the spec's rate (ECG content of interest lies far below the
Nyquist frequency of the rates in use, so no anti-alias filter is applied), its last ``samples``
values are kept, and a shorter one is padded at its end with its last value when it is at least
``min_samples`` long. Samples are kept to 6 significant digits: far below any lead's noise, and
it keeps the wire messages small. Pure Python, no I/O.

Bounded work: only the samples that are kept are computed (the tail of the resampled signal), so
the cost follows ``samples`` and the points received, never how long the signal lasts. Two
signals are refused as implausible (``WaveformError.implausible``: the payload is unacceptable,
not just the reading): one sampled more than ``MAX_UPSAMPLING`` times more slowly than the
spec's rate (see there), and one whose values are not finite numbers once ``origin``,
``factor`` and the unit conversion are applied. How long a signal may last at most is a limit
of the payload, checked by validation with ``signal_seconds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from medmesh_contracts.modelspec import UCUM, WaveformSpec
from medmesh_ingest.units import UnitConversionError, convert

_SIGNIFICANT_DIGITS = 6

# The most resampled values one interval between two received points may become. Linear
# interpolation invents every value between two points: beyond 10 per interval, over 90 % of
# the row the model reads would be straight lines drawn by ingest, not a measured signal. For
# the ECG spec (250 Hz) this asks for at least 25 Hz, which every ECG device exceeds (they
# sample at 100 to 1000 Hz), and refuses periods of seconds or hours, which are no waveform at
# that rate. It also bounds the resampled length to 10 times the points received.
MAX_UPSAMPLING = 10


class WaveformError(ValueError):
    """A SampledData that cannot be read as the input says; ``element`` names the culprit.

    ``implausible``: the signal is not a usable measurement at all (a period far too long for
    the input's rate, values that are not finite numbers), which makes the payload unacceptable
    (422) instead of only the reading unusable.
    """

    def __init__(self, element: str, problem: str, *, implausible: bool = False) -> None:
        super().__init__(problem)
        self.element = element
        self.problem = problem
        self.implausible = implausible


@dataclass(frozen=True)
class Waveform:
    """One signal ready for the tensor: ``samples`` in the input's unit, ``period_ms`` apart."""

    samples: tuple[float, ...]
    period_ms: float
    # How long the signal received lasted (seconds), before cropping or padding.
    duration_s: float


def sample_count(sampled_data: Any) -> int:
    """How many points a SampledData's ``data`` holds (all dimensions together)."""
    data = getattr(sampled_data, "data", None)
    return len(data.split()) if data else 0


def signal_seconds(sampled_data: Any) -> tuple[str, float] | None:
    """How long the signal of a SampledData lasts, (points per dimension - 1) x its period, and
    the element giving the period (``period`` or ``interval``); None when there is no usable
    period (reading the waveform says why). Cheap: the points are counted, not read."""
    try:
        period_ms, element = _spacing(sampled_data)
    except WaveformError:
        return None
    dimensions = sampled_data.dimensions or 1
    points = sample_count(sampled_data) // dimensions if dimensions > 0 else 0
    return element, max(points - 1, 0) * period_ms / 1000


def read_waveform(sampled_data: Any, unit: str, spec: WaveformSpec) -> Waveform:
    """The SampledData as the input's samples; WaveformError when it cannot be used."""
    scale, offset = _to_unit(sampled_data.origin, unit)
    period_ms, element = _spacing(sampled_data)
    longest_ms = MAX_UPSAMPLING * spec.period_ms
    if period_ms > longest_ms:
        raise WaveformError(
            element,
            f"a sampling period of {period_ms:g} ms is too long for this input, read at "
            f"{spec.sample_rate_hz:g} Hz: at most {longest_ms:g} ms ({MAX_UPSAMPLING} resampled "
            "values between two points) is usable",
            implausible=True,
        )
    if (sampled_data.dimensions or 1) != 1:
        raise WaveformError(
            "dimensions", "only one signal per SampledData is read (send one lead per component)"
        )
    values = _values(sampled_data, spec.max_gap_fraction)
    duration_s = (len(values) - 1) * period_ms / 1000
    count = _resampled_count(len(values), period_ms, spec.period_ms)
    if count < spec.shortest:
        needed = (spec.shortest - 1) / spec.sample_rate_hz
        raise WaveformError(
            "data", f"the signal lasts {duration_s:.3f} s; at least {needed:.3f} s are needed"
        )
    window = _resampled_tail(values, period_ms, spec.period_ms, count, spec.samples)
    window = window + [window[-1]] * (spec.samples - len(window))
    samples = tuple(_sample(v * scale + offset, unit) for v in window)
    return Waveform(samples, spec.period_ms, round(duration_s, 6))


def _sample(value: float, unit: str) -> float:
    """One output value, finite, to 6 significant digits."""
    if not math.isfinite(value):
        raise WaveformError(
            "data",
            f"origin + factor x data is not a finite number in {unit}",
            implausible=True,
        )
    return _significant(value)


def _to_unit(origin: Any, unit: str) -> tuple[float, float]:
    """(scale, offset) taking a value in the unit of ``origin`` (origin.value added) to ``unit``."""
    if origin is None:
        raise WaveformError("origin", "no origin")
    if origin.code is not None and origin.system not in (None, UCUM):
        raise WaveformError("origin.system", "the unit is not a UCUM code")
    from_unit = origin.code if origin.code is not None else origin.unit
    if from_unit is None:
        raise WaveformError("origin.code", "no unit")
    base = float(origin.value) if origin.value is not None else 0.0
    try:
        zero = convert(0.0, from_unit, unit)
        scale = convert(1.0, from_unit, unit) - zero
    except UnitConversionError as exc:
        raise WaveformError("origin.code", f"{exc}, expected {unit!r}") from None
    offset = zero + scale * base
    if not math.isfinite(offset):
        raise WaveformError(
            "origin.value", f"the origin is not a finite number in {unit}", implausible=True
        )
    return scale, offset


def _spacing(sampled_data: Any) -> tuple[float, str]:
    """Milliseconds between points, and the element that says so: R4B ``period``, or R5
    ``interval`` in ``intervalUnit``."""
    period = getattr(sampled_data, "period", None)
    if period is not None:
        found, element = float(period), "period"
    elif getattr(sampled_data, "interval", None) is not None:
        unit = sampled_data.intervalUnit
        if unit is None:
            raise WaveformError("intervalUnit", "an interval needs its unit")
        try:
            found, element = convert(float(sampled_data.interval), unit, "ms"), "interval"
        except UnitConversionError as exc:
            raise WaveformError("intervalUnit", f"{exc}, expected a time unit") from None
    elif getattr(sampled_data, "offsets", None) is not None:
        raise WaveformError("offsets", "irregular sampling (offsets) is not supported")
    else:
        raise WaveformError("period", "no sampling period")
    if not (math.isfinite(found) and found > 0):
        raise WaveformError(element, "the sampling period must be a positive number")
    return found, element


def _values(sampled_data: Any, max_gap_fraction: float) -> list[float]:
    """The points as numbers in the unit of origin (before its value is added); gaps filled."""
    factor = float(sampled_data.factor) if sampled_data.factor is not None else 1.0
    if not math.isfinite(factor):
        raise WaveformError("factor", "the factor is not a finite number", implausible=True)
    points = (sampled_data.data or "").split()
    if len(points) < 2:
        raise WaveformError("data", "fewer than two points")
    lower, upper = (
        (float(limit) - (float(sampled_data.origin.value or 0)) if limit is not None else None)
        for limit in (sampled_data.lowerLimit, sampled_data.upperLimit)
    )
    values: list[float | None] = []
    for i, point in enumerate(points):
        if point == "E":
            values.append(None)
        elif point in ("L", "U"):
            limit = lower if point == "L" else upper
            name = "lowerLimit" if point == "L" else "upperLimit"
            if limit is None:
                raise WaveformError(name, f"point {i} is {point!r} but there is no {name}")
            if not math.isfinite(limit):
                raise WaveformError(name, f"{name} is not a finite number", implausible=True)
            values.append(limit)
        else:
            try:
                value = float(point) * factor
            except ValueError:
                raise WaveformError("data", f"point {i} is not a decimal, E, L or U") from None
            if not math.isfinite(value):
                raise WaveformError(
                    "data", f"point {i} (factor x data) is not a finite number", implausible=True
                )
            values.append(value)
    gaps = sum(v is None for v in values)
    if gaps > max_gap_fraction * len(values) or gaps == len(values):
        raise WaveformError("data", f"{gaps} of {len(values)} points have no valid data (E)")
    return _filled(values) if gaps else [v for v in values if v is not None]


def _filled(values: list[float | None]) -> list[float]:
    """Gaps linearly interpolated between their neighbours (the nearest one at either end)."""
    known = [i for i, v in enumerate(values) if v is not None]
    filled: list[float] = []
    right = 0
    for i, v in enumerate(values):
        if v is not None:
            filled.append(v)
            continue
        while right < len(known) and known[right] < i:
            right += 1
        before = known[right - 1] if right > 0 else None
        after = known[right] if right < len(known) else None
        if before is None or after is None:
            nearest = after if before is None else before
            assert nearest is not None  # noqa: S101 -- at least one point is known
            filled.append(_known(values, nearest))
            continue
        share = (i - before) / (after - before)
        left_value, right_value = _known(values, before), _known(values, after)
        filled.append(left_value + share * (right_value - left_value))
    return filled


def _known(values: list[float | None], i: int) -> float:
    value = values[i]
    assert value is not None  # noqa: S101 -- only called with indexes of known points
    return value


def _resampled_count(points: int, period_ms: float, target_ms: float) -> int:
    """How many values the signal has at ``target_ms`` spacing from its first point."""
    if math.isclose(period_ms, target_ms, rel_tol=1e-9):
        return points
    duration = (points - 1) * period_ms
    return math.floor(duration / target_ms + 1e-9) + 1


def _resampled_tail(
    values: list[float], period_ms: float, target_ms: float, count: int, keep: int
) -> list[float]:
    """The last ``keep`` of the ``count`` values of the signal at ``target_ms`` spacing from its
    first point, by linear interpolation: only those are computed, so the work follows ``keep``
    (and the points read), not how long the signal lasts."""
    if math.isclose(period_ms, target_ms, rel_tol=1e-9):
        return values[-keep:]
    out: list[float] = []
    last = len(values) - 1
    for k in range(max(count - keep, 0), count):
        position = k * target_ms / period_ms
        i = min(int(position), last)
        share = position - i
        if i >= last or share <= 0:
            out.append(values[i])
        else:
            out.append(values[i] + share * (values[i + 1] - values[i]))
    return out


def _significant(value: float) -> float:
    if value == 0:
        return 0.0
    digits = _SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value)))
    return round(value, digits) + 0.0
