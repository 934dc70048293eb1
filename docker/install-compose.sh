#!/bin/sh
# Install Docker Compose v2 as a Docker CLI plugin on Debian bookworm, which does not
# package it: Debian trixie's `docker-compose` package (2.26) is a static Go binary, so its
# .deb is fetched with a throwaway apt state (the system's sources are left alone), unpacked,
# and the plugin copied to /usr/local/lib/docker/cli-plugins/. Needs root and a Debian mirror.
set -eu
mirror="${EGM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
dest="${EGM_COMPOSE_PLUGIN_DIR:-/usr/local/lib/docker/cli-plugins}"
if docker compose version >/dev/null 2>&1; then
    docker compose version
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb $mirror trixie main" >"$work/sources.list"
opts="-oDir::Etc::SourceList=$work/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$work/lists -oDir::Cache::Archives=$work/archives -oAPT::Get::List-Cleanup=0"
# shellcheck disable=SC2086
apt-get $opts update -q >"$work/update.log" 2>&1 || { echo "install-compose: apt-get update for trixie failed: $(tail -n 1 "$work/update.log")" >&2; exit 1; }
# shellcheck disable=SC2086
(cd "$work" && apt-get $opts download docker-compose >"$work/download.log" 2>&1) \
    || { echo "install-compose: apt-get download docker-compose failed: $(tail -n 1 "$work/download.log")" >&2; exit 1; }
dpkg -x "$work"/docker-compose_*.deb "$work/root"
mkdir -p "$dest"
install -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-compose" "$dest/docker-compose"
docker compose version
