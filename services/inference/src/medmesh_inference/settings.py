"""Configuration of one inference worker (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medmesh_runtime.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    """A worker serves exactly one model version: it consumes that version's task topic."""

    worker_model: str = "deterioration"
    worker_model_version: int = 1
    worker_port: int = 8182
    triton_grpc_url: str = "127.0.0.1:8001"
    # Longest wait for more tasks to fill a batch.
    batch_wait_ms: int = 20
    # adaptive: a batch waits only when tasks arrive fast enough to fill it within
    # batch_wait_ms (a lone task on an idle worker is scored at once); fixed: every batch short
    # of the max waits batch_wait_ms (the behaviour before issue 17).
    batch_linger: Literal["adaptive", "fixed"] = "adaptive"
    # Most tasks scored in one Triton call; 0 means the model spec's max_batch_size (1 = no
    # consumer micro-batching, as the benchmark's batching-off series runs it).
    worker_max_batch: int = Field(default=0, ge=0)
    # Retries of a transient Triton error before the tasks are failed.
    triton_max_attempts: int = 4
    triton_backoff_initial_ms: int = 100
    # Circuit breaker while Triton is unreachable or the version not ready: the wait before each
    # readiness probe doubles from the initial value up to the cap (with jitter).
    circuit_backoff_initial_ms: int = 200
    circuit_backoff_max_ms: int = 5000
    # Heartbeats on medmesh.models.status (and Triton readiness probes) this often.
    heartbeat_interval_s: float = 3.0
    # DICOMweb bases (comma-separated) this worker may fetch image inputs from: a task naming any
    # other PACS fails, so an event never makes a worker call an arbitrary host.
    pacs_urls: str = ""
    # One WADO-RS retrieve's time limit, and its tries before the PACS counts as unavailable.
    pacs_timeout_ms: int = Field(default=10_000, ge=1)
    pacs_max_attempts: int = Field(default=3, ge=1)

    @property
    def allowed_pacs_urls(self) -> list[str]:
        """``pacs_urls`` as a list."""
        return [url.strip() for url in self.pacs_urls.split(",") if url.strip()]

    @property
    def group_id(self) -> str:
        """Workers of the same version share one consumer group (they split its partitions)."""
        return f"medmesh-worker-{self.worker_model}-v{self.worker_model_version}"
