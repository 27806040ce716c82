"""Redfish BMC client on `sushy` (OpenStack Ironic's Redfish library): power, one-time boot override, inventory.

sushy does the Redfish work; this module adds what gpufleet needs on top and wraps the places where
sushy's defaults are unsafe for us. Per concern (sushy 5.14.0, read from its source):

- **Resources, reset, boot override.** sushy's `System.reset_system` (checks the reset type against
  `ResetType@Redfish.AllowableValues` or the action's ActionInfo) and `System.set_system_boot_options`
  (checks the target against the allowable values, writes to the `@Redfish.Settings` resource when the BMC
  has one) are used as they are.
- **ETag / If-Match on PATCH.** sushy sends `If-Match` with the ETag of the last GET of the resource, and on
  `412` retries with a weak ETag made strong, then without `If-Match` (`Connector._etag_handler`). Wrapped:
  (1) `_System._get_etag` also takes the body's `@odata.etag` when a BMC sends no `ETag` header; (2) the boot
  PATCH reads the system afresh right before it, and a `412`/`428` answer (a stale or missing ETag: iDRAC,
  iLO, Lenovo/AMI, Huawei — ansible #56150, #56050, DMTF Redfish-Tacklebox #22, gofish #171) is retried
  once after another fresh read.
- **Sessions.** sushy's `SessionOrBasicAuth` POSTs to the session service, keeps `X-Auth-Token`, logs in
  again when a session expires, and deletes the session on close. Wrapped (`_SessionFirstAuth`): a `401/403`
  on the session POST is final (sushy falls back to basic auth, i.e. a second try of a wrong password: BMCs
  lock accounts) unless the BMC challenges for Basic; a BMC whose service root offers no session service
  gets basic auth without a session POST.
- **Redirects.** sushy lets `requests` follow redirects, and `requests` re-sends a POST body on 307/308 —
  the password of the session POST — to wherever the BMC points. `_Connector` sends every request with
  `allow_redirects=False` and turns any 3xx into `BmcRedirected`: credentials go only to the stack's endpoint.
- **Retries and timeouts.** sushy retries *every* method three times on connection errors *and read
  timeouts* (a duplicated `ForceRestart` resets a node twice). `_Connector` asks sushy for one attempt
  (`server_side_retries=1`, which also means one retry of a GET answered 5xx) and mounts a urllib3 `Retry`
  that retries only connection *establishment* failures (the request never left). Connect and read timeouts
  are sushy's `connect_timeout`/`read_timeout`.
- **TLS.** sushy passes `verify` (True, False or a CA bundle path) on every request, so `REQUESTS_CA_BUNDLE`
  from the environment cannot silently replace a stack's `ca_bundle` (requests#3829).
- **Errors.** sushy's exception messages carry the BMC's error text, and it logs them; some BMCs fill error
  bodies with the submitted values (a password). Messages here hold only the HTTP status and a Redfish
  `MessageId` that matches the registry grammar (`_safe_message_id`); sushy's logger is silenced
  (`_quiet_sushy`) because its warnings quote those bodies.
- **Power.** Changes are asynchronous (1–11 s on the emulator): callers poll (`confirm_power`). A power-on
  accepted while a BMC is still powering off may be silently dropped: when the system stays Off after an
  On, the On is sent again (a bounded number of times).
- **Boot mode.** Supermicro resets `BootSourceOverrideMode` unless it is sent again with the target
  (Redfishtool #106): the current mode is sent back. iLO refuses it as a write (community.general #3509):
  a 400 to a PATCH that carried the mode only because we added it is retried without it, and the client
  remembers that.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast
from urllib.parse import urlsplit

import requests
import sushy
import urllib3
from requests.adapters import HTTPAdapter
from sushy import auth as sushy_auth
from sushy import connector as sushy_connector
from sushy import exceptions as sushy_exc
from sushy.resources import constants as res_cons
from sushy.resources.system import constants as sys_cons
from sushy.resources.system import system as sushy_system
from urllib3.util.retry import Retry

from infra.bmc.errors import (
    BmcAuthError,
    BmcError,
    BmcNotFound,
    BmcProtocolError,
    BmcRedirected,
    BmcTimeout,
    BmcTlsError,
    BmcUnreachable,
    BmcUnsupported,
    PowerTimeout,
)

SERVICE_ROOT = "/redfish/v1/"
# Reset types Redfish defines, used when a BMC does not list its allowable values.
_DEFAULT_RESETS = ("On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "ForceOn")
# DSP0266 MessageId: RegistryName.MajorVersion.MinorVersion[.Errata].MessageKey. Anything else in an
# error body is BMC-chosen text and is never shown.
_MESSAGE_ID = re.compile(r"[A-Za-z][A-Za-z0-9]{0,31}\.\d{1,3}\.\d{1,3}(\.\d{1,3})?\.[A-Za-z][A-Za-z0-9]{0,63}")


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
    # Off this long after a power-on was accepted: the BMC dropped it (sent while powering off); send again.
    # Longer than the emulator's slowest apply (11 s), so an honest BMC is never sent a second On.
    resend_after: float = 15.0
    resends: int = 2


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
    state, waited, _ = confirm_power(
        read, want, send=None, endpoint=endpoint, timeouts=timeouts, timeout=timeout, sleep=sleep, hint=hint
    )
    return state, waited


def confirm_power(
    read: Callable[[], str],
    want: str,
    *,
    send: Callable[[], None] | None,
    endpoint: str,
    timeouts: Timeouts,
    timeout: float | None,
    sleep: Callable[[float], None],
    hint: str = "",
) -> tuple[str, float, int]:
    """Poll until the power state is `want`; (state, seconds, times `send` was repeated).

    With `send` (the request that was just accepted): when the system stays in the opposite steady state
    (`Off` for `On`) for `timeouts.resend_after` seconds, the BMC dropped the request (a power-on accepted
    during a power-off is silently lost on some BMCs), so it is sent again, at most `timeouts.resends` times.
    """
    limit = timeouts.power_timeout if timeout is None else timeout
    opposite = {"On": "Off", "Off": "On"}.get(want)
    start = last_send = time.monotonic()
    resent = 0
    while True:
        state = read()
        now = time.monotonic()
        waited = now - start
        if state == want:
            return state, waited, resent
        if waited >= limit:
            raise PowerTimeout(
                endpoint,
                f"system still {state} after {waited:.0f} s (wanted {want}"
                + (f"; request sent {resent + 1} times)" if send else ")"),
                hint,
            )
        if state != opposite:
            last_send = now  # in transition: the BMC is working on it
        elif send is not None and resent < timeouts.resends and now - last_send >= timeouts.resend_after:
            send()
            resent += 1
            last_send = time.monotonic()
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
    resent: int = 0

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
    mode: str | None = None
    mode_sent: bool = False

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
            "mode": self.mode,
            "mode_sent": self.mode_sent,
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


def _classify(endpoint: str, exc: BaseException | None) -> BmcError:
    """Map a requests/urllib3 transport failure to one typed error with a hint."""
    reason: object = exc
    # urllib3 wraps the real cause in MaxRetryError once retries are used up.
    if isinstance(exc, requests.RequestException) and exc.args and isinstance(
        exc.args[0], urllib3.exceptions.MaxRetryError
    ):
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


def _safe_message_id(exc: sushy_exc.HTTPError) -> str:
    """The first Redfish MessageId of an error answer that has the registry grammar; '' if none."""
    candidates: list[object] = []
    info = exc.extended_info
    if isinstance(info, list):
        candidates += [m.get("MessageId") for m in info if isinstance(m, dict)]
    elif isinstance(info, dict):
        candidates.append(info.get("MessageId"))
    candidates.append(exc.code)
    for c in candidates:
        if isinstance(c, str) and _MESSAGE_ID.fullmatch(c) and c != "Base.1.0.GeneralError":
            return c
    return ""


def _http_error(endpoint: str, what: str, exc: sushy_exc.HTTPError) -> BmcError:
    """A message from the status code and a MessageId only: error bodies may echo what was sent."""
    mid = _safe_message_id(exc)
    text = f"{what}: HTTP {exc.status_code}" + (f" ({mid})" if mid else "")
    if isinstance(exc, sushy_exc.AccessError):
        return BmcAuthError(
            endpoint,
            f"{text}: credentials refused",
            "check the password the node's `bmc.password` SecretRef points at; "
            "not retried, so the BMC account is not locked out",
        )
    if isinstance(exc, sushy_exc.ResourceNotFoundError):
        return BmcNotFound(endpoint, f"{text}: not found", "check `bmc.system_id` against `gpufleet bmc inventory`")
    return BmcProtocolError(endpoint, text)


@contextlib.contextmanager
def _mapped(endpoint: str, what: str) -> Iterator[None]:
    """Turn sushy's and requests' exceptions into typed BmcErrors without any BMC-supplied text."""
    try:
        yield
    except BmcError:
        raise
    except sushy_exc.HTTPError as exc:
        raise _http_error(endpoint, what, exc) from None
    except sushy_exc.ConnectionError as exc:
        # sushy raises this inside its `except` for the transport error: the cause is the implicit context.
        raise _classify(endpoint, exc.__context__) from None
    except sushy_exc.InvalidParameterValueError as exc:
        raise BmcUnsupported(endpoint, f"{what}: not offered by the BMC", str(exc)[:300]) from None
    except sushy_exc.UnknownDefaultError:
        raise BmcNotFound(endpoint, f"{what}: the BMC has not exactly one system", "set `bmc.system_id`") from None
    except (sushy_exc.MissingAttributeError, sushy_exc.MissingActionError, sushy_exc.MalformedAttributeError) as exc:
        raise BmcProtocolError(endpoint, f"{what}: answer lacks a Redfish field ({type(exc).__name__})") from None
    except sushy_exc.SushyError as exc:
        raise BmcProtocolError(endpoint, f"{what}: {type(exc).__name__}") from None
    except requests.RequestException as exc:
        raise _classify(endpoint, exc) from None
    except ValueError:
        raise BmcProtocolError(endpoint, f"{what}: answer is not JSON") from None


def _quiet_sushy() -> None:
    """Keep sushy's log out of every log: its warnings quote BMC error bodies, which may echo what was sent."""
    log = logging.getLogger("sushy")
    # Above CRITICAL: sushy's records are never even created, whatever handlers a host program attaches.
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())


class _Connector(sushy_connector.Connector):  # type: ignore[misc]
    """sushy's connector that never follows a redirect and retries only connections that were never made."""

    def __init__(self, url: str, *, verify: bool | str, timeouts: Timeouts) -> None:
        super().__init__(
            url,
            verify=verify,
            response_callback=self._remember,
            server_side_retries=1,
            server_side_retries_delay=timeouts.backoff,
            default_request_timeout=timeouts.read,
            connect_timeout=timeouts.connect,
        )
        self.endpoint = url
        self.requests_made = 0
        self.last_headers: Mapping[str, str] = {}
        retry = Retry(
            total=timeouts.retries,
            connect=timeouts.retries,
            read=False,
            status=0,
            other=0,
            redirect=False,
            backoff_factor=timeouts.backoff,
            raise_on_redirect=False,
        )
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["Accept"] = "application/json"

    def _remember(self, response: requests.Response) -> None:
        self.last_headers = response.headers

    def _op(self, method: str, path: str = "", *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["allow_redirects"] = False
        self.requests_made += 1
        try:
            response = cast("requests.Response", super()._op(method, path, *args, **kwargs))
        finally:
            # sushy asks the BMC to close each connection (`Connection: close`); drop ours as well, so a socket
            # the BMC is closing is never reused for the next request (a POST on it could not be retried safely).
            for adapter in self._session.adapters.values():
                adapter.close()
        if 300 <= response.status_code < 400:
            target = urlsplit(response.headers.get("Location", ""))
            where = f"{target.scheme}://{target.netloc}" if target.netloc else "another path"
            raise BmcRedirected(
                self.endpoint,
                f"{method} {urlsplit(path).path or path}: HTTP {response.status_code} redirect to {where[:120]!r} "
                "not followed (credentials are sent only to the stack's endpoint)",
                "if the BMC moved, set `bmc.endpoint` to its address",
            )
        return response


class _SessionFirstAuth(sushy_auth.SessionOrBasicAuth):  # type: ignore[misc]
    """A Redfish session when the BMC offers one, else basic auth; a refused password is never tried twice."""

    def _do_authenticate(self) -> None:
        root = self._root_resource.json
        if not ((root.get("Links") or {}).get("Sessions") or root.get("SessionService")):
            # No session service (the emulator, older BMCs): basic auth, no session POST to a guessed path.
            self._fallback_to_basic_authentication()
            return
        try:
            sushy_auth.SessionAuth._do_authenticate(self)
        except sushy_exc.AccessError:
            # Some services put the session URI itself behind basic auth: a Basic challenge means "try basic".
            if "basic" in str(self._connector.last_headers.get("WWW-Authenticate", "")).lower():
                self._fallback_to_basic_authentication()
                return
            raise
        except sushy_exc.ConnectionError:
            raise
        except sushy_exc.SushyError:
            # No usable session service (404, 405, no token): basic auth, as sushy does.
            self._fallback_to_basic_authentication()


class _System(sushy_system.System):  # type: ignore[misc]
    """sushy's System, with the ETag also taken from the body (`@odata.etag`) when no header carries it."""

    def _get_etag(self) -> str | None:
        etag = super()._get_etag()
        if not etag:
            body_etag = (self.json or {}).get("@odata.etag")
            etag = body_etag if isinstance(body_etag, str) else None
        return cast("str | None", etag)


class RedfishClient:
    """One BMC, one system. Use as a context manager so a session is always logged out.

    Args:
        endpoint: `https://bmc-host[:port]` (http only for the lab emulator on loopback).
        username: BMC user.
        password: BMC password (kept in memory only; never in messages).
        system_id: Redfish system Id, Name or UUID; None when the BMC has exactly one system.
        verify: True, False, or a CA bundle path.
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
        _quiet_sushy()
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        self.system_id = system_id
        self.timeouts = timeouts or Timeouts()
        self.verify = verify
        self._username = username
        self._password = password
        self._sleep = sleep
        self._conn = _Connector(self.endpoint, verify=verify, timeouts=self.timeouts)
        self._auth: _SessionFirstAuth | None = None
        self._root: sushy.Sushy | None = None
        self._system: _System | None = None
        self._mode_writable = True

    @property
    def requests_made(self) -> int:
        """HTTP requests sent so far (connection-level retries not counted)."""
        return self._conn.requests_made

    @property
    def auth_mode(self) -> str:
        """`session`, `basic` or `none` (not logged in)."""
        if self._auth is None or self._root is None:
            return "none"
        return "session" if self._auth.get_session_key() else "basic"

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
            BmcRedirected: the BMC answered with a redirect (never followed).

        """
        self._auth = _SessionFirstAuth(username=self._username, password=self._password)
        with _mapped(self.endpoint, "login"):
            self._root = sushy.Sushy(
                self.endpoint, auth=self._auth, connector=self._conn, root_prefix=SERVICE_ROOT, language="en"
            )
            # Basic auth sends nothing until a request needs it: prove the credentials now.
            self._root.get_system_collection()

    def close(self) -> None:
        """Log the session out (best effort) and close connections."""
        if self._auth is not None:
            # Best effort: the session times out on the BMC anyway; never hide the caller's real error.
            with contextlib.suppress(Exception):
                self._auth.close()
        self._conn.close()

    def _sushy(self) -> sushy.Sushy:
        if self._root is None:
            self.login()
        assert self._root is not None
        return self._root

    # -- system --------------------------------------------------------------------------------------

    def _resolve(self) -> _System:
        """The client's system, resolved once (by Id, Name or UUID); read afresh on every later call."""
        root = self._sushy()
        if self._system is not None:
            with _mapped(self.endpoint, "read system"):
                self._system.refresh(force=True)
            return self._system
        with _mapped(self.endpoint, "list systems"):
            paths = sorted(root.get_system_collection().members_identities)
        path: str | None = None
        if self.system_id is None:
            if len(paths) != 1:
                raise BmcNotFound(
                    self.endpoint,
                    f"BMC has {len(paths)} systems and no `bmc.system_id` is set",
                    "set `bmc.system_id` to one of: " + ", ".join(p.rstrip("/").rsplit("/", 1)[-1] for p in paths),
                )
            path = paths[0]
        else:
            path = next((p for p in paths if p.rstrip("/").rsplit("/", 1)[-1] == self.system_id), None)
        names: list[str] = []
        if path is None:
            for p in paths:
                body = self._make_system(p).json
                names.append(str(body.get("Name")))
                if self.system_id in (body.get("Id"), body.get("Name"), body.get("UUID")):
                    path = p
                    break
            else:
                raise BmcNotFound(
                    self.endpoint,
                    f"no system {self.system_id!r}",
                    "set `bmc.system_id` to one of: " + ", ".join(sorted(names)),
                )
        self._system = self._make_system(path)
        return self._system

    def _make_system(self, path: str) -> _System:
        root = self._sushy()
        with _mapped(self.endpoint, f"GET {path}"):
            return _System(
                self._conn, path, redfish_version=root.redfish_version, registries=root.lazy_registries, root=root
            )

    def system_uri(self) -> str:
        """The canonical URI of this client's system."""
        return str(self._resolve().path)

    def system(self) -> dict[str, Any]:
        """The ComputerSystem resource, read now."""
        return dict(self._resolve().json)

    def power_state(self) -> str:
        """`On`, `Off`, `PoweringOn`, `PoweringOff` (as the BMC reports it)."""
        return str(self.system().get("PowerState", "Unknown"))

    def current_boot(self) -> tuple[str, str]:
        """(BootSourceOverrideTarget, BootSourceOverrideEnabled) as the BMC reports them now."""
        boot = self.system().get("Boot") or {}
        return str(boot.get("BootSourceOverrideTarget") or "None"), str(boot.get("BootSourceOverrideEnabled") or "")

    def allowed_resets(self, system: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """Reset types the system advertises (`ResetType@Redfish.AllowableValues`, else ActionInfo)."""
        s = self._system if system is not None and self._system is not None else self._resolve()
        with _mapped(self.endpoint, "reset types"):
            values = {v.value for v in s.get_allowed_reset_system_values()}
        ordered = tuple(v for v in _DEFAULT_RESETS if v in values)
        return ordered + tuple(sorted(values - set(ordered)))

    def reset(self, reset_type: str, system: Mapping[str, Any] | None = None) -> None:
        """POST ComputerSystem.Reset with a type the system advertises (never retried)."""
        allowed = self.allowed_resets(system)
        if reset_type not in allowed:
            raise BmcUnsupported(
                self.endpoint, f"reset type {reset_type!r} not offered", "the system allows: " + ", ".join(allowed)
            )
        s = self._system or self._resolve()
        with _mapped(self.endpoint, f"reset {reset_type}"):
            s.reset_system(res_cons.ResetType(reset_type))

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

        `reset` of a system that is off powers it on (a reset cannot restart what is not running). A power-on
        is confirmed and sent again when the BMC dropped it (see `confirm_power`).
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
        after, resent = before, 0
        if wait and (reset_type is not None or before != want):
            resend = reset_type if reset_type in ("On", "ForceOn") else None
            after, _, resent = confirm_power(
                self.power_state,
                want,
                send=(lambda: self.reset(str(resend))) if resend else None,
                endpoint=self.endpoint,
                timeouts=self.timeouts,
                timeout=timeout,
                sleep=self._sleep,
                hint="the request was accepted; check the BMC's event log, then retry",
            )
        return PowerResult(
            action=action.value,
            before=before,
            after=after,
            reset_type=reset_type,
            changed=reset_type is not None,
            seconds=round(time.monotonic() - start, 2),
            resent=resent,
        )

    # -- boot ----------------------------------------------------------------------------------------

    def set_boot_override(
        self, target: BootTarget | str, *, enabled: str = "Once", mode: str | None = None
    ) -> BootOverride:
        """Set the next boot device (`Once` by default) and read back what the BMC reports."""
        s = self._resolve()  # a fresh read: its ETag goes into If-Match
        boot = s.json.get("Boot") or {}
        allowed = tuple(boot.get("BootSourceOverrideTarget@Redfish.AllowableValues") or ())
        value = str(target)
        if allowed and value not in allowed:
            raise BmcUnsupported(
                self.endpoint, f"boot target {value!r} not offered", "the system allows: " + ", ".join(allowed)
            )
        # Supermicro resets the mode unless it is sent with the target (Redfishtool #106): send it back.
        current_mode = boot.get("BootSourceOverrideMode")
        added_mode = mode is None and self._mode_writable and isinstance(current_mode, str)
        send_mode = mode if mode is not None else (current_mode if added_mode else None)
        try:
            self._patch_boot(value, enabled, send_mode)
        except BmcProtocolError as exc:
            if not (added_mode and " HTTP 400" in exc.message):
                raise
            # iLO refuses BootSourceOverrideMode as a write (community.general #3509): we only added it, so
            # send the change without it, and keep leaving it out for this BMC.
            self._mode_writable = False
            send_mode = None
            self._patch_boot(value, enabled, None)
        now = self.system().get("Boot") or {}
        reported = str(now.get("BootSourceOverrideTarget"))
        if reported != value:
            raise BmcProtocolError(self.endpoint, f"boot override not applied: asked {value}, BMC reports {reported}")
        return BootOverride(
            target=reported,
            enabled=str(now.get("BootSourceOverrideEnabled", "")),
            requested_enabled=enabled,
            allowed_targets=allowed,
            mode=str(now["BootSourceOverrideMode"]) if now.get("BootSourceOverrideMode") else None,
            mode_sent=send_mode is not None,
        )

    def _patch_boot(self, value: str, enabled: str, mode: str | None) -> None:
        """One boot PATCH through sushy (If-Match from a fresh read); a 412/428 is retried once after re-reading."""
        what = f"boot override {value}"
        try:
            options = {
                "target": sys_cons.BootSource(value),
                "enabled": sys_cons.BootSourceOverrideEnabled(enabled),
                "mode": sys_cons.BootSourceOverrideMode(mode) if mode else None,
            }
        except ValueError:
            raise BmcUnsupported(self.endpoint, f"{what}: {enabled}/{mode} not a Redfish value") from None
        for attempt in (1, 2):
            s = self._system if attempt == 1 and self._system is not None else self._resolve()
            with _mapped(self.endpoint, what):
                try:
                    s.set_system_boot_options(**options)
                    return
                except sushy_exc.HTTPError as exc:
                    # 412: the ETag was stale (the system changed since our read); 428: the BMC wants If-Match
                    # and sushy's last try went without it. Read the system again for a fresh ETag, once.
                    if attempt == 2 or exc.status_code not in (412, 428):
                        raise

    # -- inventory -----------------------------------------------------------------------------------

    def macs(self, system: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """MAC addresses of the system's EthernetInterfaces, lower-case (empty if not exposed)."""
        s = self._system if system is not None and self._system is not None else self._resolve()
        if not (s.json.get("EthernetInterfaces") or {}).get("@odata.id"):
            return ()
        try:
            with _mapped(self.endpoint, "EthernetInterfaces"):
                nics = s.ethernet_interfaces.get_members()
                out = [str(n.json.get("MACAddress") or n.json.get("PermanentMACAddress") or "").lower() for n in nics]
        except BmcNotFound:
            return ()
        return tuple(m for m in out if m)

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
