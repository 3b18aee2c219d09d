"""UCUM conversions for vital signs (medmesh_ingest.units)."""

from __future__ import annotations

import pytest

from medmesh_ingest.units import UnitConversionError, convert, implausible


def test_equal_units_convert_to_themselves_even_when_unknown() -> None:
    """A unit converts to itself without asking the engine, e.g. '{score}' or '1'."""
    assert convert(3, "{score}", "{score}") == 3.0
    assert convert(1, "1", "1") == 1.0


@pytest.mark.parametrize(
    ("fahrenheit", "celsius"), [(32.0, 0.0), (98.6, 37.0), (101.3, 38.5), (212.0, 100.0)]
)
def test_fahrenheit_converts_to_celsius(fahrenheit: float, celsius: float) -> None:
    """[degF] becomes Cel by (F - 32) x 5/9."""
    assert convert(fahrenheit, "[degF]", "Cel") == pytest.approx(celsius)


def test_kelvin_converts_to_celsius() -> None:
    """K becomes Cel by subtracting 273.15."""
    assert convert(310.15, "K", "Cel") == pytest.approx(37.0)


def test_celsius_converts_back_to_fahrenheit() -> None:
    """Conversions work in both directions within a dimension."""
    assert convert(38.5, "Cel", "[degF]") == pytest.approx(101.3)


@pytest.mark.parametrize("unit", ["{beats}/min", "{breaths}/min", "{beat}/min", "/min", "1/min"])
def test_per_minute_rates_are_the_same_unit(unit: str) -> None:
    """Rates per minute, annotated or not, are /min."""
    assert convert(72, unit, "/min") == 72.0


def test_kilopascal_converts_to_millimetres_of_mercury() -> None:
    """kPa becomes mm[Hg] (1 mm[Hg] = 133.322 Pa)."""
    assert convert(16, "kPa", "mm[Hg]") == pytest.approx(120.01, abs=0.01)


def test_millilitres_per_minute_convert_to_litres_per_minute() -> None:
    """mL/min becomes L/min."""
    assert convert(500, "mL/min", "L/min") == pytest.approx(0.5)


def test_percent_is_percent() -> None:
    """% is known and converts to itself."""
    assert convert(97, "%", "%") == 97.0


def test_unknown_unit_is_an_error() -> None:
    """A unit that is not UCUM (e.g. 'bpm') cannot be converted."""
    with pytest.raises(UnitConversionError, match="unknown unit 'bpm'"):
        convert(80, "bpm", "/min")


def test_heart_rate_in_kilograms_does_not_convert() -> None:
    """A valid UCUM unit of another dimension (kg for a rate) cannot be converted."""
    with pytest.raises(UnitConversionError, match="cannot convert 'kg' to '/min'"):
        convert(80, "kg", "/min")


def test_any_ucum_unit_of_the_dimension_converts() -> None:
    """The UCUM engine converts units no table listed, e.g. beats per second and cmHg."""
    assert convert(1.5, "/s", "/min") == pytest.approx(90.0)
    assert convert(12, "cm[Hg]", "mm[Hg]") == pytest.approx(120.0)


def test_fahrenheit_threshold_does_not_drift() -> None:
    """96.8 [degF] is exactly 36.0 Cel after conversion, not 35.999999 (NEWS2 threshold)."""
    assert convert(96.8, "[degF]", "Cel") == 36.0


@pytest.mark.parametrize(
    ("value", "unit", "problem"),
    [
        (-4, "/min", "negative"),
        (101, "%", "outside"),
        (24.9, "Cel", "outside"),
        (45.5, "Cel", "outside"),
        (-1, "L/min", "negative"),
    ],
)
def test_impossible_values_are_named(value: float, unit: str, problem: str) -> None:
    """Negative rates, SpO2 over 100 % and temperatures outside 25-45 Cel are implausible."""
    reason = implausible(value, unit)
    assert reason is not None
    assert problem in reason
    assert f"{value:g} {unit}" in reason


@pytest.mark.parametrize(("value", "unit"), [(0, "/min"), (100, "%"), (25, "Cel"), (45, "Cel")])
def test_limits_themselves_are_plausible(value: float, unit: str) -> None:
    """The limits are inclusive; units without limits are never implausible."""
    assert implausible(value, unit) is None
    assert implausible(-5, "{score}") is None


def test_units_of_different_dimensions_do_not_convert() -> None:
    """Known units of different dimensions (temperature, rate) do not convert."""
    with pytest.raises(UnitConversionError, match="cannot convert"):
        convert(37, "Cel", "/min")
