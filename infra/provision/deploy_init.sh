#!/bin/sh
# gpufleet deploy ramdisk (/init, busybox sh): write the node's OS image to its root disk, check the written
# bytes, install the bootloader for the node's boot mode, inject the node's first-boot data, tell the
# provisioning service, reboot. Everything it needs arrives on the kernel command line (rendered by
# infra/provision/render.py):
#   BOOTIF=01-<mac>  ip=<addr>::<gw>:<mask>:<host>::off  gpufleet.node=  gpufleet.boot_mode=bios|uefi
#   gpufleet.image_url=  gpufleet.image_sha256=  gpufleet.image_size=
#   gpufleet.root_disk=serial:|size_gb:|path:/dev/<name>|path:/dev/disk/by-id/…|path:/dev/disk/by-path/…
#   gpufleet.firstboot_url=  gpufleet.done_url=
# Any failure stops here (no reboot) and, once the network is up, is POSTed to the done URL as
# `status=failed&reason=…` (the service logs it and keeps the node's install script). The disk may be
# half-written; the next power cycle starts the whole deploy again from the top. Nothing is partly skipped.
export PATH=/bin:/sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
. /lib/gpufleet/disk.sh
. /lib/gpufleet/efi.sh

log() { echo "gpufleet-deploy: $*"; }
# Tell the service (once the network is up): a form body of safe characters only, the reason cut to 400.
report_failed() {
    [ -n "$DONE_URL" ] && [ -n "$NET_UP" ] || return 0
    reason=$(printf '%s' "$1" | tr -c 'A-Za-z0-9._:/-' '+' | cut -c1-400)
    wget -q -T 10 -O /dev/null --post-data "status=failed&reason=$reason" "$DONE_URL" \
        && log "failure reported to $DONE_URL"
}
fail() {
    log "FAILED: $*"
    report_failed "$*"
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
NET_UP=1
log "network: $iface $addr/$mask"
[ -n "$IMAGE_URL" ] && [ -n "$IMAGE_SHA256" ] && [ -n "$IMAGE_SIZE" ] || fail "no image URL/sha256/size on the command line"
case "$BOOT_MODE" in bios|uefi) ;; *) fail "boot mode '$BOOT_MODE' is neither bios nor uefi" ;; esac

# The root disk, by the stack's hint (lib/gpufleet/disk.sh: by-id/by-path names derived from sysfs, no udev
# here). A hint that matches no disk or several stops the deploy before anything is written.
name=$(pick_disk "$ROOT_DISK" 2>/tmp/pick.err) || fail "$(cat /tmp/pick.err)"
disk=/dev/$name
case "$name" in *[0-9]) p=${disk}p ;; *) p=$disk ;; esac
part=${p}1
esp=${p}2
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

# The image's GPT (root = partition 1, last on the disk; ESP = 2; BIOS boot = 3) ends where the image ends:
# move its backup header to the end of the disk, grow the root partition to the end, then the file system
# (online), all with the image's own tools.
blockdev --rereadpt "$disk" || fail "re-reading the partition table of $disk"
mount -t ext4 "$part" /mnt || fail "mounting $part"
for fs in dev proc sys; do mount --bind "/$fs" "/mnt/$fs"; done
chroot /mnt sfdisk --quiet --no-reread --no-tell-kernel --relocate gpt-bak-std "$disk" >/dev/null 2>&1 \
    || log "backup GPT not moved"
echo ', +' | chroot /mnt sfdisk --quiet --no-reread --no-tell-kernel -N 1 "$disk" >/dev/null 2>&1 || log "partition not grown"
chroot /mnt partx -u -n 1 "$disk" && chroot /mnt resize2fs "$part" >/dev/null 2>&1 || log "file system not grown"

# The EFI system partition: formatted on every install (a fixed volume id; fstab names it by GPT GUID).
chroot /mnt mkfs.vfat -F 32 -n EFI -i 67706631 "$esp" >/dev/null || fail "formatting the EFI system partition $esp"
mount -t vfat "$esp" /mnt/boot/efi || fail "mounting the EFI system partition $esp"
if [ "$BOOT_MODE" = uefi ]; then
    # Debian's signed chain when shim-signed and grub-efi-amd64-signed are in the image: shim (Microsoft UEFI
    # CA) → grub (Debian key) → the Debian-signed kernel, so Secure Boot can stay on. Installed to
    # \EFI\debian (with a `debian` NVRAM boot entry, first in BootOrder) and to the removable-media path
    # \EFI\BOOT\BOOTX64.EFI (--force-extra-removable) for firmware that forgets, reorders or ignores NVRAM
    # entries (docs/bare-metal.md, firmware quirks).
    sb=--uefi-secure-boot
    [ -f /mnt/usr/lib/shim/shimx64.efi.signed ] || sb=--no-uefi-secure-boot  # an image built without shim
    grub_efi() {
        chroot /mnt grub-install --target=x86_64-efi --efi-directory=/boot/efi --bootloader-id=debian \
            "$sb" --force-extra-removable "$@"
    }
    if why=$(efivars_up); then
        nvram=yes
    else
        # A booting node matters more than a named entry: without EFI variables (a UEFI node PXE-booted in
        # legacy mode, EFI runtime services off) the install goes on through the removable-media path, and
        # this line (serial console) says why there is no entry.
        nvram=""
        log "NVRAM: no boot entry written: $why; the node boots through \\EFI\\BOOT\\BOOTX64.EFI only"
    fi
    entry=no
    if [ -n "$nvram" ]; then
        mount --bind "$EFIVARS" /mnt/sys/firmware/efi/efivars || fail "bind-mounting $EFIVARS into the image"
        # Debian's grub-install writes the entry itself (libefivar, no efibootmgr): it reuses the first entry
        # labelled `debian` for this ESP, deletes further ones (a rebuild leaves exactly one) and puts it first
        # in BootOrder; BootNext (a BMC's one-time override) is not touched and still wins for one boot.
        if grub_efi; then
            if entry=$(nvram_entry debian); then
                log "NVRAM: $entry"
            else
                log "NVRAM: grub-install wrote no entry ($entry); installing again without it"
                entry=no
            fi
        else
            # A full or write-protected variable store must not strand the node: the fallback path boots.
            log "NVRAM: grub-install could not write the boot entry; installing again without it (--no-nvram)"
        fi
    fi
    if [ "$entry" = no ]; then
        grub_efi --no-nvram || fail "grub-install (UEFI) into $esp"
    fi
    [ -f /mnt/boot/efi/EFI/BOOT/BOOTX64.EFI ] || fail "no \\EFI\\BOOT\\BOOTX64.EFI after grub-install"
    signed=no
    [ -f /mnt/boot/efi/EFI/BOOT/grubx64.efi ] && signed="yes (shim + signed grub)"
else
    # BIOS: GRUB's boot code into the protective MBR, its core image into the BIOS boot partition.
    chroot /mnt grub-install --target=i386-pc "$disk" || fail "grub-install (BIOS) on $disk"
fi
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
if [ "$BOOT_MODE" = uefi ]; then
    log "bootloader installed (UEFI, \\EFI\\BOOT\\BOOTX64.EFI, NVRAM entry: ${entry%%,*}, Secure Boot chain: $signed; root UUID $uuid)"
else
    log "bootloader installed (BIOS, root UUID $uuid)"
fi

# First-boot data: hostname, network, admin keys, the node's own SSH host key.
if [ -n "$FIRSTBOOT_URL" ]; then
    wget -q -O /tmp/firstboot.tar.gz "$FIRSTBOOT_URL" || fail "fetching first-boot data $FIRSTBOOT_URL"
    tar -xzf /tmp/firstboot.tar.gz -C /mnt || fail "unpacking first-boot data"
    rm -f /tmp/firstboot.tar.gz
    log "first-boot data written"
fi
umount /mnt/boot/efi || fail "unmounting $esp"
if [ -n "$nvram" ]; then umount /mnt/sys/firmware/efi/efivars; fi
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
