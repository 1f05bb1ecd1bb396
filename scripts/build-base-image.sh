#!/usr/bin/env bash
# Build the Corral base image: a Debian bookworm rootfs, as one uncompressed tarball.
#
# The tarball is used as the first OCI layer of every user environment (a plain rootfs tar
# is a valid OCI layer). Output: ${CORRAL_BASE_IMAGE:-/var/cache/corral/base/bookworm.tar},
# with a recipe hash next to it (<tar>.recipe). When the tar exists and the recipe hash
# matches, the script exits at once; otherwise it rebuilds from scratch.
#
# The recipe hash covers this script, the package list and the host's
# /usr/local/share/ca-certificates/*.crt (copied into the image so that pip inside the
# sandbox trusts this site's TLS egress CA).
#
# Needs root (debootstrap, chroot, and root-owned files in the tarball).
set -euo pipefail

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
SANDBOX_UID=1000
SANDBOX_GID=1000
SANDBOX_USER=user
HOST_CA_DIR=/usr/local/share/ca-certificates
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

OUT=${CORRAL_BASE_IMAGE:-/var/cache/corral/base/bookworm.tar}
RECIPE_FILE="$OUT.recipe"
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")

log() { printf 'build-base-image: %s\n' "$*"; }
die() { printf 'build-base-image: error: %s\n' "$*" >&2; exit 1; }

[[ $OUT == /* ]] || die "CORRAL_BASE_IMAGE must be an absolute path, got '$OUT'"

if [[ $(id -u) -ne 0 ]]; then
    die "must be run as root (debootstrap, chroot and root-owned files in the tarball need root); try: sudo $0"
fi

shopt -s nullglob
HOST_CERTS=("$HOST_CA_DIR"/*.crt)
shopt -u nullglob

recipe_hash() {
    {
        printf 'script\0'
        cat "$SCRIPT_PATH"
        printf '\0packages\0%s\0' "$PACKAGES"
        local f
        for f in "${HOST_CERTS[@]}"; do
            printf 'cert\0%s\0' "$(basename "$f")"
            cat "$f"
            printf '\0'
        done
    } | sha256sum | cut -d' ' -f1
}

up_to_date() {
    [[ -f $OUT && -f $RECIPE_FILE ]] && [[ $(<"$RECIPE_FILE") == "$RECIPE" ]]
}

RECIPE=$(recipe_hash)
if up_to_date; then
    log "base image up to date: $OUT"
    exit 0
fi

OUT_DIR=$(dirname "$OUT")
mkdir -p "$OUT_DIR"

# One build at a time per output path; a second runner waits, then finds it up to date.
exec 9>"$OUT.lock"
if ! flock -n 9; then
    log "another build of $OUT is running; waiting for it"
    flock 9
fi
if up_to_date; then
    log "base image up to date: $OUT"
    exit 0
fi

START=$SECONDS

# Build next to the output so the final mv is an atomic rename on one filesystem.
TMPDIR_BUILD=$(mktemp -d "$OUT_DIR/.build-base-image.XXXXXX")
ROOTFS="$TMPDIR_BUILD/rootfs"
TMP_TAR="$TMPDIR_BUILD/image.tar"

# Unmount everything mounted at or below $1, deepest first.
unmount_under() {
    local base=$1 target
    local -a targets=()
    # findmnt escapes odd characters (\x20 etc.); our paths are mktemp names, so plain.
    while IFS= read -r target; do
        if [[ $target == "$base" || $target == "$base"/* ]]; then
            targets+=("$target")
        fi
    done < <(findmnt -rn -o TARGET 2>/dev/null || true)
    ((${#targets[@]})) || return 0
    local t
    while IFS= read -r t; do
        umount "$t" 2>/dev/null || umount -l "$t" 2>/dev/null || {
            printf 'build-base-image: warning: could not unmount %s\n' "$t" >&2
            return 1
        }
    done < <(printf '%s\n' "${targets[@]}" | sort -r)
}

cleanup() {
    local rc=$?
    if [[ -n ${TMPDIR_BUILD:-} && -d $TMPDIR_BUILD ]]; then
        if unmount_under "$TMPDIR_BUILD"; then
            rm -rf --one-file-system "$TMPDIR_BUILD"
        else
            printf 'build-base-image: warning: leaving %s in place (mounts remain)\n' "$TMPDIR_BUILD" >&2
        fi
    fi
    if ((rc != 0)); then
        printf 'build-base-image: FAILED (exit %d)\n' "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_chroot() {
    chroot "$ROOTFS" /usr/bin/env -i PATH="$CHROOT_PATH" HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

log "building $OUT (recipe $RECIPE)"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y debootstrap || { apt-get update && apt-get install -y debootstrap; }
fi

# mktemp -d makes 0700 directories; the rootfs directory becomes the "./" entry of the
# tarball, i.e. the sandbox's /, so it must be 0755.
mkdir -m 0755 "$ROOTFS"

log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"
unmount_under "$ROOTFS"
log "debootstrap done after $((SECONDS - START))s"

log "creating user $SANDBOX_USER ($SANDBOX_UID:$SANDBOX_GID), home /home/$SANDBOX_USER"
in_chroot groupadd --gid "$SANDBOX_GID" "$SANDBOX_USER"
in_chroot useradd --uid "$SANDBOX_UID" --gid "$SANDBOX_GID" --home-dir "/home/$SANDBOX_USER" \
    --create-home --shell /bin/sh "$SANDBOX_USER"
chown "$SANDBOX_UID:$SANDBOX_GID" "$ROOTFS/home/$SANDBOX_USER"
chmod 0755 "$ROOTFS/home/$SANDBOX_USER"

log "removing EXTERNALLY-MANAGED markers"
shopt -s nullglob
for marker in "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED; do
    rm -f "$marker"
    log "  removed ${marker#"$ROOTFS"}"
done
shopt -u nullglob

if ((${#HOST_CERTS[@]})); then
    log "installing ${#HOST_CERTS[@]} host CA certificate(s): ${HOST_CERTS[*]##*/}"
    install -d -m 0755 "$ROOTFS$HOST_CA_DIR"
    for cert in "${HOST_CERTS[@]}"; do
        install -m 0644 -o root -g root "$cert" "$ROOTFS$HOST_CA_DIR/"
    done
else
    log "no host CA certificates in $HOST_CA_DIR"
fi
in_chroot update-ca-certificates
for cert in "${HOST_CERTS[@]}"; do
    name=$(basename "$cert" .crt)
    [[ -e $ROOTFS/etc/ssl/certs/$name.pem ]] \
        || die "update-ca-certificates did not link $name.pem into /etc/ssl/certs"
done

log "removing chattr"
rm -f "$ROOTFS/usr/bin/chattr" "$ROOTFS/bin/chattr" "$ROOTFS/usr/sbin/chattr" "$ROOTFS/sbin/chattr"
# Its man page too, so that no member of the tarball is named chattr at all.
find "$ROOTFS/usr/share/man" -xdev -name 'chattr.*' -delete

log "creating /opt/corral"
install -d -m 0755 -o root -g root "$ROOTFS/opt/corral"

log "writing /etc/hostname and /etc/hosts"
printf 'sandbox\n' >"$ROOTFS/etc/hostname"
cat >"$ROOTFS/etc/hosts" <<'EOF'
127.0.0.1	localhost sandbox
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
chmod 0644 "$ROOTFS/etc/hostname" "$ROOTFS/etc/hosts"

log "checking python3, venv, ensurepip and pip"
in_chroot python3 -c 'import venv, ensurepip' || die "python3 cannot import venv/ensurepip"
in_chroot python3 -m pip --version || die "python3 -m pip does not work (as root)"
chroot --userspec="$SANDBOX_UID:$SANDBOX_GID" "$ROOTFS" /usr/bin/env -i PATH="$CHROOT_PATH" \
    HOME="/home/$SANDBOX_USER" LANG=C.UTF-8 python3 -m pip --version \
    || die "python3 -m pip does not work as uid $SANDBOX_UID"

log "cleaning apt caches, logs, /tmp, /dev, /proc, /sys, /run"
in_chroot apt-get clean
unmount_under "$ROOTFS"
rm -rf "$ROOTFS"/var/lib/apt/lists/*
rm -f "$ROOTFS"/var/cache/apt/*.bin
find "$ROOTFS/var/log" -xdev -type f -delete
for d in tmp var/tmp dev proc sys run; do
    mkdir -p "$ROOTFS/$d"
    find "$ROOTFS/$d" -xdev -mindepth 1 -delete
done
[[ -z $(find "$ROOTFS" -xdev -name 'chattr*' -print -quit) ]] || die "a chattr is still in the rootfs"

log "writing tarball"
tar --sort=name --numeric-owner --xattrs --xattrs-include='*' --acls \
    -C "$ROOTFS" -cf "$TMP_TAR" .
mv -f "$TMP_TAR" "$OUT"
printf '%s\n' "$RECIPE" >"$RECIPE_FILE.tmp"
mv -f "$RECIPE_FILE.tmp" "$RECIPE_FILE"

size=$(stat -c %s "$OUT")
sha=$(sha256sum "$OUT" | cut -d' ' -f1)
log "done in $((SECONDS - START))s: $OUT"
log "  size:   $size bytes ($(numfmt --to=iec-i --suffix=B "$size"))"
log "  sha256: $sha"
