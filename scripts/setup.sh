#!/usr/bin/env bash
# Set up gpufleet on a fresh Debian 12 machine: Python venv with the locked dependencies (uv.lock).
# Idempotent; safe to re-run. Needs root only to apt-get install what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9   # also pinned in uv.lock (dev extra), so `uv sync` keeps it

need_apt=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v git >/dev/null || need_apt+=(git)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then echo "setup: need root to install: ${need_apt[*]}" >&2; exit 5; fi
  timeout 600 apt-get update -q
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if [[ ! -x .venv/bin/uv ]]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q "uv==${UV_VERSION}"
fi
# --frozen: install exactly uv.lock, never re-resolve; the lab and dev extras are part of the product's tests.
UV_PYTHON_DOWNLOADS=never .venv/bin/uv sync --frozen --all-extras --python .venv/bin/python -q
echo "setup: .venv ready ($(.venv/bin/python --version), gpufleet $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gpufleet"))'))"
