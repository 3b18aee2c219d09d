"""Ingest refuses the published placeholder pseudonym keys outside development (issue 16 item 4)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import SecretStr

import medmesh_ingest.__main__ as ingest_main
import medmesh_monolith.__main__ as monolith_main
from medmesh_cli.devstack.stack import ServiceSpec, StackConfig, service_environment
from medmesh_ingest.settings import (
    DEVELOPMENT_PSEUDONYM_KEY,
    PUBLISHED_PSEUDONYM_KEYS,
    IngestSettings,
    check_pseudonym_key,
)

ROOT = Path(__file__).parents[2]
PLACEHOLDERS = (
    DEVELOPMENT_PSEUDONYM_KEY,
    "change-me-to-a-long-random-secret",
    "replace-with-at-least-32-random-bytes",
)
A_REAL_KEY = "k7Qw9ZrT2mXc4VbN8pLs1JdH6fGy3AeU"


Environment = Literal["production", "development"]


def settings(key: str, environment: Environment = "production") -> IngestSettings:
    """Ingest settings with this key in this environment."""
    return IngestSettings(pseudonym_key=SecretStr(key), environment=environment)


@pytest.mark.parametrize("key", PLACEHOLDERS)
def test_each_published_placeholder_is_refused_outside_development(key: str) -> None:
    """The development default and the .env.example / Secret example placeholders are refused
    in production, the default environment."""
    with pytest.raises(ValueError, match="placeholder published in the medmesh repository"):
        check_pseudonym_key(settings(key))
    assert IngestSettings().environment == "production"


def test_the_default_key_is_refused_when_nothing_is_configured() -> None:
    """Settings left at their defaults (no key, no environment) do not start."""
    with pytest.raises(ValueError, match="MEDMESH_PSEUDONYM_KEY"):
        check_pseudonym_key(IngestSettings())


def test_a_placeholder_with_surrounding_whitespace_is_still_refused() -> None:
    """A placeholder pasted with a trailing newline or spaces is the same published key."""
    with pytest.raises(ValueError, match="placeholder"):
        check_pseudonym_key(settings("change-me-to-a-long-random-secret\n"))


@pytest.mark.parametrize("environment", ["production", "development"])
def test_a_key_shorter_than_16_bytes_is_refused_in_any_environment(
    environment: Environment,
) -> None:
    """HMAC pseudonyms need at least 16 bytes of key, development included."""
    with pytest.raises(ValueError, match="at least 16 bytes"):
        check_pseudonym_key(settings("fifteen-bytes!!", environment))


@pytest.mark.parametrize("key", PLACEHOLDERS)
def test_development_allows_the_placeholders(key: str) -> None:
    """MEDMESH_ENVIRONMENT=development (local runs, tests) starts with a published key."""
    check_pseudonym_key(settings(key, "development"))


def test_a_random_key_of_16_bytes_or_more_is_accepted_in_production() -> None:
    """A key of the site's own is accepted."""
    check_pseudonym_key(settings(A_REAL_KEY))
    check_pseudonym_key(settings("0123456789abcdef"))


def test_the_environment_is_read_from_medmesh_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MEDMESH_ENVIRONMENT sets the switch; any value but production or development is refused."""
    monkeypatch.setenv("MEDMESH_ENVIRONMENT", "development")
    assert IngestSettings().environment == "development"
    monkeypatch.setenv("MEDMESH_ENVIRONMENT", "staging")
    with pytest.raises(ValueError, match="environment"):
        IngestSettings()


@pytest.mark.parametrize(
    ("module", "name"), [(ingest_main, "medmesh ingest"), (monolith_main, "medmesh monolith")]
)
def test_the_entry_points_exit_with_the_reason_before_serving(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str
) -> None:
    """python -m medmesh_ingest and the monolith stop with a message naming the setting, and
    never serve, when the key is a published placeholder."""
    monkeypatch.setenv("MEDMESH_PSEUDONYM_KEY", "change-me-to-a-long-random-secret")
    monkeypatch.delenv("MEDMESH_ENVIRONMENT", raising=False)

    def never(*_: object) -> None:
        raise AssertionError("served with a published pseudonym key")

    monkeypatch.setattr(module, "serve", never)
    monkeypatch.setattr(module, "create_app", never)
    with pytest.raises(SystemExit, match=rf"^{name}: MEDMESH_PSEUDONYM_KEY is a placeholder"):
        module.main()  # type: ignore[attr-defined]


def test_the_local_stack_runs_its_services_in_development() -> None:
    """`medmesh up`, the e2e tests and the benchmarks start ingest with the development switch."""
    env = service_environment(StackConfig(), ServiceSpec("ingest", "medmesh_ingest", 8080))
    assert env["MEDMESH_ENVIRONMENT"] == "development"


def test_every_placeholder_the_repository_publishes_is_refused() -> None:
    """The keys in .env.example and deploy/k8s/secret.example.yaml are among the refused ones,
    so that a placeholder changed there cannot slip through."""
    env_example = (ROOT / ".env.example").read_text()
    found = re.search(r"^MEDMESH_PSEUDONYM_KEY=(.*)$", env_example, re.M)
    assert found is not None
    secret = yaml.safe_load((ROOT / "deploy" / "k8s" / "secret.example.yaml").read_text())
    published = {found.group(1), secret["stringData"]["MEDMESH_PSEUDONYM_KEY"]}
    assert published <= PUBLISHED_PSEUDONYM_KEYS
