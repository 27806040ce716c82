#!/bin/sh
# gpufleet deploy ramdisk (/init, busybox sh): write the node's OS image to its root disk, check the written
# bytes, install the bootloader, inject the node's first-boot data, tell the provisioning service, reboot.
# Everything it needs arrives on the kernel command line (rendered by infra/provision/render.py):
#   BOOTIF=01-<mac>  ip=<addr>::<gw>:<mask>:<host>::off  gpufleet.node=  gpufleet.boot_mode=bios|uefi
#   gpufleet.image_url=  gpufleet.image_sha256=  gpufleet.image_size=  gpufleet.root_disk=serial:|size_gb:|path:
#   gpufleet.firstboot_url=  gpufleet.done_url=
# Any failure stops here (no reboot): the disk may be half-written, the service still says "install", so
# the next power cycle starts the whole deploy again from the top. Nothing is ever partly skipped.
export PATH=/bin:/sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

log() { echo "gpufleet-deploy: $*"; }
fail() {
    log "FAILED: $*"
    log "the node stays in the deploy ramdisk; power-cycle it to run the whole deploy again"
    while :; do sleep 3600; done
}

for arg in $(cat /proc/cmdline); do
    case "$arg" in
        BOOTIF=*) BOOTIF="${arg#BOOTIF=}" ;;
        ip=*) IPCONF="${arg#ip=}" ;;
        gpufleet.node=*) NODE="${arg#*=}" ;;
        gpufleet.boot_mode=*) BOOT_MODE="${arg#*=}" ;;
        gpufleet.image_url=*) IMAGE_URL="${arg#*=}" ;;
        gpufleet.image_sha256=*) IMAGE_SHA256="${arg#*=}" ;;
        gpufleet.image_size=*) IMAGE_SIZE="${arg#*=}" ;;
        gpufleet.root_disk=*) ROOT_DISK="${arg#*=}" ;;
        gpufleet.firstboot_url=*) FIRSTBOOT_URL="${arg#*=}" ;;
        gpufleet.done_url=*) DONE_URL="${arg#*=}" ;;
    esac
done
log "node ${NODE:-?}: deploy starts"
[ -n "$IMAGE_URL" ] && [ -n "$IMAGE_SHA256" ] && [ -n "$IMAGE_SIZE" ] || fail "no image URL/sha256/size on the command line"
[ "$BOOT_MODE" = bios ] || fail "boot mode '$BOOT_MODE': this ramdisk installs the BIOS bootloader only (UEFI not built yet)"

kver=$(ls /lib/modules)
while read -r m; do insmod "/lib/modules/$kver/$m" 2>/dev/null; done <"/lib/modules/$kver/gpufleet.order"
sleep 1

# The network: the interface whose MAC is BOOTIF's, the address from ip=.
mac=$(echo "${BOOTIF#01-}" | tr '-' ':' | tr 'A-F' 'a-f')
iface=""
for d in /sys/class/net/*; do
    [ "$(cat "$d/address")" = "$mac" ] && iface=${d##*/}
done
[ -n "$iface" ] || fail "no network interface with MAC $mac"
addr=$(echo "$IPCONF" | cut -d: -f1)
gw=$(echo "$IPCONF" | cut -d: -f3)
mask=$(echo "$IPCONF" | cut -d: -f4)
ip link set lo up
ip link set "$iface" up
ifconfig "$iface" "$addr" netmask "$mask" up || fail "cannot set $addr on $iface"
[ -n "$gw" ] && ip route add default via "$gw"
log "network: $iface $addr/$mask"

# The root disk, by the stack's hint. Without udev there is no /dev/disk/by-*: serials and sizes are read
# from sysfs; a path hint must be /dev/<name>.
disks=""
for b in /sys/block/*; do
    n=${b##*/}
    case "$n" in loop*|ram*|sr*|fd*|dm-*|md*) continue ;; esac
    disks="$disks $n"
done
pick=""
case "$ROOT_DISK" in
    serial:*)
        want=${ROOT_DISK#serial:}
        for n in $disks; do
            s=$(cat "/sys/block/$n/serial" 2>/dev/null || cat "/sys/block/$n/device/serial" 2>/dev/null)
            s=$(echo "$s" | tr -d ' ')
            [ "$s" = "$want" ] && pick="$pick $n"
        done ;;
    size_gb:*)
        want=${ROOT_DISK#size_gb:}
        for n in $disks; do
            sectors=$(cat "/sys/block/$n/size")
            [ "$((sectors * 512 / 1000000000))" = "$want" ] && pick="$pick $n"
        done ;;
    path:/dev/disk/*) fail "root disk path $ROOT_DISK: the deploy ramdisk has no udev links; use serial or size_gb" ;;
    path:/dev/*) n=${ROOT_DISK#path:/dev/}; [ -e "/sys/block/$n" ] && pick=" $n" ;;
    "") pick="$disks" ;;
    *) fail "unknown root disk hint $ROOT_DISK" ;;
esac
set -- $pick
[ "$#" -eq 1 ] || fail "root disk hint '${ROOT_DISK:-none}' matches $# disks (${pick:-none}; disks:$disks)"
disk=/dev/$1
case "$1" in *[0-9]) part=${disk}p1 ;; *) part=${disk}1 ;; esac
log "root disk: $disk (hint ${ROOT_DISK:-none})"

# Write, then read back exactly the image's bytes from the disk and compare with the locked sha256.
log "writing $IMAGE_URL ($IMAGE_SIZE bytes) to $disk"
wget -q -O - "$IMAGE_URL" | dd of="$disk" bs=1M conv=fsync 2>/dev/null || fail "download or write of $IMAGE_URL"
sync
echo 3 >/proc/sys/vm/drop_caches
mib=$((IMAGE_SIZE / 1048576))
[ "$((mib * 1048576))" = "$IMAGE_SIZE" ] || fail "image size $IMAGE_SIZE is not whole MiB"
got=$(dd if="$disk" bs=1M count="$mib" 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$got" = "$IMAGE_SHA256" ] || fail "written bytes have sha256 $got, the lock says $IMAGE_SHA256"
log "written bytes verified: sha256 $got"

# Grow the root partition to the whole disk, then the file system (online), with the image's own tools.
blockdev --rereadpt "$disk" || fail "re-reading the partition table of $disk"
mount -t ext4 "$part" /mnt || fail "mounting $part"
for fs in dev proc sys; do mount --bind "/$fs" "/mnt/$fs"; done
echo ', +' | chroot /mnt sfdisk --quiet --no-reread --no-tell-kernel -N 1 "$disk" >/dev/null 2>&1 || log "partition not grown"
chroot /mnt partx -u -n 1 "$disk" && chroot /mnt resize2fs "$part" >/dev/null 2>&1 || log "file system not grown"

# Bootloader (BIOS): GRUB's boot code into the MBR and its core image into the gap before the partition.
chroot /mnt grub-install --target=i386-pc "$disk" || fail "grub-install on $disk"
uuid=$(sed -n 's/^UUID=\([^ ]*\) \/ .*/\1/p' /mnt/etc/fstab)
[ -n "$uuid" ] || fail "no root UUID in the image's /etc/fstab"
cat >/mnt/boot/grub/grub.cfg <<EOF
# gpufleet: written by the deploy ramdisk.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set default=0
set timeout=1
search --no-floppy --fs-uuid --set=root $uuid
menuentry "gpufleet $NODE" {
    linux /vmlinuz root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8
    initrd /initrd.img
}
EOF
log "bootloader installed (BIOS, root UUID $uuid)"

# First-boot data: hostname, network, admin keys, the node's own SSH host key.
if [ -n "$FIRSTBOOT_URL" ]; then
    wget -q -O /tmp/firstboot.tar.gz "$FIRSTBOOT_URL" || fail "fetching first-boot data $FIRSTBOOT_URL"
    tar -xzf /tmp/firstboot.tar.gz -C /mnt || fail "unpacking first-boot data"
    rm -f /tmp/firstboot.tar.gz
    log "first-boot data written"
fi
for fs in sys proc dev; do umount "/mnt/$fs"; done
umount /mnt || fail "unmounting $part"
sync

# Done: the service switches this node's iPXE script to "boot from disk" before we reboot.
if [ -n "$DONE_URL" ]; then
    wget -q -O - --post-data "sha256=$got" "$DONE_URL" >/dev/null || fail "telling the provisioning service ($DONE_URL)"
fi
log "deploy of ${NODE:-?} done; rebooting"
sleep 1
reboot -f
