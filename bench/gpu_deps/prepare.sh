#!/usr/bin/env bash
# Build, on the CPU box, what a bare GPU machine lacks, as folders of .gpu/ that travel with a
# device call (`carry`; at most 64 MiB a call, the working tree included). No GPU is used.
#
#   make gpu-deps                     # = bash bench/gpu_deps/prepare.sh .gpu
#
# Writes (each folder is one `carry` path; bench/gpu_deps/install.sh installs it on the GPU):
#   .gpu/base   the project's wheels (egm.txt) + Debian's redis-server and its libraries  ~8 MB
#   .gpu/trl    TRL and datasets (trl.txt), for fine-tuning on the GPU                     ~2 MB
#   .gpu/vp01   vLLM 0.24.0 and its missing dependencies (vllm.txt), xz part 1 of 2      ~55 MB
#   .gpu/vp02   part 2 of 2                                                                ~55 MB
# The vLLM parts take ~20 min of xz on 2 cores; they are rebuilt only when vllm.txt,
# vllm-drop.txt or xgrammar_stub.py change (FORCE=1 rebuilds everything).
#
# The GPU image (docs/gpu.md): Python 3.12, torch 2.11.0, transformers 5.17; wheels are
# cp312 manylinux x86_64, downloaded with pip's --platform flags and installed there with
# --no-deps, so every list names all the packages it needs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DEST=$(mkdir -p "${1:-.gpu}" && cd "${1:-.gpu}" && pwd)
CACHE=${EGM_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/egm-gpu-deps}
FORCE=${FORCE:-0}

PLATFORMS=""
for tag in manylinux1 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 \
           manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  PLATFORMS="$PLATFORMS --platform ${tag}_x86_64"
done
# EGM_GPU_PYVER=3.11 EGM_GPU_PARTS="base trl" builds those two for this box's Python instead
# (how install.sh is tested on the CPU box)
PYVER=${EGM_GPU_PYVER:-3.12}
PIP_TARGET_FLAGS="--only-binary=:all: --python-version $PYVER --implementation cp --abi cp${PYVER/./} --abi abi3 --abi none $PLATFORMS"
WHEELS=$CACHE/wheels-cp${PYVER/./}  # one cache per Python: a name-version glob must not pick another's wheel
mkdir -p "$WHEELS"

say() { echo "gpu-deps: $*"; }

pins() { grep -v '^\s*#' "$1" | grep -v '^\s*$'; }

# Download the pinned wheels of list $1 into the cache; print their paths (one per pin).
fetch() {
  local list=$1 spec name ver found
  # shellcheck disable=SC2086
  python3 -m pip download -q --disable-pip-version-check --no-deps $PIP_TARGET_FLAGS -d "$WHEELS" \
    -r "$list" 2> >(grep -v "is ignored: it is neither" >&2)
  while read -r spec; do
    name=${spec%%==*}; ver=${spec#*==}
    # wheel file names normalise - and . in the project name to _
    found=$(ls "$WHEELS/$(echo "$name" | tr '.-' '__')-$ver-"*.whl 2>/dev/null \
            || ls "$WHEELS/$name-$ver-"*.whl 2>/dev/null || true)
    [ -n "$found" ] || { echo "gpu-deps: no wheel for $spec in $WHEELS" >&2; exit 1; }
    echo "$found" | head -1
  done < <(pins "$list")
}

recipe_hash() { cat "$@" | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- .gpu/base: project wheels + redis
build_base() {
  local out=$DEST/base stamp
  stamp=$(recipe_hash "$HERE/egm.txt" "$HERE/redis-debs.txt")-$PYVER
  if [ "$FORCE" != 1 ] && [ "$(cat "$out/RECIPE" 2>/dev/null)" = "$stamp" ]; then
    say "base up to date"; return
  fi
  rm -rf "$out.new" && mkdir -p "$out.new/wheels"
  fetch "$HERE/egm.txt" | while read -r w; do cp "$w" "$out.new/wheels/"; done

  local debs=$CACHE/debs root
  mkdir -p "$debs"
  root=$(mktemp -d)
  # apt's sandbox user cannot write into root-owned temp folders; download from inside the cache
  (cd "$debs" && apt-get download -qq $(pins "$HERE/redis-debs.txt") 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
  for p in $(pins "$HERE/redis-debs.txt"); do
    local deb
    deb=$(ls -t "$debs/${p}_"*.deb | head -1)
    dpkg -x "$deb" "$root/x"
  done
  mkdir -p "$root/pkg/bin" "$root/pkg/lib"
  # redis-server is a link to redis-check-rdb; the binary picks its role from argv[0]
  cp "$root/x/usr/bin/redis-check-rdb" "$root/pkg/bin/redis-server"
  cp -a "$root"/x/usr/lib/x86_64-linux-gnu/*.so* "$root/pkg/lib/" 2>/dev/null || true
  cp -a "$root"/x/lib/x86_64-linux-gnu/*.so* "$root/pkg/lib/" 2>/dev/null || true
  LD_LIBRARY_PATH=$root/pkg/lib "$root/pkg/bin/redis-server" --version > "$root/pkg/VERSION"
  tar -C "$root/pkg" -cJf "$out.new/redis.tar.xz" .
  rm -rf "$root"
  (cd "$out.new" && sha256sum wheels/*.whl redis.tar.xz > SHA256SUMS)
  echo "$stamp" > "$out.new/RECIPE"
  rm -rf "$out" && mv "$out.new" "$out"
  say "base: $(ls "$out/wheels" | wc -l) wheels, redis-server $(tar -xJOf "$out/redis.tar.xz" ./VERSION | cut -d' ' -f3)"
}

# ---------------------------------------------------------------- .gpu/trl
build_trl() {
  local out=$DEST/trl stamp
  stamp=$(recipe_hash "$HERE/trl.txt")-$PYVER
  if [ "$FORCE" != 1 ] && [ "$(cat "$out/RECIPE" 2>/dev/null)" = "$stamp" ]; then
    say "trl up to date"; return
  fi
  rm -rf "$out.new" && mkdir -p "$out.new/wheels"
  fetch "$HERE/trl.txt" | while read -r w; do cp "$w" "$out.new/wheels/"; done
  (cd "$out.new" && sha256sum wheels/*.whl > SHA256SUMS)
  echo "$stamp" > "$out.new/RECIPE"
  rm -rf "$out" && mv "$out.new" "$out"
  say "trl: $(ls "$out/wheels" | wc -l) wheels"
}

# ---------------------------------------------------------------- .gpu/vp01, vp02: vLLM
build_vllm() {
  local stamp work site
  stamp=$(recipe_hash "$HERE/vllm.txt" "$HERE/vllm-drop.txt" "$HERE/xgrammar_stub.py")
  if [ "$FORCE" != 1 ] && [ "$(cat "$DEST/vp01/RECIPE" 2>/dev/null)" = "$stamp" ] \
     && [ "$(cat "$DEST/vp02/RECIPE" 2>/dev/null)" = "$stamp" ]; then
    say "vLLM parts up to date"; return
  fi
  work=$(mktemp -d "${TMPDIR:-/tmp}/egm-vllm.XXXXXX")
  site=$work/site
  mkdir -p "$site"
  local wheels vllm_whl
  wheels=$(fetch "$HERE/vllm.txt")
  vllm_whl=$(echo "$wheels" | grep '/vllm-')
  # dependencies: a normal --target install; vLLM itself: unzipped, so files can be dropped first
  # shellcheck disable=SC2046,SC2086
  python3 -m pip install -q --disable-pip-version-check --no-deps --no-index --no-compile $PIP_TARGET_FLAGS \
    --target "$site" $(echo "$wheels" | grep -v '/vllm-')
  rm -rf "$site/bin"
  (cd "$site" && python3 -m zipfile -e "$vllm_whl" .)
  while read -r rel; do rm -rf "${site:?}/vllm/$rel"; done < <(pins "$HERE/vllm-drop.txt")
  mkdir -p "$site/xgrammar" && cp "$HERE/xgrammar_stub.py" "$site/xgrammar/__init__.py"
  find "$site" -name __pycache__ -prune -exec rm -rf {} +
  say "vLLM site $(du -sh "$site" | cut -f1); compressing (xz -9, ~20 min on 2 cores)"
  tar -C "$site" --sort=name -cf - . | xz -9 -T0 > "$work/vllm.tar.xz"
  split -n 2 -d -a 2 "$work/vllm.tar.xz" "$work/vllm.tar.xz.part-"
  (cd "$work" && sha256sum vllm.tar.xz.part-* > SHA256SUMS)
  for i in 1 2; do
    local d=$DEST/vp0$i
    rm -rf "$d" && mkdir -p "$d"
    mv "$work/vllm.tar.xz.part-0$((i - 1))" "$d/"
    cp "$work/SHA256SUMS" "$d/"
    echo "$stamp" > "$d/RECIPE"
  done
  rm -rf "$work"
  say "vLLM parts: $(du -b "$DEST"/vp0*/vllm.tar.xz.part-* | awk '{printf "%s %.1f MB  ", $2, $1/1e6}')"
}

for part in ${EGM_GPU_PARTS:-base trl vllm}; do "build_$part"; done

# ---------------------------------------------------------------- what travels per call
top=$(git rev-parse --show-toplevel)
tree=$(cd "$top" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb | awk 'END {print $1}')
size() { { du -sb "$@" 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
call1=$(( tree + $(size "$DEST/base" "$DEST/vp01") ))
call2=$(( tree + $(size "$DEST/trl" "$DEST/vp02") ))
say "working tree $(mib "$tree"); call 1 (carry .gpu/base .gpu/vp01) $(mib $call1); call 2 (carry .gpu/trl .gpu/vp02) $(mib $call2); limit 64 MiB"
if [ $call1 -gt 66060288 ] || [ $call2 -gt 66060288 ]; then  # 63 MiB: leave room for files added later
  echo "gpu-deps: a call would carry more than 63 MiB: move something to the other call" >&2
  exit 2
fi
