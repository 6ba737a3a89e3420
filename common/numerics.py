"""Which CPU kernels a run computes with, in one line: what makes two machines' numbers differ.

Two x86 machines running the same code and seeds give the same numbers only where they run the same
kernels: oneDNN (convolutions) picks AVX-512 or AVX2 code by the CPU, ATen's own vectorised ops
likewise, and with
`train.cpu_amp=true` a CPU with native bf16 (avx512_bf16 or AMX) pretrains in bf16 while one without it runs fp32.
`make demo FP32=1` pins all of them (REPRODUCIBLE_ENV, and train.cpu_amp=false), so that any two x86-64 CPUs with
AVX2 run the same kernels.
"""

from __future__ import annotations

import os
import platform

import torch

# The environment of the fp32 switch: the AVX2 code paths of ATen, oneDNN, MKL and OpenBLAS. The
# threads, which change rounding too, are the executor's (configs/slurm/local.yaml: one per job,
# whatever the machine's cores).
REPRODUCIBLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pinned() -> bool:
    """True when this process runs under the fp32 switch's environment."""
    return all(os.environ.get(key) == value for key, value in REPRODUCIBLE_ENV.items())


def describe(cpu_amp: bool) -> str:
    """One line: the CPU, its kernels, the pretraining precision, and whether the numbers are the
    pinned ones."""
    bf16 = native_bf16()
    precision = "bf16 (train.cpu_amp and native bf16)" if cpu_amp and bf16 else "fp32"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "the CPU's best")
    line = (
        f"numerics: {cpu_model()}, ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN ISA "
        f"{isa}, native bf16 "
        f"{'yes' if bf16 else 'no'}; pretraining in {precision}"
    )
    if pinned() and not (cpu_amp and bf16):
        return (
            line
            + "; pinned to the AVX2 kernels (FP32=1): the same kernels on any x86-64 CPU with AVX2"
        )
    return (
        line
        + "; numbers may differ on another CPU (README, 'Which CPU'): `make demo FP32=1` pins them"
    )
