"""Reading a model version's output values against its spec's output kinds. No I/O.

The one place that decides what a model's raw outputs mean: the worker reads them to fail a
result that does not fit (NaN, a wrong shape, a band the spec does not know) before it reaches
anyone; reporting reads them to build FHIR; the router reads the headline to compare a shadow
version with its primary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medmesh_contracts.modelspec import (
    BandSpec,
    ClassificationOutput,
    ClassSpec,
    ContributionSpec,
    ExplanationOutput,
    FindingsOutput,
    FindingSpec,
    ModelSpec,
    OutputSpec,
    QuantityOutput,
    RiskScoreOutput,
    VersionSpec,
    output_tensors,
)

# Probabilities may be off by float rounding (softmax in FP32): tolerated this far outside 0-1.
PROBABILITY_SLACK = 1e-4


class OutputError(ValueError):
    """A model's outputs do not fit its spec (the message names the tensor and what is wrong)."""


@dataclass(frozen=True)
class ScoreReading:
    """A risk score and its band."""

    output: RiskScoreOutput
    score: float | int
    band: BandSpec

    @property
    def label(self) -> str:
        return self.band.code

    @property
    def value(self) -> float | None:
        return float(self.score)


@dataclass(frozen=True)
class ClassReading:
    """Probabilities over a classifier's classes; ``top`` is the most probable one's index."""

    output: ClassificationOutput
    probabilities: tuple[float, ...]
    top: int

    @property
    def chosen(self) -> ClassSpec:
        return self.output.classes[self.top]

    @property
    def label(self) -> str:
        return self.chosen.code.code

    @property
    def value(self) -> float | None:
        return self.probabilities[self.top]


@dataclass(frozen=True)
class FindingsReading:
    """Per-label probabilities; ``present`` are the labels at or above their thresholds."""

    output: FindingsOutput
    probabilities: tuple[float, ...]

    @property
    def present(self) -> tuple[tuple[FindingSpec, float], ...]:
        return tuple(
            (label, p)
            for label, p in zip(self.output.labels, self.probabilities, strict=True)
            if p >= label.threshold
        )

    @property
    def label(self) -> str:
        return ",".join(sorted(f.code.token for f, _ in self.present)) or "none"

    @property
    def value(self) -> float | None:
        return None


@dataclass(frozen=True)
class QuantityReading:
    """A regression value in its unit."""

    output: QuantityOutput
    quantity: float

    @property
    def label(self) -> str:
        return self.output.code.token

    @property
    def value(self) -> float | None:
        return self.quantity


@dataclass(frozen=True)
class ExplanationReading:
    """Contributions, each named by its item."""

    items: tuple[ContributionSpec, ...]
    values: tuple[float, ...]


Reading = ScoreReading | ClassReading | FindingsReading | QuantityReading


@dataclass(frozen=True)
class VersionReading:
    """Every output of one result, read: the headline first."""

    version: VersionSpec
    readings: tuple[Reading, ...]
    explanation: ExplanationReading | None

    @property
    def headline(self) -> Reading:
        return self.readings[0]


def read_headline(version: VersionSpec, outputs: Mapping[str, Sequence[float]]) -> Reading:
    """Read only a result's headline output (what a shadow comparison needs)."""
    headline = version.headline
    _check_tensors(version, output_tensors(headline), outputs)
    return _read(headline, outputs)


def read_outputs(
    spec: ModelSpec, version: VersionSpec, outputs: Mapping[str, Sequence[float]]
) -> VersionReading:
    """Read a result's output values (flattened per tensor); OutputError when they do not fit."""
    _check_tensors(version, version.output_tensor_names, outputs)
    readings: list[Reading] = []
    explanation: ExplanationReading | None = None
    for output in version.outputs:
        if isinstance(output, ExplanationOutput):
            explanation = ExplanationReading(
                spec.explanation_items(output), tuple(outputs[output.tensor])
            )
        else:
            readings.append(_read(output, outputs))
    return VersionReading(version, tuple(readings), explanation)


def _check_tensors(
    version: VersionSpec, names: Sequence[str], outputs: Mapping[str, Sequence[float]]
) -> None:
    """Each named tensor is there, with its declared number of values, all finite."""
    for name in names:
        values = outputs.get(name)
        declared = version.triton.output(name)
        if values is None:
            raise OutputError(f"output {name} is missing")
        if len(values) != declared.elements:
            raise OutputError(
                f"output {name} has {len(values)} values a row, the spec declares"
                f" {declared.elements} (shape {list(declared.shape)})"
            )
        if not all(math.isfinite(v) for v in values):
            raise OutputError(f"output {name} holds a value that is not a finite number")


def _read(output: OutputSpec, outputs: Mapping[str, Sequence[float]]) -> Reading:
    if isinstance(output, RiskScoreOutput):
        return _score(output, outputs)
    if isinstance(output, ClassificationOutput):
        probabilities = _probabilities(output.tensor, outputs[output.tensor])
        top = max(range(len(probabilities)), key=probabilities.__getitem__)
        return ClassReading(output, probabilities, top)
    if isinstance(output, FindingsOutput):
        return FindingsReading(output, _probabilities(output.tensor, outputs[output.tensor]))
    if isinstance(output, QuantityOutput):
        return QuantityReading(output, float(outputs[output.tensor][output.index]))
    raise OutputError(f"output kind {output.kind} is not a headline")


def _score(output: RiskScoreOutput, outputs: Mapping[str, Sequence[float]]) -> ScoreReading:
    raw = outputs[output.score_tensor][output.score_index]
    if output.score_scale != 1.0:
        # FP32 outputs carry about 7 significant digits: a scaled score is rounded to 6
        # decimals, so 0.234 reads 23.4 and not 23.400000000000002.
        raw = round(raw * output.score_scale, 6)
    score: float | int = raw
    if output.integer:
        if not float(raw).is_integer():
            raise OutputError(f"{output.score_tensor} {raw} is not an integer score")
        score = int(raw)
    if output.band_tensor is None:
        return ScoreReading(output, score, output.band_for(raw))
    band_value = float(outputs[output.band_tensor][0])
    if not band_value.is_integer():
        raise OutputError(f"{output.band_tensor} {band_value} is not a band index")
    try:
        band = output.band(int(band_value))
    except KeyError as exc:
        raise OutputError(f"{output.band_tensor} {int(band_value)} is not a band") from exc
    return ScoreReading(output, score, band)


def _probabilities(tensor: str, values: Sequence[float]) -> tuple[float, ...]:
    if any(v < -PROBABILITY_SLACK or v > 1 + PROBABILITY_SLACK for v in values):
        raise OutputError(f"output {tensor} holds a probability outside 0-1")
    return tuple(min(1.0, max(0.0, float(v))) for v in values)
