"""A DICOM instance becomes a model's image tensor (medmesh_inference.imaging), or is refused."""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import config
from pydicom.dataset import Dataset

from medmesh_cli.devstack.radiographs import synthetic_radiograph
from medmesh_cli.devstack.studies import StudyIdentity, build_radiograph, to_bytes
from medmesh_contracts.modelspec import (
    ImagePreprocessing,
    ImageSpec,
    ModelSpec,
    SeriesCriteria,
    WindowSpec,
    load_spec,
    parse_spec,
)
from medmesh_inference.imaging import (
    ImageRefusedError,
    area_resize,
    image_tensor,
    linear_window,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = ROOT / "deploy" / "models" / "chest-opacity.yaml"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The imaging demonstration model's spec."""
    return load_spec(SPEC_PATH)


@pytest.fixture(scope="module")
def image(spec: ModelSpec) -> ImageSpec:
    """Its image input."""
    found = spec.input("chest_radiograph").image
    assert found is not None
    return found


def _radiograph(seed: int = 7, opacity: bool = False) -> Dataset:
    identity = StudyIdentity.new(f"unit-{seed}")
    return build_radiograph(synthetic_radiograph(seed, opacity), identity)


def test_stored_range_maps_to_unit_interval_and_block_means(image: ImageSpec) -> None:
    """Without a window, 12 stored bits scale to [0, 1] (x / 4095) and 256 -> 64 is a 4x4 mean."""
    pixels = synthetic_radiograph(7, False)
    data = to_bytes(_radiograph(7))
    prepared = image_tensor(data, image)
    expected = pixels.astype(np.float64).reshape(64, 4, 64, 4).mean(axis=(1, 3)) / 4095
    assert prepared.tensor.shape == (1, 64, 64)
    assert prepared.tensor.dtype == np.float32
    np.testing.assert_allclose(prepared.tensor[0], expected, atol=1e-6)
    assert prepared.sha256 == hashlib.sha256(data).hexdigest()
    assert (prepared.rows, prepared.columns) == (256, 256)


def test_monochrome1_is_inverted(image: ImageSpec) -> None:
    """The same stored values read as MONOCHROME1 (bright means low) give 1 minus the tensor."""
    plain = image_tensor(to_bytes(_radiograph(8)), image).tensor
    dataset = _radiograph(8)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    inverted = image_tensor(to_bytes(dataset), image).tensor
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def test_rescale_then_window_follows_the_dicom_linear_function() -> None:
    """Slope and intercept apply before the window; the window's ends clip to 0 and 1."""
    window = WindowSpec(center=40, width=400)
    values = np.array([[-1000.0, -160.5, 40.0, 239.5, 3000.0]])
    np.testing.assert_allclose(
        linear_window(values, window)[0], [0.0, 0.0, 0.5 + 0.5 / 399, 1.0, 1.0]
    )
    hounsfield = ImageSpec(
        series=SeriesCriteria(),
        preprocessing=ImagePreprocessing(rows=256, columns=256, window=window),
    )
    dataset = _radiograph(9)
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    stored = synthetic_radiograph(9, False).astype(np.float64)
    tensor = image_tensor(to_bytes(dataset), hounsfield).tensor[0]
    np.testing.assert_allclose(tensor, linear_window(stored - 1024, window), atol=1e-6)


def test_area_resize_weighs_fractional_edges() -> None:
    """3 -> 2 cells: each output cell takes one whole input cell and half of the middle one."""
    column = np.array([[0.0], [3.0], [6.0]])
    np.testing.assert_allclose(area_resize(column, 2, 1)[:, 0], [1.0, 5.0])
    constant = np.full((37, 53), 0.25)
    np.testing.assert_allclose(area_resize(constant, 16, 16), 0.25)


def test_normalisation_and_channels_last_layout() -> None:
    """mean and std apply after scaling; channels-last puts the one channel at the end."""
    steps = ImagePreprocessing(rows=32, columns=32, mean=0.5, std=0.25, layout="channels-last")
    spec = ImageSpec(series=SeriesCriteria(), preprocessing=steps)
    tensor = image_tensor(to_bytes(_radiograph(10)), spec).tensor
    plain = ImageSpec(
        series=SeriesCriteria(), preprocessing=ImagePreprocessing(rows=32, columns=32)
    )
    reference = image_tensor(to_bytes(_radiograph(10)), plain).tensor
    assert tensor.shape == (32, 32, 1)
    np.testing.assert_allclose(tensor[:, :, 0], (reference[0] - 0.5) / 0.25, atol=1e-5)


def _refusal(data: bytes, image: ImageSpec) -> str:
    with pytest.raises(ImageRefusedError) as refused:
        image_tensor(data, image)
    return str(refused.value)


def test_refusals_name_the_attribute_never_its_value(image: ImageSpec) -> None:
    """Each refusal says why without DICOM values (the patient id never appears)."""
    base = _radiograph(11)
    patient_id = str(base.PatientID)
    cases: dict[str, bytes] = {"not a readable DICOM": b"%PDF-1.7 not an image"}
    for keyword, value in [
        ("Modality", "CT"),
        ("BodyPartExamined", "HEAD"),
        ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),
    ]:
        changed = _radiograph(11)
        setattr(changed, keyword, value)
        cases[keyword] = to_bytes(changed)
    no_pixels = _radiograph(11)
    del no_pixels.PixelData
    cases["no pixel data"] = to_bytes(no_pixels)
    small = build_radiograph(synthetic_radiograph(11, False, size=128), StudyIdentity.new("s"))
    cases["smaller"] = to_bytes(small)
    colour = _radiograph(11)
    colour.PhotometricInterpretation = "RGB"
    cases["grayscale"] = to_bytes(colour)
    truncated = _radiograph(11)
    truncated.PixelData = truncated.PixelData[:1000]
    cases["decoded"] = to_bytes(truncated)
    for expected, data in cases.items():
        reason = _refusal(data, image)
        assert expected in reason, (expected, reason)
        assert patient_id not in reason


def test_values_that_break_their_vr_are_never_logged_or_warned_by_pydicom(
    image: ImageSpec, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance whose read values break their VR is refused without pydicom logging or
    warning them (its warnings quote the value: patient data, and a flood from a hostile file)."""
    hostile = _radiograph(12)
    marker = "not-a-code!"
    with config.disable_value_validation():
        hostile.Modality = "\\".join([marker] * 50)
        data = to_bytes(hostile)
    with warnings.catch_warnings(record=True) as warned, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        reason = _refusal(data, image)
    assert "Modality" in reason
    assert [str(w.message) for w in warned] == []
    assert marker not in caplog.text


def test_an_instance_over_the_size_limit_is_refused_before_parsing() -> None:
    """More bytes than ``max_instance_bytes`` is refused without reading the instance."""
    tight = ImageSpec(
        series=SeriesCriteria(),
        preprocessing=ImagePreprocessing(rows=64, columns=64),
        max_instance_bytes=1000,
    )
    assert "more than the model's limit" in _refusal(b"\0" * 1001, tight)


def test_spec_image_tensor_must_match_the_preprocessing(spec: ModelSpec) -> None:
    """An image tensor shaped unlike what the preprocessing makes is a spec error."""
    document = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["versions"][0]["triton"]["inputs"][0]["shape"] = [64, 64, 1]
    with pytest.raises(ValueError, match="preprocessing makes"):
        parse_spec(document)


def test_spec_image_inputs_read_imaging_studies_only(spec: ModelSpec) -> None:
    """An image input with an Observation source, or an imaging-study source on a scalar
    input, is a spec error."""
    document = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["inputs"][0]["sources"][0]["kind"] = "quantity"
    with pytest.raises(ValueError, match="imaging-study sources only"):
        parse_spec(document)
    document = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    del document["inputs"][0]["image"]
    with pytest.raises(ValueError, match="no 'image'"):
        parse_spec(document)


def test_worker_preprocessing_feeds_the_committed_model_what_it_was_trained_on(
    image: ImageSpec,
) -> None:
    """The fixture radiographs, as DICOM through the spec's preprocessing, are classified right
    by the committed chest-opacity ONNX model (the worker and the training script agree)."""
    import onnxruntime  # noqa: PLC0415 -- only this test needs a session

    from medmesh_cli.devstack.radiographs import (  # noqa: PLC0415
        CLEAR_FIXTURE_SEEDS,
        OPACITY_FIXTURE_SEEDS,
    )

    model = ROOT / "deploy" / "triton" / "models" / "chest-opacity-cnn" / "1" / "model.onnx"
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    cases = [(seed, True) for seed in OPACITY_FIXTURE_SEEDS]
    cases += [(seed, False) for seed in CLEAR_FIXTURE_SEEDS]
    batch = np.stack(
        [
            image_tensor(
                to_bytes(
                    build_radiograph(
                        synthetic_radiograph(seed, opacity), StudyIdentity.new(f"m{seed}")
                    )
                ),
                image,
            ).tensor
            for seed, opacity in cases
        ]
    )
    (probabilities,) = session.run(["PROBABILITIES"], {"IMAGE": batch})
    assert [bool(p[1] > 0.5) for p in probabilities] == [opacity for _, opacity in cases]


def test_a_multi_frame_instance_is_read_from_its_first_frame_only(image: ImageSpec) -> None:
    """Only frame 1 is decoded and scored: the other frames cost no memory."""
    first, second = synthetic_radiograph(12, False), synthetic_radiograph(13, True)
    dataset = _radiograph(12)
    dataset.NumberOfFrames = 2
    dataset.PixelData = first.tobytes() + second.tobytes()
    tensor = image_tensor(to_bytes(dataset), image).tensor
    single = image_tensor(to_bytes(_radiograph(12)), image).tensor
    np.testing.assert_array_equal(tensor, single)
