# syntax=docker/dockerfile:1
# The tenantflow worker image: the locked runtime dependencies, the package
# with its migrations, and flows/ + prefect.yaml in /app.
#
# As a *worker*: its command starts tenantflow's process worker on $TENANTFLOW_WORK_POOL (job
# variables cannot change a flow run's command, environment or folder); run N replicas of it
# against one Prefect server to scale out. As the *job image* of a docker or kubernetes work
# pool: tenantflow's locked docker/kubernetes worker (`tenantflow worker --pool
# tenantflow-docker`, with the docker or kubernetes extra) starts each flow run in it as
# `python -m tenantflow.container_run DEPLOYMENT`, the entrypoint taken from /app/prefect.yaml.
# Either way secrets (DATABASE_URL, MIGRATION_DATABASE_URL, SUPABASE_URL, SUPABASE_ANON_KEY,
# PREFECT_API_AUTH_STRING) come from the runtime environment or a mounted /app/.env, never
# the image.
#
# tests/deployments/test_dockerfile.py replays this file's install steps in a fresh virtual
# environment; keep RUN steps to plain commands on $VIRTUAL_ENV and the WORKDIR.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ARG UV_VERSION=0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src

# uv from its PyPI wheel, pinned.
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

# The locked runtime dependencies (no dev tools), verified against their hashes, in a layer of
# their own: rebuilt only when requirements.lock changes.
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv venv --python python3.11 "$VIRTUAL_ENV" \
    && uv pip sync --python "$VIRTUAL_ENV/bin/python" --require-hashes requirements.lock

# The project itself (package, Alembic migrations inside it), without dependencies: every
# one of them is in the lock already.
COPY pyproject.toml README.md ./
COPY src/ ./src/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python "$VIRTUAL_ENV/bin/python" --no-deps . \
    && "$VIRTUAL_ENV/bin/python" -c "import tenantflow.migrations, tenantflow.deployments"

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=10001
RUN groupadd --system --gid "${UID}" tenantflow \
    && useradd --system --uid "${UID}" --gid tenantflow --create-home \
        --home-dir /home/tenantflow --shell /usr/sbin/nologin tenantflow

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_HOME=/home/tenantflow/.prefect \
    TENANTFLOW_PROJECT_DIR=/app \
    TENANTFLOW_WORK_POOL=tenantflow-process \
    FLOW_HEARTBEAT_S=30 \
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY flows/ ./flows/
COPY prefect.yaml ./

# Flow runs send a heartbeat event every 30 s, which the bootstrap's zombie automation
# watches (ZOMBIE_AFTER_S): the tenantflow worker passes FLOW_HEARTBEAT_S on to its flow runs;
# PREFECT_FLOWS_HEARTBEAT_FREQUENCY is for flow runs that Prefect's docker or kubernetes
# worker starts in this image. Keep both below ZOMBIE_AFTER_S.

# NOTE: numeric, so Kubernetes can check runAsNonRoot.
USER ${UID}:${UID}
# NOTE: a shell only to expand $TENANTFLOW_WORK_POOL; `exec` hands PID 1 to the worker, which
# turns SIGTERM into a graceful shutdown. The pool is made by the bootstrap, not the worker.
CMD ["/bin/sh", "-c", "exec tenantflow worker --pool \"$TENANTFLOW_WORK_POOL\""]
