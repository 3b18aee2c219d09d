"""GPU detection for Triton's instance groups: NVML first, nvidia-smi as fallback, env override."""

from __future__ import annotations

import sys
import types

import pytest

from medmesh_cli.devstack.triton import GpuDetection, detect_gpus, nvml_gpu_count


class _NVMLError(Exception):
    pass


def _fake_pynvml(count: int, init_fails: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_fails:
            raise _NVMLError("Driver Not Loaded")

    def device_count() -> int:
        return count

    def shutdown() -> None:
        calls.append("shutdown")

    module.NVMLError = _NVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = device_count  # type: ignore[attr-defined]
    module.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


def test_nvml_counts_devices_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a driver, NVML's device count is used and NVML is shut down again."""
    fake = _fake_pynvml(4)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml_gpu_count() == 4
    assert fake.calls == ["init", "shutdown"]


def test_nvml_without_a_driver_says_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvmlInit failing (no driver, no libnvidia-ml) means 'unknown', not zero GPUs."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(0, init_fails=True))
    assert nvml_gpu_count() is None


def test_nvml_answer_wins_over_nvidia_smi() -> None:
    """When NVML answers, nvidia-smi is not asked."""

    def smi() -> int:
        raise AssertionError("nvidia-smi must not run when NVML answered")

    assert detect_gpus({}, nvml=lambda: 2, smi=smi) == GpuDetection(2, "nvml")


def test_nvidia_smi_is_the_fallback_when_nvml_is_unavailable() -> None:
    """Without NVML, the count of `nvidia-smi -L` is used."""
    assert detect_gpus({}, nvml=lambda: None, smi=lambda: 1) == GpuDetection(1, "nvidia-smi")


def test_medmesh_gpu_count_overrides_detection() -> None:
    """MEDMESH_GPU_COUNT=0 forces CPU even on a GPU host (and any number forces that many)."""
    assert detect_gpus({"MEDMESH_GPU_COUNT": "0"}, nvml=lambda: 8, smi=lambda: 8) == GpuDetection(
        0, "env"
    )
    assert detect_gpus({"MEDMESH_GPU_COUNT": "2"}, nvml=lambda: None, smi=lambda: 0).count == 2


def test_this_host_detection_does_not_fail() -> None:
    """On the test host (a CPU machine here) detection answers a count without raising."""
    assert detect_gpus().count >= 0
