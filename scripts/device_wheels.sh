#!/usr/bin/env bash
# The wheels bench/device_check.py needs on a bare GPU machine whose Python 3.12 holds only torch, torchvision,
# numpy, scipy, scikit-learn, Pillow (and timm, safetensors): into .whl/ (git-ignored; copy it with the working
# tree). Run here, where the package registry answers:
#     bash scripts/device_wheels.sh
# and on the GPU machine (docs/gpu.md):
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site:. python3 bench/device_check.py --out $OUT/device_check.md
# Versions: constraints.txt's pin, else the version installed in .venv (what the tests ran with).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
# omegaconf + antlr4 + PyYAML: every config; tqdm: the trainer's and the tasks' progress bars; tensorboard + protobuf
# + absl-py: the trainer's event files (torch.utils.tensorboard.SummaryWriter).
PACKAGES="omegaconf antlr4-python3-runtime PyYAML tqdm tensorboard protobuf absl-py"

version() {  # constraints.txt's pin, else .venv's installed version
  local pinned
  pinned=$(grep -i "^$1==" constraints.txt | head -n 1 | cut -d= -f3 || true)
  if [ -n "$pinned" ]; then echo "$pinned"; return; fi
  if [ -x .venv/bin/python ]; then
    .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null && return
  fi
  echo "device_wheels: no version of $1 in constraints.txt or .venv; install the project first (make install)" >&2
  return 1
}

rm -rf "$DEST"
mkdir -p "$DEST"
for name in $PACKAGES; do
  spec="$name==$(version "$name")"
  if ! "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$DEST" "$spec" 2>/dev/null; then
    # no wheel on the registry (antlr4-python3-runtime 4.9.3 is an sdist only): build one here; it must be pure
    # Python, or it would not install on the other machine's Python 3.12
    echo "device_wheels: $spec has no wheel for CPython 3.12 on the registry; building it from its sdist" >&2
    "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary "$name" -w "$DEST" "$spec"
  fi
done
impure=$(ls "$DEST" | grep -v -e '-none-any\.whl$' -e '-cp312-' -e '-abi3-' || true)
if [ -n "$impure" ]; then
  echo "device_wheels: not installable on CPython 3.12: $impure" >&2
  exit 1
fi
ls -1 "$DEST"
total() { awk '{s += $1} END {print s + 0}'; }
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | total)
whl_bytes=$(stat -c %s "$DEST"/*.whl | total)
echo "device_wheels: $DEST holds $(ls "$DEST" | wc -l) wheels, $((whl_bytes / 1024)) KiB;" \
     "with the working tree ($((tree_bytes / 1024)) KiB) $(((whl_bytes + tree_bytes) / 1048576)) MiB of the 64 MiB a" \
     "device run carries"
