"""The model spec, version 1 (``medmesh.ModelSpec/1``): still accepted, upgraded to version 2.

A version 1 spec names one Triton model for all versions, with exactly one FP32 input tensor (the
inputs' values in input order) and three outputs: a score, an INT32 band index and per-input
contributions. ``upgrade`` turns it into the version 2 spec that says the same thing: each version
a ``risk-score`` output plus an ``explanation``, fed by one ``features`` or ``waveform`` tensor.
``medmesh models migrate`` writes the upgraded document.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from medmesh_contracts.modelspec import (
    OBSERVATION_CATEGORY,
    BandSpec,
    Coding,
    ContributionSpec,
    ExplanationOutput,
    InputSpec,
    InputTensor,
    ModelSpec,
    OutputTensor,
    ReferenceRangeSpec,
    ReportSpec,
    RiskScoreOutput,
    RoutingSpec,
    SpecModel,
    TritonTarget,
    VersionSpec,
)


class TritonSpecV1(SpecModel):
    """Where the model lives in Triton and the names of its tensors."""

    model: str
    input_tensor: str
    score_tensor: str
    band_tensor: str
    contributions_tensor: str
    max_batch_size: int = 64
    timeout_ms: int = 2000


class VersionSpecV1(SpecModel):
    """One deployed version of the model."""

    version: int
    triton_version: int
    algorithm: str
    score: Coding
    extra_score_codings: tuple[Coding, ...] = ()
    score_unit: str
    score_is_integer: bool = False
    reference_range: ReferenceRangeSpec | None = None


class ReportSpecV1(SpecModel):
    """How reporting codes the DiagnosticReport."""

    code: Coding
    category: Coding
    band_system: str
    observation_category: Coding = Coding(
        system=OBSERVATION_CATEGORY, code="survey", display="Survey"
    )


class ModelSpecV1(SpecModel):
    """A version 1 model spec, as model owners wrote them before tensors and output kinds."""

    schema_id: Literal["medmesh.ModelSpec/1"] = Field(alias="schema")
    name: str
    display: str
    owner: str
    triton: TritonSpecV1
    inputs: tuple[InputSpec, ...]
    bands: tuple[BandSpec, ...]
    versions: tuple[VersionSpecV1, ...]
    report: ReportSpecV1
    routing: RoutingSpec
    contributions: tuple[ContributionSpec, ...] = ()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> ModelSpecV1:
        signals = [i for i in self.inputs if i.waveform is not None]
        if signals and len(self.inputs) > 1:
            raise ValueError(
                "a version 1 spec mixing a waveform with other inputs has no version 2 tensor;"
                " write it as version 2 with one tensor each"
            )
        return self


def _input_tensor(v1: ModelSpecV1) -> InputTensor:
    names = tuple(i.name for i in v1.inputs)
    signal = v1.inputs[0].waveform if len(v1.inputs) == 1 else None
    if signal is not None:
        return InputTensor(
            name=v1.triton.input_tensor, shape=(signal.samples,), feed="waveform", inputs=names
        )
    return InputTensor(
        name=v1.triton.input_tensor, shape=(len(names),), feed="features", inputs=names
    )


def _version(v1: ModelSpecV1, version: VersionSpecV1) -> VersionSpec:
    contributions_width = len(v1.contributions) if v1.contributions else len(v1.inputs)
    t = v1.triton
    return VersionSpec(
        version=version.version,
        algorithm=version.algorithm,
        triton=TritonTarget(
            model=t.model,
            version=version.triton_version,
            inputs=(_input_tensor(v1),),
            outputs=(
                OutputTensor(name=t.score_tensor, datatype="FP32", shape=(1,)),
                OutputTensor(name=t.band_tensor, datatype="INT32", shape=(1,)),
                OutputTensor(
                    name=t.contributions_tensor, datatype="FP32", shape=(contributions_width,)
                ),
            ),
            max_batch_size=t.max_batch_size,
            timeout_ms=t.timeout_ms,
        ),
        outputs=(
            RiskScoreOutput(
                score_tensor=t.score_tensor,
                band_tensor=t.band_tensor,
                score=version.score,
                extra_score_codings=version.extra_score_codings,
                unit=version.score_unit,
                integer=version.score_is_integer,
                reference_range=version.reference_range,
                band_system=v1.report.band_system,
                bands=v1.bands,
            ),
            ExplanationOutput(tensor=t.contributions_tensor, items=v1.contributions),
        ),
    )


def upgrade(document: Any) -> ModelSpec:
    """The version 2 spec equivalent to a version 1 spec document (validated as both)."""
    v1 = ModelSpecV1.model_validate(document)
    return ModelSpec(
        name=v1.name,
        display=v1.display,
        owner=v1.owner,
        inputs=v1.inputs,
        versions=tuple(_version(v1, v) for v in v1.versions),
        report=ReportSpec(
            code=v1.report.code,
            category=v1.report.category,
            observation_category=v1.report.observation_category,
        ),
        routing=v1.routing,
    )
