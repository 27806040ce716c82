#!/usr/bin/env bash
# The README's main command: set up, bring the local lab up, converge the lab stack, validate, summarise.
#   ./scripts/quickstart.sh [STACK]     (default: lab; as root — another user is re-run through sudo)
# With the Pulumi CLI on PATH it runs `pulumi up --stack lab` on a local file:// backend; without it, the
# same per-node steps through `gpufleet converge` / `gpufleet validate-node` (it says which path ran).
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=${1:-lab}

# The lab needs root (systemd-nspawn, bridges). A fresh Debian 12 has no sudo: as root, just run; as
# another user, re-run through sudo when it exists.
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -- "$PWD/scripts/quickstart.sh" "$@"; fi
  echo "quickstart: the lab needs root (systemd-nspawn, bridges): run it as root (su -)" >&2; exit 5
fi
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== validate stacks/Pulumi.${STACK}.yaml"
gpufleet validate --stack "$STACK"

echo "== lab up"
gpufleet lab up --stack "$STACK"

if command -v pulumi >/dev/null 2>&1; then
  echo "== path: Pulumi CLI found ($(pulumi version)) — pulumi up on a local file:// backend"
  backend="$PWD/.gpufleet/pulumi-state"
  mkdir -p "$backend"
  export PULUMI_BACKEND_URL="file://$backend"
  # The lab stack holds no Pulumi-encrypted secrets (its BMC password is a file the lab writes), so a
  # fixed local passphrase only protects this throwaway state. Real stacks: set your own.
  export PULUMI_CONFIG_PASSPHRASE=${PULUMI_CONFIG_PASSPHRASE:-gpufleet-lab}
  pulumi stack select "$STACK" 2>/dev/null || pulumi stack init "$STACK"
  pulumi up --stack "$STACK" --yes --skip-preview
  pulumi stack output --stack "$STACK" --json
else
  echo "== path: no Pulumi CLI on PATH — running the same per-node steps with gpufleet converge"
  echo "   (install the CLI to use pulumi up: see docs/pulumi.md)"
  gpufleet converge --stack "$STACK"
  for node in $(gpufleet plan --stack "$STACK" --json | python3 -c 'import json,sys; print(" ".join(n["hostname"] for n in json.load(sys.stdin)["nodes"]))'); do
    gpufleet validate-node --stack "$STACK" --node "$node"
  done
fi

echo "== endpoints"
gpufleet lab status --stack "$STACK"
gpufleet plan --stack "$STACK" --json | python3 -c '
import json, sys
for n in json.load(sys.stdin)["nodes"]:
    for s in n["services"]:
        print("  %-16s %-9s %s  (%s)" % (s["name"], s["engine"], s["endpoint"], n["hostname"]))
'
