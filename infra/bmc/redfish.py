"""A small Redfish client on `requests`: power, one-time boot override, inventory.

Written against the DMTF Redfish schema (ComputerSystem, ComputerSystem.Reset, Boot, EthernetInterface)
and tested against sushy-tools' emulator. Design choices:

- Sessions first (`POST SessionService/Sessions`, then `X-Auth-Token`) because many BMCs allow only a
  few concurrent basic-auth requests; basic auth when the BMC has no session service.
- Retries (urllib3 `Retry`) only for idempotent requests and only on connection failures and 502/503/504.
  A 401 is never retried: BMCs lock an account after a few bad passwords. Reset actions are never
  retried automatically: a duplicated ForceRestart would reset a node twice.
- Power changes are asynchronous on real BMCs (and 1–11 s on the emulator): callers poll.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from infra.bmc.errors import (
    BmcAuthError,
    BmcError,
    BmcNotFound,
    BmcProtocolError,
    BmcTimeout,
    BmcTlsError,
    BmcUnreachable,
    BmcUnsupported,
    PowerTimeout,
)

SERVICE_ROOT = "/redfish/v1/"
_IDEMPOTENT = frozenset({"GET", "HEAD", "PATCH", "DELETE", "OPTIONS"})
# Reset types Redfish defines, used when a BMC does not list its allowable values.
_DEFAULT_RESETS = ("On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "ForceOn")


class PowerAction(StrEnum):
    """What `gpufleet bmc power --state` asks for."""

    ON = "on"
    OFF = "off"
    GRACEFUL_OFF = "graceful-off"
    RESET = "reset"


class BootTarget(StrEnum):
    """One-time boot devices gpufleet uses (Redfish `BootSourceOverrideTarget` values)."""

    PXE = "Pxe"
    HDD = "Hdd"
    CD = "Cd"
    USB = "Usb"
    BIOS = "BiosSetup"
    UEFI_HTTP = "UefiHttp"


@dataclass(frozen=True)
class Timeouts:
    """Network timeouts and polling figures, seconds."""

    connect: float = 3.05
    read: float = 15.0
    retries: int = 2
    backoff: float = 0.3
    poll_interval: float = 0.5
    power_timeout: float = 120.0


def poll_power(
    read: Callable[[], str],
    want: str,
    *,
    endpoint: str,
    timeouts: Timeouts,
    timeout: float | None,
    sleep: Callable[[float], None],
    hint: str = "",
) -> tuple[str, float]:
    """Poll `read()` until it says `want` (BMCs apply power changes asynchronously); (state, seconds waited)."""
    limit = timeouts.power_timeout if timeout is None else timeout
    start = time.monotonic()
    while True:
        state = read()
        waited = time.monotonic() - start
        if state == want:
            return state, waited
        if waited >= limit:
            raise PowerTimeout(endpoint, f"system still {state} after {waited:.0f} s (wanted {want})", hint)
        sleep(timeouts.poll_interval)


@dataclass(frozen=True)
class PowerResult:
    """What a power request did."""

    action: str
    before: str
    after: str
    reset_type: str | None
    changed: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class BootOverride:
    """The boot override as the BMC reports it after a change."""

    target: str
    enabled: str
    requested_enabled: str
    allowed_targets: tuple[str, ...] = ()

    @property
    def honoured_once(self) -> bool:
        """False when the BMC reports a different persistence than asked (the emulator says Continuous)."""
        return self.enabled == self.requested_enabled

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "target": self.target,
            "enabled": self.enabled,
            "requested_enabled": self.requested_enabled,
            "honoured": self.honoured_once,
            "allowed_targets": list(self.allowed_targets),
        }


@dataclass(frozen=True)
class Inventory:
    """Identity of the machine behind a BMC system."""

    system_id: str
    name: str
    uuid: str
    manufacturer: str
    model: str
    serial: str
    power_state: str
    bios_version: str
    macs: tuple[str, ...]
    boot: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {**self.__dict__, "macs": list(self.macs)}


def _classify(endpoint: str, exc: requests.RequestException) -> BmcError:
    """Map a requests/urllib3 failure to one typed error with a hint."""
    reason: object = exc
    # urllib3 wraps the real cause in MaxRetryError once retries are used up.
    if exc.args and isinstance(exc.args[0], urllib3.exceptions.MaxRetryError):
        reason = exc.args[0].reason
    if isinstance(exc, requests.exceptions.SSLError) or isinstance(reason, urllib3.exceptions.SSLError):
        return BmcTlsError(
            endpoint,
            "TLS certificate verification failed",
            "give the BMC's CA with `bmc.ca_bundle` (or fix the certificate); "
            "`verify_tls: false` only on an isolated management network",
        )
    if isinstance(exc, requests.exceptions.ReadTimeout) or isinstance(reason, urllib3.exceptions.ReadTimeoutError):
        return BmcTimeout(
            endpoint,
            "connected but got no answer in time",
            "the BMC may be hung: check it from its web UI, or reset the BMC (not the host)",
        )
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        # Checked first: urllib3 makes NewConnectionError (refused) a subclass of ConnectTimeoutError.
        return BmcUnreachable(
            endpoint,
            "cannot connect (refused or no route)",
            "check that the BMC is powered and the `bmc.endpoint` address and port",
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.ConnectTimeoutError
    ):
        return BmcUnreachable(
            endpoint, "connection timed out", "check the management network path and the `bmc.endpoint` address"
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return BmcUnreachable(
            endpoint,
            "cannot connect (refused or no route)",
            "check that the BMC is powered and the `bmc.endpoint` address and port",
        )
    return BmcProtocolError(endpoint, f"request failed ({type(exc).__name__})")


class RedfishClient:
    """One BMC, one system. Use as a context manager so a session is always logged out.

    Args:
        endpoint: `https://bmc-host[:port]` (http only for the lab emulator on loopback).
        username: BMC user.
        password: BMC password (kept in memory only; never in messages).
        system_id: Redfish system Id, Name or UUID; None when the BMC has exactly one system.
        verify: True, False, or a CA bundle path (requests' `verify`).
        timeouts: network and polling figures.
        sleep: sleep function (tests may pass a fast one).

    """

    def __init__(
        self,
        endpoint: str,
        username: str,
        password: str,
        *,
        system_id: str | None = None,
        verify: bool | str = True,
        timeouts: Timeouts | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{endpoint!r} is not a Redfish endpoint; write it as https://host[:port]")
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        self.system_id = system_id
        self.timeouts = timeouts or Timeouts()
        self._username = username
        self._password = password
        self._sleep = sleep
        self._session_uri: str | None = None
        self._system_uri: str | None = None
        self.auth_mode = "none"
        self.requests_made = 0
        self.http = requests.Session()
        # Passed on every request as well: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE from the
        # environment override `Session.verify` (requests#3829), which would silently ignore `ca_bundle`.
        self.http.verify = verify
        self.verify = verify
        self.http.headers.update({"Accept": "application/json", "OData-Version": "4.0"})
        retry = Retry(
            total=self.timeouts.retries,
            connect=self.timeouts.retries,
            # A read timeout is not retried: a BMC that did not answer in `read` seconds will not answer
            # faster on the next try, and it must not turn into a storm of half-done requests.
            read=False,
            status=self.timeouts.retries,
            status_forcelist=(502, 503, 504),
            allowed_methods=_IDEMPOTENT,
            backoff_factor=self.timeouts.backoff,
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        adapter = HTTPAdapter(max_retries=retry)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)

    # -- session -------------------------------------------------------------------------------------

    def __enter__(self) -> RedfishClient:
        self.login()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def login(self) -> None:
        """Check reachability and TLS (service root), then authenticate (session, else basic auth).

        Raises:
            BmcUnreachable, BmcTimeout, BmcTlsError: before any credential is sent.
            BmcAuthError: the credentials were refused.

        """
        root = self._json("GET", SERVICE_ROOT, auth=False)
        sessions = (root.get("Links") or {}).get("Sessions", {}).get("@odata.id")
        if not sessions and "SessionService" in root:
            sessions = SERVICE_ROOT + "SessionService/Sessions"
        if sessions:
            resp = self._request(
                "POST", sessions, auth=False, json={"UserName": self._username, "Password": self._password}
            )
            token = resp.headers.get("X-Auth-Token")
            if resp.status_code in (200, 201) and token:
                self.http.headers["X-Auth-Token"] = token
                self._session_uri = resp.headers.get("Location")
                self.auth_mode = "session"
                return
            if resp.status_code in (401, 403) and self._session_refusal_is_final(resp):
                raise self._auth_error(resp)
        # No session service (the emulator, older BMCs): basic auth on every request.
        self.http.auth = (self._username, self._password)
        self.auth_mode = "basic"
        self._json("GET", str((root.get("Systems") or {}).get("@odata.id") or SERVICE_ROOT + "Systems"))

    def _session_refusal_is_final(self, resp: requests.Response) -> bool:
        # Some services put the session URI behind basic auth; a 401 with a Basic challenge means "try
        # basic", anything else means the credentials themselves were refused.
        return "basic" not in resp.headers.get("WWW-Authenticate", "").lower()

    def close(self) -> None:
        """Log the session out (best effort) and close connections."""
        if self._session_uri:
            # Best effort: the session times out on the BMC anyway; never hide the caller's real error.
            with contextlib.suppress(BmcError):
                self._request("DELETE", self._session_uri)
            self._session_uri = None
        self.http.close()

    def _auth_error(self, resp: requests.Response) -> BmcAuthError:
        return BmcAuthError(
            self.endpoint,
            f"credentials for user {self._username!r} refused (HTTP {resp.status_code})",
            "check the password the node's `bmc.password` SecretRef points at; "
            "not retried, so the BMC account is not locked out",
        )

    # -- HTTP ----------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> requests.Response:
        url = urljoin(self.endpoint + "/", path)
        saved = self.http.auth
        if not auth:
            self.http.auth = None
        try:
            self.requests_made += 1
            return self.http.request(
                method,
                url,
                timeout=(self.timeouts.connect, self.timeouts.read),
                allow_redirects=True,
                verify=self.verify,
                **kwargs,
            )
        except requests.RequestException as exc:
            raise _classify(self.endpoint, exc) from None
        finally:
            self.http.auth = saved

    def _check(self, resp: requests.Response, what: str) -> None:
        if resp.status_code in (401, 403):
            raise self._auth_error(resp)
        if resp.status_code == 404:
            raise BmcNotFound(
                self.endpoint,
                f"{what}: not found ({urlsplit(resp.url).path})",
                "check `bmc.system_id` against `gpufleet bmc inventory`",
            )
        if resp.status_code >= 400:
            raise BmcProtocolError(self.endpoint, f"{what}: HTTP {resp.status_code}: {_error_text(resp)}")

    def _json(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> dict[str, Any]:
        resp = self._request(method, path, auth=auth, **kwargs)
        self._check(resp, f"{method} {path}")
        try:
            body = resp.json()
        except ValueError:
            raise BmcProtocolError(self.endpoint, f"{method} {path}: answer is not JSON") from None
        if not isinstance(body, dict):
            raise BmcProtocolError(self.endpoint, f"{method} {path}: answer is not a JSON object")
        return body

    # -- system --------------------------------------------------------------------------------------

    def system_uri(self) -> str:
        """The canonical URI of this client's system (resolved once: by Id, Name or UUID)."""
        if self._system_uri:
            return self._system_uri
        collection = self._json("GET", SERVICE_ROOT + "Systems")
        members = [str(m["@odata.id"]) for m in collection.get("Members", [])]
        if self.system_id is None:
            if len(members) != 1:
                raise BmcNotFound(
                    self.endpoint,
                    f"BMC has {len(members)} systems and no `bmc.system_id` is set",
                    "set `bmc.system_id` to one of: " + ", ".join(m.rsplit("/", 1)[-1] for m in members),
                )
            self._system_uri = members[0]
            return self._system_uri
        for uri in members:
            if uri.rstrip("/").rsplit("/", 1)[-1] == self.system_id:
                self._system_uri = uri
                return uri
        names = []
        for uri in members:
            body = self._json("GET", uri)
            names.append(str(body.get("Name")))
            if self.system_id in (body.get("Id"), body.get("Name"), body.get("UUID")):
                self._system_uri = str(body.get("@odata.id") or uri)
                return self._system_uri
        raise BmcNotFound(
            self.endpoint, f"no system {self.system_id!r}", "set `bmc.system_id` to one of: " + ", ".join(sorted(names))
        )

    def system(self) -> dict[str, Any]:
        """The ComputerSystem resource."""
        return self._json("GET", self.system_uri())

    def power_state(self) -> str:
        """`On`, `Off`, `PoweringOn`, `PoweringOff` (as the BMC reports it)."""
        return str(self.system().get("PowerState", "Unknown"))

    def allowed_resets(self, system: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """Reset types the system advertises (`ResetType@Redfish.AllowableValues`, else ActionInfo)."""
        action = ((system or self.system()).get("Actions") or {}).get("#ComputerSystem.Reset") or {}
        values = action.get("ResetType@Redfish.AllowableValues")
        if values is None and action.get("@Redfish.ActionInfo"):
            info = self._json("GET", str(action["@Redfish.ActionInfo"]))
            for param in info.get("Parameters", []):
                if param.get("Name") == "ResetType":
                    values = param.get("AllowableValues")
        return tuple(values) if values else _DEFAULT_RESETS

    def reset(self, reset_type: str, system: Mapping[str, Any] | None = None) -> None:
        """POST ComputerSystem.Reset with a type the system advertises (not retried)."""
        system = system or self.system()
        allowed = self.allowed_resets(system)
        if reset_type not in allowed:
            raise BmcUnsupported(
                self.endpoint, f"reset type {reset_type!r} not offered", "the system allows: " + ", ".join(allowed)
            )
        action = (system.get("Actions") or {}).get("#ComputerSystem.Reset") or {}
        target = str(action.get("target") or self.system_uri().rstrip("/") + "/Actions/ComputerSystem.Reset")
        resp = self._request("POST", target, json={"ResetType": reset_type})
        self._check(resp, f"reset {reset_type}")

    def wait_power(self, want: str, timeout: float | None = None) -> tuple[str, float]:
        """Poll until PowerState is `want`; returns (state, seconds waited)."""
        return poll_power(
            self.power_state,
            want,
            endpoint=self.endpoint,
            timeouts=self.timeouts,
            timeout=timeout,
            sleep=self._sleep,
            hint="the request was accepted; check the BMC's event log, then retry",
        )

    def _first_allowed(self, allowed: tuple[str, ...], *choices: str) -> str:
        for c in choices:
            if c in allowed:
                return c
        raise BmcUnsupported(
            self.endpoint, f"none of {', '.join(choices)} offered", "the system allows: " + ", ".join(allowed)
        )

    def set_power(self, action: PowerAction, *, wait: bool = True, timeout: float | None = None) -> PowerResult:
        """Ensure a power state. Idempotent: `on` on a powered-on system sends nothing.

        `reset` of a system that is off powers it on (a reset cannot restart what is not running).
        """
        start = time.monotonic()
        system = self.system()
        before = str(system.get("PowerState", "Unknown"))
        allowed = self.allowed_resets(system)
        if action is PowerAction.ON:
            want, reset_type = (
                "On",
                None if before in ("On", "PoweringOn") else self._first_allowed(allowed, "On", "ForceOn"),
            )
        elif action in (PowerAction.OFF, PowerAction.GRACEFUL_OFF):
            want = "Off"
            reset_type = (
                None
                if before in ("Off", "PoweringOff")
                else self._first_allowed(
                    allowed, *(("GracefulShutdown",) if action is PowerAction.GRACEFUL_OFF else ("ForceOff",))
                )
            )
        else:
            want = "On"
            reset_type = (
                self._first_allowed(allowed, "On", "ForceOn")
                if before in ("Off", "PoweringOff")
                else self._first_allowed(allowed, "ForceRestart", "GracefulRestart", "PowerCycle")
            )
        if reset_type is not None:
            self.reset(reset_type, system)
        after = before
        if wait and (reset_type is not None or before != want):
            after, _ = self.wait_power(want, timeout)
        return PowerResult(
            action=action.value,
            before=before,
            after=after,
            reset_type=reset_type,
            changed=reset_type is not None,
            seconds=round(time.monotonic() - start, 2),
        )

    # -- boot ----------------------------------------------------------------------------------------

    def set_boot_override(
        self, target: BootTarget | str, *, enabled: str = "Once", mode: str | None = None
    ) -> BootOverride:
        """Set the next boot device (`Once` by default) and read back what the BMC reports."""
        boot = self.system().get("Boot") or {}
        allowed = tuple(boot.get("BootSourceOverrideTarget@Redfish.AllowableValues") or ())
        value = str(target)
        if allowed and value not in allowed:
            raise BmcUnsupported(
                self.endpoint, f"boot target {value!r} not offered", "the system allows: " + ", ".join(allowed)
            )
        body: dict[str, Any] = {"BootSourceOverrideTarget": value, "BootSourceOverrideEnabled": enabled}
        if mode:
            body["BootSourceOverrideMode"] = mode
        resp = self._request("PATCH", self.system_uri(), json={"Boot": body})
        self._check(resp, f"boot override {value}")
        now = self.system().get("Boot") or {}
        reported = str(now.get("BootSourceOverrideTarget"))
        if reported != value:
            raise BmcProtocolError(self.endpoint, f"boot override not applied: asked {value}, BMC reports {reported}")
        return BootOverride(
            target=reported,
            enabled=str(now.get("BootSourceOverrideEnabled", "")),
            requested_enabled=enabled,
            allowed_targets=allowed,
        )

    # -- inventory -----------------------------------------------------------------------------------

    def macs(self, system: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """MAC addresses of the system's EthernetInterfaces, lower-case (empty if not exposed)."""
        link = ((system or self.system()).get("EthernetInterfaces") or {}).get("@odata.id")
        if not link:
            return ()
        try:
            collection = self._json("GET", str(link))
        except BmcNotFound:
            return ()
        out = []
        for m in collection.get("Members", []):
            nic = self._json("GET", str(m["@odata.id"]))
            mac = nic.get("MACAddress") or nic.get("PermanentMACAddress")
            if mac:
                out.append(str(mac).lower())
        return tuple(out)

    def inventory(self) -> Inventory:
        """Model, serial, UUID, MACs and boot settings of the system."""
        s = self.system()
        return Inventory(
            system_id=str(s.get("Id", "")),
            name=str(s.get("Name", "")),
            uuid=str(s.get("UUID", "")),
            manufacturer=str(s.get("Manufacturer", "")),
            model=str(s.get("Model", "")),
            serial=str(s.get("SerialNumber", "")),
            power_state=str(s.get("PowerState", "Unknown")),
            bios_version=str(s.get("BiosVersion", "")),
            macs=self.macs(s),
            boot={k: v for k, v in (s.get("Boot") or {}).items() if "@" not in k},
        )


def _error_text(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200].strip() or resp.reason
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:200]
    return str(body)[:200]
