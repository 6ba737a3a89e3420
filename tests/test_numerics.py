"""The fp32 switch (`make demo FP32=1`): the environment the Makefile sets is the one
common.numerics describes,
and under it the kernels are the AVX2 ones whatever the CPU."""

import os
import re
import subprocess
import sys

from common.numerics import REPRODUCIBLE_ENV
from tests.helpers import ROOT


def test_the_makefile_sets_the_environment_that_numerics_calls_pinned():
    makefile = (ROOT / "Makefile").read_text()
    line = re.search(r"^DEMO_ENV := env (.*)$", makefile, re.M).group(1)
    assert dict(pair.split("=", 1) for pair in line.split()) == REPRODUCIBLE_ENV
    assert 'DEMO_ARGS := root=runs/demo-fp32 "pretrain_overrides=[train.cpu_amp=false]"' in makefile


def test_under_the_switch_aten_and_onednn_run_their_avx2_kernels():
    code = "from common.numerics import describe; print(describe(cpu_amp=False))"
    pinned = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **REPRODUCIBLE_ENV},
    )
    assert pinned.returncode == 0, pinned.stderr
    assert "ATen AVX2, oneDNN ISA AVX2" in pinned.stdout and "pretraining in fp32" in pinned.stdout
    assert pinned.stdout.rstrip().endswith(
        "pinned to the AVX2 kernels (FP32=1): the same kernels on any x86-64 CPU with AVX2"
    )
    free = subprocess.run(
        [sys.executable, "-c", code.replace("False", "True")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in REPRODUCIBLE_ENV},
    )
    assert free.returncode == 0 and "`make demo FP32=1` pins them" in free.stdout
