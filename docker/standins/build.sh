#!/bin/sh
# Make the three base images the stack names available to Docker, without a registry if need be:
#
#   python:3.12.12-slim-bookworm    heartexlabs/label-studio:1.23.2    redis:7.4.6-alpine
#
# For each: already present -> kept (a stand-in built earlier is reused, nothing is rebuilt);
# else pulled when a registry answers; else a stand-in is built from local/debian:bookworm,
# itself made with debootstrap from a Debian mirror (EGM_DEBIAN_MIRROR). The stand-ins trust
# this machine's CA bundle (pip inside builds goes through the same TLS path as the host):
# it is copied into this folder for the build and removed afterwards, never committed.
# EGM_STANDINS_FORCE=1 builds stand-ins even where a pull would work.
# EGM_STANDINS_VLLM=1 also builds egm-standin/vllm-openai:v0.24.0, a build-only base for the GPU
# worker image (empty torch/vllm packages: it proves docker/Dockerfile.worker builds, nothing more;
# see Dockerfile.vllm-openai). It never takes the official vllm/vllm-openai name.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
mirror="${EGM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca_bundle="${EGM_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
pull_timeout="${EGM_PULL_TIMEOUT_S:-60}"
PYTHON_IMAGE=python:3.12.12-slim-bookworm
REDIS_IMAGE=redis:7.4.6-alpine
LS_IMAGE=heartexlabs/label-studio:1.23.2
BASE_IMAGE=local/debian:bookworm
VLLM_STANDIN=egm-standin/vllm-openai:v0.24.0

say() { echo "standins: $*" >&2; }
fail() { echo "standins: $*" >&2; exit 1; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

pull() {
    [ "${EGM_STANDINS_FORCE:-0}" = 1 ] && return 1
    timeout "$pull_timeout" docker pull -q "$1" >/dev/null 2>&1
}

base() {
    have "$BASE_IMAGE" && return 0
    command -v debootstrap >/dev/null 2>&1 || fail "debootstrap is needed to build $BASE_IMAGE (apt-get install -y debootstrap)"
    root="$(mktemp -d /var/tmp/egm-debootstrap.XXXXXX)"
    say "debootstrap bookworm from $mirror into $root"
    if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1; then
        rm -rf "$root"
        fail "debootstrap failed: $(tail -n 1 "$root.log")"
    fi
    # mktemp made the folder 0700; as the image's / it would lock every non-root user out.
    chmod 755 "$root"
    tar -C "$root" -c . | docker import - "$BASE_IMAGE" >/dev/null
    rm -rf "$root" "$root.log"
}

standin() {  # standin <image> <Dockerfile> [docker build args...]
    image="$1"; dockerfile="$2"; shift 2
    start="$(date +%s)"
    say "building stand-in $image from docker/standins/$dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -f "$here/$dockerfile" -t "$image" "$@" "$here" >/dev/null \
        || fail "building the stand-in $image failed (docker/standins/$dockerfile)"
    say "built $image in $(( $(date +%s) - start )) s"
}

ensure() {  # ensure <image> <Dockerfile> [docker build args...]
    if have "$1"; then say "$1 present"; return 0; fi
    if pull "$1"; then say "$1 pulled"; return 0; fi
    base
    standin "$@"
}

[ -r "$ca_bundle" ] || fail "CA bundle $ca_bundle not readable (EGM_CA_BUNDLE)"
cp "$ca_bundle" "$here/ca-certificates.crt"
trap 'rm -f "$here/ca-certificates.crt"' EXIT INT TERM

ensure "$PYTHON_IMAGE" Dockerfile.python
ensure "$REDIS_IMAGE" Dockerfile.redis
ensure "$LS_IMAGE" Dockerfile.label-studio --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"
if [ "${EGM_STANDINS_VLLM:-0}" = 1 ]; then
    if have "$VLLM_STANDIN"; then say "$VLLM_STANDIN present"
    else standin "$VLLM_STANDIN" Dockerfile.vllm-openai --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"; fi
fi
