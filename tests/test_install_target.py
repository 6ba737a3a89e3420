"""What the install builds the compiled ops for (scripts/build_target.py) and where it caches them,
with fake `nvidia-smi` / `nvcc` on PATH; the parsing in scripts/install.sh; detectron2's build
recipe
(scripts/build_detectron2.py). Nothing is built."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_target.py"
TORCH = ["--torch-version", "2.11.0_cu130", "--torch-cuda", "13.0", "--py-tag", "cp311"]
# what every install before build_target.py keyed its cache with
CPU_KEY = "torch-2.11.0_cu130-cp311"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def fake_nvidia_smi(bin_dir: Path, *capabilities: str) -> None:
    """nvidia-smi answering the compute-capability query with one line per GPU."""
    lines = "".join(f"echo {c}\n" for c in capabilities)
    executable(bin_dir / "nvidia-smi", f'[ "$1" = "--query-gpu=compute_cap" ] || exit 9\n{lines}')


def fake_toolkit(root: Path, release: str = "13.0") -> Path:
    """A CUDA toolkit folder: bin/nvcc reporting `release`, include/cuda_runtime.h."""
    executable(
        root / "bin" / "nvcc",
        f'echo "nvcc: NVIDIA (R) Cuda compiler driver"\n'
        f'echo "Cuda compilation tools, release {release}, '
        f'V{release}.88"\n',
    )
    (root / "include").mkdir(parents=True, exist_ok=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def target(tmp_path: Path, path_dirs: list[Path], *args: str, **env: str) -> dict:
    """Run build_target.py with only `path_dirs` on PATH (no CUDA_HOME / CUDA_PATH, no real
    /usr/local/cuda);
    return its lines as {name: value}, env lines as a dict under "env"."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_HOME", "CUDA_PATH", "SSL_HSIC_CUDA_ARCHS", "PATH")
    }
    environ.update(
        PATH=os.pathsep.join(str(d) for d in path_dirs) or str(tmp_path / "empty"), **env
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--default-cuda-home", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out: dict = {"env": {}}
    for line in result.stdout.splitlines():
        name, value = line.split("=", 1)
        if name == "env":
            key, setting = value.split("=", 1)
            out["env"][key] = setting
        else:
            out[name] = value
    return out


def test_a_gpu_and_nvcc_build_cuda_kernels_for_the_gpus_present(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda")
    fake_nvidia_smi(tmp_path / "bin", "9.0", "9.0")
    out = target(tmp_path, [tmp_path / "bin", toolkit / "bin"], *TORCH)
    assert out["key"] == f"{CPU_KEY}-cuda13.0-sm90"
    assert (out["cuda"], out["archs"], out["summary"]) == ("13.0", "9.0", "CUDA 13.0, sm_90")
    assert out["env"] == {
        "FORCE_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": "9.0",
        "CUDA_HOME": str(toolkit.resolve()),
    }
    assert out["cpu_key"] == CPU_KEY


def test_two_kinds_of_gpu_give_both_architectures_in_order(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda")
    fake_nvidia_smi(tmp_path / "bin", "9.0", "8.0", "9.0")
    out = target(tmp_path, [tmp_path / "bin", toolkit / "bin"], *TORCH)
    assert out["key"] == f"{CPU_KEY}-cuda13.0-sm80-sm90"
    assert (
        out["env"]["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
        and out["summary"] == "CUDA 13.0, sm_80 + sm_90"
    )


def test_the_override_names_the_architectures_where_no_gpu_is_visible(tmp_path):
    """A login node with the toolkit but no GPU: SSL_HSIC_CUDA_ARCHS; CUDA_HOME as set is what
    the build gets."""
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    out = target(tmp_path, [], *TORCH, SSL_HSIC_CUDA_ARCHS="9.0+PTX, 8.6", CUDA_HOME=str(toolkit))
    assert out["key"] == f"{CPU_KEY}-cuda13.0-sm86-sm90ptx"
    assert out["env"] == {
        "FORCE_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": "8.6;9.0+PTX",
        "CUDA_HOME": str(toolkit),
    }
    assert out["summary"] == "CUDA 13.0, sm_86 + sm_90 (+PTX)"


def test_the_cuda_version_in_the_key_is_nvccs(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda", "13.1")
    fake_nvidia_smi(tmp_path / "bin", "10.0")
    out = target(tmp_path, [tmp_path / "bin", toolkit / "bin"], *TORCH)
    assert out["key"] == f"{CPU_KEY}-cuda13.1-sm100" and out["cuda"] == "13.1"


def test_a_wrapper_nvcc_on_path_builds_with_the_toolkit_it_stands_for(tmp_path):
    """/usr/local/bin/nvcc as a wrapper script: the folder above it holds no headers, the default
    toolkit does."""
    toolkit = fake_toolkit(tmp_path / "cuda")
    wrapper = executable(
        tmp_path / "local" / "bin" / "nvcc", f'exec {toolkit / "bin" / "nvcc"} "$@"\n'
    )
    fake_nvidia_smi(tmp_path / "bin", "9.0")
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_HOME", "CUDA_PATH", "SSL_HSIC_CUDA_ARCHS")
    }
    environ["PATH"] = f"{tmp_path / 'bin'}:{wrapper.parent}"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TORCH, "--default-cuda-home", str(toolkit)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert f"env=CUDA_HOME={toolkit.resolve()}" in result.stdout.splitlines()


def test_neither_gpu_nor_nvcc_keeps_the_cpu_key_of_every_earlier_install(tmp_path):
    out = target(tmp_path, [], *TORCH)
    assert out["key"] == out["cpu_key"] == CPU_KEY
    assert (out["cuda"], out["archs"]) == ("cpu", "")
    assert out["summary"] == "CPU-only: no nvcc / GPU found"
    # mmcv's setup.py must not see a GPU
    assert out["env"] == {"FORCE_CUDA": "0", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize(
    "case, summary",
    [
        (
            "gpu without nvcc",
            "CPU-only: GPU sm_90 found but no nvcc; install the CUDA 13.0 toolkit or set CUDA_HOME",
        ),
        (
            "nvcc without gpu",
            'CPU-only: nvcc 13.0 found but no GPU; set SSL_HSIC_CUDA_ARCHS (e.g. "8.0;9.0") to '
            "build "
            "CUDA kernels here",
        ),
        (
            "old nvcc",
            "CPU-only: nvcc 12.4 ({nvcc}) does not match torch's CUDA 13.0; install the CUDA 13.0 "
            "toolkit or "
            "point CUDA_HOME at it",
        ),
        ("forced", "CPU-only: SSL_HSIC_CUDA_ARCHS=cpu"),
        ("cpu torch", "CPU-only: torch is a CPU-only build"),
        (
            "old driver",
            "CPU-only: no nvcc / GPU found; nvidia-smi lists no compute capability (a driver older "
            "than 510?)",
        ),
    ],
)
def test_what_cannot_build_cuda_kernels_builds_the_cpu_key_and_says_why(tmp_path, case, summary):
    dirs, args, env = [tmp_path / "bin"], list(TORCH), {}
    if case in ("gpu without nvcc", "forced", "cpu torch"):
        fake_nvidia_smi(tmp_path / "bin", "9.0")
    if case in ("nvcc without gpu", "forced", "cpu torch"):
        dirs.append(fake_toolkit(tmp_path / "cuda") / "bin")
    if case == "old nvcc":
        fake_nvidia_smi(tmp_path / "bin", "9.0")
        dirs.append(fake_toolkit(tmp_path / "cuda", "12.4") / "bin")
    if case == "forced":
        env["SSL_HSIC_CUDA_ARCHS"] = "cpu"
    if case == "cpu torch":
        args[args.index("--torch-cuda") + 1] = ""
    if case == "old driver":
        executable(
            tmp_path / "bin" / "nvidia-smi",
            'echo "Field \\"compute_cap\\" is not a valid field"; exit 2\n',
        )
    out = target(tmp_path, dirs, *args, **env)
    assert out["key"] == CPU_KEY and out["env"]["FORCE_CUDA"] == "0"
    assert out["summary"] == summary.format(nvcc=(tmp_path / "cuda").resolve() / "bin" / "nvcc")


def test_a_bad_override_is_refused_on_one_line(tmp_path):
    environ = {**os.environ, "SSL_HSIC_CUDA_ARCHS": "sm_90"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TORCH],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "error: SSL_HSIC_CUDA_ARCHS='sm_90' is not a list of compute capabilities; write e.g. "
        '"8.0;9.0" (A100 and H100/H200), "9.0+PTX", or "cpu" for the CPU-only '
        "build\n"
    )


def test_the_installed_torch_gives_the_key_install_sh_always_used(tmp_path):
    """Without --torch-*: the installed torch's version (+ as _) and this python's tag, as
    install.sh computed them."""

    out = target(tmp_path, [])
    assert (
        out["key"]
        == f"torch-{torch.__version__.replace('+', '_')}-cp{sys.version_info[0]}{sys.version_info[1]}"
    )


def test_install_sh_reads_the_target_and_builds_with_its_environment(tmp_path):
    """The lines of scripts/install.sh that read build_target.py's output, run on a CUDA target: the
    key, the summary, and an environment in which FORCE_CUDA, TORCH_CUDA_ARCH_LIST and CUDA_HOME are
    set; on the CPU target
    CUDA_VISIBLE_DEVICES is set and empty."""
    text = (ROOT / "scripts" / "install.sh").read_text()
    block = re.search(
        r'^TARGET=\$\("\$PY" scripts/build_target\.py\)\n.*?^done <<< "\$TARGET"\n',
        text,
        re.MULTILINE | re.DOTALL,
    )
    assert block, "install.sh no longer reads build_target.py's output as this test expects"
    toolkit = fake_toolkit(tmp_path / "cuda")
    fake_nvidia_smi(tmp_path / "bin", "8.0", "9.0")
    probe = (
        'import os; print(os.environ.get("FORCE_CUDA"), os.environ.get("TORCH_CUDA_ARCH_LIST"), '
        'os.environ.get("CUDA_HOME"), repr(os.environ.get("CUDA_VISIBLE_DEVICES")))'
    )
    for env, expected in (
        (
            {"PATH": f"{tmp_path / 'bin'}:{toolkit / 'bin'}"},
            f"{CPU_KEY}-cuda13.0-sm80-sm90|CUDA 13.0, sm_80 + sm_90|1 8.0;9.0 {toolkit.resolve()} "
            f"None",
        ),
        (
            {"PATH": str(tmp_path / "empty")},
            f"{CPU_KEY}|CPU-only: no nvcc / GPU found|0 None None ''",
        ),
    ):
        script = (
            f"set -euo pipefail\nPY={sys.executable}\n"
            + block.group(0).replace(
                "scripts/build_target.py",
                f"{SCRIPT} {' '.join(TORCH)} --default-cuda-home {tmp_path / 'none'}",
            )
            + f'printf "%s|%s|" "$KEY" "$SUMMARY"\n/usr/bin/env "${{BUILD_ENV[@]}}" "$PY" -c \'{probe}\'\n'
        )
        environ = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CUDA_HOME", "CUDA_PATH", "SSL_HSIC_CUDA_ARCHS")
        }
        result = subprocess.run(
            ["/bin/bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            env={**environ, **env},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


# ------------------------------------------------------------------------------------- detectron2's
# recipe

SETUP_PY = """setup(
    name="pb1-detectron2",
    install_requires=[
        "black==21.4b2",
        "fvcore",
    ],
    ext_modules=get_extensions(),
)
"""


def source_tree(root: Path, with_csrc: bool) -> Path:
    (root / "detectron2" / "model_zoo" / "configs").mkdir(parents=True)
    (root / "setup.py").write_text(SETUP_PY)
    if with_csrc:
        (root / "detectron2" / "layers" / "csrc").mkdir(parents=True)
    return root


def test_pb1_sources_build_without_the_extension_and_say_cuda_has_nothing_to_compile(tmp_path):
    d2 = load_script("build_detectron2")
    source = source_tree(tmp_path / "pb1-detectron2-0.6", with_csrc=False)
    d2.patch_setup(source / "setup.py")
    setup = (source / "setup.py").read_text()
    assert "ext_modules=[]," in setup and "black" not in setup and (source / "configs").is_dir()
    line = d2.describe(source, {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"})
    assert line == (
        "pb1-detectron2-0.6: no C++ / CUDA sources, so no detectron2._C (FORCE_CUDA=1 has nothing "
        "to "
        "compile); the shipped models run on torchvision's ops"
    )


def test_sources_with_the_extension_keep_it_and_the_build_gets_the_cuda_target(tmp_path):
    d2 = load_script("build_detectron2")
    source = source_tree(tmp_path / "detectron2", with_csrc=True)
    d2.patch_setup(source / "setup.py")
    assert "ext_modules=get_extensions()," in (source / "setup.py").read_text()
    environ = {
        "FORCE_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": "8.0;9.0",
        "CUDA_HOME": "/opt/cuda",
        "PATH": "/bin",
    }
    env = d2.build_env(environ, "abc")
    assert {k: env[k] for k in environ} == environ and env["D2_VERSION_SUFFIX"] == "+recipe.abc"
    assert d2.describe(source, environ) == "detectron2: detectron2._C with CUDA kernels for 8.0;9.0"
    assert (
        d2.describe(source, {"FORCE_CUDA": "0", "CUDA_VISIBLE_DEVICES": ""})
        == "detectron2: detectron2._C, CPU-only"
    )


def test_a_source_tarball_or_tree_is_unpacked_to_the_folder_holding_setup_py(tmp_path):
    d2 = load_script("build_detectron2")
    tree = source_tree(tmp_path / "detectron2-0.6", with_csrc=True)
    with tarfile.open(tmp_path / "v0.6.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="detectron2-0.6")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    unpacked = d2.unpack(tmp_path / "v0.6.tar.gz", tmp_path / "a")
    assert unpacked.name == "detectron2-0.6" and d2.has_sources(unpacked)
    copied = d2.unpack(tree, tmp_path / "b")
    # a copy: the tree is never patched
    assert (copied / "setup.py").read_text() == SETUP_PY and copied != tree
    with pytest.raises(SystemExit, match="no detectron2 setup.py"):
        d2.unpack(tmp_path / "a" / "src" / "detectron2-0.6" / "detectron2", tmp_path / "c")
