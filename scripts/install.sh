#!/usr/bin/env bash
# The one install path: everything the project needs, on a fresh Debian machine with only the package
# registries, into .venv. Slow builds (mmcv's ops, detectron2) are cached as wheels under
# $SSL_HSIC_CACHE (default ~/.cache/ssl-hsic), keyed by the torch version, so a second install takes
# minutes. Safe to rerun: what is in place is kept.
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

TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS="$CACHE/wheels/torch-$TORCH_VERSION-$PY_TAG"
mkdir -p "$WHEELS"

# 3. mmcv 2.1.0 with its compiled ops (mmsegmentation imports mmcv.ops; the registry has only the sdist).
if ! ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  log "building mmcv 2.1.0 with ops (the long pole: tens of minutes on 2 cores, once per machine)"
  tmp=$(mktemp -d)
  MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) "$PY" -m pip wheel -q --no-build-isolation --no-deps \
    -c "$ROOT/constraints.txt" -w "$tmp" mmcv==2.1.0
  mv "$tmp"/mmcv-*.whl "$WHEELS"/ && rm -rf "$tmp"
fi

# 4. detectron2 v0.6 from pb1-detectron2's sources (see the script for why pip alone fails).
#    Its cache folder is keyed by the build script's hash: a changed recipe rebuilds.
D2_WHEELS="$WHEELS/detectron2-$(sha1sum scripts/build_detectron2.py | cut -c1-10)"
if ! ls "$D2_WHEELS"/pb1_detectron2-0.6*.whl >/dev/null 2>&1; then
  log "building detectron2 0.6"
  "$PY" scripts/build_detectron2.py --out "$D2_WHEELS"
fi

# 5. Everything else, and the project itself (editable).
log "mmcv, mmsegmentation, detectron2, submitit, omegaconf and the project"
"${PIP[@]}" "$WHEELS"/mmcv-2.1.0-*.whl "$D2_WHEELS"/pb1_detectron2-0.6*.whl -e "$ROOT[all]"
"$PY" -c 'import mmseg, mmcv.ops, submitit, omegaconf, pretrain, transfer, slurm; from transfer.detectron2_glue import import_detectron2; import_detectron2()'
log "done: $VENV"
