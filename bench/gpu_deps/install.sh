#!/usr/bin/env bash
# On the GPU machine, from the repository root, first thing in every device call:
#
#   bash bench/gpu_deps/install.sh && . /tmp/egm-gpu/env.sh
#
# Installs whatever `make gpu-deps` folders this call carried (.gpu/base, .gpu/trl,
# .gpu/vp01, .gpu/vp02) and is not installed yet; nothing is fetched (the machine has no
# network). Idempotent, so every call can start with it while the machine stays warm:
#   base   project wheels -> /tmp/egm-gpu/site; redis-server -> /tmp/egm-gpu/redis, with a
#          wrapper on PATH that sets LD_LIBRARY_PATH for it alone
#   trl    TRL + datasets wheels -> /tmp/egm-gpu/site
#   vpNN   vLLM parts, kept in /tmp/egm-gpu/parts until every part has arrived (they come in
#          separate calls: 64 MiB per call), then checked and unpacked to /tmp/egm-gpu/vllm
#   the project: /tmp/egm-gpu/proj/egm, links that map the repository's folders into the
#          one `egm` namespace as pyproject's package-dir does (no build, no setuptools)
# Writes /tmp/egm-gpu/env.sh (PYTHONPATH, PATH, vLLM's offline switches) and prints one
# status line; exits non-zero only when something that arrived cannot be installed.
set -euo pipefail

SRC=${1:-.gpu}
ROOT=${EGM_GPU_ROOT:-/tmp/egm-gpu}
REPO=$(pwd)
PY=${PYTHON:-python3}
mkdir -p "$ROOT/site" "$ROOT/parts" "$ROOT/bin"

say() { echo "gpu-deps: $*"; }

# Install the wheels of carried folder $1 unless this exact set is installed already.
install_wheels() {
  local name=$1 dir=$SRC/$1 mark=$ROOT/.$1.installed
  [ -d "$dir" ] || return 0
  (cd "$dir" && sha256sum -c --quiet SHA256SUMS) || { say "$name: checksum mismatch"; return 1; }
  if cmp -s "$dir/SHA256SUMS" "$mark"; then return 0; fi
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
    --target "$ROOT/site" "$dir"/wheels/*.whl
  cp "$dir/SHA256SUMS" "$mark"
  say "$name: installed $(ls "$dir"/wheels/*.whl | wc -l) wheels"
}

install_redis() {
  local dir=$SRC/base mark=$ROOT/.redis.installed
  [ -f "$dir/redis.tar.xz" ] || return 0
  if cmp -s "$dir/SHA256SUMS" "$mark"; then return 0; fi
  rm -rf "$ROOT/redis" && mkdir -p "$ROOT/redis"
  tar -C "$ROOT/redis" -xJf "$dir/redis.tar.xz"
  # egm.processes starts `redis-server` from PATH; the wrapper gives it the carried libraries
  # without putting Debian's libssl/libstdc++ neighbours in front of anything else
  cat > "$ROOT/bin/redis-server" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$ROOT/redis/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$ROOT/redis/bin/redis-server" "\$@"
EOF
  chmod +x "$ROOT/bin/redis-server"
  "$ROOT/bin/redis-server" --version >/dev/null || { say "redis-server does not start here"; return 1; }
  cp "$dir/SHA256SUMS" "$mark"
  say "redis: $("$ROOT/bin/redis-server" --version | cut -d' ' -f3)"
}

install_vllm() {
  local d
  for d in "$SRC"/vp[0-9]*; do
    [ -d "$d" ] || continue
    cp -f "$d"/vllm.tar.xz.part-* "$d/SHA256SUMS" "$ROOT/parts/"
  done
  [ -f "$ROOT/parts/SHA256SUMS" ] || return 0
  if cmp -s "$ROOT/parts/SHA256SUMS" "$ROOT/vllm/.complete" 2>/dev/null; then return 0; fi
  local want have
  want=$(wc -l < "$ROOT/parts/SHA256SUMS")
  have=0
  for f in $(cut -d' ' -f3 "$ROOT/parts/SHA256SUMS"); do
    if [ -f "$ROOT/parts/$f" ]; then have=$((have + 1)); fi
  done
  if [ "$have" -lt "$want" ]; then
    say "vLLM: $have of $want parts here; send the others in the next call (the machine must stay warm)"
    return 0
  fi
  (cd "$ROOT/parts" && sha256sum -c --quiet SHA256SUMS) || { say "vLLM: a part is damaged"; return 1; }
  rm -rf "$ROOT/vllm" && mkdir -p "$ROOT/vllm"
  (cd "$ROOT/parts" && cat $(cut -d' ' -f3 SHA256SUMS | sort)) | xz -d -T0 | tar -C "$ROOT/vllm" -xf -
  cp "$ROOT/parts/SHA256SUMS" "$ROOT/vllm/.complete"
  rm -f "$ROOT"/parts/vllm.tar.xz.part-*  # 110 MB of disk back
  say "vLLM: unpacked $(du -sh "$ROOT/vllm" | cut -f1)"
}

# The repository's folders under one `egm` namespace, read from pyproject's package-dir.
link_project() {
  rm -rf "$ROOT/proj" && mkdir -p "$ROOT/proj"
  "$PY" - "$REPO" "$ROOT/proj" <<'EOF'
import sys, tomllib
from pathlib import Path
repo, out = Path(sys.argv[1]), Path(sys.argv[2])
mapping = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
top = out / "egm"
top.mkdir()
for entry in (repo / mapping["egm"]).iterdir():
    (top / entry.name).symlink_to(entry)
for name, folder in mapping.items():
    if name != "egm":
        (out / name.replace(".", "/")).symlink_to(repo / folder)
EOF
}

install_wheels base
install_redis
install_wheels trl
install_vllm
link_project

pythonpath=$ROOT/proj:$ROOT/site
[ -f "$ROOT/vllm/.complete" ] && pythonpath=$pythonpath:$ROOT/vllm
cat > "$ROOT/env.sh" <<EOF
export PYTHONPATH="$pythonpath:$REPO\${PYTHONPATH:+:\$PYTHONPATH}"
export PATH="$ROOT/bin:\$PATH"
# the repository root (the usual cwd) must not come first on sys.path: its egm/ folder holds the
# core only, the links in $ROOT/proj hold the whole namespace
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1
EOF
# shellcheck disable=SC1091
. "$ROOT/env.sh"
"$PY" - <<'EOF'
import importlib, importlib.util
found = {m: importlib.util.find_spec(m) is not None for m in ("pydantic", "redis", "rq", "trl", "datasets", "vllm")}
import egm.config.settings  # noqa: F401  the project imports with the carried wheels
print("gpu-deps: ready:", ", ".join(f"{m}{'' if ok else ' (absent)'}" for m, ok in found.items()),
      "| redis-server", "yes" if __import__("shutil").which("redis-server") else "absent")
EOF
