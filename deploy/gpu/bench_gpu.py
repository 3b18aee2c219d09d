"""Direct-Triton throughput of the ONNX models on a GPU host, KIND_GPU against KIND_CPU instances.

Two steps, because the GPU host has no network and none of medmesh's packages:

1. ``prepare`` (here, in the project's virtualenv): render the committed model repository twice,
   for one GPU (``KIND_GPU`` instance groups, ONNX models through the rendered python runner, as
   ``medmesh up`` serves them from the tritonserver wheel) and for none (``KIND_CPU``), and fetch
   the ``nvidia-pytriton`` wheel (its ``tritonserver``) into one bundle folder.
2. ``run`` (on the GPU host, plain ``python3`` with numpy, onnxruntime and torch): install the
   wheel into a scratch folder, start both servers side by side, and measure sequential calls
   of batch 1, 8 and the model's maximum on each, alternating the servers round by round, over
   Triton's HTTP protocol with binary tensors. Also, for the ECG network, the same ONNX weights
   run by torch on the GPU directly (the CUDA compute the runner would get with onnxruntime-gpu)
   against onnxruntime on the host's CPUs, after checking both give the same probabilities.

Results go to ``<out>/gpu.json`` and ``<out>/gpu.md`` (docs/benchmarks/gpu.md quotes them).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS = (
    # (Triton model, version, input tensor, row width, output tensor, max batch)
    ("deterioration-gbt", 1, "VITALS", 7, "PROBABILITIES", 64),
    ("ecg-rhythm-cnn", 1, "ECG", 2500, "PROBABILITIES", 32),
    ("deterioration", 1, "VITALS", 7, "SCORE", 64),
)
PORTS = {"gpu": 28100, "cpu": 28200}
ROUNDS = 2
SECONDS_PER_SERIES = 4.0


# --- prepare (here) -----------------------------------------------------------------------------


def prepare(bundle: Path) -> None:
    """Render the repository for one GPU and for none into ``bundle`` (the wheel goes beside)."""
    from medmesh_cli.devstack.model_repository import (  # noqa: PLC0415 -- only here, not there
        render_model_repository,
    )

    root = Path(__file__).resolve().parents[2]
    source = root / "deploy" / "triton" / "models"
    for name, gpus in (("repo-gpu", 1), ("repo-cpu", 0)):
        target = bundle / name
        shutil.rmtree(target, ignore_errors=True)
        render_model_repository(source, target, gpus)
    print(f"rendered {bundle}/repo-gpu and repo-cpu; put the nvidia-pytriton wheel in {bundle}")


# --- run (on the GPU host) ----------------------------------------------------------------------


def _install_tritonserver(bundle: Path, scratch: Path) -> tuple[Path, Path]:
    """The tritonserver binary and a backend folder with the python stub of this interpreter."""
    wheel = next(bundle.glob("nvidia_pytriton-*.whl"))
    site = scratch / "site"
    # A wheel is a zip archive: unpacked as it is (no pip there), then the executables marked.
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    server = site / "pytriton" / "tritonserver"
    # The stub goes in place: its libraries are found relative to it (nvidia_pytriton.libs).
    backends = server / "backends"
    tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = backends / "python" / "triton_python_backend_stub"
    shutil.copy2(server / "python_backend_stubs" / tag / "triton_python_backend_stub", stub)
    binary = server / "bin" / "tritonserver"
    for executable in (binary, stub):
        executable.chmod(0o755)
    return binary, backends


def _start(binary: Path, backends: Path, repository: Path, port: int, log: Path) -> Any:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
    command = [
        str(binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--http-port={port}",
        f"--grpc-port={port + 1}",
        f"--metrics-port={port + 2}",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--strict-readiness=true",
        "--exit-timeout-secs=5",
    ]
    return subprocess.Popen(  # noqa: S603 -- the wheel's own tritonserver
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
    )


def _ready(port: int, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/v2/health/ready")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"Triton on port {port} was not ready in {timeout_s:.0f} s")


def _config(port: int, model: str) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", f"/v2/models/{model}/config")
    answer: dict[str, Any] = json.loads(connection.getresponse().read())
    return answer


class Client:
    """Sequential binary-tensor inference calls over one keep-alive HTTP connection."""

    def __init__(self, port: int, model: str, version: int, tensor: str, output: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.path = f"/v2/models/{model}/versions/{version}/infer"
        self.tensor, self.output = tensor, output

    def infer(self, batch: Any) -> bytes:
        data = batch.astype("float32").tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": self.tensor,
                        "shape": list(batch.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
                "outputs": [{"name": self.output, "parameters": {"binary_data": True}}],
            }
        ).encode()
        self.connection.request(
            "POST",
            self.path,
            body=header + data,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.path}: HTTP {response.status} {body[:300]!r}")
        return body


def _rows(width: int, batch: int, seed: int) -> Any:
    import numpy as np  # noqa: PLC0415 -- numpy is there, imported where used

    rng = np.random.default_rng(seed)
    if width == 7:  # plausible vital signs in the spec's column order
        centre = np.array([18, 96, 0, 37.0, 120, 85, 0], dtype=np.float32)
        spread = np.array([4, 2, 0, 0.6, 15, 15, 0], dtype=np.float32)
        return centre + spread * rng.standard_normal((batch, width)).astype(np.float32)
    t = np.arange(width, dtype=np.float32) / 250.0
    beats = np.sin(2 * np.pi * 1.2 * t) ** 63  # a spiky 72 /min train, 10 s at 250 Hz
    noise = 0.02 * rng.standard_normal((batch, width))
    return (beats + noise).astype(np.float32)


def _series(client: Client, batch: Any) -> dict[str, float]:
    for _ in range(10):  # warm-up
        client.infer(batch)
    latencies: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < SECONDS_PER_SERIES:
        t0 = time.perf_counter()
        client.infer(batch)
        latencies.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "calls": len(latencies),
        "rows_per_s": len(latencies) * batch.shape[0] / elapsed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def _triton_series() -> list[dict[str, Any]]:
    results = []
    for model, version, tensor, width, output, max_batch in MODELS:
        for batch_size in sorted({1, 8, max_batch}):
            batch = _rows(width, batch_size, seed=batch_size)
            runs: dict[str, list[dict[str, float]]] = {"cpu": [], "gpu": []}
            for round_index in range(ROUNDS):
                order = ("cpu", "gpu") if round_index % 2 == 0 else ("gpu", "cpu")
                for kind in order:
                    client = Client(PORTS[kind], model, version, tensor, output)
                    runs[kind].append(_series(client, batch))
            row: dict[str, Any] = {"model": model, "batch": batch_size}
            for kind, measured in runs.items():
                row[kind] = {
                    key: statistics.median(m[key] for m in measured) for key in measured[0]
                }
            row["gpu_over_cpu"] = row["gpu"]["rows_per_s"] / row["cpu"]["rows_per_s"]
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def _torch_reference(repository: Path) -> dict[str, Any]:
    """The ECG network's ONNX weights run by torch on the GPU vs onnxruntime on the CPUs."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    path = repository / "ecg-rhythm-cnn" / "1" / "model.onnx"
    weights = {
        i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
        for i in onnx.load(str(path)).graph.initializer
    }
    device = torch.device("cuda")
    w = {k: v.to(device) for k, v in weights.items()}
    eps = float(weights["eps"].reshape(-1)[0])
    functional = torch.nn.functional

    def forward(x: Any) -> Any:  # mirrors the graph node by node (see the model card)
        centred = x - x.mean(dim=1, keepdim=True)
        h = (centred / torch.sqrt((centred * centred).mean(dim=1, keepdim=True) + eps))[:, None]
        h = functional.max_pool1d(
            functional.relu(functional.conv1d(h, w["conv0_w"], w["conv0_b"], stride=2, padding=3)),
            2,
        )
        h = functional.max_pool1d(
            functional.relu(functional.conv1d(h, w["conv1_w"], w["conv1_b"], padding=3)), 4
        )
        h = functional.max_pool1d(
            functional.relu(functional.conv1d(h, w["conv2_w"], w["conv2_b"], padding=3)), 2
        )
        pooled = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)
        return torch.softmax(pooled @ w["dense_w"] + w["dense_b"], dim=1)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = _rows(2500, 64, seed=7)
    expected = session.run(None, {"ECG": check})[0]
    with torch.no_grad():
        got = forward(torch.from_numpy(check).to(device)).cpu().numpy()
    result: dict[str, Any] = {"max_abs_diff": float(np.abs(got - expected).max()), "series": []}
    for batch_size in (1, 8, 64, 1024):
        batch = _rows(2500, batch_size, seed=batch_size)
        on_gpu = torch.from_numpy(batch).to(device)
        row: dict[str, Any] = {"batch": batch_size}

        def on_cpu(b: Any = batch) -> object:
            return session.run(None, {"ECG": b})

        def on_cuda(g: Any = on_gpu) -> object:
            return forward(g).cpu()

        calls: tuple[tuple[str, Callable[[], object]], ...] = (
            ("onnxruntime_cpu", on_cpu),
            ("torch_cuda", on_cuda),
        )
        for name, call in calls:
            with torch.no_grad():
                for _ in range(10):
                    call()
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < 2.0:
                    call()
                    count += 1
            row[name] = count * batch_size / (time.perf_counter() - started)
        row["cuda_over_cpu"] = row["torch_cuda"] / row["onnxruntime_cpu"]
        result["series"].append(row)
        print(json.dumps(row), flush=True)
    return result


def _facts() -> dict[str, Any]:
    import onnxruntime  # noqa: PLC0415
    import torch  # noqa: PLC0415

    smi = subprocess.run(
        ["nvidia-smi", "-L"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "gpu": smi.stdout.strip(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "torch": torch.__version__,
        "torch_cuda": torch.cuda.is_available(),
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"facts: `{json.dumps(report['facts'])}`",
        "",
        "| model | batch | KIND_CPU rows/s | KIND_GPU rows/s | GPU / CPU | CPU p50 ms | GPU p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["triton"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['cpu']['rows_per_s']:.0f} "
            f"| {r['gpu']['rows_per_s']:.0f} | {r['gpu_over_cpu']:.2f} "
            f"| {r['cpu']['p50_ms']:.2f} | {r['gpu']['p50_ms']:.2f} |"
        )
    reference = report.get("torch_reference")
    if reference:
        lines += [
            "",
            f"ECG network, same weights, torch on the GPU vs onnxruntime on the CPUs "
            f"(max |difference| {reference['max_abs_diff']:.2e}):",
            "",
            "| batch | onnxruntime CPU rows/s | torch CUDA rows/s | CUDA / CPU |",
            "|---|---|---|---|",
        ]
        for r in reference["series"]:
            lines.append(
                f"| {r['batch']} | {r['onnxruntime_cpu']:.0f} | {r['torch_cuda']:.0f} "
                f"| {r['cuda_over_cpu']:.2f} |"
            )
    runner = report.get("runner_providers")
    if runner:
        lines += ["", f"runner log lines on providers: `{runner}`"]
    return "\n".join(lines) + "\n"


def run(bundle: Path, out: Path) -> None:
    """Start both servers from the bundle, measure, write gpu.json and gpu.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="medmesh-gpu-"))
    report: dict[str, Any] = {"facts": _facts()}
    print(json.dumps(report["facts"]), flush=True)
    binary, backends = _install_tritonserver(bundle, scratch)
    servers = {
        kind: _start(binary, backends, bundle / f"repo-{kind}", port, out / f"triton-{kind}.log")
        for kind, port in PORTS.items()
    }
    try:
        for port in PORTS.values():
            _ready(port)
        report["instance_groups"] = {
            kind: _config(port, "ecg-rhythm-cnn").get("instance_group")
            for kind, port in PORTS.items()
        }
        print(json.dumps(report["instance_groups"]), flush=True)
        report["triton"] = _triton_series()
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(timeout=30)
    log = (out / "triton-gpu.log").read_text(errors="replace").splitlines()
    report["runner_providers"] = [line for line in log if "Provider" in line][:6]
    try:
        report["torch_reference"] = _torch_reference(bundle / "repo-gpu")
    except Exception as exc:  # noqa: BLE001 -- a missing reference is recorded, the rest stands
        report["torch_reference_error"] = f"{type(exc).__name__}: {exc}"
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu.md").write_text(_markdown(report))
    print(_markdown(report))


def main() -> None:
    """``prepare BUNDLE`` here, ``run BUNDLE OUT`` on the GPU host."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare").add_argument("bundle", type=Path)
    step = sub.add_parser("run")
    step.add_argument("bundle", type=Path)
    step.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.bundle)
    else:
        run(args.bundle, args.out)


if __name__ == "__main__":
    main()
