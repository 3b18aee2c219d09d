"""The worker's image inputs: WADO-RS retrieves from allowed PACS only, refusals and outages, and
a batch whose tasks reference images scored with each image's digest on its result."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from medmesh_cli.devstack.radiographs import synthetic_radiograph
from medmesh_cli.devstack.studies import StudyIdentity, build_radiograph, to_bytes
from medmesh_contracts.events import (
    ImageReference,
    InferenceCompleted,
    InferenceFailed,
    ModelInput,
    Producer,
    RunInference,
)
from medmesh_contracts.modelspec import ModelSpec, load_spec
from medmesh_inference.batching import ModelUnavailable, RetryPolicy, WorkerIdentity, score_tasks
from medmesh_inference.image_inputs import ImageInputs
from medmesh_inference.imaging import ImageRefusedError
from medmesh_inference.pacs import Pacs, PacsUnavailable
from medmesh_runtime.dicomweb import multipart_related
from tests.factories import make_request, make_task

SPEC: ModelSpec = load_spec(
    Path(__file__).resolve().parents[2] / "deploy" / "models" / "chest-opacity.yaml"
)
PACS_URL = "http://pacs.test/dicom-web"
IDENTITY = WorkerIdentity(
    Producer(service="inference", instance="t"), "chest-opacity-cnn", "1", "KIND_CPU"
)
NO_WAIT = RetryPolicy(max_attempts=1, initial_backoff_s=0.0)


def _now() -> datetime:
    return datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


class FakePacs:
    """A DICOMweb server holding instances by SOP instance UID, with scripted failures."""

    def __init__(self) -> None:
        self.instances: dict[str, bytes] = {}
        self.failures: list[int] = []  # statuses answered first, one per request
        self.requests: list[httpx.Request] = []

    def store(self, seed: int, *, modality: str = "DX") -> ImageReference:
        identity = StudyIdentity.new(f"worker-images-{seed}-{modality}")
        dataset = build_radiograph(synthetic_radiograph(seed, seed % 2 == 0), identity)
        dataset.Modality = modality
        self.instances[identity.sop_uid] = to_bytes(dataset)
        return ImageReference(
            dicomweb_url=PACS_URL,
            study_uid=identity.study_uid,
            series_uid=identity.series_uid,
            instance_uid=identity.sop_uid,
        )

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            return httpx.Response(self.failures.pop(0))
        if request.url.path.endswith("/studies"):
            return httpx.Response(200, json=[])
        data = self.instances.get(request.url.path.rsplit("/", 1)[-1])
        if data is None:
            return httpx.Response(404)
        body, content_type = multipart_related([data], "application/dicom")
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    def client(self, max_attempts: int = 1) -> Pacs:
        return Pacs(
            [PACS_URL + "/"],
            transport=httpx.MockTransport(self.handler),
            backoff_s=0.0,
            max_attempts=max_attempts,
        )


async def test_fetch_returns_the_instance_bytes() -> None:
    """A WADO-RS retrieve of an allowed PACS gives the stored Part 10 bytes, asking for DICOM."""
    pacs = FakePacs()
    reference = pacs.store(1)
    data = await pacs.client().fetch(reference, 10_000_000)
    assert data == pacs.instances[reference.instance_uid]
    assert 'type="application/dicom"' in pacs.requests[0].headers["accept"]


async def test_a_pacs_outside_the_allowlist_is_never_called() -> None:
    """A task naming another host is refused without any request."""
    pacs = FakePacs()
    reference = pacs.store(1).model_copy(update={"dicomweb_url": "http://elsewhere/dicom-web"})
    with pytest.raises(ImageRefusedError, match="not one this worker may call"):
        await pacs.client().fetch(reference, 10_000_000)
    assert pacs.requests == []


async def test_missing_and_oversized_instances_are_refused() -> None:
    """404 and an instance above the model's byte limit are refusals, not outages."""
    pacs = FakePacs()
    reference = pacs.store(1)
    missing = reference.model_copy(update={"instance_uid": "1.2.3"})
    with pytest.raises(ImageRefusedError, match="no such instance"):
        await pacs.client().fetch(missing, 10_000_000)
    with pytest.raises(ImageRefusedError, match="limit"):
        await pacs.client().fetch(reference, 1000)


async def test_transient_failures_are_retried_then_reported_unavailable() -> None:
    """A 503 then a good answer succeeds; three 503s in a row are PacsUnavailable."""
    pacs = FakePacs()
    reference = pacs.store(1)
    pacs.failures = [503]
    assert await pacs.client(max_attempts=3).fetch(reference, 10_000_000)
    pacs.failures = [503, 502, 429]
    with pytest.raises(PacsUnavailable):
        await pacs.client(max_attempts=3).fetch(reference, 10_000_000)


async def test_readiness_asks_each_allowed_pacs() -> None:
    """ready() is True when the PACS answers a QIDO-RS search, False on a 503."""
    pacs = FakePacs()
    client = pacs.client()
    assert await client.ready()
    pacs.failures = [503]
    assert not await client.ready()
    assert client.not_ready_because == "QIDO-RS answered 503"


def _image_task(correlation_id: str, reference: ImageReference) -> RunInference:
    image_input = ModelInput(
        name="chest_radiograph",
        value=1.0,
        unit="1",
        source_reference="ImagingStudy/s1",
        image=reference,
    )
    request = make_request(
        model="chest-opacity", correlation_id=correlation_id, inputs=[image_input]
    )
    return make_task(request=request)


class MeanTriton:
    """Scores each image as (1 - mean, mean) of its pixels: a stand-in that reads the tensor."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        images = inputs["IMAGE"].astype(np.float32)
        self.shapes.append(images.shape)
        mean = images.reshape(images.shape[0], -1).mean(axis=1, keepdims=True)
        return {"PROBABILITIES": np.concatenate([1 - mean, mean], axis=1).astype(np.float32)}


async def test_a_batch_of_images_is_scored_with_digests_and_a_refusal_fails_alone() -> None:
    """Two studies are fetched, preprocessed and scored in one call, each result carrying its
    instance's SHA-256; a CT study in the same batch fails as invalid-input with the reason."""
    pacs = FakePacs()
    first, second, ct = pacs.store(1), pacs.store(2), pacs.store(3, modality="CT")
    tasks = [_image_task("c1", first), _image_task("c2", ct), _image_task("c3", second)]
    images, times = await ImageInputs(SPEC, pacs.client()).prepare(tasks)
    triton = MeanTriton()
    outcomes = await score_tasks(tasks, SPEC, triton.infer, IDENTITY, NO_WAIT, _now, None, images)
    assert triton.shapes == [(2, 1, 64, 64)]
    assert times.images == 2
    completed = [o for o in outcomes if isinstance(o, InferenceCompleted)]
    assert [o.correlation_id for o in completed] == ["c1", "c3"]
    for outcome, reference in zip(completed, [first, second], strict=True):
        expected = hashlib.sha256(pacs.instances[reference.instance_uid]).hexdigest()
        assert outcome.input_digests == {"chest_radiograph": expected}
    (failed,) = [o for o in outcomes if isinstance(o, InferenceFailed)]
    assert failed.correlation_id == "c2"
    assert failed.error_kind == "invalid-input"
    assert "Modality is not one the model reads" in failed.reason


async def test_a_pacs_outage_makes_the_whole_batch_wait() -> None:
    """A PACS that stays unavailable raises ModelUnavailable: no task is failed, the worker
    rewinds the batch and waits behind its circuit breaker."""
    pacs = FakePacs()
    tasks = [_image_task("c1", pacs.store(1))]
    pacs.failures = [503, 503, 503]
    with pytest.raises(ModelUnavailable, match="PACS unavailable"):
        await ImageInputs(SPEC, pacs.client(max_attempts=3)).prepare(tasks)


async def test_a_task_without_its_image_reference_fails_as_invalid_input() -> None:
    """An image input with no reference (or none prepared) is a poison task, never scored."""
    task = _image_task("c1", FakePacs().store(1))
    bare = task.request.inputs[0].model_copy(update={"image": None})
    task = make_task(request=task.request.model_copy(update={"inputs": (bare,)}))
    images, _ = await ImageInputs(SPEC, FakePacs().client()).prepare([task])
    (outcome,) = await score_tasks(
        [task], SPEC, MeanTriton().infer, IDENTITY, NO_WAIT, _now, None, images
    )
    assert isinstance(outcome, InferenceFailed)
    assert "references none" in outcome.reason
