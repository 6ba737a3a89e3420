#!/usr/bin/env bash
# The device check on a bare GPU machine in one command (docs/gpu.md), from the repository root with .whl/ copied
# along (bash scripts/device_wheels.sh fills it): install the carried wheels into $SITE, then run the check.
#     bash bench/device_check.sh [bench/device_check.py's options]      (the table goes to $OUT/device_check.md)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/; run bash scripts/device_wheels.sh where the" \
  "package registry answers and copy .whl/ along" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
PYTHONPATH="$SITE:." exec python3 bench/device_check.py --out "${OUT:-.}/device_check.md" "$@"
