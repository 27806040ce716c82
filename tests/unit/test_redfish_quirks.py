"""The Redfish client and the shared reimage against sushy-tools' emulator behind a proxy with real-BMC quirks.

Each quirk's source is cited beside its switch in tests/unit/redfish_proxy.py. The emulator is started as
in test_bmc.py (loopback, free port); each test gets its own proxy in front of it.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

import infra.bmc.lifecycle
import infra.commands.bmc
import infra.dr.rebuild
from infra.bmc.errors import BmcAuthError, BmcProtocolError, BmcRedirected
from infra.bmc.lifecycle import reimage
from infra.bmc.redfish import BootTarget, PowerAction, RedfishClient, Timeouts
from tests.unit.redfish_proxy import Proxy, Sink
from tests.unit.test_bmc import (
    FAST,
    HOST_KEY,
    PASSWORD,
    Emulator,
    Recorder,
    _rebuild,
    _start_emulator,
    _stop,
    make_stack,
    run_cli,
)

CANARY = "CANARY-5f1e9a77-do-not-echo"

# Real emulators or thousands of generated inputs: run by scripts/test.sh, not in the fast unit loop.
pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emu = _start_emulator(tmp_path_factory.mktemp("sushy-quirks"))
    yield emu
    _stop(emu)


@pytest.fixture
def proxy(emulator: Emulator) -> Iterator[Proxy]:
    p = Proxy(emulator.url, "admin", PASSWORD)
    yield p
    p.close()


def client(p: Proxy, password: str = PASSWORD, timeouts: Timeouts = FAST) -> RedfishClient:
    return RedfishClient(p.url, "admin", password, system_id="node-a", timeouts=timeouts)


def upstream(emu: Emulator) -> dict[str, Any]:
    """node-a as the emulator itself holds it (no proxy in between)."""
    r = requests.get(emu.url + "/redfish/v1/Systems", auth=("admin", PASSWORD), timeout=5)
    for m in r.json()["Members"]:
        body = requests.get(emu.url + m["@odata.id"], auth=("admin", PASSWORD), timeout=5).json()
        if body["Name"] == "node-a":
            return dict(body)
    raise AssertionError("node-a missing")


def set_upstream_boot(emu: Emulator, **boot: str) -> None:
    path = upstream(emu)["@odata.id"]
    r = requests.patch(f"{emu.url}{path}", json={"Boot": boot}, auth=("admin", PASSWORD), timeout=5)
    assert r.status_code == 204


# --- sessions (sushy's SessionOrBasicAuth, wrapped) ------------------------------------------------------


def test_session_login_token_and_logout(proxy: Proxy) -> None:
    """A BMC with a session service: one session POST, then only X-Auth-Token, and DELETE on close."""
    with client(proxy) as c:
        assert c.auth_mode == "session"
        assert c.system()["Name"] == "node-a"
    assert proxy.record.session_posts == 1 and proxy.record.session_deletes == 1
    assert proxy.record.basic_auth_requests == 0


def test_refused_password_is_tried_once(proxy: Proxy) -> None:
    """401 on the session POST is final: no basic-auth retry of the same wrong password (account lockout)."""
    c = client(proxy, password="wrong-" + PASSWORD)
    with pytest.raises(BmcAuthError) as exc:
        c.login()
    assert proxy.record.session_posts == 1 and proxy.record.basic_auth_requests == 0
    assert PASSWORD not in str(exc.value)


# --- (f) redirect of the session POST ----------------------------------------------------------------------


def test_session_redirect_is_not_followed_with_the_password(proxy: Proxy, tmp_path: Path) -> None:
    """(f) A 307 on the session POST: nothing reaches the other host; exit 2 naming the redirect, no password."""
    sink = Sink()
    try:
        proxy.quirks.redirect_sessions_to = sink.url
        with pytest.raises(BmcRedirected) as exc:
            client(proxy).login()
        assert "307" in str(exc.value) and PASSWORD not in str(exc.value)
        stack = str(make_stack(tmp_path, proxy.url))
        code, out, err = run_cli(
            "bmc", "power", "--stack-file", stack, "--node", "lab-gpu01", "--state", "on", "--json"
        )
        assert code == 2 and json.loads(out)["error"] == "redirect" and PASSWORD not in out + err
        assert sink.seen == []  # the password was never re-sent anywhere
        assert proxy.record.session_posts == 2 and proxy.record.basic_auth_requests == 0
    finally:
        sink.close()


def test_redirect_control_requests_would_follow(proxy: Proxy) -> None:
    """Control for (f): plain `requests` (what sushy uses) re-sends the password to the redirect target."""
    sink = Sink()
    try:
        proxy.quirks.redirect_sessions_to = sink.url
        requests.post(proxy.url + "/redfish/v1/SessionService/Sessions",
                      json={"UserName": "admin", "Password": PASSWORD}, timeout=5)
        assert sink.seen and PASSWORD.encode() in sink.seen[0][2]
    finally:
        sink.close()


# --- (a) If-Match -----------------------------------------------------------------------------------------


def test_patch_carries_if_match_from_a_fresh_read(proxy: Proxy, emulator: Emulator) -> None:
    """(a) The BMC answers 428 without If-Match: the client's PATCH carries the ETag of its GET."""
    proxy.quirks.etag = True
    bare = requests.patch(proxy.url + str(upstream(emulator)["@odata.id"]),
                          json={"Boot": {"BootSourceOverrideTarget": "Pxe"}}, auth=("admin", PASSWORD), timeout=5)
    assert bare.status_code == 428  # the quirk is on: a PATCH without If-Match is refused
    with client(proxy) as c:
        result = c.set_boot_override(BootTarget.PXE)
    assert result.target == "Pxe"
    assert [(status, bool(etag)) for _, etag, status in proxy.record.patches] == [(428, False), (204, True)]


def test_stale_etag_is_read_again_and_retried_once(proxy: Proxy) -> None:
    """(a) 412 on a stale ETag (the resource changed after our GET): read again, PATCH again with the new ETag."""
    proxy.quirks.etag = True
    proxy.quirks.stale_next_patch = True
    with client(proxy) as c:
        assert c.set_boot_override(BootTarget.HDD).target == "Hdd"
    statuses = [status for _, _, status in proxy.record.patches]
    assert statuses[0] == 412 and statuses[-1] == 204
    sent = [etag for _, etag, _ in proxy.record.patches if etag]
    assert len(set(sent)) >= 2  # the retry used a newer ETag


# --- (c), (d) boot mode ---------------------------------------------------------------------------------


def test_boot_mode_is_sent_back_when_the_bmc_resets_it(proxy: Proxy, emulator: Emulator) -> None:
    """(c) A BMC that resets BootSourceOverrideMode unless it is sent: the mode survives the PATCH."""
    set_upstream_boot(emulator, BootSourceOverrideMode="UEFI")
    proxy.quirks.mode_reset = True
    requests.patch(proxy.url + str(upstream(emulator)["@odata.id"]),
                   json={"Boot": {"BootSourceOverrideTarget": "Hdd"}}, auth=("admin", PASSWORD), timeout=5)
    assert upstream(emulator)["Boot"]["BootSourceOverrideMode"] == "Legacy"  # quirk on
    set_upstream_boot(emulator, BootSourceOverrideMode="UEFI")
    with client(proxy) as c:
        result = c.set_boot_override(BootTarget.PXE)
    assert result.mode_sent and result.mode == "UEFI"
    assert upstream(emulator)["Boot"]["BootSourceOverrideMode"] == "UEFI"


def test_read_only_boot_mode_is_left_out_and_remembered(proxy: Proxy, emulator: Emulator) -> None:
    """(d) A BMC that refuses BootSourceOverrideMode as a write: retried without it, then never sent again."""
    set_upstream_boot(emulator, BootSourceOverrideMode="UEFI")
    proxy.quirks.mode_readonly = True
    with client(proxy) as c:
        first = c.set_boot_override(BootTarget.PXE)
        second = c.set_boot_override(BootTarget.HDD)
    assert first.target == "Pxe" and not first.mode_sent and second.target == "Hdd"
    sent_mode = [("BootSourceOverrideMode" in body["Boot"], status) for body, _, status in proxy.record.patches]
    assert sent_mode == [(True, 400), (False, 204), (False, 204)]


def test_explicit_mode_refusal_is_an_error_without_body_text(proxy: Proxy) -> None:
    """(d) When the caller asked for the mode itself, the refusal is reported: status + MessageId only."""
    proxy.quirks.mode_readonly = True
    with client(proxy) as c, pytest.raises(BmcProtocolError) as exc:
        c.set_boot_override(BootTarget.PXE, mode="UEFI")
    assert "HTTP 400" in str(exc.value) and "Base.1.8.PropertyNotWritable" in str(exc.value)
    assert "read only property" not in str(exc.value)


# --- (e) dropped power-on -------------------------------------------------------------------------------


def test_power_on_dropped_during_power_off_is_sent_again(proxy: Proxy) -> None:
    """(e) On sent while the BMC is still powering off is accepted and dropped: the client sees Off, resends."""
    proxy.quirks.drop_on_while_powering_off = True
    timeouts = replace(FAST, resend_after=2.0)
    with client(proxy, timeouts=timeouts) as c:
        c.set_power(PowerAction.ON)
        c.reset("ForceOff")
        result = c.set_power(PowerAction.ON)
    assert result.before == "PoweringOff" and result.after == "On" and result.resent >= 1
    assert ("On", False) in proxy.record.resets and proxy.record.resets[-1] == ("On", True)


# --- (g) error bodies with submitted values ---------------------------------------------------------------


def test_error_bodies_are_never_echoed(
    proxy: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """(g) Bodies echoing what was sent (password included) reach no message, no log, no output."""
    proxy.quirks.echo_canary = CANARY
    caplog.set_level(logging.DEBUG)
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        with client(proxy) as c:  # the session POST is answered 400 with the password echoed: basic auth
            assert c.auth_mode == "basic"
            with pytest.raises(BmcProtocolError) as exc:
                c.set_boot_override(BootTarget.PXE)
            with pytest.raises(BmcProtocolError) as reset_exc:
                c.reset("ForceOff")
        stack = str(make_stack(tmp_path, proxy.url))
        code, out, err = run_cli("bmc", "boot", "--stack-file", stack, "--node", "lab-gpu01", "--target", "pxe")
    finally:
        root.removeHandler(handler)
    assert "HTTP 400 (Base.1.8.PropertyValueFormatError)" in str(exc.value)
    assert code == 1 and "HTTP 400" in err
    seen = str(exc.value) + str(reset_exc.value) + out + err + caplog.text + stream.getvalue()
    captured = capsys.readouterr()
    seen += captured.out + captured.err
    assert CANARY not in seen and PASSWORD not in seen


# --- (b) "Once" ignored: the shared reimage, through `bmc reimage` and through `rebuild` ------------------


def test_both_entry_points_run_the_one_reimage_function() -> None:
    """`bmc reimage` (Pulumi's BMC step runs it) and `rebuild` call the same function object."""
    assert infra.commands.bmc.reimage is infra.bmc.lifecycle.reimage
    assert infra.dr.rebuild.reimage is infra.bmc.lifecycle.reimage


@pytest.mark.parametrize("ignore_once", [True, False])
def test_bmc_reimage_handles_a_bmc_ignoring_once(
    proxy: Proxy, emulator: Emulator, tmp_path: Path, ignore_once: bool
) -> None:
    """(b) `gpufleet bmc reimage`: the override kept after the boot → disk set back; honoured → left alone."""
    proxy.quirks.ignore_once = ignore_once
    set_upstream_boot(emulator, BootSourceOverrideTarget="Hdd")
    stack = str(make_stack(tmp_path, proxy.url))
    code, out, _ = run_cli(
        "bmc", "reimage", "--stack-file", stack, "--node", "lab-gpu01", "--yes", "--boot-grace", "1", "--json"
    )
    data = json.loads(out)
    assert code == 0, data
    assert data["boot"]["target"] == "Pxe" and data["power_off"]["after"] == "Off" and data["power"]["after"] == "On"
    assert data["once_ignored"] is ignore_once
    assert (data["restored"] or {}).get("target") == ("Hdd" if ignore_once else None)
    # Either way the node's next boot is from disk, not another reinstall.
    assert upstream(emulator)["Boot"]["BootSourceOverrideTarget"] == "Hdd"
    # The PXE override was set while the node was off, before the power-on.
    kinds = [k for k, _ in proxy.record.resets]
    pxe_patch = next(i for i, (m, path, _) in enumerate(proxy.record.requests)
                     if m == "PATCH" and "Pxe" in json.dumps(proxy.record.patches[0][0]))
    on_post = max(i for i, (m, path, _) in enumerate(proxy.record.requests) if m == "POST" and "Reset" in path)
    assert kinds[-1] == "On" and pxe_patch < on_post


@pytest.mark.parametrize("ignore_once", [True, False])
def test_rebuild_handles_a_bmc_ignoring_once(
    proxy: Proxy, emulator: Emulator, tmp_path: Path, ignore_once: bool
) -> None:
    """(b) `gpufleet rebuild` (SSH, converge, validate stubbed at its seams): same reimage, same outcome."""
    proxy.quirks.ignore_once = ignore_once
    proxy.quirks.etag = True  # and a BMC that wants If-Match, on the same path
    set_upstream_boot(emulator, BootSourceOverrideTarget="Hdd")
    stack = make_stack(tmp_path, proxy.url, lab_mode=False)
    key = tmp_path / "host_key.pub"
    key.write_text(HOST_KEY + "\n")
    pkgs = {"nvidia-driver": "570.133.20-1"}
    rec = Recorder([dict(pkgs), dict(pkgs)])
    report = _rebuild(stack, rec, record_dir=tmp_path / "fp", host_key=key)
    assert report.ok and report.identical is True, report.as_dict()
    step = next(s for s in report.steps if s["step"] == "bmc-reimage")
    assert step["once_ignored"] is ignore_once and step["host_key"].startswith("SHA256:")
    assert (step["restored"] or {}).get("target") == ("Hdd" if ignore_once else None)
    assert upstream(emulator)["Boot"]["BootSourceOverrideTarget"] == "Hdd"
    assert rec.calls.index("wait_ssh") < rec.calls.index("converge")


def test_reimage_function_with_a_fake_boot_wait(proxy: Proxy, emulator: Emulator) -> None:
    """(b) The function itself: `booted` runs after the confirmed power-on, then the override is checked once."""
    proxy.quirks.ignore_once = True
    seen: list[str] = []
    with client(proxy) as c:

        def booted() -> str:
            seen.append(c.power_state())
            return "SHA256:test"

        result = reimage(c, booted=booted, boot_grace=0)
    assert seen == ["On"] and result.once_ignored and result.restored is not None
    assert result.host_key == "SHA256:test" and result.override_after[0] == "Pxe"
