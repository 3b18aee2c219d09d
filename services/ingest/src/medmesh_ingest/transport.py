"""HTTP transport checks that come before FHIR validation: media type and FHIR version.

``fhirVersion=4.0`` (or ``4.0.1``) names R4, which ingest reads with the R4B models
(``medmesh_ingest.r4`` says why they serve).
"""

from __future__ import annotations

from medmesh_contracts.events import FhirVersion
from medmesh_ingest.outcomes import UNSUPPORTED_VERSION, rejected

_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
# fhirVersion parameter values (FHIR's version-specific MIME parameter) and what they mean.
_VERSIONS: dict[str, FhirVersion] = {"4.0": "R4", "4.3": "R4B", "5.0": "R5"}


def requested_version(content_type: str | None, default: FhirVersion) -> FhirVersion:
    """The FHIR version a content type asks for (``fhirVersion=5.0``), else ``default``.

    Raises ``FhirRejected`` (415) for a media type other than JSON or a version not spoken.
    """
    if content_type is None:
        return default  # curl and many interface engines omit it; the body decides
    media, *params = (part.strip() for part in content_type.split(";"))
    if media.lower() not in _JSON_TYPES:
        raise rejected(
            UNSUPPORTED_VERSION,
            "not-supported",
            f"media type {media[:80]} is not supported; send application/fhir+json",
        )
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() != "fhirversion":
            continue
        wanted = value.strip().strip('"')
        version = next((v for prefix, v in _VERSIONS.items() if _names(wanted, prefix)), None)
        if version is None:
            raise rejected(
                UNSUPPORTED_VERSION,
                "not-supported",
                f"fhirVersion {wanted[:20]} is not supported; this endpoint speaks R4 (4.0), "
                "R4B (4.3) and R5 (5.0)",
            )
        return version
    return default


def _names(wanted: str, prefix: str) -> bool:
    """Whether a fhirVersion value names the version ``prefix`` (``4.3`` or ``4.3.0``)."""
    return wanted == prefix or wanted.startswith(prefix + ".")
