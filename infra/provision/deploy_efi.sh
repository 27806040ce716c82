# gpufleet deploy ramdisk: the UEFI variable store (sourced by /init as /lib/gpufleet/efi.sh).
# Functions only, so tests run them against a fake efivarfs directory (EFIVARS=<dir>) with busybox sh.
#
# efivarfs (Linux Documentation/filesystems/efivarfs.rst): one file per variable, named <Name>-<VendorGUID>,
# its content the variable's 4-byte attributes (little endian) followed by its data. The data used here
# (UEFI Specification 2.10, section 3.3 "Globally Defined Variables" and 3.1.3 "Load Options"):
#   BootOrder  UINT16 array of Boot#### option numbers, first tried first
#   BootNext   one UINT16: the option booted once on the next boot, before BootOrder (then deleted)
#   Boot####   EFI_LOAD_OPTION: UINT32 Attributes, UINT16 FilePathListLength, CHAR16 Description
#              (NUL-terminated UCS-2), the device path list, optional data
# Read with od(1) as 16-bit words: the ramdisk (x86-64) and the test hosts are little endian, as UEFI is.
EFIVARS=${EFIVARS:-/sys/firmware/efi/efivars}
EFI_GLOBAL=8be4df61-93ca-11d2-aa0d-00e098032b8c

# Make the variable store writable for grub-install, or print why it cannot be and fail. The efivarfs module
# is loaded with the others (gpufleet.order); /sys/firmware/efi exists only when the firmware booted the
# kernel through UEFI with runtime services (not under legacy/CSM boot, not with `noefi`).
efivars_up() {
    if [ ! -d "${EFIVARS%/efivars}" ]; then
        echo "${EFIVARS%/efivars} is absent (the firmware booted this ramdisk in legacy/CSM mode, or without EFI runtime services)"
        return 1
    fi
    # (busybox 1.35 has no mountpoint applet: /proc/mounts says whether efivarfs is there already.)
    if ! grep -qs " $EFIVARS efivarfs " /proc/mounts; then
        mount -t efivarfs efivarfs "$EFIVARS" 2>/dev/null \
            || { echo "efivarfs cannot be mounted on $EFIVARS (no efivarfs module in this kernel?)"; return 1; }
    fi
    [ -e "$EFIVARS/BootOrder-$EFI_GLOBAL" ] || ls "$EFIVARS"/Boot[0-9A-F][0-9A-F][0-9A-F][0-9A-F]-"$EFI_GLOBAL" \
        >/dev/null 2>&1 || { echo "$EFIVARS has no BootOrder and no Boot#### variables"; return 1; }
}

# The variable's data as 16-bit words (hex, 4 digits each, one per line), the attributes (2 words) dropped.
# Read from the start with no `od -j`: efivarfs files cannot seek (no_llseek in fs/efivarfs/file.c), and
# busybox od skips by seeking (seen in the lab: every variable read as empty).
_words() {
    od -An -v -tx2 "$1" 2>/dev/null | tr -s ' ' '\n' | sed '/^$/d' | sed -n '3,$p'
}

# BootOrder as option numbers (uppercase hex, as in the Boot#### names), comma-separated.
boot_order() {
    echo "$(_words "$EFIVARS/BootOrder-$EFI_GLOBAL" | tr 'a-f' 'A-F' | tr '\n' ',' | sed 's/,$//')"
}

# The description of a Boot#### option (printable ASCII; any other character becomes `?`).
boot_desc() {
    # Words 0-2 are Attributes (2 words) and FilePathListLength; the description starts at word 3.
    _words "$EFIVARS/Boot$1-$EFI_GLOBAL" | sed -n '4,$p' | while read -r w; do
        [ "$w" = 0000 ] && break
        n=$((0x$w))
        if [ "$n" -ge 32 ] && [ "$n" -le 126 ]; then
            # shellcheck disable=SC2059  # the format is the octal escape of one checked character
            printf "\\$(printf %o "$n")"
        else
            printf '?'
        fi
    done
}

# The Boot#### options labelled $1 (case-insensitive, as grub-install matches them), and where the first one
# stands in BootOrder: prints e.g. `Boot0004, first in BootOrder 0004,0001,0000`; fails when none exists.
nvram_entry() {
    found=""
    for f in "$EFIVARS"/Boot[0-9A-F][0-9A-F][0-9A-F][0-9A-F]-"$EFI_GLOBAL"; do
        [ -e "$f" ] || continue
        num=${f##*/Boot}
        num=${num%%-*}
        [ "$(boot_desc "$num" | tr 'A-Z' 'a-z')" = "$(echo "$1" | tr 'A-Z' 'a-z')" ] && found="$found $num"
    done
    set -- "$1" $found
    if [ "$#" -eq 1 ]; then
        echo "no Boot#### variable labelled '$1'"
        return 1
    fi
    label=$1
    shift
    order=$(boot_order)
    where="not in BootOrder"
    case ",$order," in
        ",$1,"*) where="first in BootOrder" ;;
        *",$1,"*) where="in BootOrder, not first" ;;
    esac
    if [ "$#" -gt 1 ]; then
        echo "Boot$1 and $(($# - 1)) more labelled '$label', $where $order"
    else
        echo "Boot$1, $where $order"
    fi
}
