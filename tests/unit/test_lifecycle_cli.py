"""`medmesh models`: the Triton shape check and spec validation of `deploy`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from medmesh_cli.main import app
from medmesh_cli.models import check_triton_metadata
from medmesh_contracts.modelspec import load_spec

SPEC_FILE = Path(__file__).resolve().parents[2] / "deploy" / "models" / "deterioration.yaml"
SPEC = load_spec(SPEC_FILE)


def _metadata(vitals: int = 7, contributions: int = 7) -> dict[str, Any]:
    """Triton's answer to GET /v2/models/deterioration/versions/N (batching: leading -1)."""
    return {
        "inputs": [{"name": "VITALS", "datatype": "FP32", "shape": [-1, vitals]}],
        "outputs": [
            {"name": "SCORE", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "RISK_BAND", "datatype": "INT32", "shape": [-1, 1]},
            {"name": "CONTRIBUTIONS", "datatype": "FP32", "shape": [-1, contributions]},
        ],
    }


def test_matching_triton_metadata_has_no_problems() -> None:
    """Tensors named in the spec with one column per input pass the check."""
    assert check_triton_metadata(SPEC.version(1), _metadata()) == []


def test_shape_mismatch_and_missing_tensor_are_reported() -> None:
    """A 6-column input and a missing band tensor are both named."""
    metadata = _metadata(vitals=6)
    metadata["outputs"] = [o for o in metadata["outputs"] if o["name"] != "RISK_BAND"]
    problems = check_triton_metadata(SPEC.version(1), metadata)
    assert any("'VITALS' has shape [-1, 6]" in p for p in problems)
    assert any("no tensor 'RISK_BAND'" in p for p in problems)


def test_deploy_refuses_a_version_the_spec_does_not_declare() -> None:
    """`medmesh models deploy SPEC --version 9` exits 2 before touching Triton or Kafka."""
    result = CliRunner().invoke(app, ["models", "deploy", str(SPEC_FILE), "--version", "9"])
    assert result.exit_code == 2
    assert "invalid spec or policy" in result.output
