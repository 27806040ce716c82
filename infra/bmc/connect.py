"""From a node of the site model to a logged-in BMC client; and the pre-flight check rebuild relies on."""

from __future__ import annotations

from dataclasses import dataclass

from infra.bmc.errors import BmcError
from infra.bmc.ipmi import IpmiClient
from infra.bmc.redfish import RedfishClient, Timeouts
from infra.model.site import BmcProtocol, Node
from infra.secrets import SecretError, resolve_secret

# Both speak the same methods (power, boot override, inventory, system summary).
BmcClient = RedfishClient | IpmiClient


class NoBmcError(ValueError):
    """The node has no `bmc:` section in the stack."""


def client_for(node: Node, timeouts: Timeouts | None = None) -> BmcClient:
    """A (not yet logged-in) Redfish or IPMI client for the node's BMC; the password from its SecretRef.

    Raises:
        NoBmcError: the node has no BMC configured.
        infra.secrets.SecretError: the password cannot be read.

    """
    bmc = node.bmc
    if bmc is None:
        raise NoBmcError(f"node {node.hostname} has no `bmc:` in the stack; add one to control power and rebuild it")
    if bmc.protocol is BmcProtocol.IPMI or bmc.endpoint.startswith("ipmi://"):
        return IpmiClient(bmc.endpoint, bmc.username, resolve_secret(bmc.password), timeouts=timeouts)
    verify: bool | str = bmc.ca_bundle if bmc.ca_bundle else bmc.verify_tls
    return RedfishClient(
        bmc.endpoint,
        bmc.username,
        resolve_secret(bmc.password),
        system_id=bmc.system_id,
        verify=verify,
        timeouts=timeouts,
    )


@dataclass(frozen=True)
class Preflight:
    """Result of checking a node's BMC before anything destructive happens."""

    ok: bool
    power_state: str = ""
    macs: tuple[str, ...] = ()
    mac_matches: bool | None = None
    problem: str = ""
    kind: str = ""


def preflight(node: Node, timeouts: Timeouts | None = None) -> Preflight:
    """Reachable, credentials accepted, system found, and its MACs include the node's PXE MAC.

    The MAC check guards against a wrong `bmc.system_id` sending a reimage to another machine. A BMC that
    exposes no EthernetInterfaces cannot be checked (`mac_matches` None), which is not an error.
    """
    try:
        with client_for(node, timeouts) as c:
            system = c.system()
            macs = c.macs(system)
            state = str(system.get("PowerState", "Unknown"))
    except BmcError as exc:
        return Preflight(ok=False, problem=str(exc), kind=exc.kind)
    except SecretError as exc:
        return Preflight(ok=False, problem=str(exc), kind="secret")
    except (NoBmcError, ValueError) as exc:
        return Preflight(ok=False, problem=str(exc), kind="config")
    if not macs:
        return Preflight(ok=True, power_state=state, macs=(), mac_matches=None)
    pxe = node.macs[0]
    if pxe not in macs:
        return Preflight(
            ok=False,
            power_state=state,
            macs=macs,
            mac_matches=False,
            kind="identity",
            problem=f"BMC system {node.bmc.system_id if node.bmc else ''!r} has MACs "
            f"{', '.join(macs)}, none is the node's PXE MAC {pxe}: wrong `bmc.system_id`?",
        )
    return Preflight(ok=True, power_state=state, macs=macs, mac_matches=True)
