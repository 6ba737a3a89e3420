"""Build a detectron2 v0.6 wheel from the registry's pb1-detectron2==0.6 sdist.

detectron2 is not on PyPI under its own name. pb1-detectron2 0.6 carries upstream v0.6's Python
sources unchanged but not detectron2/layers/csrc, so its setup.py fails on the missing C++ sources,
and its model zoo configs are not where its setup.py looks for them. Faster / Mask R-CNN with
R50-C4/FPN run on torchvision's ops in v0.6, so we build the package without the extension
(transfer/detectron2_glue.py covers what the missing _C and the package's age leave behind). We also
drop its pin black==21.4b2, a formatter used only by LazyConfig.save, which no longer imports with
click >= 8.1.

The build's target comes from the environment, passed through to detectron2's setup.py and torch's
extension
builder: FORCE_CUDA=1 builds CUDA kernels (TORCH_CUDA_ARCH_LIST names the architectures, CUDA_HOME the toolkit),
FORCE_CUDA=0 with CUDA_VISIBLE_DEVICES= a CPU-only extension (scripts/build_target.py picks them; scripts/install.sh
passes them). pb1-detectron2's sdist has no C++ / CUDA sources, so its wheel has no detectron2._C
whatever the target (the shipped Faster / Mask R-CNN run on torchvision's CUDA ops: docs/gpu.md).
For the kernels (deformable conv, rotated boxes, the fast COCO evaluation), pass upstream's sources:
--source (or SSL_HSIC_DETECTRON2_SOURCE) naming a tree or tarball of facebookresearch/detectron2
v0.6; they are patched the same way and keep their extension. The project works with either."""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def patch_setup(setup_py: Path) -> None:
    text = setup_py.read_text()
    if not has_sources(setup_py.parent):
        text, n = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
        if n != 1:
            raise SystemExit(
                f"error: cannot find ext_modules in {setup_py}; has the sdist changed?"
            )
    text = re.sub(r'\s*"black==[^"]*",', "", text)
    setup_py.write_text(text)
    # The model zoo's YAML configs sit in detectron2/model_zoo/configs, but setup.py packages them
    # from a top-level configs/ folder that the sdist lacks; without it model_zoo.get_config_file()
    # finds nothing.
    top_level, packaged = (
        setup_py.parent / "configs",
        setup_py.parent / "detectron2" / "model_zoo" / "configs",
    )
    if not top_level.exists() and packaged.is_dir():
        shutil.copytree(packaged, top_level)


def has_sources(source: Path) -> bool:
    """Whether the source tree carries detectron2's C++ / CUDA extension
    (detectron2/layers/csrc)."""
    return (source / "detectron2" / "layers" / "csrc").is_dir()


def build_env(environ: dict[str, str], recipe: str) -> dict[str, str]:
    """The wheel build's environment: the caller's, with the recipe's version label. FORCE_CUDA,
    TORCH_CUDA_ARCH_LIST, CUDA_HOME and CUDA_VISIBLE_DEVICES pass through unchanged to setup.py and
    torch."""
    return {**environ, "D2_VERSION_SUFFIX": f"+recipe.{recipe}"}


def describe(source: Path, environ: dict[str, str]) -> str:
    """One line: what the wheel will hold."""
    if not has_sources(source):
        note = " (FORCE_CUDA=1 has nothing to compile)" if environ.get("FORCE_CUDA") == "1" else ""
        return (
            f"{source.name}: no C++ / CUDA sources, so no detectron2._C{note}; the shipped models "
            f"run on "
            "torchvision's ops"
        )
    if environ.get("FORCE_CUDA") == "1":
        archs = environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs"
        return f"{source.name}: detectron2._C with CUDA kernels for {archs}"
    return f"{source.name}: detectron2._C" + (
        ", CPU-only" if "CUDA_VISIBLE_DEVICES" in environ else ""
    )


def unpack(archive_or_tree: Path, into: Path) -> Path:
    """A copy of the sources (a tree, or a .tar.gz / .zip of one) under `into`; the folder
    holding setup.py."""
    if archive_or_tree.is_dir():
        shutil.copytree(
            archive_or_tree,
            into / "src",
            ignore=shutil.ignore_patterns(".git", "build", "*.egg-info"),
        )
    else:
        shutil.unpack_archive(str(archive_or_tree), into / "src")
    roots = [into / "src"] + sorted(p for p in (into / "src").iterdir() if p.is_dir())
    for root in roots:
        if (root / "setup.py").is_file() and (root / "detectron2").is_dir():
            return root
    raise SystemExit(
        f"error: no detectron2 setup.py in {archive_or_tree}; pass a detectron2 source tree or "
        f"tarball"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the built wheel")
    parser.add_argument(
        "--source",
        type=Path,
        default=os.environ.get("SSL_HSIC_DETECTRON2_SOURCE") or None,
        help="detectron2 v0.6 sources (tree or tarball) with their extension; default: "
        "pb1-detectron2's sdist from the registry (env: "
        "SSL_HSIC_DETECTRON2_SOURCE)",
    )
    args = parser.parse_args()
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.source is not None:
            source = unpack(args.source.resolve(), tmp)
        else:
            subprocess.run(
                pip
                + [
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-build-isolation",
                    "--no-binary",
                    ":all:",
                    "-d",
                    str(tmp),
                    "pb1-detectron2==0.6",
                ],
                check=True,
            )
            (sdist,) = tmp.glob("pb1-detectron2-0.6.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            source = tmp / "pb1-detectron2-0.6"
        patch_setup(source / "setup.py")
        print(f"build_detectron2: {describe(source, os.environ)}", file=sys.stderr)
        # A local version label names this recipe, so that pip replaces a wheel built by an older
        # one.
        recipe = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:10]
        subprocess.run(
            pip
            + [
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(args.out),
                str(source),
            ],
            check=True,
            env=build_env(dict(os.environ), recipe),
        )


if __name__ == "__main__":
    main()
