"""UCUM unit conversion for vital signs: a small explicit table, not a UCUM engine.

Every unit we know maps to a canonical unit of its dimension by ``canonical = value * scale +
offset``. Two units convert into each other when they share a canonical unit. A unit not in the
table converts only to itself.
"""

from __future__ import annotations

from typing import NamedTuple


class UnitConversionError(ValueError):
    """A value cannot be expressed in the unit asked for (unknown unit or another dimension)."""


class _Linear(NamedTuple):
    canonical: str
    scale: float
    offset: float = 0.0


_MMHG_PER_KPA = 1000 / 133.322387415  # 1 mm[Hg] = 133.322387415 Pa

_UNITS: dict[str, _Linear] = {
    # temperature
    "Cel": _Linear("Cel", 1.0),
    "[degF]": _Linear("Cel", 5 / 9, -32 * 5 / 9),
    "K": _Linear("Cel", 1.0, -273.15),
    # rates per minute (UCUM annotations in braces do not change the unit)
    "/min": _Linear("/min", 1.0),
    "1/min": _Linear("/min", 1.0),
    "{beats}/min": _Linear("/min", 1.0),
    "{beat}/min": _Linear("/min", 1.0),
    "{breaths}/min": _Linear("/min", 1.0),
    "{breath}/min": _Linear("/min", 1.0),
    # pressure
    "mm[Hg]": _Linear("mm[Hg]", 1.0),
    "kPa": _Linear("mm[Hg]", _MMHG_PER_KPA),
    # fractions
    "%": _Linear("%", 1.0),
    # flow
    "L/min": _Linear("L/min", 1.0),
    "mL/min": _Linear("L/min", 0.001),
}


def is_known(unit: str) -> bool:
    """Whether the table knows the unit."""
    return unit in _UNITS


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (UCUM codes)."""
    if from_unit == to_unit:
        return float(value)
    source, target = _lookup(from_unit), _lookup(to_unit)
    if source.canonical != target.canonical:
        raise UnitConversionError(f"cannot convert {from_unit!r} to {to_unit!r}")
    canonical = value * source.scale + source.offset
    return (canonical - target.offset) / target.scale


def _lookup(unit: str) -> _Linear:
    try:
        return _UNITS[unit]
    except KeyError:
        raise UnitConversionError(f"unknown unit {unit!r}") from None
