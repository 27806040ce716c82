"""The lab's BMC notifier: sushy-emulator PUTs each system's state here; we act on the nspawn host.

Power changes are applied by the emulator 1–11 s after a request (`pending_power.apply_time`), like
real BMCs. We act at that time, so a client that polls the Redfish power state sees `Off` only
once the container is really stopped. A transition from off to on while the boot override
target is `Pxe` is a reimage (fresh disk from the base image, new SSH host key re-pinned); the
override is then cleared, emulating `BootSourceOverrideEnabled: Once`.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from infra.lab import bmc, lab
from infra.lab.config import LabSpec, Paths, lab_spec

log = logging.getLogger("gpufleet.lab.notifier")


class PowerController:
    """Turns emulator notifications into host power actions, one at a time per node."""

    def __init__(self, spec: LabSpec, paths: Paths) -> None:
        self.spec = spec
        self.paths = paths
        self._locks: dict[str, threading.Lock] = {h.name: threading.Lock() for h in spec.nodes}
        self._by_system = {(n.bmc.system_id if n.bmc and n.bmc.system_id else n.hostname): n.hostname
                           for n in spec.site.nodes}
        self._generation: dict[str, int] = {}

    def handle(self, system: dict[str, Any]) -> None:
        """React to one notification (schedules pending power changes at their apply time)."""
        node = self._by_system.get(str(system.get("name")))
        if node is None:
            return
        pxe = system.get("boot_device") == "Pxe"
        pending = system.get("pending_power")
        gen = self._generation[node] = self._generation.get(node, 0) + 1
        if pending:
            target = str(pending["power_state"])
            if "Restart" in target:
                # The emulator reports Off right away for a restart; the node goes down now, up later.
                self._act(node, "Off", pxe)
                target = "On"
            delay = max(0.0, float(pending["apply_time"]) - time.time())
            threading.Timer(delay, self._act_if_current, (node, gen, target, pxe)).start()
        else:
            self._act(node, str(system.get("power_state")), pxe)

    def _act_if_current(self, node: str, gen: int, target: str, pxe: bool) -> None:
        if self._generation.get(node) == gen:
            self._act(node, target, pxe)

    def _act(self, node: str, target: str, pxe: bool) -> None:
        with self._locks[node]:
            if target == "Off":
                if lab.power_off(self.spec, self.paths, node):
                    log.info("%s: powered off", node)
            elif target == "On" and lab.power_on(self.spec, self.paths, node, reimage=pxe):
                log.info("%s: powered on%s", node, " from PXE (reimaged, host key re-pinned)" if pxe else "")
                if pxe:
                    # Not under the node lock: the PATCH makes the emulator notify us again.
                    threading.Thread(target=self._clear_pxe, args=(node,), daemon=True).start()

    def _clear_pxe(self, node: str) -> None:
        """One-time boot override: back to disk after the PXE boot was used."""
        system = next(k for k, v in self._by_system.items() if v == node)
        password = self.paths.bmc_password.read_text().strip()
        url = f"{bmc.redfish_url(self.spec)}/redfish/v1/Systems/{bmc.system_uuid(self.spec, node)}"
        try:
            requests.patch(url, json={"Boot": {"BootSourceOverrideTarget": "Hdd"}}, auth=("admin", password),
                           timeout=5)
        except requests.RequestException as exc:
            log.warning("%s (%s): could not clear the PXE override: %s", node, system, exc)


def make_handler(ctl: PowerController) -> type[BaseHTTPRequestHandler]:
    """HTTP handler class bound to a controller."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply(200 if self.path == "/health" else 404, {"ok": self.path == "/health"})

        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                system = json.loads(self.rfile.read(length) or b"{}")
                ctl.handle(system)
            except Exception as exc:  # keep serving; the emulator only logs our status
                log.exception("notification failed")
                self._reply(500, {"error": str(exc)})
                return
            self._reply(200, {"ok": True})

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s", format % args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve notifications until terminated (started by `gpufleet lab up`, stopped by `down`)."""
    p = argparse.ArgumentParser(prog="gpufleet-lab-notifier")
    p.add_argument("--stack-file", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, required=True, help="the lab's state directory (its Paths.state)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = lab_spec(path=args.stack_file, stack=args.stack_file.name.removeprefix("Pulumi.").removesuffix(".yaml"))
    ctl = PowerController(spec, Paths(state=args.state_dir))
    server = ThreadingHTTPServer((str(spec.bmc.address), spec.bmc.port + bmc.NOTIFIER_PORT_OFFSET),
                                 make_handler(ctl))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
