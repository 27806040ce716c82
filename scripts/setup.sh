#!/usr/bin/env bash
# Set up gpufleet on a fresh Debian 12 machine: Python venv with the locked dependencies (uv.lock).
# Idempotent; safe to re-run. Needs root only to apt-get install what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9   # also pinned in uv.lock (dev extra), so `uv sync` keeps it

# Debian packages the controller uses, by the command that proves each is there:
# ssh (converge), gpg/gpgv + dpkg-scanpackages + skopeo (bundle build/verify/import), ipmitool (IPMI BMCs).
# With --test, also what the test suite needs: systemd-analyze (unit files), ipmi_sim (IPMI tests),
# nft (ruleset checks), g++/make (the lab's llama.cpp wheel is built from source), dnsmasq (provisioning
# config check), qemu + its iPXE ROMs + OVMF + ipxe + cpio (the network-boot VM tests), mmdebstrap +
# mke2fs/debugfs (`gpufleet image build`), libvirt + its Python binding (the VM nodes behind sushy-tools):
# libvirt-daemon, not libvirt-daemon-system — the lab runs the daemons itself, and the system package would
# start libvirtd and its default NAT network (192.168.122.0/24) on a machine that runs systemd.
declare -A want=([git]=git [ssh]=openssh-client [gpg]=gnupg [gpgv]=gpgv [dpkg-scanpackages]=dpkg-dev
                 [skopeo]=skopeo [ipmitool]=ipmitool [openssl]=openssl)
if [[ "${1:-}" == "--test" ]]; then
  want+=([systemd-analyze]=systemd [ipmi_sim]=openipmi [nft]=nftables [g++]=g++ [make]=make [promtool]=prometheus
         [dnsmasq]=dnsmasq-base [qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio
         [mmdebstrap]=mmdebstrap [debugfs]=e2fsprogs [libvirtd]=libvirt-daemon [virsh]=libvirt-clients)
fi
need_apt=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
for cmd in "${!want[@]}"; do command -v "$cmd" >/dev/null || need_apt+=("${want[$cmd]}"); done
# The iPXE option ROMs QEMU's virtio-net boots from (a file, not a command).
[[ "${1:-}" != "--test" || -e /usr/lib/ipxe/qemu/efi-virtio.rom ]] || need_apt+=(ipxe-qemu)
# UEFI firmware and the iPXE builds the provisioning service chain-loads (UEFI network-boot VM test).
[[ "${1:-}" != "--test" || -e /usr/share/OVMF/OVMF_CODE_4M.fd ]] || need_apt+=(ovmf)
[[ "${1:-}" != "--test" || -e /usr/lib/ipxe/ipxe.efi ]] || need_apt+=(ipxe)
# sushy-tools' libvirt driver runs on the system Python with Debian's binding (infra/lab/vm.py, tests/lab/test_vm_node_lab.py).
[[ "${1:-}" != "--test" ]] || /usr/bin/python3 -c 'import libvirt' 2>/dev/null || need_apt+=(python3-libvirt)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    # Wait for another apt/dpkg process (unattended-upgrades on a fresh machine) instead of failing at
    # once: DPkg::Lock::Timeout covers install's dpkg lock; apt 2.6's `update` ignores it for the lists
    # lock, so update is retried while that lock is held (up to 5 minutes).
    lock=(-o DPkg::Lock::Timeout=300)
    for ((i = 0; ; i++)); do
      if out=$(timeout 900 apt-get "${lock[@]}" update -q 2>&1); then break; fi
      if ((i >= 60)) || ! grep -qE 'Unable to lock directory|Could not get lock' <<<"$out"; then
        echo "$out" >&2; echo "setup: apt-get update failed" >&2; exit 1
      fi
      sleep 5
    done
    DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get "${lock[@]}" install -y -q --no-install-recommends "${need_apt[@]}"
  elif [[ " ${need_apt[*]} " == *" python3-venv "* ]]; then
    echo "setup: need root to install: ${need_apt[*]}" >&2; exit 5
  else
    echo "setup: not root, not installing: ${need_apt[*]} (commands and tests that need them say so)" >&2
  fi
fi

if [[ ! -x .venv/bin/uv ]]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q "uv==${UV_VERSION}"
fi
# --frozen: install exactly uv.lock, never re-resolve; the lab and dev extras are part of the product's tests.
# --compile-bytecode (and compileall for infra/): every converge starts ansible-playbook and its plugins;
# without .pyc files (or with PYTHONDONTWRITEBYTECODE set) each run compiles them again, seconds of CPU.
UV_PYTHON_DOWNLOADS=never .venv/bin/uv sync --frozen --all-extras --compile-bytecode --python .venv/bin/python -q
.venv/bin/python -m compileall -q infra
echo "setup: .venv ready ($(.venv/bin/python --version), gpufleet $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gpufleet"))'))"
