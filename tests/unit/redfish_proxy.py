"""A thin HTTP proxy in front of sushy-tools' emulator that behaves like real BMCs do (quirks on demand).

The emulator is a real Redfish implementation; this proxy adds, per test, behaviours that real BMCs are
reported to have and that the emulator lacks. Each switch names its source. Loopback only, port 0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

SESSIONS = "/redfish/v1/SessionService/Sessions"


@dataclass
class Quirks:
    """Which real-BMC behaviours the proxy shows (all off: an honest, session-capable BMC)."""

    # (a) PATCH without If-Match → 428 Precondition Required; a stale ETag → 412 Precondition Failed.
    # iDRAC/iLO/others: ansible/ansible#56150, DMTF Redfish-Tacklebox#22; Lenovo/AMI, Huawei:
    # ansible/ansible#56050, stmcginnis/gofish#171. ETag/If-Match semantics: DMTF DSP0266 (Redfish
    # specification) "ETags", RFC 9110 §13.1.1 and RFC 6585 §3 (428).
    etag: bool = False
    stale_next_patch: bool = False  # the resource changes between the client's GET and its PATCH (once)
    # (b) "Once" ignored: the override stays and is reported as Continuous after the node booted. This is
    # what sushy-tools itself does (its PATCH handler: "we always set the boot device frequency to
    # continuous, so we are ignoring the BootSourceOverrideEnabled element", sushy_tools/emulator/main.py
    # 2.2.0; its system.json template hard-codes Continuous) — so with `ignore_once` off, the proxy plays an
    # honest BMC instead: it reports what was asked and spends a Once override at the next power-on
    # (DSP2046 ComputerSystem.Boot: "Once ... the value is reset to Disabled").
    ignore_once: bool = False
    # (c) BootSourceOverrideMode falls back unless sent with the target (Supermicro: DMTF Redfishtool#106).
    mode_reset: bool = False
    # (d) BootSourceOverrideMode refused as a write (iLO: ansible-collections/community.general#3509),
    # answered with the Base registry's PropertyNotWritable (DSP8011 Base 1.x).
    mode_readonly: bool = False
    # (e) a power-on accepted while the system is powering off is silently dropped (issue 19 of this project,
    # "a power-on accepted during a power-off and silently dropped"); PoweringOff is a Redfish PowerState.
    drop_on_while_powering_off: bool = False
    off_transition_s: float = 1.5
    # (f) the session POST (carrying the password) is redirected to another host (issue 16: "the session
    # POST (with the password) follows redirects"); 307 keeps method and body (RFC 9110 §15.4.8).
    redirect_sessions_to: str | None = None
    # (g) error bodies that echo the submitted values plus a canary (issue 16: "BMC error bodies, which
    # some BMCs fill with the submitted values").
    echo_canary: str | None = None
    sessions: bool = True


@dataclass
class _SystemState:
    enabled: str = "Disabled"
    last_power: str = ""
    powering_off_since: float | None = None


@dataclass
class Record:
    """What the proxy saw."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    patches: list[tuple[dict[str, Any], str | None, int]] = field(default_factory=list)  # body, If-Match, status
    resets: list[tuple[str, bool]] = field(default_factory=list)  # ResetType, forwarded
    session_posts: int = 0
    session_deletes: int = 0
    basic_auth_requests: int = 0


class Proxy:
    """Forwards to the emulator at `upstream` (basic auth with `password`), applying `quirks`."""

    def __init__(self, upstream: str, user: str, password: str, quirks: Quirks | None = None) -> None:
        self.upstream = upstream
        self.creds = (user, password)
        self.quirks = quirks or Quirks()
        self.record = Record()
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, str]] = {}
        self._systems: dict[str, _SystemState] = {}
        self._gen = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- helpers used by the handler -------------------------------------------------------------------

    def state(self, path: str) -> _SystemState:
        return self._systems.setdefault(path, _SystemState())

    def up(self, method: str, path: str, auth: tuple[str, str] | None, body: Any = None) -> requests.Response:
        return requests.request(method, self.upstream + path, json=body, auth=auth, timeout=10, allow_redirects=False)

    def etag(self, raw: dict[str, Any]) -> str:
        # Changes whenever the boot settings or the power state change, like a real BMC's resource ETag.
        material = json.dumps([self._gen, raw.get("Boot"), raw.get("PowerState")], sort_keys=True)
        return '"' + hashlib.sha256(material.encode()).hexdigest()[:20] + '"'

    def echo_error(self, sent: Any) -> tuple[int, dict[str, Any]]:
        canary = self.quirks.echo_canary
        text = f"Request {json.dumps(sent)} rejected; canary {canary}"
        return 400, {
            "error": {
                "code": "Base.1.8.GeneralError",
                "message": text,
                "@Message.ExtendedInfo": [
                    {
                        "MessageId": "Base.1.8.PropertyValueFormatError",
                        "Message": text,
                        "MessageArgs": [json.dumps(sent), str(canary)],
                        "Severity": "Warning",
                    }
                ],
            }
        }


def _redfish_error(message_id: str, message: str, related: list[str] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"MessageId": message_id, "Message": message, "Severity": "Warning"}
    if related:
        info["RelatedProperties"] = related
    return {"error": {"code": "Base.1.8.GeneralError", "message": message, "@Message.ExtendedInfo": [info]}}


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    q = proxy.quirks

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        # -- plumbing ------------------------------------------------------------------------------

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                return None

        def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
            data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.headers.get("Connection", "").lower() == "close":
                self.send_header("Connection", "close")
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _auth(self) -> tuple[str, str] | None:
            token = self.headers.get("X-Auth-Token")
            if token:
                return proxy._tokens.get(token, ("invalid", "invalid"))
            header = self.headers.get("Authorization", "")
            if header.lower().startswith("basic "):
                proxy.record.basic_auth_requests += 1
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                return user, pw
            return None

        def _forward(self, method: str, body: Any = None) -> None:
            r = proxy.up(method, self.path, self._auth(), body)
            headers = {k: v for k, v in r.headers.items() if k.lower() in ("location", "www-authenticate")}
            self._send(r.status_code, r.content or None, headers)

        def _system_path(self) -> bool:
            parts = self.path.rstrip("/").split("/")
            return len(parts) == 5 and parts[:4] == ["", "redfish", "v1", "Systems"]

        def _record(self, method: str) -> None:
            keep = {k: v for k, v in self.headers.items() if k.lower() in ("if-match", "x-auth-token", "authorization")}
            proxy.record.requests.append((method, self.path, keep))

        # -- verbs -----------------------------------------------------------------------------------

        def do_GET(self) -> None:
            self._record("GET")
            if self.path.rstrip("/") == "/redfish/v1" and q.sessions:
                r = proxy.up("GET", self.path, None)
                root = r.json()
                root["SessionService"] = {"@odata.id": "/redfish/v1/SessionService"}
                root.setdefault("Links", {})["Sessions"] = {"@odata.id": SESSIONS}
                self._send(200, root)
                return
            if not self._system_path():
                self._forward("GET")
                return
            auth = self._auth()
            with proxy._lock:
                r = proxy.up("GET", self.path, auth)
                if r.status_code != 200:
                    self._send(r.status_code, r.content or None)
                    return
                raw = r.json()
                st = proxy.state(self.path)
                power = str(raw.get("PowerState"))
                if not q.ignore_once and power == "On" and st.last_power not in ("", "On") and st.enabled == "Once":
                    # An honest BMC: a Once override is spent by the next power-on.
                    proxy.up("PATCH", self.path, auth, {"Boot": {"BootSourceOverrideTarget": "Hdd"}})
                    st.enabled = "Disabled"
                    raw = proxy.up("GET", self.path, auth).json()
                etag = proxy.etag(raw)  # of the emulator's resource, before this proxy's rewrites
                raw = json.loads(json.dumps(raw))
                boot = raw.get("Boot") or {}
                if not q.ignore_once:
                    boot["BootSourceOverrideEnabled"] = st.enabled
                    if st.enabled == "Disabled":
                        boot["BootSourceOverrideTarget"] = "None"
                st.last_power = power
                if q.drop_on_while_powering_off and st.powering_off_since is not None:
                    if power == "On" or time.monotonic() - st.powering_off_since < q.off_transition_s:
                        raw["PowerState"] = "PoweringOff"
                    else:
                        st.powering_off_since = None
                raw["Boot"] = boot
            self._send(200, raw, {"ETag": etag} if q.etag else None)

        def do_POST(self) -> None:
            self._record("POST")
            body = self._body()
            if self.path.rstrip("/") == SESSIONS and q.sessions:
                proxy.record.session_posts += 1
                if q.redirect_sessions_to:
                    self._send(307, None, {"Location": q.redirect_sessions_to + SESSIONS})
                    return
                if q.echo_canary:
                    self._send(*proxy.echo_error(body))
                    return
                creds = (str((body or {}).get("UserName")), str((body or {}).get("Password")))
                if proxy.up("GET", "/redfish/v1/Systems", creds).status_code != 200:
                    self._send(401, _redfish_error("Base.1.8.NoValidSession", "Invalid credentials"))
                    return
                token = secrets.token_hex(16)
                proxy._tokens[token] = creds
                sid = f"{SESSIONS}/{len(proxy._tokens)}"
                self._send(201, {"@odata.id": sid, "Id": str(len(proxy._tokens))},
                           {"X-Auth-Token": token, "Location": sid})
                return
            if self.path.endswith("/Actions/ComputerSystem.Reset"):
                if q.echo_canary:
                    self._send(*proxy.echo_error(body))
                    return
                system = self.path.removesuffix("/Actions/ComputerSystem.Reset")
                kind = str((body or {}).get("ResetType"))
                st = proxy.state(system)
                if q.drop_on_while_powering_off:
                    if kind in ("On", "ForceOn") and st.powering_off_since is not None:
                        proxy.record.resets.append((kind, False))
                        self._send(204)  # accepted, and dropped
                        return
                    if kind in ("ForceOff", "GracefulShutdown"):
                        st.powering_off_since = time.monotonic()
                proxy.record.resets.append((kind, True))
            self._forward("POST", body)

        def do_DELETE(self) -> None:
            self._record("DELETE")
            if self.path.startswith(SESSIONS + "/"):
                proxy.record.session_deletes += 1
                self._send(204)
                return
            self._forward("DELETE")

        def do_PATCH(self) -> None:
            self._record("PATCH")
            body = self._body()
            if not self._system_path():
                self._forward("PATCH", body)
                return
            if_match = self.headers.get("If-Match")
            auth = self._auth()
            with proxy._lock:
                status = self._patch(body, if_match, auth)
                proxy.record.patches.append((body, if_match, status))

        def _patch(self, body: Any, if_match: str | None, auth: tuple[str, str] | None) -> int:
            boot = dict((body or {}).get("Boot") or {})
            if q.echo_canary:
                self._send(*proxy.echo_error(body))
                return 400
            if q.etag:
                if not if_match:
                    self._send(428, _redfish_error("Base.1.8.PreconditionRequired", "If-Match header required"))
                    return 428
                if q.stale_next_patch:
                    q.stale_next_patch = False
                    proxy._gen += 1  # someone else changed the resource after the client's GET
                raw = proxy.up("GET", self.path, auth).json()
                if if_match != proxy.etag(raw):
                    self._send(412, _redfish_error("Base.1.8.PreconditionFailed", "ETag does not match"))
                    return 412
            if q.mode_readonly and "BootSourceOverrideMode" in boot:
                self._send(400, _redfish_error(
                    "Base.1.8.PropertyNotWritable",
                    "The property BootSourceOverrideMode is a read only property and cannot be assigned a value.",
                    ["#/Boot/BootSourceOverrideMode"],
                ))
                return 400
            r = proxy.up("PATCH", self.path, auth, body)
            if r.status_code < 300 and boot:
                if q.mode_reset and "BootSourceOverrideMode" not in boot:
                    proxy.up("PATCH", self.path, auth, {"Boot": {"BootSourceOverrideMode": "Legacy"}})
                if "BootSourceOverrideEnabled" in boot:
                    proxy.state(self.path).enabled = str(boot["BootSourceOverrideEnabled"])
                proxy._gen += 1
            self._send(r.status_code, r.content or None)
            return r.status_code

    return Handler


class Sink:
    """Another host a redirect points at: records every request it gets (it must get none)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        sink = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                sink.seen.append(("POST", self.path, self.rfile.read(n) + str(self.headers).encode()))
                self.send_response(201)
                self.send_header("X-Auth-Token", "stolen")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                sink.seen.append(("GET", self.path, str(self.headers).encode()))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
