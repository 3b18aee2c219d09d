"""Fetch what the local stack needs before the first run: Kafka jars, HAPI's FHIR validator
(the conformance tests), HAPI's JPA server (the stack's FHIR server), Triton's backend, Orthanc, and chromium for the console's browser
test."""

from __future__ import annotations

import sys

from medmesh_cli.devstack.chromium import ChromiumMissingError, ensure_chromium
from medmesh_cli.devstack.hapi_server import ensure_fhir_server
from medmesh_cli.devstack.hapi_validator import ensure_validator
from medmesh_cli.devstack.kafka import ensure_kafka_jars
from medmesh_cli.devstack.kustomize import ensure_kustomize
from medmesh_cli.devstack.orthanc import OrthancMissingError, ensure_orthanc
from medmesh_cli.devstack.triton import prepare_backend_directory, tritonserver_binary


def main() -> None:
    """Resolve the Kafka jars, the validator's and the FHIR server's (Maven, once; the
    launchers compiled once), prepare the Triton python backend folder, and make
    sure Orthanc and its DICOMweb plugin are installed (apt-get as root; otherwise how to get
    them, and exit 1), and chromium likewise."""
    sys.stdout.write(f"kafka jars: {ensure_kafka_jars()}\n")
    sys.stdout.write(f"HAPI FHIR validator: {ensure_validator()}\n")
    sys.stdout.write(f"HAPI FHIR server: {ensure_fhir_server()}\n")
    sys.stdout.write(f"kustomize: {ensure_kustomize()}\n")
    sys.stdout.write(f"tritonserver: {tritonserver_binary()}\n")
    sys.stdout.write(f"triton backends: {prepare_backend_directory()}\n")
    try:
        binary, plugin = ensure_orthanc()
    except OrthancMissingError as exc:
        sys.stderr.write(f"medmesh: {exc}\n")
        raise SystemExit(1) from exc
    sys.stdout.write(f"orthanc: {binary}\northanc dicomweb plugin: {plugin}\n")
    try:
        chromium = ensure_chromium()
    except ChromiumMissingError as exc:
        sys.stderr.write(f"medmesh: {exc}\n")
        raise SystemExit(1) from exc
    sys.stdout.write(f"chromium: {chromium}\n")


if __name__ == "__main__":
    main()
