"""The worker's gRPC channel to Triton: tritonclient's defaults kept, reconnects kept short."""

from __future__ import annotations

from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

from medmesh_inference.settings import WorkerSettings
from medmesh_inference.triton import channel_options


def test_channel_keeps_tritonclients_message_limits_and_keepalive() -> None:
    """Passing channel options replaces tritonclient's defaults, so they are all passed again."""
    options = dict(channel_options())
    assert options["grpc.max_send_message_length"] == MAX_GRPC_MESSAGE_SIZE
    assert options["grpc.max_receive_message_length"] == MAX_GRPC_MESSAGE_SIZE
    assert {"grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms"} <= options.keys()


def test_channel_reconnects_faster_than_the_circuit_probes() -> None:
    """After a Triton restart the channel retries within a second, never slower than the
    circuit breaker's longest wait between probes (gRPC's own default grows to 120 s)."""
    options = dict(channel_options())
    longest_probe_wait_ms = WorkerSettings.model_fields["circuit_backoff_max_ms"].default
    assert options["grpc.max_reconnect_backoff_ms"] <= min(1000, longest_probe_wait_ms)
    assert options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]
