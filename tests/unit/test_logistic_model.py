"""deterioration v2 (deploy/triton/models/deterioration/2/): logistic risk model and its fit.

Columns of a row: RR /min, SpO2 %, oxygen (1 = on oxygen), temperature Cel, systolic BP mm[Hg],
heart rate /min, not alert (1 = CVPU). Modules are loaded by path; Triton is not needed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
TRITON = ROOT / "deploy" / "triton"
VERSION_DIR = TRITON / "models" / "deterioration" / "2"
NORMAL = [16.0, 98.0, 0.0, 37.0, 120.0, 70.0, 0.0]


@pytest.fixture(scope="module")
def v2() -> ModuleType:
    """The version 2 model module."""
    return load_file(VERSION_DIR / "model.py", "deterioration_v2_model_under_test")


@pytest.fixture(scope="module")
def weights(v2: ModuleType) -> tuple[np.ndarray[Any, Any], float]:
    """The shipped coefficients and intercept."""
    coefficients, intercept = v2.load_weights(VERSION_DIR / "weights.json")
    return coefficients, intercept


def _score(v2: ModuleType, weights: tuple[np.ndarray[Any, Any], float], rows: Any) -> Any:
    return v2.predict(np.asarray(rows, dtype=np.float32), *weights)


def test_weights_json_is_reproduced_by_the_fit() -> None:
    """Re-running fit() with the recorded seed and size gives exactly the shipped weights.json."""
    fit_logistic = load_file(TRITON / "fit_logistic.py", "fit_logistic_under_test")
    shipped = json.loads((VERSION_DIR / "weights.json").read_text())

    refit = fit_logistic.fit(seed=shipped["seed"], n=shipped["n"])

    assert refit["features"] == shipped["features"]
    assert refit["feature_columns"] == shipped["feature_columns"]
    assert refit["coefficients"] == pytest.approx(shipped["coefficients"], rel=1e-6, abs=1e-6)
    assert refit["intercept"] == pytest.approx(shipped["intercept"], rel=1e-6, abs=1e-6)
    assert refit["holdout_auc"] == pytest.approx(shipped["holdout_auc"], abs=1e-6)
    assert {k: v for k, v in refit.items() if not isinstance(v, float | list)} == {
        k: v for k, v in shipped.items() if not isinstance(v, float | list)
    }


def test_weights_json_records_how_it_was_fitted(v2: ModuleType) -> None:
    """weights.json names the model's features and records seed, size and a useful held-out AUC."""
    shipped = json.loads((VERSION_DIR / "weights.json").read_text())
    assert tuple(shipped["features"]) == v2.FEATURE_NAMES
    assert len(shipped["coefficients"]) == len(v2.FEATURES)
    assert shipped["n"] >= 10_000
    assert isinstance(shipped["seed"], int)
    assert 0.8 < shipped["holdout_auc"] < 1.0


def test_load_weights_refuses_other_features(v2: ModuleType, tmp_path: Path) -> None:
    """Weights fitted for other features are refused instead of silently mis-scoring."""
    shipped = json.loads((VERSION_DIR / "weights.json").read_text())
    shipped["features"] = list(reversed(shipped["features"]))
    path = tmp_path / "weights.json"
    path.write_text(json.dumps(shipped))
    with pytest.raises(ValueError, match="features"):
        v2.load_weights(path)


WORSE = [
    ("respiratory rate rises", 0, 28.0),
    ("respiratory rate falls", 0, 7.0),
    ("SpO2 falls", 1, 89.0),
    ("supplemental oxygen", 2, 1.0),
    ("fever", 3, 39.5),
    ("hypothermia", 3, 34.5),
    ("systolic pressure falls", 4, 85.0),
    ("systolic pressure very high", 4, 240.0),
    ("heart rate rises", 5, 135.0),
    ("heart rate falls", 5, 38.0),
    ("not alert", 6, 1.0),
]


@pytest.mark.parametrize(("what", "column", "value"), WORSE, ids=[w[0] for w in WORSE])
def test_risk_increases_when_a_vital_worsens(
    v2: ModuleType,
    weights: tuple[np.ndarray[Any, Any], float],
    what: str,
    column: int,
    value: float,
) -> None:
    """Worsening one vital from a normal row raises the probability and that column's share."""
    worse = list(NORMAL)
    worse[column] = value
    score, _, contributions = _score(v2, weights, [NORMAL, worse])
    assert score[1, 0] > score[0, 0], what
    assert contributions[1, column] > contributions[0, column], what


def test_risk_rises_monotonically_as_spo2_falls(
    v2: ModuleType, weights: tuple[np.ndarray[Any, Any], float]
) -> None:
    """From 96 % down to 80 % every 1 % drop of SpO2 raises the probability."""
    rows = [[16.0, spo2, 0.0, 37.0, 120.0, 70.0, 0.0] for spo2 in range(96, 79, -1)]
    score = _score(v2, weights, rows)[0][:, 0]
    assert np.all(np.diff(score) > 0)


def test_outputs_vary_across_patients(
    v2: ModuleType, weights: tuple[np.ndarray[Any, Any], float]
) -> None:
    """Scores and bands are not constant over a varied batch; all within their ranges."""
    rng = np.random.default_rng(7)
    rows = np.column_stack(
        [
            rng.integers(6, 35, 64),
            rng.integers(82, 100, 64),
            rng.integers(0, 2, 64),
            rng.normal(37.2, 1.0, 64),
            rng.integers(70, 200, 64),
            rng.integers(40, 150, 64),
            rng.integers(0, 2, 64),
        ]
    )
    score, band, contributions = _score(v2, weights, rows)
    assert score.shape == (64, 1)
    assert score.dtype == np.float32
    assert band.dtype == np.int32
    assert contributions.shape == (64, 7)
    assert len(np.unique(score)) > 50
    assert len(np.unique(band)) >= 3
    assert np.all((score >= 0) & (score <= 100))
    assert set(np.unique(band).tolist()) <= {0, 1, 2, 3}


def test_contributions_add_up_to_the_log_odds(
    v2: ModuleType, weights: tuple[np.ndarray[Any, Any], float]
) -> None:
    """intercept + sum of CONTRIBUTIONS is the log-odds of SCORE; a normal row contributes 0."""
    rows = [NORMAL, [26.0, 90.0, 1.0, 38.9, 95.0, 120.0, 1.0]]
    score, _, contributions = _score(v2, weights, rows)
    _, intercept = weights
    log_odds = intercept + contributions.astype(np.float64).sum(axis=1)
    assert (100.0 / (1.0 + np.exp(-log_odds))) == pytest.approx(score[:, 0], rel=1e-5)
    assert contributions[0].tolist() == [0.0] * 7


@pytest.mark.parametrize(
    ("probability", "band"),
    [(0.01, 0), (0.0499, 0), (0.0501, 1), (0.1499, 1), (0.1501, 2), (0.3999, 2), (0.4001, 3)],
)
def test_bands_follow_the_documented_probability_thresholds(
    v2: ModuleType, probability: float, band: int
) -> None:
    """Below 5 % low, 5-15 % low-medium, 15-40 % medium, 40 % and above high."""
    coefficients = np.zeros(len(v2.FEATURES))
    intercept = math.log(probability / (1.0 - probability))
    score, got, _ = v2.predict(np.asarray([NORMAL], dtype=np.float32), coefficients, intercept)
    assert score[0, 0] == pytest.approx(100 * probability, rel=1e-5)
    assert got[0, 0] == band


def test_predict_rejects_nan(v2: ModuleType, weights: tuple[np.ndarray[Any, Any], float]) -> None:
    """A NaN reading raises ValueError instead of returning a NaN probability."""
    with pytest.raises(ValueError, match="non-finite"):
        _score(v2, weights, [[16.0, math.nan, 0.0, 37.0, 120.0, 70.0, 0.0]])


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray[Any, Any]) -> None:
        self.name = name
        self.array = array

    def as_numpy(self) -> np.ndarray[Any, Any]:
        return self.array


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor], error: Any = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


def test_triton_model_loads_weights_from_its_version_folder(
    v2: ModuleType, weights: tuple[np.ndarray[Any, Any], float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """initialize() reads weights.json of its version; execute() matches predict() per request."""
    fake = SimpleNamespace(
        Tensor=_FakeTensor,
        InferenceResponse=_FakeResponse,
        TritonError=lambda message: SimpleNamespace(message=message),
        get_input_tensor_by_name=lambda request, name: _FakeTensor(name, request[name]),
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    model = v2.TritonPythonModel()
    model.initialize({"model_repository": str(VERSION_DIR.parent), "model_version": "2"})
    rows = np.asarray([NORMAL, [26.0, 90.0, 1.0, 38.9, 95.0, 120.0, 1.0]], dtype=np.float32)
    broken = np.asarray([[math.nan] * 7], dtype=np.float32)

    ok, bad = model.execute([{"VITALS": rows}, {"VITALS": broken}])

    expected = _score(v2, weights, rows)
    assert ok.error is None
    for name, array in zip(("SCORE", "RISK_BAND", "CONTRIBUTIONS"), expected, strict=True):
        assert np.array_equal(ok.outputs[name], array)
    assert bad.outputs == {}
    assert "non-finite" in bad.error.message
