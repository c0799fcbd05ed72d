#!/usr/bin/env bash
# Installs every system dependency thaw needs, and nothing that is already there.
# Idempotent: a second run on a ready machine does no network I/O and takes well under a second.
#
#   scripts/install-deps.sh            container tier + tests (runc, CRIU 4.x, debootstrap, busybox, qemu)
#
# CRIU: Debian bookworm ships 3.17, whose vDSO check fails on current kernels, and trixie's 4.x
# binary needs glibc 2.38. So we build CRIU 4.1.1 from the upstream tarball Debian's archive
# serves (about 20 s on 2 cores) and install it as /usr/local/sbin/criu.
# It is built with RUNDIR=/dev/shm: CRIU caches its kernel-feature probes (about 20 ms per
# restore) only on a tmpfs, and /run is not one on every host; /dev/shm always is, and is
# emptied by a reboot just like /run.
set -euo pipefail

CRIU_VERSION=4.1.1
PREFIX=/usr/local
CACHE=${THAW_DEPS_CACHE:-/var/cache/thaw-deps}

log() { printf '[install-deps] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (apt-get, /usr/local). Re-run: sudo $0"
    exit 1
  fi
}

APT_PACKAGES=(
  runc            # OCI runtime of the container tier
  iptables        # CRIU's network lock (thaw skips it for sandboxes; kept for other CRIU use)
  busybox-static  # the `shell` template's base and the microvm initramfs
  debootstrap     # the `python` template's Debian base
  e2fsprogs       # mkfs.ext4 -d for microvm rootfs images
  cpio            # initramfs archives
  zstd
  qemu-system-x86 # boots the microvm guest image under TCG in CI
  qemu-utils      # qemu-img: qcow2 overlays for microvm clone disks, flattened at checkpoints
  iproute2
  procps
  ca-certificates
  xz-utils
  python3         # the Python client's tests (make test-python)
  iptables        # the egress gateway's redirect in each sandbox's network namespace
  iproute2        # its route there
  python3-venv
)

CRIU_BUILD_DEPS=(
  gcc make patch pkg-config protobuf-c-compiler libprotobuf-c-dev libprotobuf-dev protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libcap-dev libgnutls28-dev libbsd-dev libaio-dev
  python3-yaml uuid-dev libdrm-dev
)

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

apt_updated=0
apt_install() {
  local missing
  missing=$(missing_pkgs "$@")
  [ -z "$missing" ] && return 0
  if [ $apt_updated = 0 ]; then
    log "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install $(echo $missing | tr '\n' ' ')"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

criu_ok() {
  command -v criu >/dev/null 2>&1 || return 1
  local v
  v=$(criu --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\)\..*/\1/p')
  [ -n "$v" ] && [ "$v" -ge 4 ]
}

# How our CRIU is built: version, options and patches. A change to any of them rebuilds it.
CRIU_PATCHES="$(cd "$(dirname "$0")" && pwd)/criu-patches"
CRIU_STAMP="$PREFIX/share/thaw/criu-build"
criu_recipe() {
  { echo "$CRIU_VERSION RUNDIR=/dev/shm"; cat "$CRIU_PATCHES"/*.patch 2>/dev/null; } | sha256sum | cut -d' ' -f1
}

# Our build of CRIU is current when its stamp matches the recipe. A CRIU 4 installed by
# someone else (not at $PREFIX/sbin) is left alone: it works, without our fixes.
criu_ours_current() {
  [ -x "$PREFIX/sbin/criu" ] && [ "$(cat "$CRIU_STAMP" 2>/dev/null)" = "$(criu_recipe)" ]
}

install_criu() {
  if criu_ok && { criu_ours_current || [ "$(command -v criu)" != "$PREFIX/sbin/criu" ]; }; then
    return 0
  fi
  apt_install "${CRIU_BUILD_DEPS[@]}" dpkg-dev
  mkdir -p "$CACHE"
  local tarball="$CACHE/criu_${CRIU_VERSION}.orig.tar.xz"
  if [ ! -s "$tarball" ]; then
    # The tarball comes from Debian's source archive (trixie suite); its .dsc may 404 here, so
    # we check for the tarball rather than trusting apt-get's exit code.
    local srcdir
    srcdir=$(mktemp -d)
    cat >/etc/apt/sources.list.d/thaw-trixie-src.list <<SRC
deb-src http://deb.debian.org/debian trixie main
SRC
    apt-get update -qq
    apt_updated=1
    (cd "$srcdir" && apt-get source --download-only -qq criu >/dev/null 2>&1 || true)
    local got
    got=$(ls "$srcdir"/criu_${CRIU_VERSION}.orig.tar.* 2>/dev/null | head -n1 || true)
    if [ -z "$got" ]; then
      got=$(ls "$srcdir"/criu_*.orig.tar.* 2>/dev/null | head -n1 || true)
    fi
    if [ -z "$got" ]; then
      log "could not fetch the CRIU ${CRIU_VERSION} source tarball from Debian's source archive."
      log "fix: install CRIU >= 4.0 by hand (criu.org) and put it on PATH, then re-run."
      exit 1
    fi
    cp "$got" "$tarball"
    rm -rf "$srcdir"
  fi
  local build
  build=$(mktemp -d)
  log "building CRIU from $(basename "$tarball")"
  tar -C "$build" -xf "$tarball"
  local dir
  dir=$(find "$build" -maxdepth 1 -mindepth 1 -type d | head -n1)
  local p
  for p in "$CRIU_PATCHES"/*.patch; do
    [ -e "$p" ] || continue
    patch -d "$dir" -p1 --quiet <"$p" || { log "patch $(basename "$p") does not apply"; exit 1; }
  done
  make -C "$dir" -j"$(nproc)" RUNDIR=/dev/shm criu >"$build/build.log" 2>&1 || {
    tail -n 30 "$build/build.log" >&2
    log "CRIU build failed (log above)"
    exit 1
  }
  install -m 0755 "$dir/criu/criu" "$PREFIX/sbin/criu"
  mkdir -p "$(dirname "$CRIU_STAMP")"
  criu_recipe >"$CRIU_STAMP"
  rm -rf "$build"
  criu_ok || { log "installed criu does not report version >= 4"; exit 1; }
  log "criu $(criu --version | head -n1) installed at $PREFIX/sbin/criu"
}

# Every sandbox of a template runs as that template's host uid, and the kernel caps the pipe
# buffers one uid holds (fs.pipe-user-pages-soft: 16384 pages, 64 MiB, by default). Past about
# 250 live python sessions of one template, CRIU could not restore a pipe's size (EPERM, "Can't
# restore pipe size") and every further restore failed (measured by `thaw bench rollouts`).
# Each sandbox's memory cgroup bounds what its pipes hold instead; 0 lifts the per-uid cap
# (until the next boot; this script runs before every build and test).
raise_pipe_cap() {
  local cur
  cur=$(cat /proc/sys/fs/pipe-user-pages-soft 2>/dev/null || echo unknown)
  if [ "$cur" != 0 ]; then
    if sysctl -qw fs.pipe-user-pages-soft=0; then
      log "fs.pipe-user-pages-soft: $cur -> 0 (no per-uid cap on pipe buffers; see the comment)"
    else
      log "warning: cannot set fs.pipe-user-pages-soft (it is $cur): about 250 live sessions per template at most"
    fi
  fi
}

main() {
  need_root
  apt_install "${APT_PACKAGES[@]}"
  install_criu
  raise_pipe_cap
}

main "$@"
