"""UCUM unit conversion for vital signs, by a UCUM engine (ucumvert, on top of pint).

Any two UCUM units of the same dimension convert into each other (``[degF]`` to ``Cel``,
``kPa`` to ``mm[Hg]``, ``mL/min`` to ``L/min``); annotations in braces (``{beats}/min``) do not
change a unit. Every conversion between two units is linear (``to = from * scale + offset``), so
the engine is asked once per pair of units and the pair's scale and offset are cached.

``implausible`` holds the physiological limits of the units model inputs are expressed in: a
reading outside them is not a measurement of a living patient but an error upstream.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any, NamedTuple


class UnitConversionError(ValueError):
    """A value cannot be expressed in the unit asked for (unknown unit or another dimension)."""


class _Linear(NamedTuple):
    scale: float
    offset: float


# (lowest, highest) physiologically possible value of a reading in this unit.
_PLAUSIBLE: dict[str, tuple[float, float]] = {
    "/min": (0.0, 400.0),  # respiratory and heart rates
    "%": (0.0, 100.0),  # saturations, inspired oxygen fraction
    "Cel": (25.0, 45.0),  # body temperature
    "mm[Hg]": (0.0, 400.0),  # blood pressure
    "L/min": (0.0, 100.0),  # oxygen flow
}
_MAX_UNIT_LENGTH = 64
_DECIMALS = 9


@cache
def _registry() -> Any:
    """The UCUM-aware pint registry (built once, on first use: it takes about half a second)."""
    from ucumvert import (  # type: ignore[import-untyped]  # noqa: PLC0415 -- heavy: on first use
        PintUcumRegistry,
    )

    return PintUcumRegistry()


@lru_cache(maxsize=512)
def _parsed(unit: str) -> Any:
    """The pint quantity of one UCUM unit (a magnitude and units); UnitConversionError if none."""
    if not unit or len(unit) > _MAX_UNIT_LENGTH:
        raise UnitConversionError(f"unknown unit {unit!r}")
    try:
        return _registry().from_ucum(unit)
    except Exception:  # noqa: BLE001 -- lark and pint raise many kinds; all mean "not UCUM"
        raise UnitConversionError(f"unknown unit {unit!r}") from None


@lru_cache(maxsize=512)
def _linear(from_unit: str, to_unit: str) -> _Linear:
    source, target = _parsed(from_unit), _parsed(to_unit)
    quantity = _registry().Quantity

    def at(value: float) -> float:
        converted = quantity(value * source.magnitude, source.units).to(target.units)
        return float(converted.magnitude / target.magnitude)

    try:
        zero = at(0.0)
        return _Linear(at(1.0) - zero, zero)
    except Exception:  # noqa: BLE001 -- pint's DimensionalityError and offset-unit errors
        raise UnitConversionError(f"cannot convert {from_unit!r} to {to_unit!r}") from None


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (UCUM codes)."""
    if from_unit == to_unit:
        return float(value)
    linear = _linear(from_unit, to_unit)
    # Rounded so that float noise of the engine (98.6 [degF] -> 36.999999999999) cannot move a
    # reading across a clinical threshold.
    return round(float(value) * linear.scale + linear.offset, _DECIMALS)


def implausible(value: float, unit: str) -> str | None:
    """Why a reading of ``value`` in ``unit`` cannot be physiological, or None when it can."""
    limits = _PLAUSIBLE.get(unit)
    if limits is None:
        return None
    low, high = limits
    if low <= value <= high:
        return None
    shown = f"{value:g} {unit}"
    if value < 0 <= low:
        return f"{shown} is negative, which is physiologically impossible"
    return f"{shown} is outside the physiologically possible range {low:g} to {high:g} {unit}"
