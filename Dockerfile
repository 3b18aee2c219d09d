# syntax=docker/dockerfile:1.7
# One image for all four services; the command picks the service (see compose.yaml, deploy/k8s):
#   python -m medmesh_ingest | medmesh_router | medmesh_inference | medmesh_reporting
# A second target packs the Triton model repository for Kubernetes (docker build --target models).
# Base images are pinned by version; pin them by digest too (image@sha256:...) in your registry.
#
# onnxruntime-gpu: no image built here needs it. The services never run a model (Triton does), and
# NVIDIA's Triton container runs ONNX models (platform onnxruntime_onnx) on the GPU with its own
# onnxruntime backend. This image holds the CPU onnxruntime only through medmesh-cli's model tooling.
# The one place onnxruntime-gpu belongs instead of onnxruntime is the virtualenv of a Triton started
# from the nvidia-pytriton wheel on a GPU host (`medmesh up`): its python backend runs ONNX models
# with medmesh_cli.devstack.onnx_runner, which uses CUDA only when onnxruntime-gpu provides it.

# --- build: resolve the locked dependencies into a virtualenv with uv ---------------------------
FROM python:3.11.11-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.9.5 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
# Dependencies first (cached while only the source changes), then the workspace packages.
COPY pyproject.toml uv.lock ./
COPY contracts/pyproject.toml contracts/pyproject.toml
COPY libs/runtime/pyproject.toml libs/runtime/pyproject.toml
COPY services/ingest/pyproject.toml services/ingest/pyproject.toml
COPY services/router/pyproject.toml services/router/pyproject.toml
COPY services/inference/pyproject.toml services/inference/pyproject.toml
COPY services/reporting/pyproject.toml services/reporting/pyproject.toml
COPY services/monolith/pyproject.toml services/monolith/pyproject.toml
COPY services/console/pyproject.toml services/console/pyproject.toml
COPY cli/pyproject.toml cli/pyproject.toml
# --no-dev: the runtime image needs neither test tools nor the local Triton wheel.
RUN uv sync --frozen --no-dev --no-install-workspace
COPY contracts contracts
COPY libs libs
COPY services services
COPY cli cli
RUN uv sync --frozen --no-dev --no-editable
# The Triton model repository rendered for one GPU, the GPU each Triton pod gets (nvidia.com/gpu: 1
# in deploy/k8s/base/triton.yaml): every instance_group one KIND_GPU instance on GPU 0, ONNX models
# as they are (NVIDIA's container loads them). Same code as `medmesh up` and compose's gpu profile.
COPY deploy/triton/models deploy/triton/models
RUN .venv/bin/python -m medmesh_cli.devstack.model_repository --source=deploy/triton/models \
      --target=/app/triton-models-gpu --gpus=1 --onnx=native

# --- models: the Triton model repository, copied into Triton's pod by an init container ---------
FROM busybox:1.37.0 AS models
COPY --from=build /app/triton-models-gpu /models
USER 10001
CMD ["cp", "-R", "/models/.", "/repository/"]

# --- runtime: the services (the default target: last stage) -------------------------------------
# No compiler, no uv, no sources: only the virtualenv, the model specs and the health check.
FROM python:3.11.11-slim-bookworm AS runtime
# /app/triton-models: where compose's triton-models job renders the repository (a volume that
# takes this folder's owner when first mounted, so the non-root user can write it).
RUN useradd --create-home --uid 10001 --user-group medmesh \
 && install -d -o medmesh -g medmesh /app/triton-models
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY deploy/models deploy/models
# Docker health check: GET /readyz on this container's service port, read through the service's own
# settings class (so MEDMESH_<SERVICE>_PORT means the same to the check as to the service).
COPY <<'EOF' /app/healthcheck.py
import importlib
import urllib.request
from pathlib import Path

SERVICES = {
    "medmesh_ingest": ("IngestSettings", "ingest_port"),
    "medmesh_router": ("RouterSettings", "router_port"),
    "medmesh_inference": ("WorkerSettings", "worker_port"),
    "medmesh_reporting": ("ReportingSettings", "reporting_port"),
    "medmesh_console": ("ConsoleSettings", "console_port"),
}
args = Path("/proc/1/cmdline").read_bytes().decode().split("\0")
module = next(a for a in args if a in SERVICES)
cls, field = SERVICES[module]
port = getattr(getattr(importlib.import_module(f"{module}.settings"), cls)(), field)
urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
EOF
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MEDMESH_MODEL_SPECS_DIR=/app/deploy/models MEDMESH_HTTP_HOST=0.0.0.0
USER 10001:10001
EXPOSE 8080 8181 8182 8184
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
  CMD ["python", "/app/healthcheck.py"]
CMD ["python", "-m", "medmesh_ingest"]
