"""The monolith serves image models as a worker does: each batch's images fetched from the PACS
and preprocessed with the worker's code before its Triton call, a PACS outage waited out, and a
refused image failed with its reason."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    ImageReference,
    InferenceFailed,
    ModelInput,
    Producer,
    RequestInference,
    utc_now,
)
from medmesh_contracts.lifecycle import seed_deployment
from medmesh_inference.batching import RetryPolicy, WorkerIdentity
from medmesh_inference.circuit import CircuitBackoff
from medmesh_inference.image_inputs import ImageInputs
from medmesh_inference.imaging import image_tensor
from medmesh_monolith.pipeline import InProcessPipeline, VersionStage
from medmesh_monolith.settings import MonolithSettings
from medmesh_reporting.handling import ReportHandler
from medmesh_router.readiness import Readiness
from medmesh_router.state import RouterState
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_request
from tests.unit.test_worker_images import SPEC, FakePacs, MeanTriton

PRODUCER = Producer(service="monolith", instance="test")
Published = list[tuple[str, bytes | None, bytes, dict[str, str]]]


class RecordingTriton(MeanTriton):
    """MeanTriton that also keeps each call's IMAGE tensor, to compare with the prepared one."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[npt.NDArray[np.generic]] = []

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        self.images.append(inputs["IMAGE"])
        return await super().infer(inputs)

    async def ready(self) -> bool:
        return True


def _pipeline(triton: RecordingTriton, pacs: FakePacs, published: Published) -> InProcessPipeline:
    state = RouterState({SPEC.name: SPEC}, Readiness())
    state.apply(
        seed_deployment(SPEC.name, SPEC.routing.weights, PRODUCER, utc_now(), "t"), utc_now()
    )
    tracer = trace.get_tracer("test")

    async def publish(
        topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None:
        published.append((topic, key, value, dict(headers)))

    # The settings' PACS retries, so an outage is told by PacsUnavailable as in a worker.
    client = pacs.client(max_attempts=MonolithSettings().pacs_max_attempts)
    stages = [
        VersionStage(
            SPEC,
            v.version,
            triton.infer,
            triton.ready,
            WorkerIdentity(PRODUCER, v.triton.model, str(v.triton.version), "KIND_CPU"),
            v.triton.max_batch_size,
            ImageInputs.for_model(SPEC, client),
        )
        for v in SPEC.versions
    ]
    return InProcessPipeline(
        state=state,
        stages=stages,
        reports=ReportHandler({SPEC.name: SPEC}, PRODUCER, tracer),
        publish=publish,
        router_producer=PRODUCER,
        policy=RetryPolicy(max_attempts=1, initial_backoff_s=0.0),
        tracer=tracer,
        linger_s=0.01,
        unavailable_pause_s=0.0,
        backoff=CircuitBackoff(0.001, 0.01),
    )


def _image_request(correlation_id: str, reference: ImageReference) -> RequestInference:
    image_input = ModelInput(
        name="chest_radiograph",
        value=1.0,
        unit="1",
        source_reference="ImagingStudy/s1",
        image=reference,
    )
    return make_request(
        model=SPEC.name,
        correlation_id=correlation_id,
        patient_pseudonym=f"p-{correlation_id}",
        inputs=[image_input],
    )


async def _serve(
    pipeline: InProcessPipeline, requests: list[RequestInference], published: Published
) -> None:
    """Accept ``requests`` before the batchers start (one batch), and wait for their outcomes."""
    for request in requests:
        await pipeline.accept(request)
    pipeline.start()
    try:
        async with asyncio.timeout(10):
            while len(published) < len(requests) or pipeline.in_flight:  # noqa: ASYNC110 -- polls what the pipeline fills
                await asyncio.sleep(0.01)
    finally:
        await pipeline.stop()


def _by_id(published: Published) -> dict[str, tuple[str, bytes | None, bytes, dict[str, str]]]:
    return {p[3][h.CORRELATION_ID]: p for p in published}


async def test_an_image_task_is_scored_with_its_prepared_tensor_and_reported() -> None:
    """The monolith fetches the study's instance, scores the tensor the worker's preprocessing
    makes of it, and publishes a report Bundle."""
    pacs, triton = FakePacs(), RecordingTriton()
    published: Published = []
    reference = pacs.store(1)
    pipeline = _pipeline(triton, pacs, published)
    await _serve(pipeline, [_image_request("c1", reference)], published)
    data = pacs.instances[reference.instance_uid]
    image_spec = SPEC.input("chest_radiograph").image
    assert image_spec is not None
    expected = image_tensor(data, image_spec).tensor
    assert len(triton.images) == 1
    np.testing.assert_array_equal(triton.images[0], expected[np.newaxis])
    ((topic, key, value, headers),) = published
    assert (topic, key, headers[h.CORRELATION_ID]) == (topics.REPORTS_DIAGNOSTIC, b"p-c1", "c1")
    bundle = json.loads(value)
    assert check_report_bundle(bundle) == []


async def test_a_pacs_outage_makes_the_batch_wait_then_succeed_once() -> None:
    """While the PACS answers 503 nothing is scored or published; the batch then waits behind
    the PACS readiness probe and is served whole once: one report per task, none twice."""
    pacs, triton = FakePacs(), RecordingTriton()
    published: Published = []
    requests = [_image_request("c1", pacs.store(1)), _image_request("c2", pacs.store(2))]
    attempts = MonolithSettings().pacs_max_attempts
    # Every retrieve's tries of the first preparation, then the first readiness probe.
    pacs.failures = [503] * (attempts * len(requests) + 1)
    pipeline = _pipeline(triton, pacs, published)
    await _serve(pipeline, requests, published)
    assert pacs.failures == []
    probes = [r for r in pacs.requests if r.url.path.endswith("/studies")]
    assert len(probes) >= 2  # the failed probe, then the one that let the batch through
    assert triton.shapes == [(2, 1, 64, 64)]
    assert sorted(p[3][h.CORRELATION_ID] for p in published) == ["c1", "c2"]
    assert {p[0] for p in published} == {topics.REPORTS_DIAGNOSTIC}


async def test_a_refused_image_fails_with_its_reason_and_its_neighbour_is_reported() -> None:
    """A CT study and a missing instance become InferenceFailed on the failed topic with the
    refusal's reason; the good radiograph in the same batch is scored alone and reported."""
    pacs, triton = FakePacs(), RecordingTriton()
    published: Published = []
    good = pacs.store(1)
    ct = pacs.store(3, modality="CT")
    missing = good.model_copy(update={"instance_uid": "1.2.3.4"})
    requests = [
        _image_request("good", good),
        _image_request("ct", ct),
        _image_request("missing", missing),
    ]
    pipeline = _pipeline(triton, pacs, published)
    await _serve(pipeline, requests, published)
    by_id = _by_id(published)
    assert len(published) == 3
    assert by_id["good"][0] == topics.REPORTS_DIAGNOSTIC
    assert triton.shapes == [(1, 1, 64, 64)]
    reasons = {}
    for cid in ("ct", "missing"):
        topic, _, value, _ = by_id[cid]
        assert topic == topics.INFERENCE_FAILED
        failed = InferenceFailed.model_validate_json(value)
        assert failed.error_kind == "invalid-input"
        reasons[cid] = failed.reason
    assert "Modality is not one the model reads" in reasons["ct"]
    assert "no such instance" in reasons["missing"]
