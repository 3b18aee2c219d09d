"""One DICOM instance to one input tensor, as a model spec's ``image`` input says (no I/O).

The worker fetches the instance's bytes from the PACS (the claim check: the task carries only
the study, series and instance UIDs) and calls ``image_tensor``; preprocessing runs here, beside
the GPU worker, so pixels cross the network once (PACS to worker) and never ride Kafka.

``image_tensor`` refuses, with ``ImageRefusedError`` and a reason that names attributes but never
their values (no patient data), an instance that is too large (also once inflated), not DICOM,
too costly to parse, without pixel data, outside the spec's series criteria (modality, body
part, SOP class, size), not grayscale, whose pixels cannot be decoded, or whose rescale gives
values out of range. The steps are ``ImagePreprocessing``'s, in its order.

The bytes come from outside (any PACS an operator allows), so parsing is bounded: pydicom reads
through a reader that stops it past a budget of reads (some malformed sequences make pydicom's
parser quadratic), deflated data sets are inflated here up to the model's byte limit (pydicom
would inflate without one), and memory is a few copies of one frame (tests/unit/test_dicom_fuzz.py
mutates valid instances to check all of it).
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array as decode_pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medmesh_contracts.modelspec import ImagePreprocessing, ImageSpec, SeriesCriteria, WindowSpec

# pydicom checks each value it converts against its VR and logs a warning per invalid value that
# quotes the value: an invalid PatientName would reach the worker's log, and an instance with
# thousands of malformed values would flood it (seconds in the log redaction, found by the fuzz).
# The values this module reads are checked here, and refusals never quote them.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

FloatImage = npt.NDArray[np.float64]
# More pixels than this in one frame is refused before decoding (e.g. a mammogram's 4096 x 5000
# fits; a whole-slide image does not belong in one tensor).
MAX_FRAME_PIXELS = 50_000_000
# Rows and Columns are US (at most 65535); a file that writes them with a wider VR is refused, which
# also bounds the resize's work per axis.
MAX_SIDE = 65535
# pydicom reads an element in about three calls; a radiograph has hundreds of elements. Past this
# many reads, or past PARSE_READ_FACTOR times the instance's bytes read, the structure is refused
# (it would take seconds to minutes: nested undefined-length items are rescanned to the end).
MAX_PARSE_READS = 20_000
PARSE_READ_FACTOR = 4
# Rescaled values beyond this magnitude are refused: no modality has them, and windowing them in
# float64 could overflow to infinity.
MAX_MODALITY_VALUE = 1e100
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
PREAMBLE = 128
LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


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
    dataset = _parse(data, image.max_instance_bytes)
    _check_series(dataset, image.series)
    pixels = _stored_pixels(dataset)
    modality = _modality_range(dataset, pixels)
    tensor = preprocess(pixels, modality, _inverted(dataset), image.preprocessing)
    return PreparedImage(
        tensor=tensor,
        sha256=hashlib.sha256(data).hexdigest(),
        rows=int(pixels.shape[0]),
        columns=int(pixels.shape[1]),
    )


def preprocess(
    stored: npt.NDArray[Any],
    modality: tuple[float, float, float, float],
    inverted: bool,
    steps: ImagePreprocessing,
) -> npt.NDArray[np.float32]:
    """Rescale, window, invert, resize, normalise and lay out one frame of stored values.

    ``modality`` is (slope, intercept, lowest stored value, highest stored value).
    """
    slope, intercept, lowest, highest = modality
    # One float64 copy of the frame, worked in place: a 50-megapixel frame costs 400 MB, not
    # a few times that.
    values: FloatImage = np.multiply(stored, slope, dtype=np.float64)
    values += intercept
    window = steps.window or _stored_range_window(slope, intercept, lowest, highest)
    scaled = _window_in_place(values, window)
    if inverted:
        np.subtract(1.0, scaled, out=scaled)
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
    return _window_in_place(np.array(values, dtype=np.float64), window)


def _window_in_place(values: FloatImage, window: WindowSpec) -> FloatImage:
    values -= window.center - 0.5
    values /= window.width - 1
    values += 0.5
    return np.clip(values, 0.0, 1.0, out=values)


def area_resize(image: FloatImage, rows: int, columns: int) -> FloatImage:
    """``image`` resized to ``rows`` x ``columns``, each output pixel the area-weighted mean of
    the input pixels it covers (a block mean when the sizes divide; fractional edges weighted)."""
    return _area_mean(_area_mean(image, rows).T, columns).T


def _area_mean(image: FloatImage, target: int) -> FloatImage:
    """``image`` resized along its first axis to ``target`` cells by area averaging.

    Output cell i covers input [i * scale, (i + 1) * scale): the whole input cells inside it are
    summed (``np.add.reduceat``), then the fractional cells at its two edges are corrected for.
    The work and memory are in proportion to the input plus the output, never their product (a
    dense weight matrix of 65535 x 4096 would be 2 GB).
    """
    size = image.shape[0]
    edges = np.arange(target + 1, dtype=np.float64) * (size / target)
    edges[-1] = size
    whole = np.floor(edges).astype(np.intp)
    fraction = edges - whole
    starts = whole[:-1]
    sums: FloatImage = np.add.reduceat(image, starts, axis=0)
    # reduceat gives image[start] where a cell has no whole input cell (upsampling): it has 0.
    sums[np.append(starts[:-1] == starts[1:], False)] = 0.0
    # The edge corrections one at a time, in place: two output-sized arrays at most.
    lower = image[starts]
    lower *= fraction[:-1, np.newaxis]
    sums -= lower
    del lower
    upper = image[np.minimum(whole[1:], size - 1)]
    upper *= fraction[1:, np.newaxis]
    sums += upper
    del upper
    sums /= (edges[1:] - edges[:-1])[:, np.newaxis]
    return sums


def _stored_range_window(
    slope: float, intercept: float, lowest: float, highest: float
) -> WindowSpec:
    """The window that maps the whole stored bit range (rescaled) to [0, 1]."""
    ends = sorted((lowest * slope + intercept, highest * slope + intercept))
    width = max(ends[1] - ends[0] + 1, 2.0)
    return WindowSpec(center=ends[0] + width / 2, width=width)


class _ParseBudgetExceededError(Exception):
    """pydicom read more, or more often, than any well-formed instance of this size needs."""


class _BudgetedReader(io.BytesIO):
    """The instance's bytes, for pydicom, that refuse to be read past a budget of calls and
    bytes (once spent, every later read fails too, so a caught error cannot reset it)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.calls_left = MAX_PARSE_READS
        self.bytes_left = PARSE_READ_FACTOR * len(data) + 65536

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self.calls_left -= 1
        self.bytes_left -= len(chunk)
        if self.calls_left < 0 or self.bytes_left < 0:
            raise _ParseBudgetExceededError
        return chunk


def _parse(data: bytes, max_bytes: int) -> Dataset:
    body = _inflated(data, max_bytes)
    try:
        dataset = pydicom.dcmread(_BudgetedReader(body))
    except _ParseBudgetExceededError as exc:
        raise ImageRefusedError("the instance's structure is too costly to parse") from exc
    except Exception as exc:  # any failure to parse means "not DICOM"; pydicom raises many kinds
        raise ImageRefusedError(f"not a readable DICOM instance ({type(exc).__name__})") from exc
    _check_sequences(dataset)
    return dataset


def _inflated(data: bytes, max_bytes: int) -> bytes:
    """``data``, or if its transfer syntax is Deflated Explicit VR Little Endian, the same file
    with the data set inflated and the syntax Explicit VR Little Endian (which it then is).

    pydicom would inflate without a limit (a 32 MiB instance can inflate to 32 GiB), and then
    parse outside the budgeted reader; inflated here, the model's byte limit applies.
    """
    found = _transfer_syntax(data)
    if found is None:
        return data  # pydicom refuses it, or guesses an uncompressed syntax (no meta)
    syntax, start, end, body = found
    if syntax != DeflatedExplicitVRLittleEndian:
        return data
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[body:], max_bytes + 1)
    except zlib.error as exc:
        raise ImageRefusedError("the instance's deflated data set cannot be inflated") from exc
    if len(inflated) > max_bytes:
        raise ImageRefusedError(
            f"the instance inflates to more than the model's limit of {max_bytes} bytes"
        )
    # The new UID, NUL-padded to the old value's length: the file meta's group length holds.
    explicit = ExplicitVRLittleEndian.encode().ljust(end - start, b"\0")
    return data[:start] + explicit + data[end:body] + inflated


def _transfer_syntax(data: bytes) -> tuple[str, int, int, int] | None:
    """(TransferSyntaxUID, its value's start and end offsets, the data set's offset) from the
    file meta (always explicit VR little endian, PS3.10 7.1), or None without one."""
    if data[PREAMBLE : PREAMBLE + 4] != b"DICM":
        return None
    offset, syntax = PREAMBLE + 4, None
    while offset + 12 <= len(data):
        group, element, vr = struct.unpack_from("<HH2s", data, offset)
        if group != 2:
            break
        if vr in LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        if element == 0x0010:
            value = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
            syntax = (value, start, start + length)
        offset = start + length
    if syntax is None or offset > len(data):
        return None
    return (*syntax, offset)


def _check_sequences(dataset: Dataset) -> None:
    """ImageRefusedError for an attribute the standard does not make a sequence, written as one:
    reading it would parse its value as items (slow, or failing) where a number or text is due."""
    # keys(), not the dataset itself: iterating a Dataset converts every element it yields.
    for tag in dataset.keys():  # noqa: SIM118 -- the tags alone, without converting their values
        if not dictionary_has_tag(tag) or dictionary_VR(tag) == "SQ":
            continue
        # keep_deferred: else an empty raw element is converted here (and an unknown VR raises).
        element = dataset.get_item(tag, keep_deferred=True)
        if element is not None and element.VR == "SQ":
            keyword = keyword_for_tag(tag) or "attribute"
            raise ImageRefusedError(f"the instance's {keyword} is a sequence, not a value")


def _value(dataset: Dataset, keyword: str) -> Any:
    """``dataset.get(keyword)``; pydicom converts the element when it is first read, and a
    malformed one fails then (OverflowError for an IS of 1e999, OSError for a bad item)."""
    try:
        return dataset.get(keyword)
    except Exception as exc:  # conversion fails in many ways: each is an unreadable attribute
        raise ImageRefusedError(f"the instance's {keyword} cannot be read") from exc


def _text(dataset: Dataset, keyword: str) -> str | None:
    value: Any = _value(dataset, keyword)
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
    value: Any = _value(dataset, keyword)
    if value is None:
        raise ImageRefusedError(f"the instance has no {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageRefusedError(f"the instance's {keyword} is not an integer") from exc


def _stored_pixels(dataset: Dataset) -> npt.NDArray[Any]:
    """The first frame's stored values, [rows, columns] as decoded (an integer type)."""
    if "PixelData" not in dataset:
        raise ImageRefusedError("the instance has no pixel data")
    photometric = _text(dataset, "PhotometricInterpretation")
    if photometric not in GRAYSCALE or _int(dataset, "SamplesPerPixel") != 1:
        raise ImageRefusedError(
            "the image is not grayscale (MONOCHROME1 or MONOCHROME2, one sample)"
        )
    rows, columns = _int(dataset, "Rows"), _int(dataset, "Columns")
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise ImageRefusedError(f"the image is {rows} x {columns}, more than {MAX_SIDE} a side")
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
    if not np.issubdtype(array.dtype, np.integer):
        raise ImageRefusedError("the pixel data is not of integers")
    return array


def _modality_range(
    dataset: Dataset, pixels: npt.NDArray[Any]
) -> tuple[float, float, float, float]:
    """(RescaleSlope, RescaleIntercept, lowest, highest stored value) of the instance.

    ImageRefusedError unless the stored range and the pixels present both rescale to values of
    at most ``MAX_MODALITY_VALUE`` in magnitude (so windowing stays finite).
    """
    bits = _int(dataset, "BitsStored")
    if not 1 <= bits <= 64:
        raise ImageRefusedError("the instance's BitsStored is not between 1 and 64")
    signed = _value(dataset, "PixelRepresentation") == 1
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = (
        _float(dataset, "RescaleSlope", 1.0),
        _float(dataset, "RescaleIntercept", 0.0),
    )
    if slope == 0:
        raise ImageRefusedError("the instance's RescaleSlope is 0")
    ends = (lowest, highest, int(pixels.min()), int(pixels.max()))
    if any(abs(float(end) * slope + intercept) > MAX_MODALITY_VALUE for end in ends):
        raise ImageRefusedError(
            "the instance's RescaleSlope and RescaleIntercept give values out of range"
        )
    return slope, intercept, float(lowest), float(highest)


def _float(dataset: Dataset, keyword: str, default: float) -> float:
    value: Any = _value(dataset, keyword)
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
