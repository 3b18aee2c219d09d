"""How numbers and units read for people: one rule for the report narratives (reporting's
``narrative``) and the CLI's report lines (``medmesh_cli.reports``), so a score reads the same in
both. Kept in contracts because both sides depend on it and neither may import the other.
"""

from __future__ import annotations

import math
import re

# Significant digits a fraction is shown with: 0.3495475649833679 % reads 0.35 %.
SIGNIFICANT_DIGITS = 3

# UCUM codes as people write them. A curly-brace annotation ({score}, {beats}) is UCUM's way of
# saying "a count of something" (its unit is 1): a label for machines, not for people.
_HUMAN_UNITS = {"{score}": "points", "1": "", "Cel": "°C", "mm[Hg]": "mmHg", "[degF]": "°F"}
_ANNOTATION = re.compile(r"\{[^{}]*\}")


def format_number(value: float | int, digits: int = SIGNIFICANT_DIGITS) -> str:
    """An integer as it is; a fraction to ``digits`` significant digits, never in exponent form
    and without trailing zeros (0.3495475649833679 -> 0.35, 12.345 -> 12.3, 38.0 -> 38,
    1234.56 -> 1235)."""
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    shown = f"{value:.{decimals}f}"
    return shown.rstrip("0").rstrip(".") if "." in shown else shown


def human_unit(ucum_code: str) -> str:
    """A UCUM code as people read it: ``{score}`` -> ``points``, ``Cel`` -> ``°C``, ``1`` ->
    nothing, other annotations without their braces (``{beats}`` -> ``beats``)."""
    if ucum_code in _HUMAN_UNITS:
        return _HUMAN_UNITS[ucum_code]
    if _ANNOTATION.fullmatch(ucum_code):
        return ucum_code[1:-1]
    return _ANNOTATION.sub("", ucum_code)  # an annotation beside a unit: the unit
