# gpufleet deploy ramdisk: pick the root disk by the stack's hint (sourced by /init as /lib/gpufleet/disk.sh).
# Functions only, no side effects, so tests run them against a fake sysfs tree (SYS=<dir>) with busybox sh.
#
# The ramdisk has no udev, so /dev/disk/by-id and /dev/disk/by-path do not exist; this derives the names udev
# would give a disk from sysfs, following Debian 12's udev rules (systemd 252.39,
# /lib/udev/rules.d/60-persistent-storage.rules) and its path_id builtin:
#   virtio-blk  by-id   virtio-<serial>                         (rule "virtio-blk": ATTRS{serial})
#   NVMe        by-id   nvme-<wwid>, nvme-<model>_<serial>,      (rules "NVMe": ATTR{wwid}; model and serial
#                       nvme-<model>_<serial>_<nsid>              with OPTIONS="string_escape=replace")
#   SCSI/SATA   by-id   wwn-0x<hex> from a device/wwid "naa.<hex>" (the NAA designator scsi_id/ata_id report)
#   virtio-blk  by-path pci-<addr>, virtio-pci-<addr>            (path_id: nearest PCI device; legacy link)
#   NVMe        by-path pci-<addr>-nvme-<nsid>                   (path_id: "nvme-%s" with the namespace id)
# Other forms (ata-*, scsi-*, by-path of SATA/SAS ports, by-uuid) need udev's helpers or a file system: the
# hint then matches nothing and the deploy fails, listing the names it did derive for every disk.
SYS=${SYS:-/sys}

# Candidate disks: whole block devices that can hold an OS (no loop, ram, optical, floppy, dm, md).
disk_list() {
    for b in "$SYS"/block/*; do
        [ -e "$b" ] || continue
        n=${b##*/}
        case "$n" in loop*|ram*|sr*|fd*|dm-*|md*|zram*) continue ;; esac
        echo "$n"
    done
}

# A sysfs attribute as udev substitutes it: trailing whitespace stripped.
_attr() {
    [ -r "$1" ] || return 1
    sed -e 's/[[:space:]]*$//' "$1" | head -n 1
}

# udev's string_escape=replace: leading/trailing whitespace dropped, each run of whitespace one "_", then
# any character outside udev's allowed set replaced by "_".
_escape() {
    echo "$1" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e 's/[[:space:]][[:space:]]*/_/g' \
        -e 's/[^A-Za-z0-9#+.:=@_-]/_/g'
}

disk_serial() {
    _attr "$SYS/block/$1/serial" 2>/dev/null || _attr "$SYS/block/$1/device/serial" 2>/dev/null
}

# by-id names of disk $1, one a line.
disk_ids() {
    n=$1
    case "$n" in
        vd*)
            s=$(disk_serial "$n") && [ -n "$s" ] && echo "virtio-$(_escape "$s")" ;;
        nvme*)
            w=$(_attr "$SYS/block/$n/wwid") && [ -n "$w" ] && echo "nvme-$(_escape "$w")"
            m=$(_attr "$SYS/block/$n/device/model")
            s=$(_attr "$SYS/block/$n/device/serial")
            ns=$(_attr "$SYS/block/$n/nsid")
            if [ -n "$m" ] && [ -n "$s" ]; then
                echo "nvme-$(_escape "${m}_$s")"
                [ -n "$ns" ] && echo "nvme-$(_escape "${m}_${s}_$ns")"
            fi ;;
        *)
            w=$(_attr "$SYS/block/$n/device/wwid") || w=""
            case "$w" in naa.*) echo "wwn-0x$(echo "${w#naa.}" | tr 'A-F' 'a-f')" ;; esac ;;
    esac
    return 0
}

# by-path names of disk $1, one a line (virtio-blk and NVMe on PCI only).
disk_paths() {
    n=$1
    real=$(readlink -f "$SYS/block/$n") || return 0
    pci=""
    for c in $(echo "$real" | tr '/' ' '); do
        case "$c" in
            [0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7]) pci=$c ;;
        esac
    done
    [ -n "$pci" ] || return 0
    case "$real" in */virtual/*) return 0 ;; esac
    case "$n" in
        vd*) echo "pci-$pci"; echo "virtio-pci-$pci" ;;
        nvme*) ns=$(_attr "$SYS/block/$n/nsid") && [ -n "$ns" ] && echo "pci-$pci-nvme-$ns" ;;
    esac
    return 0
}

# The disk the hint names: its name on stdout; or the reason on stderr and status 1 (no disk, or several).
pick_disk() {
    hint=$1
    all=$(disk_list | tr '\n' ' ')
    pick=""
    case "$hint" in
        serial:*)
            want=${hint#serial:}
            for n in $all; do
                [ "$(disk_serial "$n" | tr -d ' ')" = "$want" ] && pick="$pick $n"
            done ;;
        size_gb:*)
            want=${hint#size_gb:}
            for n in $all; do
                sectors=$(cat "$SYS/block/$n/size")
                [ "$((sectors * 512 / 1000000000))" = "$want" ] && pick="$pick $n"
            done ;;
        path:/dev/disk/by-id/*|path:/dev/disk/by-path/*)
            want=${hint#path:/dev/disk/}
            kind=${want%%/*}
            want=${want#*/}
            for n in $all; do
                if [ "$kind" = by-id ]; then names=$(disk_ids "$n"); else names=$(disk_paths "$n"); fi
                for x in $names; do [ "$x" = "$want" ] && pick="$pick $n" && break; done
            done ;;
        path:/dev/disk/*)
            echo "root disk hint '$hint': only /dev/disk/by-id and /dev/disk/by-path name a disk before it is written" >&2
            return 1 ;;
        path:/dev/*)
            n=${hint#path:/dev/}
            case " $all " in *" $n "*) pick=" $n" ;; esac ;;
        "") pick=" $all" ;;
        *) echo "unknown root disk hint '$hint'" >&2; return 1 ;;
    esac
    set -- $pick
    if [ "$#" -ne 1 ]; then
        known=""
        for n in $all; do
            known="$known $n=[$(disk_serial "$n" || true);$( (disk_ids "$n"; disk_paths "$n") | tr '\n' ',' | sed 's/,$//')]"
        done
        echo "root disk hint '${hint:-none}' matches $# disks ($*); disks:${known:- none}" >&2
        return 1
    fi
    echo "$1"
}
