"""deterioration v1 (deploy/triton/models/deterioration/1/model.py): NEWS2, RCP 2017, SpO2 scale 1.

Columns of a row: RR /min, SpO2 %, oxygen (1 = on oxygen), temperature Cel, systolic BP mm[Hg],
heart rate /min, not alert (1 = CVPU). The module is loaded by path (a Triton model folder is not
a package) and without Triton: the backend utilities are faked where ``execute`` is tested.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "deploy" / "triton" / "models" / "deterioration" / "1" / "model.py"

LOW, LOW_MEDIUM, MEDIUM, HIGH = 0, 1, 2, 3


@pytest.fixture(scope="module")
def v1() -> ModuleType:
    """The version 1 model module."""
    return load_file(MODEL, "deterioration_v1_model_under_test")


# (row, expected points per column, total, band); arithmetic in the comments.
CASES: list[tuple[list[float], list[int], int, int]] = [
    # healthy: RR 16 -> 0, SpO2 98 -> 0, air -> 0, 37.0 -> 0, SBP 120 -> 0, HR 70 -> 0, alert -> 0
    # total 0 -> low
    ([16, 98, 0, 37.0, 120, 70, 0], [0, 0, 0, 0, 0, 0, 0], 0, LOW),
    # points but no 3: RR 21 -> 2, SpO2 96 -> 0, air, 37.0 -> 0, SBP 120 -> 0, HR 95 -> 1, alert
    # total 2 + 1 = 3, no single 3 -> low
    ([21, 96, 0, 37.0, 120, 95, 0], [2, 0, 0, 0, 0, 1, 0], 3, LOW),
    # a single 3 from consciousness: everything normal, CVPU -> 3; total 3 -> low-medium
    ([16, 98, 0, 37.0, 120, 70, 1], [0, 0, 0, 0, 0, 0, 3], 3, LOW_MEDIUM),
    # a single 3 from RR 8 (<= 8 -> 3); SpO2 97, 36.5, SBP 130, HR 80 all 0; total 3 -> low-medium
    ([8, 97, 0, 36.5, 130, 80, 0], [3, 0, 0, 0, 0, 0, 0], 3, LOW_MEDIUM),
    # a single 3 from SBP 220 (>= 220 -> 3) plus HR 91 -> 1: total 4 -> low-medium
    ([16, 98, 0, 37.0, 220, 91, 0], [0, 0, 0, 0, 3, 1, 0], 4, LOW_MEDIUM),
    # RR 22 -> 2, SpO2 94 -> 1, air, 38.5 -> 1, SBP 115 -> 0, HR 100 -> 1: 2 + 1 + 1 + 1 = 5
    # -> medium
    ([22, 94, 0, 38.5, 115, 100, 0], [2, 1, 0, 1, 0, 1, 0], 5, MEDIUM),
    # a 3 inside a medium total: SpO2 91 -> 3, oxygen -> 2, HR 95 -> 1: 3 + 2 + 1 = 6 -> medium
    # (the total band wins over "a single 3")
    ([16, 91, 1, 37.0, 120, 95, 0], [0, 3, 2, 0, 0, 1, 0], 6, MEDIUM),
    # exactly 7: RR 24 -> 2, SpO2 93 -> 2, oxygen -> 2, 36.0 -> 1, SBP 120, HR 80: 2+2+2+1 = 7
    # -> high
    ([24, 93, 1, 36.0, 120, 80, 0], [2, 2, 2, 1, 0, 0, 0], 7, HIGH),
    # lower edges of the scoring bands: RR 9 -> 1, SpO2 92 -> 2, air, 35.1 -> 1, SBP 91 -> 2,
    # HR 41 -> 1, alert: 1 + 2 + 1 + 2 + 1 = 7 -> high
    ([9, 92, 0, 35.1, 91, 41, 0], [1, 2, 0, 1, 2, 1, 0], 7, HIGH),
    # upper edges of the zero bands: RR 20, SpO2 96, 38.0, SBP 219, HR 90 -> all 0 -> low
    ([20, 96, 0, 38.0, 219, 90, 0], [0, 0, 0, 0, 0, 0, 0], 0, LOW),
    # lower edges of the zero bands: RR 12, SpO2 96, 36.1, SBP 111, HR 51 -> all 0 -> low
    ([12, 96, 0, 36.1, 111, 51, 0], [0, 0, 0, 0, 0, 0, 0], 0, LOW),
    # just past the zero bands: RR 21 -> 2, SpO2 95 -> 1, 38.1 -> 1, SBP 110 -> 1, HR 91 -> 1
    # total 2 + 1 + 1 + 1 + 1 = 6 -> medium
    ([21, 95, 0, 38.1, 110, 91, 0], [2, 1, 0, 1, 1, 1, 0], 6, MEDIUM),
    # the worst: RR 4 -> 3, SpO2 80 -> 3, oxygen -> 2, 34.0 -> 3, SBP 80 -> 3, HR 150 -> 3,
    # CVPU -> 3: 3 + 3 + 2 + 3 + 3 + 3 + 3 = 20 -> high
    ([4, 80, 1, 34.0, 80, 150, 1], [3, 3, 2, 3, 3, 3, 3], 20, HIGH),
    # non-integer readings between published bands: RR 11.5 (> 11) -> 0, SpO2 91.5 (> 91) -> 2,
    # 35.05 (> 35.0) -> 1, SBP 90.5 (> 90) -> 2, HR 40.5 (> 40) -> 1: 2 + 1 + 2 + 1 = 6 -> medium
    ([11.5, 91.5, 0, 35.05, 90.5, 40.5, 0], [0, 2, 0, 1, 2, 1, 0], 6, MEDIUM),
]


@pytest.mark.parametrize(("row", "points", "total", "band"), CASES)
def test_news2_hand_computed_cases(
    v1: ModuleType, row: list[float], points: list[int], total: int, band: int
) -> None:
    """Each hand-computed row gets the published points, total and band."""
    got_total, got_band, got_points = v1.news2(np.asarray([row], dtype=np.float32))
    assert got_points.tolist() == [[float(p) for p in points]]
    assert got_total.tolist() == [[float(total)]]
    assert got_band.tolist() == [[band]]


# (column, value, points): every edge of every published table.
EDGES = [
    (0, 8, 3), (0, 8.5, 1), (0, 9, 1), (0, 11, 1), (0, 12, 0), (0, 20, 0), (0, 20.5, 2),
    (0, 21, 2), (0, 24, 2), (0, 24.5, 3), (0, 25, 3),
    (1, 91, 3), (1, 92, 2), (1, 93, 2), (1, 94, 1), (1, 95, 1), (1, 95.5, 0), (1, 96, 0),
    (2, 0, 0), (2, 1, 2),
    (3, 35.0, 3), (3, 35.1, 1), (3, 36.0, 1), (3, 36.1, 0), (3, 38.0, 0), (3, 38.1, 1),
    (3, 39.0, 1), (3, 39.05, 2), (3, 39.1, 2),
    (4, 90, 3), (4, 91, 2), (4, 100, 2), (4, 101, 1), (4, 110, 1), (4, 111, 0), (4, 219, 0),
    (4, 219.5, 0), (4, 220, 3),
    (5, 40, 3), (5, 41, 1), (5, 50, 1), (5, 51, 0), (5, 90, 0), (5, 91, 1), (5, 110, 1),
    (5, 111, 2), (5, 130, 2), (5, 131, 3),
    (6, 0, 0), (6, 1, 3),
]  # fmt: skip


def test_news2_table_edges(v1: ModuleType) -> None:
    """Every band edge of every parameter scores as the published table (one batched call)."""
    normal = [16, 98, 0, 37.0, 120, 70, 0]
    rows = []
    for column, value, _ in EDGES:
        row = list(normal)
        row[column] = value
        rows.append(row)
    _, _, points = v1.news2(np.asarray(rows, dtype=np.float32))
    got = [int(points[i, column]) for i, (column, _, _) in enumerate(EDGES)]
    assert got == [expected for _, _, expected in EDGES]


def test_news2_output_shapes_and_types(v1: ModuleType) -> None:
    """Outputs are float32 [n, 1], int32 [n, 1] and float32 [n, 7], rows in input order."""
    rows = np.asarray([case[0] for case in CASES], dtype=np.float32)
    total, band, points = v1.news2(rows)
    n = len(CASES)
    assert (total.dtype, total.shape) == (np.float32, (n, 1))
    assert (band.dtype, band.shape) == (np.int32, (n, 1))
    assert (points.dtype, points.shape) == (np.float32, (n, 7))
    assert total[:, 0].tolist() == [float(case[2]) for case in CASES]
    assert np.array_equal(points.sum(axis=1), total[:, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_news2_rejects_non_finite_values(v1: ModuleType, bad: float) -> None:
    """A NaN or infinite reading raises ValueError naming its row and column."""
    rows = np.asarray([[16, 98, 0, 37.0, 120, 70, 0]] * 3, dtype=np.float32)
    rows[2, 4] = bad
    with pytest.raises(ValueError, match="row 2 column 4"):
        v1.news2(rows)


def test_news2_rejects_wrong_shape(v1: ModuleType) -> None:
    """A batch without exactly 7 columns raises ValueError."""
    with pytest.raises(ValueError, match="shape"):
        v1.news2(np.zeros((2, 6), dtype=np.float32))


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


def fake_pb_utils() -> SimpleNamespace:
    """A stand-in for triton_python_backend_utils with what the models use."""
    return SimpleNamespace(
        Tensor=_FakeTensor,
        InferenceResponse=_FakeResponse,
        TritonError=lambda message: SimpleNamespace(message=message),
        get_input_tensor_by_name=lambda request, name: _FakeTensor(name, request[name]),
    )


def test_execute_answers_each_request_and_isolates_a_nan_request(
    v1: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """execute() scores multi-row requests in order; a NaN request alone gets an error response."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    model = v1.TritonPythonModel()
    model.initialize({})
    first = np.asarray([CASES[0][0], CASES[7][0]], dtype=np.float32)  # totals 0 and 7
    broken = np.asarray([[16, np.nan, 0, 37.0, 120, 70, 0]], dtype=np.float32)
    third = np.asarray([CASES[2][0], CASES[5][0], CASES[12][0]], dtype=np.float32)  # 3, 5, 20
    requests = [{"VITALS": first}, {"VITALS": broken}, {"VITALS": third}]

    responses = model.execute(requests)

    assert len(responses) == 3
    assert responses[0].error is None
    assert responses[0].outputs["SCORE"].tolist() == [[0.0], [7.0]]
    assert responses[0].outputs["RISK_BAND"].tolist() == [[LOW], [HIGH]]
    assert responses[1].outputs == {}
    assert "non-finite" in responses[1].error.message
    assert responses[2].outputs["SCORE"].tolist() == [[3.0], [5.0], [20.0]]
    assert responses[2].outputs["RISK_BAND"].tolist() == [[LOW_MEDIUM], [MEDIUM], [HIGH]]
    assert responses[2].outputs["CONTRIBUTIONS"].shape == (3, 7)
