"""What the compiled ops (mmcv's, detectron2's) are built for on this machine, and the wheel cache
folder they go to.

    .venv/bin/python scripts/build_target.py        (scripts/install.sh runs it after installing torch)

prints `name=value` lines:

    key=torch-2.11.0_cu130-cp311                   the cache folder under $SSL_HSIC_CACHE/wheels; a CUDA build adds
                                                   -cuda<nvcc version>-sm<arch>..., e.g. ...-cp311-cuda13.0-sm80-sm90
    cpu_key=torch-2.11.0_cu130-cp311               the CPU-only build's key (what every earlier install built)
    cuda=13.0 | cpu
    archs=8.0;9.0 | (empty)
    summary=CUDA 13.0, sm_80 + sm_90 | CPU-only: <why>
    env=NAME=VALUE                                 the build's environment, one line per variable

CUDA kernels are built when torch is a CUDA build, nvcc is found (found as torch's extension builder
finds it: $CUDA_HOME, $CUDA_PATH, nvcc on PATH, /usr/local/cuda), nvcc's major version is torch's,
and the architectures are known: $SSL_HSIC_CUDA_ARCHS ("8.0;9.0", "9.0+PTX"; "cpu" forces the
CPU-only build), else the compute capabilities of the GPUs `nvidia-smi` lists. The build then gets
FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST and CUDA_HOME.
Otherwise the build is CPU-only and gets FORCE_CUDA=0 and CUDA_VISIBLE_DEVICES= (mmcv's setup.py builds CUDA
kernels whenever torch sees a GPU, which fails without nvcc). The CPU-only key is
torch-$TORCH_VERSION-$PY_TAG, as before this script existed, so existing caches stay in use; a CUDA
build never shares a folder with it, nor with a build for other architectures or another CUDA
version (a home folder shared by a CPU login node and GPU nodes)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ARCH = re.compile(r"^(\d+)\.(\d+)(\+PTX)?$")


class TargetError(Exception):
    """A bad override: the message is one line for the user."""


@dataclass
class Target:
    key: str
    cpu_key: str
    cuda: str  # nvcc's "major.minor", or "cpu"
    archs: list[str]  # TORCH_CUDA_ARCH_LIST entries, e.g. ["8.0", "9.0+PTX"]
    summary: str
    env: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [
            f"key={self.key}",
            f"cpu_key={self.cpu_key}",
            f"cuda={self.cuda}",
            f"archs={';'.join(self.archs)}",
            f"summary={self.summary}",
            *(f"env={name}={value}" for name, value in self.env.items()),
        ]


def parse_archs(text: str) -> list[str]:
    """ "8.0;9.0" / "8.0 9.0+PTX" / "9.0,8.0" -> sorted, de-duplicated ["8.0", "9.0+PTX"]."""
    entries = [entry for entry in re.split(r"[;,\s]+", text.strip()) if entry]
    bad = [entry for entry in entries if not ARCH.match(entry)]
    if bad or not entries:
        raise TargetError(
            f"SSL_HSIC_CUDA_ARCHS='{text}' is not a list of compute capabilities; write e.g. "
            '"8.0;9.0" (A100 and H100/H200), "9.0+PTX", or "cpu" for the '
            "CPU-only build"
        )
    return sorted(set(entries), key=lambda e: (int(ARCH.match(e)[1]), int(ARCH.match(e)[2]), e))


def arch_tag(arch: str) -> str:
    """ "9.0" -> "sm90", "9.0+PTX" -> "sm90ptx" (folder names)."""
    major, minor, ptx = ARCH.match(arch).groups()
    return f"sm{major}{minor}" + ("ptx" if ptx else "")


def arch_words(archs: list[str]) -> str:
    """["8.0", "9.0+PTX"] -> "sm_80 + sm_90 (+PTX)"."""
    words = []
    for arch in archs:
        major, minor, ptx = ARCH.match(arch).groups()
        words.append(f"sm_{major}{minor}" + (" (+PTX)" if ptx else ""))
    return " + ".join(words)


def is_toolkit(folder: str | Path) -> bool:
    return (Path(folder) / "bin" / "nvcc").is_file() and (
        Path(folder) / "include" / "cuda_runtime.h"
    ).is_file()


def find_cuda_home(environ: dict[str, str], default_home: str) -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME or $CUDA_PATH as set; else the folder above nvcc
    on PATH when it is a toolkit (bin/nvcc and include/cuda_runtime.h), else default_home when it is
    one, else that folder anyway.

    torch.utils.cpp_extension takes the folder above nvcc on PATH even when nvcc is a wrapper script
    in /usr/local/bin (whose /usr/local holds no CUDA headers); the build gets CUDA_HOME from here
    instead."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(name):
            return environ[name]
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    above = str(Path(nvcc).resolve().parent.parent) if nvcc else None
    if above and is_toolkit(above):
        return above
    if default_home and is_toolkit(default_home):
        return str(Path(default_home).resolve())
    return above


def nvcc_version(cuda_home: str | None, environ: dict[str, str]) -> tuple[str | None, str]:
    """(nvcc's "major.minor" or None, the nvcc that was asked). nvcc on PATH is asked when cuda_home
    has none: a
    wrapper script in /usr/local/bin may stand for a toolkit elsewhere."""
    candidates = []
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "nvcc"))
    on_path = shutil.which("nvcc", path=environ.get("PATH", ""))
    if on_path:
        candidates.append(on_path)
    for nvcc in candidates:
        if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
            continue
        try:
            out = subprocess.run(
                [nvcc, "--version"], capture_output=True, text=True, timeout=60, env=environ
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.search(r"release (\d+)\.(\d+)", out)
        if match:
            return f"{match[1]}.{match[2]}", nvcc
    return None, ""


def gpu_archs(environ: dict[str, str]) -> tuple[list[str], str]:
    """(compute capabilities of the GPUs nvidia-smi lists, a note when nvidia-smi exists but did
    not say)."""
    smi = shutil.which("nvidia-smi", path=environ.get("PATH", ""))
    if not smi:
        return [], ""
    try:
        result = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            env=environ,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return [], f"nvidia-smi failed ({error})"
    found = [line.strip() for line in result.stdout.splitlines() if ARCH.match(line.strip())]
    if result.returncode != 0 or not found:
        return [], "nvidia-smi lists no compute capability (a driver older than 510?)"
    return parse_archs(";".join(found)), ""


def decide(
    torch_version: str,
    torch_cuda: str | None,
    py_tag: str,
    environ: dict[str, str],
    default_cuda_home: str = "/usr/local/cuda",
) -> Target:
    """The build for this machine (see the module's docstring)."""
    cpu_key = f"torch-{torch_version}-{py_tag}"
    cpu_env = {"FORCE_CUDA": "0", "CUDA_VISIBLE_DEVICES": ""}

    def cpu(why: str) -> Target:
        return Target(cpu_key, cpu_key, "cpu", [], f"CPU-only: {why}", cpu_env)

    override = environ.get("SSL_HSIC_CUDA_ARCHS", "").strip()
    if override.lower() == "cpu":
        return cpu("SSL_HSIC_CUDA_ARCHS=cpu")
    archs = parse_archs(override) if override else []
    smi_note = ""
    if not archs:
        archs, smi_note = gpu_archs(environ)
    cuda_home = find_cuda_home(environ, default_cuda_home)
    nvcc, nvcc_path = nvcc_version(cuda_home, environ)
    if not torch_cuda:
        return cpu("torch is a CPU-only build")
    if nvcc is None and not archs:
        return cpu("no nvcc / GPU found" + (f"; {smi_note}" if smi_note else ""))
    if nvcc is None:
        return cpu(
            f"GPU {arch_words(archs)} found but no nvcc; install the CUDA {torch_cuda} toolkit or "
            f"set CUDA_HOME"
        )
    if not archs:
        why = f"nvcc {nvcc} found but no GPU" + (f" ({smi_note})" if smi_note else "")
        return cpu(f'{why}; set SSL_HSIC_CUDA_ARCHS (e.g. "8.0;9.0") to build CUDA kernels here')
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return cpu(
            f"nvcc {nvcc} ({nvcc_path}) does not match torch's CUDA {torch_cuda}; install the CUDA "
            f"{torch_cuda} toolkit or point CUDA_HOME at it"
        )
    if cuda_home is None:
        cuda_home = str(Path(nvcc_path).resolve().parent.parent)
    key = f"{cpu_key}-cuda{nvcc}-" + "-".join(arch_tag(arch) for arch in archs)
    env = {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": ";".join(archs), "CUDA_HOME": cuda_home}
    return Target(key, cpu_key, nvcc, archs, f"CUDA {nvcc}, {arch_words(archs)}", env)


def torch_facts() -> tuple[str, str | None]:
    import torch

    return torch.__version__.replace("+", "_"), torch.version.cuda


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--torch-version", help="as install.sh writes it (+ -> _); default: the installed torch's"
    )
    parser.add_argument(
        "--torch-cuda",
        help="torch.version.cuda ('' for a CPU build); default: the installed torch's",
    )
    parser.add_argument("--py-tag", default=f"cp{sys.version_info[0]}{sys.version_info[1]}")
    parser.add_argument("--default-cuda-home", default="/usr/local/cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_version is None or args.torch_cuda is None:
        version, cuda = torch_facts()
        args.torch_version = args.torch_version or version
        args.torch_cuda = cuda if args.torch_cuda is None else args.torch_cuda
    try:
        target = decide(
            args.torch_version,
            args.torch_cuda or None,
            args.py_tag,
            dict(os.environ),
            args.default_cuda_home,
        )
    except TargetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(target.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
