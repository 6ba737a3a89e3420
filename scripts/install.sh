#!/usr/bin/env bash
# The one install path: everything the project needs, on a fresh Debian machine with only the package
# registries, into .venv. Slow builds (mmcv's ops, detectron2) are cached as wheels under
# $SSL_HSIC_CACHE (default ~/.cache/ssl-hsic), keyed by the torch version and python (and, for a CUDA build,
# by nvcc's CUDA version and the GPU architectures: scripts/build_target.py), so a second install takes
# minutes. Safe to rerun: what is in place is kept.
# On a machine with nvcc and a GPU (nvidia-smi), mmcv's ops are built with CUDA kernels for the GPUs present;
# SSL_HSIC_CUDA_ARCHS="8.0;9.0" names the architectures instead (e.g. on a login node without GPUs), "cpu" forces
# the CPU-only build. docs/gpu.md: which shipped models need CUDA kernels at all (none do today).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
CACHE=${SSL_HSIC_CACHE:-$HOME/.cache/ssl-hsic}
PYTHON=${PYTHON:-python3}
log() { printf '[install %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# 1. System packages: a one-node SLURM cluster (tests, local trials) and the Fashion-MNIST files.
#    On a cluster these come from the site; without root we only say what is missing.
APT_PACKAGES="munge slurmctld slurmd slurm-client dataset-fashion-mnist"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install$missing"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
  else
    log "warning: system packages missing (install them as root for the tests):$missing"
  fi
fi

# 2. The virtual environment and torch (the registry's CUDA build: it runs on CPU and GPU alike).
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt")
log "build tools, numpy, torch, torchvision"
"${PIP[@]}" setuptools wheel ninja numpy torch torchvision

# What the compiled ops are built for here: the cache key, CUDA or CPU-only, and the build's environment
# (CPU-only: torch-$TORCH_VERSION-$PY_TAG, the key of every earlier install, so existing caches stay in use).
TARGET=$("$PY" scripts/build_target.py)
BUILD_ENV=()
while IFS= read -r line; do
  case "${line%%=*}" in
    key) KEY=${line#*=} ;;
    cpu_key) CPU_KEY=${line#*=} ;;
    summary) SUMMARY=${line#*=} ;;
    cuda) BUILD_CUDA=${line#*=} ;;
    env) BUILD_ENV+=("${line#*=}") ;;
  esac
done <<< "$TARGET"
log "compiled ops: $SUMMARY"
WHEELS="$CACHE/wheels/$KEY"
mkdir -p "$WHEELS"

# 3. mmcv 2.1.0 with its compiled ops (mmsegmentation imports mmcv.ops; the registry has only the sdist).
if ! ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  log "building mmcv 2.1.0 with ops (the long pole: tens of minutes on 2 cores, once per machine)"
  tmp=$(mktemp -d)
  env "${BUILD_ENV[@]}" MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) "$PY" -m pip wheel -q --no-build-isolation --no-deps \
    -c "$ROOT/constraints.txt" -w "$tmp" mmcv==2.1.0
  mv "$tmp"/mmcv-*.whl "$WHEELS"/ && rm -rf "$tmp"
fi

# 4. detectron2 v0.6 from pb1-detectron2's sources (see the script for why pip alone fails), which hold no C++ /
#    CUDA sources: the wheel has no detectron2._C whatever the target (the shipped models run on torchvision's
#    ops, docs/gpu.md). SSL_HSIC_DETECTRON2_SOURCE=<upstream v0.6 tree or tarball> builds upstream's instead,
#    with its kernels for the target above. The cache folder is keyed by the build script's hash (a changed recipe
#    rebuilds) and by the source.
D2_TAG=$(sha1sum scripts/build_detectron2.py | cut -c1-10)
if [ -n "${SSL_HSIC_DETECTRON2_SOURCE:-}" ]; then
  D2_TAG="$D2_TAG-src$(printf '%s' "$(realpath "$SSL_HSIC_DETECTRON2_SOURCE")" | sha1sum | cut -c1-8)"
fi
D2_WHEELS="$WHEELS/detectron2-$D2_TAG"
if ! ls "$D2_WHEELS"/*detectron2-0.6*.whl >/dev/null 2>&1; then
  log "building detectron2 0.6"
  env "${BUILD_ENV[@]}" MAX_JOBS=$(nproc) "$PY" scripts/build_detectron2.py --out "$D2_WHEELS"
fi
D2_WHEEL=$(ls "$D2_WHEELS"/*detectron2-0.6*.whl | head -n 1)

# 5. Everything else, and the project itself (editable). pip keeps an installed mmcv 2.1.0 whatever it was built
#    for, so when the build target changed since the last install (.venv/.ssl-hsic-ops; none: the CPU-only key of
#    every earlier install), the two wheels replace what is installed; upstream detectron2 and pb1-detectron2 share
#    the package folder, so the other one goes.
OPS_STAMP="$VENV/.ssl-hsic-ops"
INSTALLED_KEY=$(cat "$OPS_STAMP" 2>/dev/null || echo "$CPU_KEY")
OTHER_D2=pb1-detectron2; case "$(basename "$D2_WHEEL")" in pb1_*) OTHER_D2=detectron2 ;; esac
if "$PY" -m pip show -q "$OTHER_D2" >/dev/null 2>&1; then "$PY" -m pip uninstall -q -y "$OTHER_D2"; fi
if [ "$INSTALLED_KEY" != "$KEY" ] && "$PY" -m pip show -q mmcv >/dev/null 2>&1; then
  log "replacing the installed mmcv and detectron2 with the build for $KEY"
  "${PIP[@]}" --force-reinstall --no-deps "$WHEELS"/mmcv-2.1.0-*.whl "$D2_WHEEL"
fi
log "mmcv, mmsegmentation, detectron2, submitit, omegaconf and the project"
"${PIP[@]}" "$WHEELS"/mmcv-2.1.0-*.whl "$D2_WHEEL" -e "$ROOT[all]"
echo "$KEY" > "$OPS_STAMP"
# The check imports everything; it also reads what the installed builds hold (mmcv's compiling CUDA version,
# whether detectron2._C exists), so the last line says what was built, not what was asked for.
BUILT=$("$PY" -c 'import mmseg, mmcv.ops, submitit, omegaconf, pretrain, transfer, slurm
from transfer.detectron2_glue import has_compiled_ops, import_detectron2
import_detectron2()
print(mmcv.ops.get_compiling_cuda_version(), "yes" if has_compiled_ops() else "no")' | tail -n 1)
MMCV_CUDA=${BUILT% *}; D2_OPS=${BUILT##* }
if [ "$BUILD_CUDA" = cpu ]; then
  DONE="$SUMMARY"
elif [ "$MMCV_CUDA" = "not available" ]; then
  DONE="CPU-only: mmcv's build found no CUDA, although $SUMMARY was asked"
elif [ "$D2_OPS" = yes ]; then
  DONE="mmcv ops and detectron2: $SUMMARY"
else
  DONE="mmcv ops: $SUMMARY; detectron2: torchvision's ops (pb1-detectron2 has no C++ sources; docs/gpu.md)"
fi
log "done: $VENV ($DONE)"
