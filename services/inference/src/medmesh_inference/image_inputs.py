"""A batch's images, fetched from the PACS and preprocessed before its Triton call.

For each task whose version feeds an image tensor, the referenced instance is fetched
(``pacs.Pacs``, a few at a time) and turned into its tensor (``imaging.image_tensor``, in a thread:
decoding and resizing are CPU work that must not stall the event loop, and the heartbeats).
A refused image becomes the task's ``ImageRefusedError``, which ``tensors.input_rows`` turns into
an invalid-input failure with its reason; a PACS that stays unavailable raises
``ModelUnavailable`` for the whole batch, which the worker rewinds and waits out like Triton.

The start-up pieces both topologies share (the worker's ``app`` and the monolith's ``startup``)
are here too: the PACS client of the settings (``pacs_client``), a model's image inputs
(``ImageInputs.for_model``), the readiness probe that asks the PACS beside Triton
(``servable_probe``) and a batch's preparation in its ``inference.images`` span
(``prepare_in_span``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry.trace import Tracer

from medmesh_contracts.events import ImageReference, RunInference
from medmesh_contracts.modelspec import ImageSpec, ModelSpec
from medmesh_inference.batching import Available, ModelUnavailable
from medmesh_inference.imaging import ImageRefusedError, PreparedImage, image_tensor
from medmesh_inference.pacs import Pacs, PacsUnavailable
from medmesh_inference.settings import WorkerSettings
from medmesh_inference.tensors import Images


@dataclass
class PrepareTimes:
    """Where a batch's image time went (summed over its images), for its span."""

    images: int = 0
    fetch_ms: float = 0.0
    preprocess_ms: float = 0.0


@dataclass
class ImageInputs:
    """Fetches and prepares the images of a model's tasks."""

    spec: ModelSpec
    pacs: Pacs
    concurrency: int = 4
    _slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_model(cls, spec: ModelSpec, pacs: Pacs) -> ImageInputs | None:
        """The model's image inputs from ``pacs``; None when no version feeds an image."""
        images = cls(spec, pacs)
        return images if images.needed else None

    @property
    def needed(self) -> bool:
        """Whether any version of the model feeds an image tensor."""
        return any(tensor.feed == "image" for v in self.spec.versions for tensor in v.triton.inputs)

    async def prepare(self, tasks: Sequence[RunInference]) -> tuple[list[Images], PrepareTimes]:
        """Each task's images by input name (a refused one as its ImageRefusedError)."""
        times = PrepareTimes()
        jobs = [self._task_images(task, times) for task in tasks]
        try:
            return list(await asyncio.gather(*jobs)), times
        except PacsUnavailable as exc:
            raise ModelUnavailable(f"PACS unavailable: {exc}") from exc

    async def _task_images(self, task: RunInference, times: PrepareTimes) -> Images:
        wanted = self._image_inputs(task)
        given = {i.name: i.image for i in task.request.inputs if i.image is not None}
        images: dict[str, PreparedImage | ImageRefusedError] = {}
        for name, image in wanted.items():
            reference = given.get(name)
            if reference is None:
                continue  # input_rows says the reference is missing
            try:
                images[name] = await self._prepare(reference, image, times)
            except ImageRefusedError as exc:
                images[name] = exc
        return images

    def _image_inputs(self, task: RunInference) -> dict[str, ImageSpec]:
        """The image inputs the task's version feeds (none for an unknown version)."""
        try:
            version = self.spec.version(task.model_version)
        except KeyError:
            return {}
        found: dict[str, ImageSpec] = {}
        for tensor in version.triton.inputs:
            for name in tensor.inputs if tensor.feed == "image" else ():
                image = self.spec.input(name).image
                if image is not None:
                    found[name] = image
        return found

    async def _prepare(
        self, reference: ImageReference, image: ImageSpec, times: PrepareTimes
    ) -> PreparedImage:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:
            started = time.perf_counter()
            data = await self.pacs.fetch(reference, image.max_instance_bytes)
            fetched = time.perf_counter()
            prepared = await asyncio.to_thread(image_tensor, data, image)
        times.images += 1
        times.fetch_ms += (fetched - started) * 1000
        times.preprocess_ms += (time.perf_counter() - fetched) * 1000
        return prepared


def pacs_client(settings: WorkerSettings) -> Pacs:
    """The PACS client the settings allow: MEDMESH_PACS_URLS, MEDMESH_PACS_TIMEOUT_MS and
    MEDMESH_PACS_MAX_ATTEMPTS."""
    return Pacs(
        settings.allowed_pacs_urls,
        timeout_s=settings.pacs_timeout_ms / 1000,
        max_attempts=settings.pacs_max_attempts,
    )


def servable_probe(triton_ready: Available, images: ImageInputs | None) -> Available:
    """Whether a version can be served: Triton serves it and, for an image model, the PACS
    answers (an image model waits for its PACS as for Triton)."""

    async def servable() -> bool:
        return await triton_ready() and (images is None or await images.pacs.ready())

    return servable


async def prepare_in_span(
    images: ImageInputs | None, tasks: Sequence[RunInference], tracer: Tracer
) -> list[Images] | None:
    """The batch's images from the PACS (None when the model reads none), in a child span of
    the batch's that says where the time went; ModelUnavailable while the PACS is away."""
    if images is None:
        return None
    with tracer.start_as_current_span("inference.images") as span:
        prepared, times = await images.prepare(tasks)
        span.set_attributes(
            {
                "medmesh.images": times.images,
                "medmesh.fetch_ms": round(times.fetch_ms, 3),
                "medmesh.preprocess_ms": round(times.preprocess_ms, 3),
            }
        )
    return prepared
