"""HTTP transport checks that come before FHIR validation."""

from __future__ import annotations

from medmesh_ingest.outcomes import FhirRejected, Issue, outcome

_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")


def content_type_problem(content_type: str | None) -> FhirRejected | None:
    """A 415 rejection for a media type or FHIR version ingest does not speak, else None."""
    if content_type is None:
        return None  # curl and many interface engines omit it; the body decides
    media, *params = (part.strip() for part in content_type.split(";"))
    if media.lower() not in _JSON_TYPES:
        return FhirRejected(
            415,
            outcome(
                (
                    Issue(
                        "error",
                        "not-supported",
                        f"media type {media} is not supported; send application/fhir+json",
                    ),
                )
            ),
        )
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "fhirversion" and not value.strip().strip('"').startswith("4.3"):
            return FhirRejected(
                415,
                outcome(
                    (
                        Issue(
                            "error",
                            "not-supported",
                            f"fhirVersion {value} is not supported; this endpoint speaks R4B (4.3)",
                        ),
                    )
                ),
            )
    return None
