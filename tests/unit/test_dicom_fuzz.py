"""Property-based fuzzing of medmesh_inference.imaging.image_tensor, the worker's DICOM parsing
and preprocessing, on mutated valid instances: it returns the spec's tensor or refuses with
ImageRefusedError, nothing else escapes, each instance finishes in bounded time and memory, and
no refusal carries patient data.

The short form (300 examples) runs with the unit tests; MEDMESH_FUZZ_EXAMPLES asks for more
(``make fuzz``). Mutations: byte flips, insertions, deletions, overwrites and truncations (anywhere,
in the header, in the pixel data), edited data elements (sizes, bit depths, photometric
interpretation, rescale, window, frames, series criteria; wrong VRs and lying lengths; removed or
added), other transfer syntaxes over the same bytes, pixel data shorter or longer than declared,
and bytes that are not DICOM at all. The regression tests below pin what the fuzz found.
"""

from __future__ import annotations

import os
import re
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from medmesh_cli.devstack.radiographs import synthetic_radiograph
from medmesh_cli.devstack.studies import StudyIdentity, build_radiograph, to_bytes
from medmesh_contracts.modelspec import ImagePreprocessing, ImageSpec, SeriesCriteria, load_spec
from medmesh_inference.imaging import (
    MAX_FRAME_PIXELS,
    ImageRefusedError,
    PreparedImage,
    image_tensor,
)

ROOT = Path(__file__).resolve().parents[2]
# The production spec.
SPEC_PATH = ROOT / "deploy" / "models" / "chest-opacity.yaml"
_IMAGE = load_spec(SPEC_PATH).input("chest_radiograph").image
assert _IMAGE is not None
IMAGE: ImageSpec = _IMAGE
STEPS = IMAGE.preprocessing
TENSOR_SHAPE = (
    (1, STEPS.rows, STEPS.columns)
    if STEPS.layout == "channels-first"
    else (STEPS.rows, STEPS.columns, 1)
)
FUZZ_EXAMPLES = int(os.environ.get("MEDMESH_FUZZ_EXAMPLES", "300"))
# A refused or accepted instance takes milliseconds; pydicom's parse is stopped past its read
# budget in about a second on this project's slowest machines. Beyond this is a hang.
EXAMPLE_SECONDS = 10.0
PATIENT = StudyIdentity.new("dicom-fuzz")

LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR"}
LONG_LENGTH_VRS |= {b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF


def memory_limit(data: bytes, image: ImageSpec) -> int:
    """The most memory one instance may take: copies of its bytes, plus 16 bytes for each pixel
    its bytes could hold (1 bit each, at most MAX_FRAME_PIXELS: the decoded frame and one
    float64 copy), plus 32 bytes for each output pixel (the resize's float64 arrays), plus
    16 MiB for pydicom and numpy's fixed costs."""
    frame = 16 * min(MAX_FRAME_PIXELS, 8 * len(data))
    output = 32 * image.preprocessing.rows * image.preprocessing.columns
    return 16 * 2**20 + 4 * len(data) + frame + output


def _radiograph(seed: int, opacity: bool) -> bytes:
    dataset = build_radiograph(synthetic_radiograph(seed, opacity), PATIENT)
    return to_bytes(dataset)


def _variant(edit: Callable[[Dataset], None], syntax: UID | None = None) -> bytes:
    dataset = build_radiograph(synthetic_radiograph(5, True), PATIENT)
    edit(dataset)
    if syntax is not None:
        dataset.file_meta.TransferSyntaxUID = syntax
    return to_bytes(dataset)


def _monochrome1_rescaled(dataset: Dataset) -> None:
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.RescaleSlope, dataset.RescaleIntercept = 0.5, -1024


def _two_frames(dataset: Dataset) -> None:
    dataset.NumberOfFrames = 2
    dataset.PixelData = dataset.PixelData + dataset.PixelData


def _unchanged(dataset: Dataset) -> None:
    """No edit: the instance as the devstack builds it."""


# Valid instances to mutate; the explicit VR little endian ones (the first three) also take
# element edits, which walk their top-level elements.
EXPLICIT_SEEDS = [
    _radiograph(5, True),
    _variant(_monochrome1_rescaled),
    _variant(_two_frames),
]
OTHER_SEEDS = [
    _variant(_unchanged, ImplicitVRLittleEndian),
    _variant(_unchanged, ExplicitVRBigEndian),
    _variant(_unchanged, DeflatedExplicitVRLittleEndian),
]


def _elements(data: bytes) -> dict[int, tuple[int, int]]:
    """The top-level data set elements of an explicit VR little endian Part 10 file, tag ->
    (start, end) offsets. The seeds have no undefined lengths; an earlier edit may have written
    one (or a lying length), and then the walk ends there, that element running to the end."""
    (meta_length,) = struct.unpack_from("<I", data, 140)
    offset, found = 144 + meta_length, {}
    while offset + 12 <= len(data):
        group, element, vr = struct.unpack_from("<HH2s", data, offset)
        if vr in LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            header = 8
        end = min(len(data), offset + header + length)
        found[group << 16 | element] = (offset, end)
        offset = end
    return found


def _element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` may lie about the value's."""
    if len(value) % 2:
        value += b"\0" if vr in LONG_LENGTH_VRS or vr == b"UI" else b" "
    declared = len(value) if length is None else length
    if vr in LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, declared) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, declared & 0xFFFF) + value


def set_element(
    data: bytes, keyword: str, vr: bytes, value: bytes | None, length: int | None = None
) -> bytes:
    """``data`` with its top-level ``keyword`` element replaced (added in tag order if absent;
    removed when ``value`` is None)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    elements = _elements(data)
    new = b"" if value is None else _element(tag, vr, value, length)
    if tag in elements:
        start, end = elements[tag]
        return data[:start] + new + data[end:]
    start = min((s for t, (s, _) in elements.items() if t > tag), default=len(data))
    return data[:start] + new + data[start:]


def set_transfer_syntax(data: bytes, uid: bytes) -> bytes:
    """``data`` with its file meta's TransferSyntaxUID replaced and the group length kept
    right, the data set's bytes untouched (so they no longer match the syntax)."""
    (meta_length,) = struct.unpack_from("<I", data, 140)
    key = struct.pack("<HH2s", 0x0002, 0x0010, b"UI")
    start = data.index(key, 144)
    (length,) = struct.unpack_from("<H", data, start + 6)
    new = _element(0x00020010, b"UI", uid)
    meta_length += len(new) - (8 + length)
    patched = data[:start] + new + data[start + 8 + length :]
    return patched[:140] + struct.pack("<I", meta_length) + patched[144:]


def us(*values: int) -> bytes:
    """US values, little endian."""
    return struct.pack(f"<{len(values)}H", *values)


def text(value: str) -> bytes:
    """A string value's bytes."""
    return value.encode("latin-1")


# Hostile values per element: (VR as written, value). Sizes and bit depths in range and out of
# it, with wider or textual VRs than the standard's, empty, multi-valued, NaN and infinities.
SIZES = [us(0), us(1), us(255), us(256), us(512), us(65535), us(256, 256), b"", b"\x01"]
EDITS: dict[str, list[tuple[bytes, bytes]]] = {
    "Rows": [(b"US", v) for v in SIZES]
    + [(b"UL", struct.pack("<I", 70000)), (b"IS", b"1e999"), (b"SS", b"\xff\xff")],
    "Columns": [(b"US", v) for v in SIZES]
    + [(b"UL", struct.pack("<I", 200_000)), (b"DS", b"NaN"), (b"IS", b"-256")],
    "BitsAllocated": [(b"US", us(v)) for v in (0, 1, 7, 8, 12, 16, 17, 32, 64, 65535)]
    + [(b"US", b""), (b"IS", b"1e999")],
    "BitsStored": [(b"US", us(v)) for v in (0, 1, 8, 12, 15, 16, 17, 33, 64, 65535)]
    + [(b"US", us(12, 16)), (b"IS", b"abc")],
    "HighBit": [(b"US", us(v)) for v in (0, 11, 15, 16, 63, 65535)],
    "PixelRepresentation": [(b"US", us(v)) for v in (0, 1, 2, 65535)] + [(b"US", b"")],
    "SamplesPerPixel": [(b"US", us(v)) for v in (0, 1, 3, 4, 65535)] + [(b"IS", b"1e999")],
    "NumberOfFrames": [
        (b"IS", text(v))
        for v in ("0", "1", "2", "3", "-1", "2147483647", "99999999999", "1e999", "abc", "1\\2")
    ],
    "PhotometricInterpretation": [
        (b"CS", text(v))
        for v in ("MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "garbage", "", "\\")
    ]
    + [(b"CS", b"\xff\xfe\x00\x01")],
    "RescaleSlope": [
        (b"DS", text(v))
        for v in ("0", "-1", "NaN", "inf", "-inf", "1e308", "-1e308", "1e300", "1e-300", "1\\2")
    ]
    + [(b"FD", struct.pack("<d", float("nan")))],
    "RescaleIntercept": [
        (b"DS", text(v)) for v in ("NaN", "inf", "-1e308", "1e308", "1e200", "-1024", "x")
    ],
    "WindowCenter": [(b"DS", text(v)) for v in ("0", "-5", "NaN", "inf", "1\\2\\3", "1e999")],
    "WindowWidth": [(b"DS", text(v)) for v in ("0", "-1", "1", "NaN", "-inf", "400\\1", "")],
    "Modality": [(b"CS", text(v)) for v in ("CT", "dx", "", "DX\\CR", "\x1b$B")],
    "BodyPartExamined": [(b"CS", text(v)) for v in ("HEAD", "chest", "", "CHEST\\HEAD")],
    "SOPClassUID": [
        (b"UI", text(v))
        for v in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7", "", "x")
    ],
    "SpecificCharacterSet": [
        (b"CS", text(v)) for v in ("ISO_IR 192", "ISO_IR 999", "\\ISO 2022 IR 87", "GB18030")
    ],
}
SYNTAXES = [
    b"1.2.840.10008.1.2",  # implicit VR little endian
    b"1.2.840.10008.1.2.2",  # explicit VR big endian
    b"1.2.840.10008.1.2.1.99",  # deflated
    b"1.2.840.10008.1.2.4.50",  # JPEG baseline
    b"1.2.840.10008.1.2.4.70",  # JPEG lossless
    b"1.2.840.10008.1.2.4.80",  # JPEG-LS
    b"1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    b"1.2.840.10008.1.2.4.201",  # HTJ2K
    b"1.2.840.10008.1.2.5",  # RLE
    b"1.2.840.10008.1.2.4.100",  # MPEG2
    b"1.2.3.4",
    b"",
    b"\xff\xfe",
]
PIXEL_BYTES = 256 * 256 * 2


def seeds(choices: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of ``choices``, drawn by index: a strategy that holds the seeds' bytes in its repr
    would print megabytes with every failure."""
    return st.integers(0, len(choices) - 1).map(choices.__getitem__)


@st.composite
def element_edits(draw: st.DrawFn) -> bytes:
    """An explicit seed with 1 to 3 elements edited (hostile value, wrong VR or removed), its
    pixel data resized or re-typed, or its transfer syntax switched."""
    data = draw(seeds(EXPLICIT_SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "value", "remove", "pixels", "syntax"]))
        if kind == "value":
            keyword = draw(st.sampled_from(sorted(EDITS)))
            vr, value = draw(st.sampled_from(EDITS[keyword]))
            if draw(st.integers(0, 9)) == 0:
                vr = draw(st.sampled_from([b"SQ", b"UN", b"OB", b"LO", b"FL", b"\0\0"]))
            data = set_element(data, keyword, vr, value)
        elif kind == "remove":
            keyword = draw(st.sampled_from([*sorted(EDITS), "PixelData"]))
            data = set_element(data, keyword, b"", None)
        elif kind == "pixels":
            size = draw(
                st.sampled_from([0, 1, 2, 100, PIXEL_BYTES - 2, PIXEL_BYTES + 2, 2 * PIXEL_BYTES])
                | st.integers(0, 3 * PIXEL_BYTES)
            )
            pattern = draw(st.binary(min_size=1, max_size=4))
            pixels = (pattern * (size // len(pattern) + 1))[:size]
            vr = draw(st.sampled_from([b"OW", b"OW", b"OB", b"UN", b"SQ", b"OF", b"OD"]))
            lie = draw(st.sampled_from([None, None, UNDEFINED, 0, size + 2, 2**31]))
            data = set_element(data, "PixelData", vr, pixels, lie)
        else:
            data = set_transfer_syntax(data, draw(st.sampled_from(SYNTAXES)))
    return data


@st.composite
def byte_mutations(draw: st.DrawFn, bases: st.SearchStrategy[bytes]) -> bytes:
    """An instance drawn from ``bases`` with 1 to 8 byte-level changes, each in the header, the
    pixel data or anywhere: flip, insert, delete, overwrite or truncate."""
    data = bytearray(draw(bases))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        # The header from the file meta on (after the preamble and DICM, which hypothesis's
        # leaning to small integers would otherwise hit in most examples), twice as often.
        pixel_start = max(0, len(data) - PIXEL_BYTES)
        header = (min(132, pixel_start), max(133, pixel_start))
        low, high = draw(
            st.sampled_from([(0, len(data)), header, header, (pixel_start, len(data))])
        )
        at = draw(st.integers(low, max(low, high - 1)))
        operation = draw(st.sampled_from(["flip", "insert", "delete", "overwrite", "truncate"]))
        if operation == "flip":
            if at < len(data):
                data[at] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif operation == "overwrite":
            patch = draw(
                st.binary(min_size=1, max_size=8)
                | st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"SQ", b"\xfe\xff\x00\xe0"])
            )
            data[at : at + len(patch)] = patch
        else:
            del data[at:]
    return bytes(data)


not_dicom = st.one_of(
    st.just(b""),
    st.binary(max_size=600),
    st.binary(max_size=600).map(lambda tail: b"\0" * 128 + b"DICM" + tail),
    st.sampled_from([b"%PDF-1.7", b"\x89PNG\r\n\x1a\n", b'{"resourceType": "Patient"}']),
)
# Mostly instances close to valid ones (they reach decoding and preprocessing); not_dicom is an
# eighth, as the parser refuses such bytes in its first steps.
instances = st.sampled_from(range(8)).flatmap(
    lambda branch: (
        element_edits()
        if branch < 3
        else byte_mutations(seeds(EXPLICIT_SEEDS + OTHER_SEEDS))
        if branch < 5
        else byte_mutations(element_edits())
        if branch < 7
        else not_dicom
    )
)


def check_instance(data: bytes, image: ImageSpec = IMAGE) -> PreparedImage | ImageRefusedError:
    """``image_tensor`` of ``data`` under the fuzz's property: the spec's finite float32 tensor or
    an ImageRefusedError free of patient data, in bounded time and memory."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            # pydicom warns about each oddity it reads past; the outcome is what is checked.
            warnings.simplefilter("ignore")
            outcome: PreparedImage | ImageRefusedError = image_tensor(data, image)
    except ImageRefusedError as refused:
        outcome = refused
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1] - before
    assert elapsed < EXAMPLE_SECONDS, f"{elapsed:.1f} s for one instance"
    assert peak < memory_limit(data, image), f"{peak} bytes traced for {len(data)} bytes"
    if isinstance(outcome, ImageRefusedError):
        reason = str(outcome)
        assert PATIENT.patient_id not in reason
        assert "SYNTHETIC" not in reason.upper()
    else:
        steps = image.preprocessing
        assert outcome.tensor.shape == (
            (1, steps.rows, steps.columns)
            if steps.layout == "channels-first"
            else (steps.rows, steps.columns, 1)
        )
        assert outcome.tensor.dtype == np.float32
        assert np.isfinite(outcome.tensor).all()
    return outcome


@pytest.fixture(scope="module", autouse=True)
def traced_memory() -> Iterator[None]:
    """tracemalloc on for this module's tests (the memory bound is measured), then off."""
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.timeout(120 + 2 * FUZZ_EXAMPLES)
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=timedelta(seconds=EXAMPLE_SECONDS),
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=instances)
def test_any_mutated_instance_gives_the_tensor_or_a_refusal(data: bytes) -> None:
    """Whatever the bytes, image_tensor returns the spec's finite float32 tensor or raises
    ImageRefusedError without patient data, within the time and memory bounds."""
    outcome = check_instance(data)
    # Which refusals the fuzz reaches (--hypothesis-show-statistics), numbers elided.
    event("tensor" if isinstance(outcome, PreparedImage) else re.sub(r"\d+", "N", str(outcome)))


def test_the_seeds_give_tensors() -> None:
    """Every unmutated seed (each transfer syntax, MONOCHROME1, two frames) gives a tensor, so
    the fuzz mutates instances the worker accepts."""
    for seed in EXPLICIT_SEEDS + OTHER_SEEDS:
        outcome = check_instance(seed)
        assert isinstance(outcome, PreparedImage), outcome
        assert outcome.tensor.shape == TENSOR_SHAPE


def _refusal(data: bytes, image: ImageSpec = IMAGE) -> str:
    outcome = check_instance(data, image)
    assert isinstance(outcome, ImageRefusedError), "expected a refusal"
    return str(outcome)


def test_an_unconvertible_size_is_refused_not_raised() -> None:
    """Rows or SamplesPerPixel written as IS 1e999 (pydicom's OverflowError on reading it) is
    refused as an unreadable attribute."""
    seed = EXPLICIT_SEEDS[0]
    for keyword in ("Rows", "Columns", "SamplesPerPixel"):
        reason = _refusal(set_element(seed, keyword, b"IS", b"1e999"))
        assert f"{keyword} cannot be read" in reason


def test_a_value_written_as_a_sequence_is_refused_before_parsing_it() -> None:
    """Modality or PixelData written as a sequence (OSError, or seconds of parsing zeros as
    items) is refused without reading its value."""
    seed = EXPLICIT_SEEDS[0]
    for keyword in ("Modality", "PhotometricInterpretation", "PixelData"):
        reason = _refusal(set_element(seed, keyword, b"SQ", b"\xff\xfe\xff\xfe" + bytes(300_000)))
        assert f"{keyword} is a sequence" in reason


def test_an_empty_element_of_unknown_vr_is_refused() -> None:
    """An empty PixelData of VR 'NW' (no such VR; the fuzz found the sequence check converting
    it, NotImplementedError) is refused."""
    reason = _refusal(set_element(EXPLICIT_SEEDS[0], "PixelData", b"NW", b""))
    assert "pixel data" in reason


def test_rescale_to_infinity_is_refused() -> None:
    """A RescaleSlope or RescaleIntercept of 1e308 (finite, but the rescaled pixels are not)
    is refused, not scored as NaN."""
    seed = EXPLICIT_SEEDS[0]
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        reason = _refusal(set_element(seed, keyword, b"DS", b"1e308"))
        assert "out of range" in reason
    steep = check_instance(set_element(seed, "RescaleSlope", b"DS", b"1e90"))
    assert isinstance(steep, PreparedImage), "a large but finite rescale is still read"


def _with_private_sequence(content: bytes) -> bytes:
    seed = EXPLICIT_SEEDS[0]
    start = _elements(seed)[tag_for_keyword("PixelData") or 0][0]
    header = struct.pack("<HH2sHI", 0x0029, 0x1010, b"SQ", 0, UNDEFINED)
    return seed[:start] + header + content + seed[start:]


def test_nested_undefined_length_items_are_refused_quickly() -> None:
    """32,768 undefined-length items in a private sequence (pydicom rescans to the end for each:
    minutes at 256 KiB) are refused within the parse budget."""
    item = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
    started = time.monotonic()
    reason = _refusal(_with_private_sequence(item * 32_768))
    assert "too costly to parse" in reason
    assert time.monotonic() - started < 5


def test_zeros_in_an_undefined_length_sequence_are_refused_quickly() -> None:
    """256 KiB of zeros in an undefined-length sequence (a warning per 8 bytes) stop at the
    parse budget."""
    started = time.monotonic()
    reason = _refusal(_with_private_sequence(bytes(262_144)))
    assert "too costly to parse" in reason
    assert time.monotonic() - started < 5


def _deflated(body: bytes, seed: bytes) -> bytes:
    """``seed``'s file meta, with a deflated transfer syntax, before ``body`` deflated."""
    (meta_length,) = struct.unpack_from("<I", seed, 140)
    meta = set_transfer_syntax(seed[: 144 + meta_length], DeflatedExplicitVRLittleEndian.encode())
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return meta + compressor.compress(body) + compressor.flush()


def test_a_deflate_bomb_is_refused_within_the_byte_limit() -> None:
    """A deflated data set under the model's 1 MiB limit that inflates to 64 MiB is refused once
    past the limit, without inflating the rest (pydicom alone would hold all 64 MiB; a 32 MiB
    instance could inflate to 32 GiB)."""
    tight = IMAGE.model_copy(update={"max_instance_bytes": 2**20})
    seed = EXPLICIT_SEEDS[0]
    (meta_length,) = struct.unpack_from("<I", seed, 140)
    bomb = _deflated(seed[144 + meta_length :] + bytes(64 * 2**20), seed)
    assert len(bomb) < tight.max_instance_bytes
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    reason = _refusal(bomb, tight)
    assert "inflates to more than" in reason
    assert tracemalloc.get_traced_memory()[1] - before < 4 * tight.max_instance_bytes


def test_a_deflated_instance_is_still_read() -> None:
    """A deflated instance within the limit gives the same tensor as its uncompressed self."""
    deflated = image_tensor(OTHER_SEEDS[2], IMAGE).tensor
    plain = image_tensor(_variant(_unchanged), IMAGE).tensor
    np.testing.assert_array_equal(deflated, plain)


def test_a_side_over_65535_is_refused() -> None:
    """Rows written as UL 70000 (Rows is US) is refused before decoding."""
    reason = _refusal(set_element(EXPLICIT_SEEDS[0], "Rows", b"UL", struct.pack("<I", 70000)))
    assert "more than 65535 a side" in reason


def test_a_tall_thin_frame_resizes_in_bounded_memory() -> None:
    """A 1-bit 65535 x 256 frame (2 MB of bytes) resized to 4096 x 4096 stays within the memory
    bound: no dense 4096 x 65535 weight matrix (2 GB)."""
    large = ImageSpec(
        series=SeriesCriteria(),
        preprocessing=ImagePreprocessing(rows=4096, columns=4096),
    )
    dataset = build_radiograph(synthetic_radiograph(5, True), PATIENT)
    dataset.Rows, dataset.Columns = 65535, 256
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 1, 1, 0
    dataset.PixelData = np.random.default_rng(3).bytes(65535 * 256 // 8)
    outcome = check_instance(to_bytes(dataset), large)
    assert isinstance(outcome, PreparedImage)
    assert outcome.tensor.shape == (1, 4096, 4096)
