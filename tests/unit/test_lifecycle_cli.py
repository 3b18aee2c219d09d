"""`medmesh models`: the Triton shape check and spec validation of `deploy`, routing rules."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medmesh_cli.main import app
from medmesh_cli.models import check_triton_metadata, parse_rule
from medmesh_contracts.events import Producer
from medmesh_contracts.lifecycle import LifecycleError, RoutingRule, seed_deployment, with_rules
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


def test_a_rule_is_parsed_from_key_value_pairs() -> None:
    """`--rule version=2,site=north,source-system=ris` pins that site and system to v2."""
    rule = parse_rule("version=2, site=north, source-system=ris")
    assert rule == RoutingRule(version=2, site="north", source_system="ris")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("site=north", "version=<number>"),
        ("version=two,site=north", "version=<number>"),
        ("version=2", "at least one of"),
        ("version=2,room=7", "key=value pairs"),
        ("version=2,site=", "key=value pairs"),
        ("version=2,site=a,site=b", "given twice"),
    ],
)
def test_a_malformed_rule_is_refused_with_the_reason(text: str, why: str) -> None:
    """Each malformed rule names what is wrong."""
    with pytest.raises(ValueError, match=why):
        parse_rule(text)


def test_route_refuses_bad_rules_before_touching_kafka() -> None:
    """`medmesh models route` with a bad rule, or with neither --rule nor --clear, exits 2."""
    runner = CliRunner()
    bad = runner.invoke(app, ["models", "route", "deterioration", "--rule", "site=north"])
    assert bad.exit_code == 2
    assert "invalid rule" in bad.output
    neither = runner.invoke(app, ["models", "route", "deterioration"])
    assert neither.exit_code == 2


def test_rules_name_registry_versions_only() -> None:
    """with_rules replaces the rules and bumps the revision; a rule naming a version the
    registry does not hold is refused."""
    now = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    producer = Producer(service="cli", instance="t")
    current = seed_deployment(SPEC.name, SPEC.routing.weights, producer, now, "tester")
    rules = (RoutingRule(version=1, ward="icu"),)
    changed = with_rules(current, rules, producer, now, "tester")
    assert changed.rules == rules
    assert changed.revision == current.revision + 1
    with pytest.raises(LifecycleError, match=r"not in the registry: \[9\]"):
        with_rules(current, (RoutingRule(version=9, site="x"),), producer, now, "tester")
