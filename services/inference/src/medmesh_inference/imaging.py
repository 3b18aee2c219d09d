"""One DICOM instance to one input tensor, as a model spec's ``image`` input says (no I/O).

The worker fetches the instance's bytes from the PACS (the claim check: the task carries only
the study, series and instance UIDs) and calls ``image_tensor``; preprocessing runs here, beside
the GPU worker, so pixels cross the network once (PACS to worker) and never ride Kafka.

``image_tensor`` refuses, with ``ImageRefusedError`` and a reason that names attributes but never
their values (no patient data), an instance that is too large, not DICOM, without pixel data,
outside the spec's series criteria (modality, body part, SOP class, size), not grayscale, or
whose pixels cannot be decoded. The steps are ``ImagePreprocessing``'s, in its order.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array as decode_pixels

from medmesh_contracts.modelspec import ImagePreprocessing, ImageSpec, SeriesCriteria, WindowSpec

FloatImage = npt.NDArray[np.float64]
# More pixels than this in one frame is refused before decoding (e.g. a mammogram's 4096 x 5000
# fits; a whole-slide image does not belong in one tensor).
MAX_FRAME_PIXELS = 50_000_000
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


class ImageRefusedError(ValueError):
    """The instance cannot feed the model; the message says why without any DICOM value that
    could identify the patient."""


@dataclass(frozen=True)
class PreparedImage:
    """The input tensor of one instance, and the SHA-256 of the bytes it was made from (what the
    report's provenance names as the pixels read)."""

    tensor: npt.NDArray[np.float32]
    sha256: str
    rows: int
    columns: int


def image_tensor(data: bytes, image: ImageSpec) -> PreparedImage:
    """The tensor ``image.preprocessing`` makes from one DICOM instance's bytes (Part 10 file)."""
    if len(data) > image.max_instance_bytes:
        raise ImageRefusedError(
            f"the instance has {len(data)} bytes, more than the model's limit of"
            f" {image.max_instance_bytes}"
        )
    dataset = _parse(data)
    _check_series(dataset, image.series)
    pixels = _stored_pixels(dataset)
    tensor = preprocess(pixels, _modality_range(dataset), _inverted(dataset), image.preprocessing)
    return PreparedImage(
        tensor=tensor,
        sha256=hashlib.sha256(data).hexdigest(),
        rows=int(pixels.shape[0]),
        columns=int(pixels.shape[1]),
    )


def preprocess(
    stored: FloatImage,
    modality: tuple[float, float, float, float],
    inverted: bool,
    steps: ImagePreprocessing,
) -> npt.NDArray[np.float32]:
    """Rescale, window, invert, resize, normalise and lay out one frame of stored values.

    ``modality`` is (slope, intercept, lowest stored value, highest stored value).
    """
    slope, intercept, lowest, highest = modality
    values = stored * slope + intercept
    window = steps.window or _stored_range_window(slope, intercept, lowest, highest)
    scaled = linear_window(values, window)
    if inverted:
        scaled = 1.0 - scaled
    resized = area_resize(scaled, steps.rows, steps.columns)
    if steps.mean is not None and steps.std is not None:
        resized = (resized - steps.mean) / steps.std
    if steps.layout == "channels-first":
        laid_out = resized[np.newaxis, :, :]
    else:
        laid_out = resized[:, :, np.newaxis]
    return np.ascontiguousarray(laid_out, dtype=np.float32)


def linear_window(values: FloatImage, window: WindowSpec) -> FloatImage:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), to [0, 1] instead of an output range."""
    scaled = (values - (window.center - 0.5)) / (window.width - 1) + 0.5
    return np.clip(scaled, 0.0, 1.0)


def area_resize(image: FloatImage, rows: int, columns: int) -> FloatImage:
    """``image`` resized to ``rows`` x ``columns``, each output pixel the area-weighted mean of
    the input pixels it covers (a block mean when the sizes divide; fractional edges weighted)."""
    resized: FloatImage = (
        _area_weights(image.shape[0], rows) @ image @ _area_weights(image.shape[1], columns).T
    )
    return resized


def _area_weights(size: int, target: int) -> FloatImage:
    """The (target x size) matrix whose row i averages the input cells output cell i covers."""
    weights: FloatImage = np.zeros((target, size))
    scale = size / target
    for i in range(target):
        start, end = i * scale, (i + 1) * scale
        for j in range(math.floor(start), min(size, math.ceil(end))):
            weights[i, j] = min(end, j + 1) - max(start, j)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights


def _stored_range_window(
    slope: float, intercept: float, lowest: float, highest: float
) -> WindowSpec:
    """The window that maps the whole stored bit range (rescaled) to [0, 1]."""
    ends = sorted((lowest * slope + intercept, highest * slope + intercept))
    width = max(ends[1] - ends[0] + 1, 2.0)
    return WindowSpec(center=ends[0] + width / 2, width=width)


def _parse(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # any failure to parse means "not DICOM"; pydicom raises many kinds
        raise ImageRefusedError(f"not a readable DICOM instance ({type(exc).__name__})") from exc


def _text(dataset: Dataset, keyword: str) -> str | None:
    value: Any = dataset.get(keyword)
    return None if value is None else str(value).strip().upper()


def _check_series(dataset: Dataset, criteria: SeriesCriteria) -> None:
    """ImageRefusedError unless the instance's own header meets the spec's series criteria."""
    checks = (
        ("Modality", criteria.modalities),
        ("BodyPartExamined", criteria.body_parts),
        ("SOPClassUID", criteria.sop_classes),
    )
    for keyword, allowed in checks:
        if allowed and _text(dataset, keyword) not in {a.upper() for a in allowed}:
            raise ImageRefusedError(f"the instance's {keyword} is not one the model reads")
    rows, columns = _int(dataset, "Rows"), _int(dataset, "Columns")
    if rows < criteria.min_rows or columns < criteria.min_columns:
        raise ImageRefusedError(
            f"the image is {rows} x {columns}, smaller than the model's"
            f" {criteria.min_rows} x {criteria.min_columns}"
        )


def _int(dataset: Dataset, keyword: str) -> int:
    value: Any = dataset.get(keyword)
    if value is None:
        raise ImageRefusedError(f"the instance has no {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ImageRefusedError(f"the instance's {keyword} is not an integer") from exc


def _stored_pixels(dataset: Dataset) -> FloatImage:
    """The first frame's stored values, as float64 [rows, columns]."""
    if "PixelData" not in dataset:
        raise ImageRefusedError("the instance has no pixel data")
    photometric = _text(dataset, "PhotometricInterpretation")
    if photometric not in GRAYSCALE or _int(dataset, "SamplesPerPixel") != 1:
        raise ImageRefusedError(
            "the image is not grayscale (MONOCHROME1 or MONOCHROME2, one sample)"
        )
    rows, columns = _int(dataset, "Rows"), _int(dataset, "Columns")
    if rows * columns > MAX_FRAME_PIXELS:
        raise ImageRefusedError(f"a frame of {rows} x {columns} pixels is too large to read")
    try:
        # Only the first frame is decoded: a multi-frame instance's other frames would cost
        # memory in proportion to their count, which MAX_FRAME_PIXELS does not bound.
        array = decode_pixels(dataset, index=0)
    except Exception as exc:  # decoding fails in many ways (syntax, lengths, codec): all refused
        raise ImageRefusedError(f"the pixel data cannot be decoded ({type(exc).__name__})") from exc
    if array.shape != (rows, columns):
        raise ImageRefusedError("the pixel data does not match Rows and Columns")
    return np.asarray(array, dtype=np.float64)


def _modality_range(dataset: Dataset) -> tuple[float, float, float, float]:
    """(RescaleSlope, RescaleIntercept, lowest, highest stored value) of the instance."""
    bits = _int(dataset, "BitsStored")
    signed = dataset.get("PixelRepresentation", 0) == 1
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = (
        _float(dataset, "RescaleSlope", 1.0),
        _float(dataset, "RescaleIntercept", 0.0),
    )
    if slope == 0:
        raise ImageRefusedError("the instance's RescaleSlope is 0")
    return slope, intercept, float(lowest), float(highest)


def _float(dataset: Dataset, keyword: str, default: float) -> float:
    value: Any = dataset.get(keyword)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ImageRefusedError(f"the instance's {keyword} is not a number") from exc
    if not math.isfinite(number):
        raise ImageRefusedError(f"the instance's {keyword} is not finite")
    return number


def _inverted(dataset: Dataset) -> bool:
    return _text(dataset, "PhotometricInterpretation") == "MONOCHROME1"
