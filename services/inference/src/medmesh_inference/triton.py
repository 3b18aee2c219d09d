"""The worker's Triton client: gRPC asyncio, one channel, explicit model name and version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import (
    MAX_GRPC_MESSAGE_SIZE,
    InferenceServerException,
    InferInput,
    InferRequestedOutput,
    KeepAliveOptions,
)
from tritonclient.grpc.aio import InferenceServerClient

from medmesh_contracts.modelspec import VersionSpec
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.inference.triton")

# gRPC status codes after which the same call may succeed later.
_TRANSIENT_STATUSES = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.ABORTED",
        "StatusCode.CANCELLED",
    }
)


# gRPC waits up to 120 s between attempts to reconnect a channel whose server went away (1 s,
# then x1.6 each failure); after a Triton restart the worker's probes kept failing for up to ~10 s
# after the server was back. The circuit breaker already paces the probes, so the channel retries
# at most a second apart.
RECONNECT_BACKOFF_INITIAL_MS = 200
RECONNECT_BACKOFF_MAX_MS = 1000


def channel_options() -> list[tuple[str, int]]:
    """tritonclient's default channel options (message sizes, keepalive) with the reconnect
    backoff capped at ``RECONNECT_BACKOFF_MAX_MS`` (passing any options replaces its defaults)."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


class TritonCallError(Exception):
    """A Triton call failed; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def classify(exc: BaseException) -> TritonCallError:
    """Translate a tritonclient or transport error into a TritonCallError."""
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        transient = status in _TRANSIENT_STATUSES or "not ready" in str(exc.message()).lower()
        return TritonCallError(f"{status or 'error'}: {exc.message()}", transient)
    if isinstance(exc, TimeoutError | ConnectionError | OSError):
        return TritonCallError(f"{type(exc).__name__}: {exc}", transient=True)
    return TritonCallError(f"{type(exc).__name__}: {exc}", transient=False)


class TritonModel:
    """One model version on one Triton server."""

    def __init__(
        self,
        url: str,
        model: str,
        version: int,
        input_datatypes: Mapping[str, str],
        output_tensors: Sequence[str],
        timeout_s: float,
    ) -> None:
        self._url = url
        self._channel: InferenceServerClient | None = None
        self.model = model
        self.version = str(version)
        self._inputs = dict(input_datatypes)
        self._outputs = tuple(output_tensors)
        self._timeout_s = timeout_s
        # Why the last readiness probe failed (None: it did not).
        self.not_ready_because: str | None = None

    @classmethod
    def for_version(cls, url: str, version: VersionSpec) -> TritonModel:
        """The Triton model version a spec version names, with its tensors and timeout."""
        target = version.triton
        return cls(
            url,
            target.model,
            target.version,
            {t.name: t.datatype for t in target.inputs},
            version.output_tensor_names,
            timeout_s=target.timeout_ms / 1000,
        )

    @property
    def _client(self) -> InferenceServerClient:
        """The gRPC client, opened on first use: grpc.aio binds a channel to the running loop."""
        if self._channel is None:
            self._channel = InferenceServerClient(url=self._url, channel_args=channel_options())
        return self._channel

    async def ready(self) -> bool:
        """True when the server answers (within the model's timeout) that this version is ready.

        Why it was not (the error, or Triton's "not ready") is logged when it changes, and kept
        in ``not_ready_because``; callers probe again with backoff.
        """
        try:
            ready = bool(
                await self._client.is_model_ready(
                    self.model, model_version=self.version, client_timeout=self._timeout_s
                )
            )
        except Exception as exc:  # noqa: BLE001 -- any failure to ask means "not ready"; logged
            self._not_ready(classify(exc).args[0])
            return False
        if ready:
            self.not_ready_because = None
        else:
            self._not_ready("Triton says the version is not ready")
        return ready

    def _not_ready(self, reason: str) -> None:
        if reason != self.not_ready_because:
            log.warning(
                "Triton model version not ready",
                model=self.model,
                model_version=self.version,
                reason=reason[:300],
            )
        self.not_ready_because = reason

    async def device_kind(self) -> str:
        """The instance kind Triton runs this version on (KIND_CPU or KIND_GPU)."""
        config = await self._client.get_model_config(
            self.model, model_version=self.version, as_json=True, client_timeout=self._timeout_s
        )
        groups = config.get("config", {}).get("instance_group", [])
        kinds = sorted({g.get("kind", "KIND_AUTO") for g in groups})
        return "+".join(kinds) or "KIND_AUTO"

    async def infer(
        self, batch: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch (a tensor per input name); raises TritonCallError."""
        tensors = []
        for name, datatype in self._inputs.items():
            tensor = InferInput(name, list(batch[name].shape), datatype)
            tensor.set_data_from_numpy(batch[name])
            tensors.append(tensor)
        try:
            result = await self._client.infer(
                self.model,
                inputs=tensors,
                model_version=self.version,
                outputs=[InferRequestedOutput(name) for name in self._outputs],
                client_timeout=self._timeout_s,
            )
        except Exception as exc:
            raise classify(exc) from exc
        return {name: result.as_numpy(name) for name in self._outputs}

    async def close(self) -> None:
        """Close the gRPC channel (if it was opened)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
