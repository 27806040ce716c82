#!/usr/bin/env bash
# The test command (README, CI): set up, static checks, then every test — unit, Pulumi mocks,
# and the lab tests (marked `lab`; they need root and skip with a stated reason otherwise).
#   ./scripts/test.sh            everything
#   ./scripts/test.sh --no-lab   static checks + unit + Pulumi mock tests only
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n== %s\n' "$*"; }
step "ruff";            ruff check infra tests
step "mypy";            mypy
step "layers (import-linter)"; lint-imports --no-cache >/dev/null || lint-imports --no-cache
step "schema is current"; gpufleet schema --check
step "stacks validate"; for f in stacks/Pulumi.*.yaml; do gpufleet validate --stack-file "$f"; done
step "core install (no lab/dev extras)"; ./scripts/check-core-install.sh
step "locks match stacks"
for f in stacks/Pulumi.*.lock.json; do [[ -e "$f" ]] && gpufleet lock --check --stack-file "${f%.lock.json}.yaml"; done
if [[ -d roles && -n "$(ls -A roles 2>/dev/null)" ]]; then
  step "yamllint";      yamllint -s roles playbooks stacks galaxy.yml meta
  # The roles call the collection's own module by FQCN: lint them as the collection (galaxy.yml at the root).
  collections=$(mktemp -d); python -m infra.ansible.collection "$collections" >/dev/null
  step "ansible-lint";  ANSIBLE_COLLECTIONS_PATH="$collections" ANSIBLE_ROLES_PATH="$PWD/roles" \
    ansible-lint --offline --profile production roles playbooks galaxy.yml meta plugins
  step "collection build + execution environment (ansible-builder create)"
  gpufleet collection ee --check
  ee=$(mktemp -d); gpufleet collection build --out "$ee" >/dev/null; cp execution-environment.yml "$ee/"
  (cd "$ee" && ansible-builder create -f execution-environment.yml -c "$ee/context" >/dev/null)
  rm -rf "$collections" "$ee"
fi

pytest_args=(-q)
if [[ "${1:-}" == "--no-lab" ]]; then pytest_args+=(-m "not lab"); fi
step "pytest"
pytest "${pytest_args[@]}"

# The benchmark harness in quick mode, so it cannot rot (times are reported, never asserted).
# Figures that need the lab skip here with their reason; tests/lab/test_bench_quick.py runs them
# while the lab is up.
step "benchmark harness (quick)"
# --no-lab: the lab figures run in tests/lab/test_bench_quick.py while the test session holds the lab; here
# they never drive a lab that happens to be up (it may be another run's).
gpufleet bench --quick --no-lab --out bench-results/quick.json
