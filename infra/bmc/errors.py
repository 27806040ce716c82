"""Typed BMC errors: each says what went wrong with which BMC and what to do, never a credential."""

from __future__ import annotations


class BmcError(Exception):
    """Base of every BMC failure. `endpoint` is the BMC URL; `hint` what the user can do about it."""

    kind = "error"

    def __init__(self, endpoint: str, message: str, hint: str = "") -> None:
        self.endpoint = endpoint
        self.message = message
        self.hint = hint
        super().__init__(f"BMC {endpoint}: {message}" + (f" — {hint}" if hint else ""))


class BmcUnreachable(BmcError):
    """No connection could be made (refused, no route, name not resolved)."""

    kind = "unreachable"


class BmcTimeout(BmcError):
    """The BMC accepted the connection but did not answer in time."""

    kind = "timeout"


class BmcTlsError(BmcError):
    """The BMC's TLS certificate could not be verified."""

    kind = "tls"


class BmcAuthError(BmcError):
    """The BMC refused the credentials (401/403). Never retried: BMCs lock accounts after a few failures."""

    kind = "auth"


class BmcRedirected(BmcError):
    """The BMC answered with a redirect. Never followed: a redirected POST would carry the password elsewhere."""

    kind = "redirect"


class BmcNotFound(BmcError):
    """The system (or a resource it links to) does not exist on this BMC."""

    kind = "not_found"


class BmcProtocolError(BmcError):
    """The BMC answered, but not as Redfish says it should (unexpected status or body)."""

    kind = "protocol"


class BmcUnsupported(BmcError):
    """The BMC does not offer what was asked (a reset type or boot target it does not advertise)."""

    kind = "unsupported"


class PowerTimeout(BmcError):
    """A power change was accepted but the system did not reach the state in time."""

    kind = "power_timeout"
