"""The one read-only node probe of gpufleet: what is installed, held, rendered, running and seen on a node.

The same source runs two ways, so `validate-node`, `converge`, `check`, `drift` and `rebuild` read a node
identically:

- as the `gpufleet.fleet.gpu_validate` module (roles/gpu_validate), which imports `probe`;
- over SSH (`infra/dr/remote.py`): the controller sends this file plus one `main(<spec JSON>)` call to
  `python3 -` on the node.

Standard library only (the node has nothing else), Python 3.6+ syntax, and it never changes the node. Every
name it looks at (packages, units, fact and record files, managed paths, endpoints) comes from the plan in
`spec` (`infra.plan.nodestate.probe_spec`); the comparison with the plan is `infra.plan.nodestate.compare`,
on the controller. The output is the JSON form of `infra.plan.nodestate.NodeState`.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request


def _run(argv):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return p.returncode, p.stdout, p.stderr


def _packages(names, out):
    for n in names:
        out["packages"][n] = None
    out["held"] = []
    if not names:
        return
    if shutil.which("dpkg-query"):
        held = set()
        _rc, so, _ = _run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n"] + names)
        for line in so.splitlines():
            parts = line.split("\t")
            # Status-Abbrev: desired (i install, h hold, ...), then state (i = installed), then error flag.
            if len(parts) == 3 and parts[0] in out["packages"] and parts[2][1:2] == "i":
                out["packages"][parts[0]] = parts[1]
                if parts[2][:1] == "h":
                    held.add(parts[0])
        if shutil.which("apt-mark"):
            _rc, so, _ = _run(["apt-mark", "showhold"])
            held |= set(so.split())
        out["held"] = sorted(held & set(names))
    elif shutil.which("rpm"):
        for n in names:
            rc, so, _ = _run(["rpm", "-q", "--qf", "%{EPOCH}:%{VERSION}-%{RELEASE}", n])
            if rc == 0:
                out["packages"][n] = so.replace("(none):", "")


def _files(spec, out):
    paths = set()
    for pattern in spec["globs"]:
        paths.update(p for p in glob.glob("/" + pattern, recursive=True) if os.path.isfile(p))
    marker = spec["marker"].encode()
    for root, dirs, files in os.walk("/etc"):
        dirs[:] = [d for d in dirs if d not in ("ssl", "alternatives")]
        for f in files:
            p = os.path.join(root, f)
            try:
                if os.path.islink(p) or os.path.getsize(p) > 1048576:
                    continue
                with open(p, "rb") as fh:
                    if marker in fh.read(4096):
                        paths.add(p)
            except OSError:
                pass
    for p in sorted(paths - set(spec["state_files"])):
        try:
            with open(p, "rb") as fh:
                out["files"][p] = hashlib.sha256(fh.read()).hexdigest()
        except OSError as exc:
            out["errors"].append("%s: %s" % (p, exc.strerror))
    try:
        with open(spec["record_file"]) as fh:
            record = json.load(fh)
        out["recorded_files"] = {str(k): str(v) for k, v in record.get("files", {}).items()}
    except (OSError, ValueError, AttributeError):
        out["recorded_files"] = None  # never recorded (not converged yet) or unreadable: nothing to compare with


def _services(units, out):
    for unit in units:
        _rc, so, _ = _run(["systemctl", "show", "-p", "ActiveState,UnitFileState,LoadState", unit])
        props = dict(line.split("=", 1) for line in so.splitlines() if "=" in line)
        out["services"][unit] = {
            "active": props.get("ActiveState", "unknown"),
            "enabled": props.get("UnitFileState", "") or props.get("LoadState", "unknown"),
        }


def _gpus(fields, out):
    if not shutil.which("nvidia-smi"):
        out["errors"].append("nvidia-smi: not installed")
        return
    rc, so, se = _run(["nvidia-smi", "--query-gpu=" + fields, "--format=csv,noheader,nounits"])
    keys = fields.split(",")
    if rc == 0:
        out["gpus"] = [dict(zip(keys, [c.strip() for c in line.split(",")])) for line in so.splitlines() if line.strip()]
    else:
        out["errors"].append("nvidia-smi: " + (se.strip() or "exit %d" % rc)[:200])


def _cdi(out):
    rc, so, se = _run(["nvidia-ctk", "cdi", "list"])
    if rc == 0:
        out["cdi"] = sorted(line.strip() for line in so.splitlines() if line.strip().startswith("nvidia.com/gpu="))
    else:
        out["cdi"] = None
        out["errors"].append("nvidia-ctk cdi list: " + (se.strip() or "exit %d" % rc)[:200])


def _endpoints(endpoints, out):
    for e in endpoints:
        url = "http://127.0.0.1:%d%s" % (int(e["port"]), e["path"])
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback URL built from the plan
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError):
            status = 0
        out["endpoints"].append({"name": e["name"], "url": url, "status": status})


def _reboot(fact_file, out):
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot_id = fh.read().strip()
    except OSError:
        boot_id = ""
    try:
        with open(fact_file) as fh:
            fact = json.load(fh)
        if not isinstance(fact, dict):
            fact = {}
    except (OSError, ValueError):
        fact = {}
    # The driver role's flag is valid only for the boot it names (a reboot since then cleared it).
    out["reboot_required"] = bool(
        os.path.exists("/run/reboot-required") or (fact.get("reboot_required") and fact.get("boot_id") == boot_id)
    )
    out["driver_fact"] = {k: v for k, v in fact.items() if k != "boot_id"}


def probe(spec):
    """Read the node as `spec` (the plan's names) says; returns NodeState's JSON form. Never changes anything."""
    out = {
        "packages": {},
        "held": [],
        "files": {},
        "recorded_files": None,
        "services": {},
        "gpus": [],
        "cdi": None,
        "endpoints": [],
        "reboot_required": False,
        "driver_fact": {},
        "errors": [],
    }
    _packages(list(spec["packages"]), out)
    _files(spec, out)
    _services(spec["services"], out)
    _gpus(spec["smi_fields"], out)
    if spec.get("cdi", True):
        _cdi(out)
    _endpoints(spec["endpoints"], out)
    _reboot(spec["fact_file"], out)
    return out


def main(spec_json):
    """Entry point over SSH: probe and print the JSON on stdout."""
    json.dump(probe(json.loads(spec_json)), sys.stdout, sort_keys=True)
