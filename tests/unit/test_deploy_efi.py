"""The deploy ramdisk's reading of UEFI boot variables (infra/provision/deploy_efi.sh), run by a real shell against
a fake efivarfs directory.

The ramdisk runs it under busybox `sh`; the tests run it under the host's busybox when installed and under
`/bin/sh` (dash), so a bashism fails here. The fake files have efivarfs's layout (Linux
Documentation/filesystems/efivarfs.rst: `<Name>-<VendorGUID>`, 4 bytes of attributes, then the data) and the
data the UEFI Specification 2.10 defines: BootOrder a UINT16 array (3.3), Boot#### an EFI_LOAD_OPTION
(3.1.3: UINT32 Attributes, UINT16 FilePathListLength, NUL-terminated CHAR16 Description, device path list)
whose device path is a Hard Drive media node (10.3.5.1: type 4, subtype 1, 42 bytes), a File Path media node
(10.3.5.4: type 4, subtype 4) and the End node (type 0x7F, subtype 0xFF). The descriptions besides `debian` are
the ones OVMF (edk2-stable202302, Debian 12 `ovmf`) gives its own boot options.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from infra.provision.image import EFI_LIB

SHELLS = [s for s in (["busybox", "sh"], ["/bin/sh"]) if shutil.which(s[0])]
GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
#: EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS (UEFI 2.10, 8.2).
NV_BS_RT = 0x7


def _var(efivars: Path, name: str, data: bytes) -> None:
    (efivars / f"{name}-{GLOBAL}").write_bytes(struct.pack("<I", NV_BS_RT) + data)


def _ucs2(text: str) -> bytes:
    return text.encode("utf-16-le") + b"\0\0"


def _load_option(desc: str, file: str = "\\EFI\\debian\\shimx64.efi") -> bytes:
    """An EFI_LOAD_OPTION booting `file` on GPT partition 2 (the image's ESP: 2 MiB, 64 MiB)."""
    hd = struct.pack("<BBHIQQ16sBB", 4, 1, 42, 2, 4096, 131072, uuid.uuid4().bytes_le, 2, 2)
    path = _ucs2(file)
    fp = struct.pack("<BBH", 4, 4, 4 + len(path)) + path
    end = struct.pack("<BBH", 0x7F, 0xFF, 4)
    dp = hd + fp + end
    return struct.pack("<IH", 1, len(dp)) + _ucs2(desc) + dp


def _order(*nums: int) -> bytes:
    return b"".join(struct.pack("<H", n) for n in nums)


@pytest.fixture
def efivars(tmp_path: Path) -> Path:
    """What OVMF's store looks like after a deploy: PXE, disk fallback, shell, and `debian` first."""
    d = tmp_path / "firmware" / "efi" / "efivars"
    d.mkdir(parents=True)
    _var(d, "Boot0000", _load_option("UiApp", ""))
    _var(d, "Boot0001", _load_option("UEFI PXEv4 (MAC:525400C0FFEE)", ""))
    _var(d, "Boot0002", _load_option("UEFI Misc Device", "\\EFI\\BOOT\\BOOTX64.EFI"))
    _var(d, "Boot000A", _load_option("debian"))
    _var(d, "BootOrder", _order(0x000A, 0x0002, 0x0001, 0x0000))
    return d


def _call(shell: list[str], efivars: Path, func: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*shell, "-c", f'. "{EFI_LIB}"; {func} "$@"', func, *args],
        env={"EFIVARS": str(efivars), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
def test_boot_order_and_descriptions_are_read_from_the_variables(shell: list[str], efivars: Path) -> None:
    assert _call(shell, efivars, "boot_order").stdout == "000A,0002,0001,0000\n"
    assert _call(shell, efivars, "boot_desc", "0001").stdout == "UEFI PXEv4 (MAC:525400C0FFEE)"
    assert _call(shell, efivars, "boot_desc", "000A").stdout == "debian"
    # Outside printable ASCII: shown as `?`, never as raw bytes in the console log.
    _var(efivars, "Boot0003", _load_option("d\u00e9bian\u2603"))
    assert _call(shell, efivars, "boot_desc", "0003").stdout == "d?bian?"


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
def test_the_debian_entry_is_found_and_its_place_in_the_boot_order_reported(shell: list[str], efivars: Path) -> None:
    res = _call(shell, efivars, "nvram_entry", "debian")
    assert res.returncode == 0 and res.stdout == "Boot000A, first in BootOrder 000A,0002,0001,0000\n"
    _var(efivars, "BootOrder", _order(0x0002, 0x000A))
    assert _call(shell, efivars, "nvram_entry", "debian").stdout == "Boot000A, in BootOrder, not first 0002,000A\n"
    _var(efivars, "BootOrder", _order(0x0002))
    assert _call(shell, efivars, "nvram_entry", "debian").stdout == "Boot000A, not in BootOrder 0002\n"


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
def test_duplicate_entries_are_reported_and_labels_match_case_insensitively(shell: list[str], efivars: Path) -> None:
    # grub-install matches its label with strcasecmp: `Debian` from an earlier installer is the same entry.
    _var(efivars, "Boot0004", _load_option("Debian"))
    res = _call(shell, efivars, "nvram_entry", "debian")
    assert res.returncode == 0
    assert res.stdout == "Boot0004 and 1 more labelled 'debian', not in BootOrder 000A,0002,0001,0000\n"


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
def test_no_entry_fails_with_the_reason(shell: list[str], efivars: Path) -> None:
    (efivars / f"Boot000A-{GLOBAL}").unlink()
    res = _call(shell, efivars, "nvram_entry", "debian")
    assert res.returncode == 1 and res.stdout == "no Boot#### variable labelled 'debian'\n"


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
def test_no_uefi_runtime_means_no_variable_store_and_says_why(shell: list[str], tmp_path: Path) -> None:
    # A ramdisk booted in legacy mode has no /sys/firmware/efi: nothing is mounted, the reason is printed.
    res = _call(shell, tmp_path / "firmware" / "efi" / "efivars", "efivars_up")
    assert res.returncode == 1
    assert res.stdout.startswith(f"{tmp_path / 'firmware' / 'efi'} is absent (the firmware booted this ramdisk")
