#!/usr/bin/env bash
# Builds the images docker-compose.yml needs, with no container registry: a Debian
# root filesystem made by debootstrap from the machine's own Debian mirror (the one apt
# already uses) and brought in with `docker import`, then our images on top of it.
#
#   docker/build-images.sh            # base image (if missing) + postgres + twopc images
#   docker/build-images.sh --rebuild  # also rebuild the base image
#
# Afterwards `docker-compose` uses them when these are set (the script prints them, and
# writes them to .env at the top of the project, which docker-compose reads):
#   TWOPC_POSTGRES_IMAGE=twopc/postgres:15  TWOPC_BASE_IMAGE=twopc/debian:bookworm
#
# Needs root (debootstrap), debootstrap, docker, and release binaries:
#   cargo build --release -p twopc-coordinator -p twopc-participant -p twopc-testkit
set -euo pipefail
cd "$(dirname "$0")/.."

base=twopc/debian:bookworm
rebuild=0
[ "${1:-}" = "--rebuild" ] && rebuild=1

mirror() {
  if [ -n "${TWOPC_DEBIAN_MIRROR:-}" ]; then echo "$TWOPC_DEBIAN_MIRROR"; return; fi
  # deb822 sources first, then the one-line format; the first non-security URI wins.
  local m=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    m=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources | grep -v security | head -n1 || true)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" {print $2}' /etc/apt/sources.list | grep -v security | head -n1 || true)
  fi
  [ -n "$m" ] || { echo "no Debian mirror found in apt's sources; set TWOPC_DEBIAN_MIRROR" >&2; exit 1; }
  echo "$m"
}

if [ "$rebuild" = 1 ] || ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update && apt-get install -y debootstrap; }
  root=$(mktemp -d /var/tmp/twopc-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "== debootstrap bookworm into $root"
  debootstrap --variant=minbase \
    --include=postgresql-15,iproute2,procps,ca-certificates,netbase \
    bookworm "$root" "$(mirror)"
  # Keep the image small and free of this machine's apt state.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # Debian's package creates a cluster under /var/lib/postgresql/15/main; the image's
  # entrypoint makes its own in $PGDATA.
  rm -rf "$root"/var/lib/postgresql/15 "$root"/etc/postgresql/15
  echo "== docker import $base"
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    - "$base"
fi

echo "== twopc/postgres:15"
docker build -q -t twopc/postgres:15 --build-arg BASE_IMAGE="$base" -f docker/postgres.Dockerfile docker

for b in twopc-coordinator twopc-participant twopc-coordinator-fp twopc-participant-fp twopc-latency-proxy; do
  [ -x "target/release/$b" ] || {
    echo "target/release/$b missing: cargo build --release -p twopc-coordinator -p twopc-participant -p twopc-testkit" >&2
    exit 1
  }
done
echo "== twopc/twopc:latest"
docker build -q -t twopc/twopc:latest --build-arg BASE_IMAGE="$base" -f docker/Dockerfile .

cat > .env <<ENV
TWOPC_POSTGRES_IMAGE=twopc/postgres:15
TWOPC_BASE_IMAGE=$base
ENV
echo "images built; .env points docker-compose at them"
