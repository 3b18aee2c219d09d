"""The model spec, version 2: the plugin contract between a model owner and medmesh.

A model owner adds a model with a Triton model folder plus one spec file, and no service's code
names the model. The spec speaks in tensors and declared kinds:

- ``inputs``: the FHIR readings the model may use (LOINC code, UCUM unit, required or not). Ingest
  extracts them; they are the model's, shared by all of its versions.
- per version, ``triton``: which Triton model and version serves it, and its input and output
  tensors by name, datatype and shape. Each input tensor says how it is fed from FHIR (``feed``):
  ``features`` (one column per scalar input), ``waveform`` (the samples of one SampledData) or
  ``image`` (the pixels of one DICOM instance of an imaging study, preprocessed as the input's
  ``image`` says; the pixels never ride Kafka, the worker fetches them from the PACS).
- per version, ``outputs``: how output tensors become FHIR, by kind: ``risk-score`` (a score and
  its band), ``classification`` (probabilities over named classes), ``findings`` (multi-label,
  each label above its threshold), ``quantity`` (a regression value in a UCUM unit), and
  ``explanation`` (per-input contributions, reported with the headline output).

Versions of one model may be served by different Triton models (a python-backend version and an
ONNX version cannot share one Triton model). Version 1 specs (``medmesh.ModelSpec/1``) are still
accepted: ``load_spec`` upgrades them (``medmesh_contracts.modelspec_v1``), and
``medmesh models migrate`` writes the upgraded file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
SPEC_SCHEMA = "medmesh.ModelSpec/2"
# The most input tensor values a version may ask for per row (a waveform input is one value per
# sample): 100 000 FP32 values are 400 kB a row, far above today's widest model (2500) and far
# below what would make one Kafka message or one Triton batch unreasonable.
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

# Triton's datatype names (the KServe v2 protocol) that a medmesh tensor may have. Inputs are
# built from FHIR numbers, so they are floating point; outputs become FHIR numbers or indices.
InputDatatype = Literal["FP16", "FP32", "FP64"]
OutputDatatype = Literal[
    "FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "BOOL"
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


# --- FHIR inputs (what ingest extracts) ---------------------------------------------------------


class InputSource(SpecModel):
    """One way a FHIR Observation can supply an input.

    ``kind`` says how the value is read:
    - ``quantity``: valueQuantity converted to the input's unit;
    - ``indicator``: 1.0 when valueQuantity (in ``unit``) exceeds ``above``, else 0.0;
    - ``coded``: valueCodeableConcept mapped through ``answers``; any other answer is ``otherwise``;
    - ``waveform``: valueSampledData (one lead), for an input with ``waveform`` set: its values
      (origin + factor * data, converted to the input's unit) resampled as the input says;
    - ``imaging-study``: an ImagingStudy whose series has the modality ``code`` (a DICOM DCM
      coding such as DX), for an input with ``image`` set: one qualifying instance's pixels.
    With ``component`` set, the value is read from the Observation component with that code
    (e.g. systolic pressure inside a blood-pressure panel).
    """

    code: Coding
    component: Coding | None = None
    kind: Literal["quantity", "indicator", "coded", "waveform", "imaging-study"] = "quantity"
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
    """How a sampled signal (FHIR SampledData) becomes a fixed number of tensor values.

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


DICOM_MODALITY = "http://dicom.nema.org/resources/ontology/DCM"
# A study's instance larger than this is not fetched whole (a dead letter says so): a plain
# radiograph is a few MB; a spec may lower it, or raise it up to MAX_INSTANCE_BYTES.
DEFAULT_INSTANCE_BYTES = 64 * 1024 * 1024
MAX_INSTANCE_BYTES = 512 * 1024 * 1024


class SeriesCriteria(SpecModel):
    """Which series of a study the model may read; an empty list allows any value.

    ``modalities`` and ``body_parts`` are DICOM's Modality and BodyPartExamined; ``sop_classes``
    are SOP Class UIDs. The ImagingStudy announces modality, body site and SOP class, so ingest can
    refuse a study with no qualifying series; the instance's own header is checked again (and its
    size, which only the header gives) where the pixels are read.
    """

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    min_rows: int = Field(default=1, ge=1)
    min_columns: int = Field(default=1, ge=1)


class WindowSpec(SpecModel):
    """A VOI window in modality units (after rescale slope and intercept): ``center`` and
    ``width`` as DICOM's linear window (PS3.3 C.11.2.1.2.1) maps values to [0, 1]."""

    center: float
    width: float = Field(gt=1)


class ImagePreprocessing(SpecModel):
    """How one DICOM instance's pixels become the input tensor, in this order:

    1. rescale: stored values times RescaleSlope plus RescaleIntercept (modality units);
    2. window: ``window`` maps modality units to [0, 1]; without one, the stored bit range
       (0 to 2**BitsStored - 1, rescaled) does;
    3. photometric interpretation: MONOCHROME1 (bright means low) is inverted, so 1 is brightest;
    4. resize to ``rows`` x ``columns`` by area averaging (each output pixel the mean of the
       input pixels it covers, fractional edges weighted);
    5. normalise: ``(x - mean) / std`` when given (after the [0, 1] scaling), else as is;
    6. layout: ``channels-first`` [1, rows, columns] or ``channels-last`` [rows, columns, 1].
    """

    rows: int = Field(ge=1, le=4096)
    columns: int = Field(ge=1, le=4096)
    window: WindowSpec | None = None
    mean: float | None = None
    std: float | None = Field(default=None, gt=0)
    layout: Literal["channels-first", "channels-last"] = "channels-first"

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor shape (without the batch dimension)."""
        if self.layout == "channels-first":
            return (1, self.rows, self.columns)
        return (self.rows, self.columns, 1)

    @model_validator(mode="after")
    def _mean_and_std_together(self) -> ImagePreprocessing:
        if (self.mean is None) != (self.std is None):
            raise ValueError("an image's 'mean' and 'std' are given together or not at all")
        return self


class ImageSpec(SpecModel):
    """An input read from an imaging study: which series qualify, how pixels become a tensor,
    and the largest instance the worker fetches."""

    series: SeriesCriteria
    preprocessing: ImagePreprocessing
    max_instance_bytes: int = Field(default=DEFAULT_INSTANCE_BYTES, ge=1, le=MAX_INSTANCE_BYTES)


class InputSpec(SpecModel):
    """One FHIR input of the model: one scalar, one signal of ``waveform.samples`` values, or
    one image (``image``: an instance of an imaging study, preprocessed to its tensor)."""

    name: str
    display: str
    unit: str
    required: bool = True
    # Value used when an optional input has no reading (e.g. "breathing air" for oxygen).
    default: float | None = None
    # Set for a sampled signal (e.g. one ECG lead): its sources are all of kind ``waveform``.
    waveform: WaveformSpec | None = None
    # Set for an image: its sources are all of kind ``imaging-study``.
    image: ImageSpec | None = None
    sources: tuple[InputSource, ...]

    @property
    def width(self) -> int:
        """How many tensor values the input fills."""
        if self.image is not None:
            return math.prod(self.image.preprocessing.shape)
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

    @model_validator(mode="after")
    def _images_are_read_from_studies(self) -> InputSpec:
        study_sources = [s.kind == "imaging-study" for s in self.sources]
        if self.image is not None and not (all(study_sources) and self.required):
            raise ValueError(
                f"image input {self.name!r}: required, with imaging-study sources only"
            )
        if self.image is None and any(study_sources):
            raise ValueError(f"input {self.name!r} has an imaging-study source but no 'image'")
        if self.image is not None and self.waveform is not None:
            raise ValueError(f"input {self.name!r} cannot be both a waveform and an image")
        return self


# --- Triton tensors -----------------------------------------------------------------------------


def _elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class OutputTensor(SpecModel):
    """One output tensor of the Triton model: name, datatype, shape without the batch dimension."""

    name: str
    datatype: OutputDatatype = "FP32"
    shape: tuple[Annotated[int, Field(ge=1)], ...] = (1,)

    @property
    def elements(self) -> int:
        """Values per row."""
        return _elements(self.shape)


class InputTensor(SpecModel):
    """One input tensor of the Triton model, and how it is fed from the model's FHIR inputs.

    - ``feed: features``: one value per named scalar input, in the order of ``inputs``
      (a missing optional input takes its default);
    - ``feed: waveform``: the samples of the one named waveform input;
    - ``feed: image``: the preprocessed pixels of the one named image input.
    ``shape`` (without the batch dimension) holds exactly those values; a row is reshaped to it
    (e.g. ``[1, 2500]`` for a channels-first 1-D CNN).
    """

    name: str
    datatype: InputDatatype = "FP32"
    shape: tuple[Annotated[int, Field(ge=1)], ...]
    feed: Literal["features", "waveform", "image"]
    inputs: tuple[str, ...] = Field(min_length=1)

    @property
    def elements(self) -> int:
        """Values per row."""
        return _elements(self.shape)


class TritonTarget(SpecModel):
    """The Triton model version that serves a spec version, and its tensors."""

    model: str
    version: int = Field(ge=1)
    inputs: tuple[InputTensor, ...] = Field(min_length=1)
    outputs: tuple[OutputTensor, ...] = Field(min_length=1)
    max_batch_size: int = Field(default=64, ge=1)
    timeout_ms: int = Field(default=2000, ge=1)

    def output(self, name: str) -> OutputTensor:
        """The declared output tensor ``name``; KeyError when there is none."""
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(f"Triton model {self.model!r} declares no output {name!r}")

    @model_validator(mode="after")
    def _tensor_names_are_unique(self) -> TritonTarget:
        names = [t.name for t in self.inputs] + [t.name for t in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"Triton model {self.model!r}: tensor names repeat: {names}")
        return self


# --- outputs: how tensors become FHIR -----------------------------------------------------------


class ReferenceRangeSpec(SpecModel):
    """The score range of the lowest-risk band, reported as Observation.referenceRange."""

    low: float | None = None
    high: float | None = None
    text: str


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
    # For a model with no band tensor: the band holds scores from this value up to the next
    # band's (bands in index order, the first from minus infinity).
    min_score: float | None = None


class RiskScoreOutput(SpecModel):
    """A score and its risk band: one Observation with the score, the band as interpretation.

    The score is value ``score_index`` of ``score_tensor`` times ``score_scale`` (e.g. the second
    column of a classifier's probabilities times 100, in percent). The band is read from
    ``band_tensor``, or, without one, from the bands' ``min_score`` thresholds.
    """

    kind: Literal["risk-score"] = "risk-score"
    score_tensor: str
    score_index: int = Field(default=0, ge=0)
    score_scale: float = 1.0
    band_tensor: str | None = None
    score: Coding
    extra_score_codings: tuple[Coding, ...] = ()
    unit: str
    integer: bool = False
    reference_range: ReferenceRangeSpec | None = None
    # Code system of the bands (the Observation's interpretation carries both codings).
    band_system: str
    bands: tuple[BandSpec, ...] = Field(min_length=1)

    def band(self, index: int) -> BandSpec:
        """The band with this index; KeyError when there is none."""
        for b in self.bands:
            if b.index == index:
                return b
        raise KeyError(f"no band {index}")

    def band_for(self, score: float) -> BandSpec:
        """The band whose ``min_score`` threshold ``score`` last reaches (no band tensor)."""
        ordered = sorted(self.bands, key=lambda b: b.index)
        found = ordered[0]
        for b in ordered[1:]:
            if b.min_score is not None and score >= b.min_score:
                found = b
        return found

    @model_validator(mode="after")
    def _bands_can_be_read(self) -> RiskScoreOutput:
        if self.band_tensor is None:
            ordered = sorted(self.bands, key=lambda b: b.index)
            thresholds = [b.min_score for b in ordered[1:]]
            given = [t for t in thresholds if t is not None]
            if len(given) != len(thresholds) or given != sorted(given):
                raise ValueError(
                    "a risk score without 'band_tensor' needs ascending 'min_score' on every band"
                    " but the first"
                )
        return self


class ClassSpec(SpecModel):
    """One class of a classifier: its code, and how the report reads it."""

    code: Coding
    # v3 ObservationInterpretation code for this class (e.g. N for normal), if any.
    interpretation: str | None = None


class ClassificationOutput(SpecModel):
    """Probabilities over named classes (one value per class, in order, each in 0-1).

    One Observation (``code``) whose valueCodeableConcept is the most probable class, with every
    class's probability as a component; the class is the report's conclusionCode.
    """

    kind: Literal["classification"] = "classification"
    tensor: str
    code: Coding
    classes: tuple[ClassSpec, ...] = Field(min_length=2)
    # Code of the components that carry each class's probability.
    probability_code: Coding = Coding(
        system="https://medmesh.dev/fhir/CodeSystem/model-output",
        code="class-probability",
        display="Class probability",
    )


class FindingSpec(SpecModel):
    """One label of a multi-label model: reported when its probability reaches ``threshold``."""

    code: Coding
    threshold: float = Field(ge=0, le=1)


class FindingsOutput(SpecModel):
    """Multi-label findings: one probability per label (0-1); each at or above its threshold
    becomes a finding Observation (the label's code, the probability in %)."""

    kind: Literal["findings"] = "findings"
    tensor: str
    labels: tuple[FindingSpec, ...] = Field(min_length=1)


class QuantityOutput(SpecModel):
    """A regression value: value ``index`` of ``tensor``, an Observation in a UCUM unit."""

    kind: Literal["quantity"] = "quantity"
    tensor: str
    index: int = Field(default=0, ge=0)
    code: Coding
    unit: str


class ContributionSpec(SpecModel):
    """One value of an explanation tensor, as reporting codes it (an Observation component)."""

    name: str
    display: str
    code: Coding
    unit: str = "{score}"


class ExplanationOutput(SpecModel):
    """Per-input contributions, reported as components of the headline output's Observation.

    ``items`` names each value of ``tensor``; none given: one per FHIR input of the model, in
    input order (the input's contribution to the score).
    """

    kind: Literal["explanation"] = "explanation"
    tensor: str
    items: tuple[ContributionSpec, ...] = ()


OutputSpec = Annotated[
    RiskScoreOutput | ClassificationOutput | FindingsOutput | QuantityOutput | ExplanationOutput,
    Field(discriminator="kind"),
]
HeadlineOutput = RiskScoreOutput | ClassificationOutput | FindingsOutput | QuantityOutput


def output_tensors(output: OutputSpec) -> tuple[str, ...]:
    """The tensors an output reads."""
    if isinstance(output, RiskScoreOutput):
        return (output.score_tensor,) + ((output.band_tensor,) if output.band_tensor else ())
    return (output.tensor,)


class ModelCard(SpecModel):
    """What a model is for and how it was made; reported on the report's Device."""

    intended_use: str
    training_data: str
    limitations: str
    # Held-out metrics, name -> value (e.g. auroc: 0.91), as the training script measured them.
    metrics: dict[str, float] = Field(default_factory=dict)
    # Where the full card is (a path in the repository, or a URL).
    document: str | None = None


class VersionSpec(SpecModel):
    """One version of the model: the Triton model version serving it and how its outputs read."""

    version: int = Field(ge=1)
    algorithm: str
    triton: TritonTarget
    outputs: tuple[OutputSpec, ...] = Field(min_length=1)
    card: ModelCard | None = None

    @property
    def headline(self) -> HeadlineOutput:
        """The output the report's conclusion and shadow agreement are about: the first one that
        is not an explanation (a version has one; see ModelSpec's checks)."""
        for output in self.outputs:
            if not isinstance(output, ExplanationOutput):
                return output
        raise ValueError(f"version {self.version} has no output but explanations")

    @property
    def explanation(self) -> ExplanationOutput | None:
        """The version's explanation output, if it has one."""
        for output in self.outputs:
            if isinstance(output, ExplanationOutput):
                return output
        return None

    @property
    def output_tensor_names(self) -> tuple[str, ...]:
        """Every output tensor the outputs read, in declaration order, once each."""
        return tuple(dict.fromkeys(n for o in self.outputs for n in output_tensors(o)))


class ReportSpec(SpecModel):
    """How reporting codes the DiagnosticReport."""

    code: Coding
    category: Coding
    # The result Observations' category (observation-category, e.g. "procedure" for an ECG).
    observation_category: Coding = Coding(
        system=OBSERVATION_CATEGORY, code="survey", display="Survey"
    )


class RoutingSpec(SpecModel):
    """The starting routing table: percentage of traffic per version."""

    weights: dict[int, int]

    @model_validator(mode="after")
    def _weights_add_up(self) -> RoutingSpec:
        if sum(self.weights.values()) != 100:
            raise ValueError("routing weights must add up to 100")
        return self


class ModelSpec(SpecModel):
    """A model: its FHIR inputs, its versions (Triton tensors and outputs), report and routing."""

    schema_id: Literal["medmesh.ModelSpec/2"] = Field(default="medmesh.ModelSpec/2", alias="schema")
    name: str
    display: str
    owner: str
    inputs: tuple[InputSpec, ...]
    versions: tuple[VersionSpec, ...] = Field(min_length=1)
    report: ReportSpec
    routing: RoutingSpec

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def version(self, number: int) -> VersionSpec:
        """The spec of one version; KeyError when it is not deployed."""
        for v in self.versions:
            if v.version == number:
                return v
        raise KeyError(f"model {self.name!r} has no version {number}")

    def input(self, name: str) -> InputSpec:
        """The FHIR input ``name``; KeyError when the model has none."""
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(f"model {self.name!r} has no input {name!r}")

    def explanation_items(self, explanation: ExplanationOutput) -> tuple[ContributionSpec, ...]:
        """What each explanation value is: the output's items, else one per FHIR input."""
        if explanation.items:
            return explanation.items
        return tuple(
            ContributionSpec(
                name=i.name, display=f"Contribution of {i.display}", code=i.sources[0].code
            )
            for i in self.inputs
        )

    @model_validator(mode="after")
    def _routing_names_deployed_versions(self) -> ModelSpec:
        deployed = [v.version for v in self.versions]
        if len(set(deployed)) != len(deployed):
            raise ValueError(f"versions repeat: {deployed}")
        unknown = set(self.routing.weights) - set(deployed)
        if unknown:
            raise ValueError(f"routing names versions that are not deployed: {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _versions_fit_their_tensors(self) -> ModelSpec:
        for v in self.versions:
            for problem in version_problems(self, v):
                raise ValueError(f"version {v.version}: {problem}")
        return self


def version_problems(spec: ModelSpec, version: VersionSpec) -> list[str]:
    """What makes a version's tensors, feeds and outputs disagree with each other (empty: none).

    These are the checks a spec can make on its own; ``medmesh models validate`` adds those
    against the Triton config and the ONNX graph.
    """
    problems: list[str] = []
    names = {i.name for i in spec.inputs}
    width = 0
    for tensor in version.triton.inputs:
        unknown = [n for n in tensor.inputs if n not in names]
        if unknown:
            problems.append(f"input tensor {tensor.name} is fed from unknown inputs {unknown}")
            continue
        fed = [spec.input(n) for n in tensor.inputs]
        expected = _fed_width(tensor, fed)
        if isinstance(expected, str):
            problems.append(expected)
            continue
        if tensor.elements != expected:
            problems.append(
                f"input tensor {tensor.name} has shape {list(tensor.shape)} ({tensor.elements}"
                f" values) but is fed {expected} values"
            )
        width += tensor.elements
    if width > MAX_INPUT_WIDTH:
        problems.append(f"the input tensors hold {width} values a row, at most {MAX_INPUT_WIDTH}")
    declared = {t.name for t in version.triton.outputs}
    for output in version.outputs:
        missing = [n for n in output_tensors(output) if n not in declared]
        if missing:
            problems.append(f"{output.kind} output reads undeclared tensors {missing}")
            continue
        problems.extend(_output_fits(spec, version.triton, output))
    if all(isinstance(o, ExplanationOutput) for o in version.outputs):
        problems.append("a version needs an output that is not an explanation")
    if sum(isinstance(o, ExplanationOutput) for o in version.outputs) > 1:
        problems.append("a version has at most one explanation output")
    return problems


def _fed_width(tensor: InputTensor, fed: list[InputSpec]) -> int | str:
    """How many values a row of ``tensor`` is fed from the inputs it names, or why it cannot be."""
    if tensor.feed == "features":
        wide = [i.name for i in fed if i.waveform is not None or i.image is not None]
        if wide:
            return f"features tensor {tensor.name} names waveform or image inputs {wide}"
        return len(fed)
    if tensor.feed == "waveform":
        one_signal = len(fed) == 1 and fed[0].waveform is not None
        return (
            fed[0].width
            if one_signal
            else f"waveform tensor {tensor.name} must name one waveform input"
        )
    image = fed[0].image if len(fed) == 1 else None
    if image is None:
        return f"image tensor {tensor.name} must name one image input"
    if tensor.shape != image.preprocessing.shape:
        return (
            f"image tensor {tensor.name} has shape {list(tensor.shape)} but the preprocessing"
            f" makes {list(image.preprocessing.shape)}"
        )
    return fed[0].width


def _output_fits(spec: ModelSpec, triton: TritonTarget, output: OutputSpec) -> list[str]:
    if isinstance(output, RiskScoreOutput):
        size = triton.output(output.score_tensor).elements
        if output.score_index >= size:
            return [f"score_index {output.score_index} is outside {output.score_tensor} ({size})"]
        return []
    if isinstance(output, QuantityOutput):
        size = triton.output(output.tensor).elements
        if output.index >= size:
            return [f"index {output.index} is outside {output.tensor} ({size} values)"]
        return []
    expected = {
        ClassificationOutput: lambda o: len(o.classes),
        FindingsOutput: lambda o: len(o.labels),
        ExplanationOutput: lambda o: len(spec.explanation_items(o)),
    }[type(output)](output)
    size = triton.output(output.tensor).elements
    if size != expected:
        return [f"{output.kind} output names {expected} values, tensor {output.tensor} has {size}"]
    return []


def parse_spec(document: Any) -> ModelSpec:
    """A spec from its parsed YAML/JSON document; a version 1 spec is upgraded to version 2.

    Top-level keys starting with ``x-`` are extension fields, as in compose files: a place for
    YAML anchors that versions share (bands, tensors); they are dropped before validation.
    """
    if isinstance(document, dict):
        document = {k: v for k, v in document.items() if not str(k).startswith("x-")}
    if isinstance(document, dict) and document.get("schema") == "medmesh.ModelSpec/1":
        from medmesh_contracts.modelspec_v1 import upgrade  # noqa: PLC0415 -- v1 needs v2 first

        return upgrade(document)
    return ModelSpec.model_validate(document)


def load_spec(path: Path) -> ModelSpec:
    """Read and validate one model spec file (YAML, version 1 or 2)."""
    return parse_spec(yaml.safe_load(path.read_text()))


def load_specs(directory: Path) -> dict[str, ModelSpec]:
    """Every ``*.yaml`` spec in a directory, by model name."""
    specs = [load_spec(p) for p in sorted(directory.glob("*.yaml"))]
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise ValueError(f"two specs in {directory} declare the same model name")
    return by_name
