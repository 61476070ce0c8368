#!/usr/bin/env bash
# Make a local base image, since no registry is reachable here (tests and air-gapped demos).
#
#   scripts/make-base-image.sh NAME:TAG            Debian bookworm + python3, pip, venv (~190 MB)
#   scripts/make-base-image.sh --busybox NAME:TAG  static busybox only (~2 MB), for tests that
#                                                  need a shell but no Python
#
# The root filesystem is made once with debootstrap and cached as a tarball under
# ${LAUNCHER_CACHE_DIR:-~/.cache/launcher}; `docker import` then takes a second. Nothing is done
# when NAME:TAG already exists. The Debian python3 is "externally managed" (PEP 668): images
# built on it install into a venv.
set -euo pipefail

usage() { echo "usage: $0 [--busybox] NAME:TAG" >&2; exit 2; }

kind=python
if [[ "${1:-}" == "--busybox" ]]; then kind=busybox; shift; fi
[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || usage
image="$1"

cache_dir="${LAUNCHER_CACHE_DIR:-$HOME/.cache/launcher}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "make-base-image: $image already exists"
    exit 0
fi

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
    if ! "${apt[@]}" install --no-install-recommends "$@" >/dev/null; then
        "${apt[@]}" update >/dev/null
        "${apt[@]}" install --no-install-recommends "$@" >/dev/null
    fi
}

mkdir -p "$cache_dir"
work="$(mktemp -d "$cache_dir/.rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [[ "$kind" == busybox ]]; then
    tarball="$cache_dir/base-busybox.tar"
    if [[ ! -s "$tarball" ]]; then
        # Only a static busybox runs in an image with no libc.
        if [[ ! -x /bin/busybox ]] \
            || [[ "$(ldd /bin/busybox 2>&1 || true)" != *"not a dynamic executable"* ]]; then
            echo "make-base-image: installing busybox-static" >&2
            apt_install busybox-static
        fi
        mkdir -p "$work/root/bin" "$work/root/tmp" "$work/root/etc"
        cp /bin/busybox "$work/root/bin/busybox"
        # Applet links so `sh`, `ls`, `sleep` ... resolve on PATH inside the image.
        for applet in $(/bin/busybox --list); do
            [[ "$applet" == busybox ]] || ln -sf busybox "$work/root/bin/$applet"
        done
        chmod 1777 "$work/root/tmp"
        echo "root:x:0:0:root:/root:/bin/sh" >"$work/root/etc/passwd"
        echo "root:x:0:" >"$work/root/etc/group"
        tar -C "$work/root" -cf "$work/rootfs.tar" .
        mv "$work/rootfs.tar" "$tarball"
    fi
    changes=(--change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin')
else
    tarball="$cache_dir/base-$suite.tar"
    if [[ ! -s "$tarball" ]]; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
        echo "make-base-image: debootstrap $suite (about a minute, once; cached in $tarball)" >&2
        if ! debootstrap --variant=minbase \
            --include=python3,python3-pip,python3-venv,ca-certificates \
            "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1; then
            echo "make-base-image: debootstrap failed; last lines:" >&2
            tail -n 20 "$work/debootstrap.log" >&2
            exit 1
        fi
        # Smaller image: apt lists and caches are not needed at run time.
        rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
        tar --numeric-owner -C "$work/root" -cf "$work/rootfs.tar" .
        mv "$work/rootfs.tar" "$tarball"
    fi
    changes=(--change 'CMD ["/bin/bash"]'
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        --change 'ENV LANG=C.UTF-8')
fi

docker import "${changes[@]}" "$tarball" "$image" >/dev/null
echo "make-base-image: imported $image from $tarball" \
    "($(docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
