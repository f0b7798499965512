#!/usr/bin/env bash
# Build a local Debian bookworm base image with python3 + venv, for hosts that cannot pull
# from Docker Hub. The Dockerfile uses it with `--build-arg BASE_IMAGE=gpumesh-base:bookworm`.
#
#   scripts/build-base-image.sh            # build once; skip if the image exists
#   scripts/build-base-image.sh --force    # rebuild
#
# Needs root, debootstrap and a reachable Debian mirror (DEBIAN_MIRROR, default deb.debian.org).
# Takes about 45 s. The image name can be changed with GPUMESH_LOCAL_BASE.
set -euo pipefail

image="${GPUMESH_LOCAL_BASE:-gpumesh-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite="${DEBIAN_SUITE:-bookworm}"

if [[ "${1:-}" != "--force" ]] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists; skipping (pass --force to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 2; }
[[ "$(id -u)" == 0 ]] || { echo "debootstrap needs root" >&2; exit 2; }

root="$(mktemp -d /tmp/gpumesh-base.XXXXXX)"
cleanup() {
    # debootstrap unmounts what it mounted; make sure before deleting the tree
    for m in proc sys dev/pts dev; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m" || true
    done
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$root" "$mirror"

# What an image does not need: package caches and lists, docs, man pages, locales.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/log/*.log
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +

tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' \
    --message "debootstrap --variant=minbase $suite + python3, python3-venv, ca-certificates" \
    - "$image"
echo "built $image"
