# One image for all four services; the command picks the service (see compose.yaml).
# Build stage: resolve the locked dependencies into a virtualenv with uv.
FROM python:3.11.11-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.9.5 /uv /usr/local/bin/uv
WORKDIR /app
COPY pyproject.toml uv.lock ./
COPY contracts contracts
COPY libs libs
COPY services services
COPY cli cli
# --no-dev: the runtime image needs neither test tools nor the local Triton wheel.
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11.11-slim-bookworm
RUN useradd --create-home --uid 10001 medmesh
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY deploy/models deploy/models
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1 MEDMESH_MODEL_SPECS_DIR=/app/deploy/models
USER medmesh
HEALTHCHECK --interval=10s --timeout=3s --retries=6 \
  CMD python -c "import os,urllib.request as u; p=os.environ.get('MEDMESH_HEALTH_PORT','8080'); u.urlopen(f'http://127.0.0.1:{p}/readyz', timeout=2)"
CMD ["python", "-m", "medmesh_ingest"]
