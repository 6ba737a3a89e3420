"""Build a detectron2 v0.6 wheel from the registry's pb1-detectron2==0.6 sdist.

detectron2 is not on PyPI under its own name. pb1-detectron2 0.6 carries upstream v0.6's Python sources
unchanged but not detectron2/layers/csrc, so its setup.py fails on the missing C++ sources, and its model
zoo configs are not where its setup.py looks for them. Faster / Mask
R-CNN with R50-C4/FPN run on torchvision's ops in v0.6, so we build the package without the extension
(transfer/detectron2_glue.py covers what the missing _C and the package's age leave behind). We also drop
its pin black==21.4b2, a formatter used only by LazyConfig.save, which no longer imports with click >= 8.1.

On a cluster, build upstream detectron2 from source instead; the project works with either.
"""
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
    csrc = setup_py.parent / "detectron2" / "layers" / "csrc"
    if not csrc.is_dir():
        text, n = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
        if n != 1:
            raise SystemExit(f"error: cannot find ext_modules in {setup_py}; has the sdist changed?")
    text = re.sub(r'\s*"black==[^"]*",', "", text)
    setup_py.write_text(text)
    # The model zoo's YAML configs sit in detectron2/model_zoo/configs, but setup.py packages them from a
    # top-level configs/ folder that the sdist lacks; without it model_zoo.get_config_file() finds nothing.
    top_level, packaged = setup_py.parent / "configs", setup_py.parent / "detectron2" / "model_zoo" / "configs"
    if not top_level.exists() and packaged.is_dir():
        shutil.copytree(packaged, top_level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the built wheel")
    args = parser.parse_args()
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(pip + ["download", "-q", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
                              "-d", str(tmp), "pb1-detectron2==0.6"], check=True)
        (sdist,) = tmp.glob("pb1-detectron2-0.6.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = tmp / "pb1-detectron2-0.6"
        patch_setup(source / "setup.py")
        # A local version label names this recipe, so that pip replaces a wheel built by an older one.
        recipe = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:10]
        subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(args.out), str(source)],
                       check=True, env={**os.environ, "D2_VERSION_SUFFIX": f"+recipe.{recipe}"})


if __name__ == "__main__":
    main()
