"""UCUM conversions for vital signs (medmesh_ingest.units)."""

from __future__ import annotations

import pytest

from medmesh_ingest.units import UnitConversionError, convert, is_known


def test_equal_units_convert_to_themselves_even_when_unknown() -> None:
    """A unit converts to itself without the table, e.g. '{score}' or '1'."""
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
    assert is_known("%")
    assert convert(97, "%", "%") == 97.0


def test_unknown_unit_is_an_error() -> None:
    """A unit not in the table (e.g. heart rate in kg) cannot be converted."""
    with pytest.raises(UnitConversionError, match="unknown unit 'kg'"):
        convert(80, "kg", "/min")


def test_units_of_different_dimensions_do_not_convert() -> None:
    """Known units of different dimensions (temperature, rate) do not convert."""
    with pytest.raises(UnitConversionError, match="cannot convert"):
        convert(37, "Cel", "/min")
