#!/usr/bin/env bash
# Installs what tenantflow needs on a Debian 12 machine, only where missing:
# uv (through pip), PostgreSQL 15 server binaries and PgBouncer (through apt),
# then the locked Python environment in .venv. Safe to run again.
# TENANTFLOW_WITH_BROWSER=1 adds chromium (the browser test), TENANTFLOW_WITH_IMAGE=1 podman,
# runc and debootstrap (the worker image); `make test` sets both.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_apt+=(postgresql-15)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
if [ "${TENANTFLOW_WITH_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  need_apt+=(chromium)
fi
# The several-server Prefect of `tenantflow-dev up --ha` (and of the tests' second stack):
# Redis and HAProxy. Debian's redis-server also starts the machine's own Redis on 6379;
# the stack's runs beside it, on its own port and folder, untouched by it.
if [ "${TENANTFLOW_WITH_HA:-0}" = 1 ] || [ "${TENANTFLOW_PREFECT_TOPOLOGY:-}" = ha ]; then
  [ -x /usr/bin/redis-server ] || need_apt+=(redis-server)
  [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
fi
# The worker image (`make image`, and its tests in `make test`): podman with Debian's runc
# (crun fails on these machines), debootstrap for the base, uidmap and slirp4netns for podman.
if [ "${TENANTFLOW_WITH_IMAGE:-0}" = 1 ]; then
  for tool in podman runc debootstrap newuidmap slirp4netns; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1; then
      need_apt+=(podman runc debootstrap uidmap slirp4netns)
      break
    fi
  done
fi
if ! command -v uv >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
  need_apt+=(python3-pip python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need_apt[*]} with apt-get"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian's pgbouncer package starts its own service on 6432; ours run beside it, untouched.

if ! command -v uv >/dev/null 2>&1; then
  echo "bootstrap: installing uv with pip"
  python3 -m pip install --quiet uv 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages uv
  export PATH="$HOME/.local/bin:$PATH"
fi

export UV_PYTHON_DOWNLOADS=never
lock=requirements-dev.lock
stamp=.venv/.tenantflow-lock
want="$(sha256sum "$lock" pyproject.toml devstack/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: syncing .venv with $lock"
  [ -x .venv/bin/python ] || uv venv --quiet --python python3 .venv
  uv pip sync --quiet --python .venv/bin/python "$lock"
  uv pip install --quiet --python .venv/bin/python --no-deps -e .
  # The local dev stack (tenantflow-dev): a distribution of its own, never in the image.
  uv pip install --quiet --python .venv/bin/python --no-deps -e devstack
  # Bytecode for every installed module, once per sync: a machine that sets
  # PYTHONDONTWRITEBYTECODE (this one does), or a process whose OS user cannot write
  # here (the stack's worker and its flow runs), would otherwise compile Prefect from
  # source in every process it starts (seconds each).
  .venv/bin/python -m compileall -q -j0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
  echo "$want" > "$stamp"
fi
# The project's own modules, each time (only what changed is compiled again).
.venv/bin/python -m compileall -q -j0 src devstack flows tests bench >/dev/null || true
