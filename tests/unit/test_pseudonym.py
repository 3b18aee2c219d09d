"""Patient pseudonyms."""

from __future__ import annotations

import pytest

from medmesh_ingest.pseudonym import Pseudonymizer

KEY = b"0123456789abcdef0123456789abcdef"


def test_same_reference_same_pseudonym() -> None:
    """A patient reference always maps to the same pseudonym under one key."""
    pseudonymize = Pseudonymizer(KEY)
    assert pseudonymize("Patient/123") == pseudonymize("Patient/123")


def test_pseudonym_hides_the_reference_and_depends_on_the_key() -> None:
    """The pseudonym does not contain the reference, and another key gives another pseudonym."""
    first = Pseudonymizer(KEY)("Patient/123")
    other = Pseudonymizer(KEY[::-1])("Patient/123")
    assert "123" not in first
    assert first != other
    assert first.startswith("p")
    assert len(first) == 27


def test_short_keys_are_refused() -> None:
    """A key shorter than 16 bytes is rejected."""
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(b"short")
