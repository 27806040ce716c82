#!/usr/bin/env bash
# Core install works (issue 16): a throwaway venv with ONLY the core dependencies of uv.lock (no lab,
# no dev extra), then the commands a production controller runs. The lab extra (gguf/numpy,
# sushy-tools) is never installed on a controller; `gpufleet lab` must say so with exit 5.
#   ./scripts/check-core-install.sh        (called by scripts/test.sh; uses uv's cache, a few seconds warm)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
uv=.venv/bin/uv
work=$(mktemp -d "${TMPDIR:-/tmp}/gpufleet-core.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The locked core set: `uv export` without extras or dev dependencies, the project itself left out
# (installed from this checkout below with --no-deps, so nothing else can slip in).
"$uv" export --frozen --no-emit-project --no-hashes -q -o "$work/core.txt"
UV_PYTHON_DOWNLOADS=never "$uv" venv -q --python "$(command -v python3)" "$work/venv"
VIRTUAL_ENV="$work/venv" "$uv" pip install -q -r "$work/core.txt"
VIRTUAL_ENV="$work/venv" "$uv" pip install -q --no-deps "$root"
gpufleet=("$work/venv/bin/gpufleet")

fail() { echo "core install: $*" >&2; exit 1; }
for mod in numpy gguf sushy_tools pytest; do
  if "$work/venv/bin/python" -c "import $mod" 2>/dev/null; then fail "$mod is importable: the venv is not core-only"; fi
done

cd "$work"   # not the checkout: the installed package must find stacks only where it is told
export GPUFLEET_RUNS_DIR="$work/runs"
expect() {  # expect CODE CMD...: run, compare the exit code, never a traceback
  local want=$1; shift
  set +e; "$@" >"$work/out" 2>"$work/err"; local got=$?; set -e
  if [[ $got -ne $want ]] || grep -q Traceback "$work/out" "$work/err"; then
    cat "$work/out" "$work/err" >&2; fail "\`${*:1}\` exited $got (want $want)"
  fi
  echo "  ok (exit $got): ${*#"$work/venv/bin/"}"
}
stack=$root/stacks/Pulumi.lab.yaml
expect 0 "${gpufleet[@]}" --help
expect 0 "${gpufleet[@]}" validate --stack-file "$stack"
expect 0 env GPUFLEET_PROJECT_DIR="$root" "${gpufleet[@]}" validate --stack lab
expect 0 "${gpufleet[@]}" plan --stack-file "$stack" --json
expect 0 "${gpufleet[@]}" vram --model llama-3.1-8b
expect 2 "${gpufleet[@]}" vram --tp 0
expect 0 "${gpufleet[@]}" schema --out -
for cmd in review converge "bundle build" "state backup"; do
  # shellcheck disable=SC2086  # the command words split on purpose
  expect 0 "${gpufleet[@]}" $cmd --help
done
preview=$(ls "$root"/tests/fixtures/preview/*.json 2>/dev/null | head -1 || true)
if [[ -n "$preview" ]]; then
  set +e; "${gpufleet[@]}" review --stack-file "$stack" --preview "$preview" >"$work/out" 2>"$work/err"; rc=$?; set -e
  if [[ $rc -gt 5 ]] || grep -q Traceback "$work/err"; then cat "$work/err" >&2; fail "review exited $rc"; fi
  echo "  ok (exit $rc): gpufleet review --preview $(basename "$preview")"
fi
expect 5 "${gpufleet[@]}" lab status --stack-file "$stack"
grep -q "install the lab extra" "$work/err" || fail "gpufleet lab without the extra does not name the fix"
echo "core install: every command above works without the lab and dev extras"
