"""The model spec: the plugin contract between a model owner and medmesh (BRIEF.md section 3).

A model owner adds a model with a Triton model folder plus one spec file. The spec says which FHIR
readings feed which position of the input tensor and in which unit, how the output tensors become
FHIR, and which version is routed. Every service reads the same spec: ingest to know what to
extract, the router what may be routed, the worker how to build tensors, reporting how to build FHIR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
# The most input tensor columns a spec may ask for (a waveform input is one column per sample):
# 100 000 FP32 values are 400 kB a row, far above today's widest model (2500) and far below what
# would make one Kafka message or one Triton batch unreasonable.
MAX_INPUT_WIDTH = 100_000

# Codes of http://terminology.hl7.org/CodeSystem/data-absent-reason (FHIR R4B and R5).
DataAbsentReason = Literal[
    "unknown",
    "asked-unknown",
    "temp-unknown",
    "not-asked",
    "asked-declined",
    "masked",
    "not-applicable",
    "unsupported",
    "as-text",
    "error",
    "not-a-number",
    "negative-infinity",
    "positive-infinity",
    "not-performed",
    "not-permitted",
]


class SpecModel(BaseModel):
    """Base of spec models: immutable, and strict about unknown keys (typos in specs fail loudly)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Coding(SpecModel):
    """A code in a code system, as FHIR Coding."""

    system: str
    code: str
    display: str | None = None

    @property
    def token(self) -> str:
        """``system|code``, the FHIR search token form."""
        return f"{self.system}|{self.code}"


class InputSource(SpecModel):
    """One way a FHIR Observation can supply an input.

    ``kind`` says how the value is read:
    - ``quantity``: valueQuantity converted to the input's unit;
    - ``indicator``: 1.0 when valueQuantity (in ``unit``) exceeds ``above``, else 0.0;
    - ``coded``: valueCodeableConcept mapped through ``answers``; any other answer is ``otherwise``;
    - ``waveform``: valueSampledData (one lead), for an input with ``waveform`` set: its values
      (origin + factor * data, converted to the input's unit) resampled as the input says.
    With ``component`` set, the value is read from the Observation component with that code
    (e.g. systolic pressure inside a blood-pressure panel).
    """

    code: Coding
    component: Coding | None = None
    kind: Literal["quantity", "indicator", "coded", "waveform"] = "quantity"
    unit: str | None = None
    above: float | None = None
    answers: dict[str, float] = Field(default_factory=dict)
    otherwise: float | None = None

    @model_validator(mode="after")
    def _kind_has_its_parameters(self) -> InputSource:
        if self.kind == "indicator" and (self.above is None or self.unit is None):
            raise ValueError("an indicator source needs 'unit' and 'above'")
        if self.kind == "coded" and (not self.answers or self.otherwise is None):
            raise ValueError("a coded source needs 'answers' and 'otherwise'")
        return self


class WaveformSpec(SpecModel):
    """How a sampled signal (FHIR SampledData) becomes a fixed number of tensor columns.

    Ingest resamples the signal (linear interpolation) to ``sample_rate_hz`` and keeps its last
    ``samples`` values (the most recent stretch). A shorter signal is padded at its end with its
    last value when it has at least ``min_samples`` values at that rate, else the reading is
    unusable (too short to read). Points marked ``E`` (no valid data) are interpolated from their
    neighbours; more than ``max_gap_fraction`` of them makes the reading unusable.
    """

    sample_rate_hz: float = Field(gt=0)
    samples: int = Field(ge=2)
    min_samples: int | None = Field(default=None, ge=2)
    max_gap_fraction: float = Field(default=0.05, ge=0, le=1)

    @property
    def shortest(self) -> int:
        """The fewest samples (at ``sample_rate_hz``) a usable signal has."""
        return self.min_samples if self.min_samples is not None else self.samples

    @property
    def period_ms(self) -> float:
        """Milliseconds between two samples of the tensor row."""
        return 1000.0 / self.sample_rate_hz

    @model_validator(mode="after")
    def _shortest_fits(self) -> WaveformSpec:
        if self.shortest > self.samples:
            raise ValueError("a waveform's min_samples cannot exceed its samples")
        return self


class InputSpec(SpecModel):
    """One input of the model: one column of its input tensor, or ``waveform.samples`` columns."""

    name: str
    display: str
    unit: str
    required: bool = True
    # Value used when an optional input has no reading (e.g. "breathing air" for oxygen).
    default: float | None = None
    # Set for a sampled signal (e.g. one ECG lead): its sources are all of kind ``waveform``.
    waveform: WaveformSpec | None = None
    sources: tuple[InputSource, ...]

    @property
    def width(self) -> int:
        """How many tensor columns the input fills."""
        return self.waveform.samples if self.waveform is not None else 1

    @model_validator(mode="after")
    def _optional_inputs_have_a_default(self) -> InputSpec:
        if not self.required and self.default is None:
            raise ValueError(f"optional input {self.name!r} needs a default")
        return self

    @model_validator(mode="after")
    def _waveforms_are_read_as_waveforms(self) -> InputSpec:
        waveform_sources = [s.kind == "waveform" for s in self.sources]
        if self.waveform is not None and not (all(waveform_sources) and self.required):
            raise ValueError(f"waveform input {self.name!r}: required, with waveform sources only")
        if self.waveform is None and any(waveform_sources):
            raise ValueError(f"input {self.name!r} has a waveform source but no 'waveform'")
        return self


class ContributionSpec(SpecModel):
    """One value of the contributions tensor, as reporting codes it (an Observation component)."""

    name: str
    display: str
    code: Coding
    unit: str = "{score}"


class BandSpec(SpecModel):
    """One risk band a model can output, and how it is coded in FHIR."""

    index: int
    code: str
    display: str
    # v3 ObservationInterpretation code that best expresses the band (N, A, H, HH, IND).
    interpretation: str
    # Set for a band that means "no result" (e.g. an unreadable input): the model's score and
    # contributions are then not reported; the Observation carries this data-absent-reason code
    # instead of a value, and no components. None: the band has a real score.
    data_absent_reason: DataAbsentReason | None = None


class ReferenceRangeSpec(SpecModel):
    """The score range of the lowest-risk band, reported as Observation.referenceRange."""

    low: float | None = None
    high: float | None = None
    text: str


class VersionSpec(SpecModel):
    """One deployed version of the model."""

    version: int
    triton_version: int
    algorithm: str
    score: Coding
    extra_score_codings: tuple[Coding, ...] = ()
    score_unit: str
    score_is_integer: bool = False
    reference_range: ReferenceRangeSpec | None = None


class TritonSpec(SpecModel):
    """Where the model lives in Triton and the names of its tensors."""

    model: str
    input_tensor: str
    score_tensor: str
    band_tensor: str
    contributions_tensor: str
    max_batch_size: int = 64
    timeout_ms: int = 2000


class ReportSpec(SpecModel):
    """How reporting codes the DiagnosticReport."""

    code: Coding
    category: Coding
    # Code system of the risk bands (the Observation's interpretation carries both codings).
    band_system: str
    # The result Observation's category (observation-category, e.g. "procedure" for an ECG).
    observation_category: Coding = Coding(
        system=OBSERVATION_CATEGORY, code="survey", display="Survey"
    )


class RoutingSpec(SpecModel):
    """The skeleton's static routing table: percentage of traffic per version."""

    weights: dict[int, int]

    @model_validator(mode="after")
    def _weights_add_up(self) -> RoutingSpec:
        if sum(self.weights.values()) != 100:
            raise ValueError("routing weights must add up to 100")
        return self


class ModelSpec(SpecModel):
    """A model: inputs, Triton location, versions, outputs and routing."""

    schema_id: Literal["medmesh.ModelSpec/1"] = Field(alias="schema")
    name: str
    display: str
    owner: str
    triton: TritonSpec
    inputs: tuple[InputSpec, ...]
    bands: tuple[BandSpec, ...]
    versions: tuple[VersionSpec, ...]
    report: ReportSpec
    routing: RoutingSpec
    # What each value of the contributions tensor is; none given: one per input, in input order
    # (the input's contribution to the score).
    contributions: tuple[ContributionSpec, ...] = ()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _routing_names_deployed_versions(self) -> ModelSpec:
        deployed = {v.version for v in self.versions}
        unknown = set(self.routing.weights) - deployed
        if unknown:
            raise ValueError(f"routing names versions that are not deployed: {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _input_width_is_bounded(self) -> ModelSpec:
        if self.input_width > MAX_INPUT_WIDTH:
            raise ValueError(
                f"the inputs fill {self.input_width} tensor columns, at most {MAX_INPUT_WIDTH}"
            )
        return self

    @property
    def input_width(self) -> int:
        """Columns of the input tensor: the inputs' widths, in input order."""
        return sum(i.width for i in self.inputs)

    @property
    def contributions_width(self) -> int:
        """Values of the contributions tensor per request."""
        return len(self.contributions) if self.contributions else len(self.inputs)

    def version(self, number: int) -> VersionSpec:
        """The spec of one version; KeyError when it is not deployed."""
        for v in self.versions:
            if v.version == number:
                return v
        raise KeyError(f"model {self.name!r} has no version {number}")

    def band(self, index: int) -> BandSpec:
        """The band with this index; KeyError when the model has none."""
        for b in self.bands:
            if b.index == index:
                return b
        raise KeyError(f"model {self.name!r} has no band {index}")


def load_spec(path: Path) -> ModelSpec:
    """Read and validate one model spec file (YAML)."""
    return ModelSpec.model_validate(yaml.safe_load(path.read_text()))


def load_specs(directory: Path) -> dict[str, ModelSpec]:
    """Every ``*.yaml`` spec in a directory, by model name."""
    specs = [load_spec(p) for p in sorted(directory.glob("*.yaml"))]
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise ValueError(f"two specs in {directory} declare the same model name")
    return by_name
