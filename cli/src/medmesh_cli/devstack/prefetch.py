"""Fetch what the local stack needs before the first run: Kafka jars and Triton's backend."""

from __future__ import annotations

import sys

from medmesh_cli.devstack.kafka import ensure_kafka_jars
from medmesh_cli.devstack.triton import prepare_backend_directory, tritonserver_binary


def main() -> None:
    """Resolve the Kafka jars (Maven, once) and prepare the Triton python backend folder."""
    sys.stdout.write(f"kafka jars: {ensure_kafka_jars()}\n")
    sys.stdout.write(f"tritonserver: {tritonserver_binary()}\n")
    sys.stdout.write(f"triton backends: {prepare_backend_directory()}\n")


if __name__ == "__main__":
    main()
