#!/bin/sh
# Make sure a Docker daemon and Docker Compose v2 answer, for `make test-docker`.
#
# * A daemon that already answers `docker info` is used as it is.
# * Otherwise, when `dockerd` is installed (Debian: apt-get install -y docker.io) and we
#   are root, it is started in the background (data under $EGM_DOCKER_DATA_ROOT, log in
#   $EGM_DOCKER_LOG) and waited for, at most $EGM_DOCKER_WAIT_S seconds.
# * Anything else ends with one line on stderr saying what is missing, and exit status 1.
#
# Compose v2 must be installed as a CLI plugin (`docker compose version` 2.24.4 or newer).
# docs/deployment.md ("Testing the stack") says how to get it on Debian bookworm.
set -eu

data_root="${EGM_DOCKER_DATA_ROOT:-/var/lib/docker-egm}"
log="${EGM_DOCKER_LOG:-/tmp/egm-dockerd.log}"
wait_s="${EGM_DOCKER_WAIT_S:-60}"
driver="${EGM_DOCKER_STORAGE_DRIVER:-vfs}"

fail() { echo "ensure-docker: $*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || fail "no docker client on PATH (Debian: apt-get install -y docker.io)"

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null 2>&1 \
        || fail "no Docker daemon answers and dockerd is not installed (Debian: apt-get install -y docker.io)"
    [ "$(id -u)" = 0 ] || fail "no Docker daemon answers and starting dockerd needs root; start it yourself"
    echo "ensure-docker: starting dockerd (storage $driver, data $data_root, log $log)" >&2
    nohup dockerd --data-root "$data_root" --storage-driver "$driver" >"$log" 2>&1 &
    waited=0
    until docker info >/dev/null 2>&1; do
        [ "$waited" -lt "$wait_s" ] \
            || fail "dockerd did not answer within ${wait_s}s; last log line: $(tail -n 1 "$log" 2>/dev/null)"
        sleep 1
        waited=$((waited + 1))
    done
fi

version="$(docker compose version --short 2>/dev/null)" \
    || fail "Docker Compose v2 is missing (docker compose version fails); see docs/deployment.md, Testing the stack"
version="${version#v}"
# 2.24.4 is the first release whose !reset / !override docker/compose.no-gpu.yml relies on.
oldest="$(printf '%s\n%s\n' "$version" 2.24.4 | sort -V | head -n 1)"
[ "$oldest" = 2.24.4 ] || fail "Docker Compose $version is too old: 2.24.4 or newer is needed"
echo "ensure-docker: docker $(docker version --format '{{.Server.Version}}'), compose $version" >&2
