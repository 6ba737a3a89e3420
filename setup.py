"""One distribution: the SSL-HSIC pretraining core and its transfer / SLURM adapters.

Versions are pinned in constraints.txt, not here; scripts/install.sh is the install path that works
on a fresh machine (it builds mmcv with its ops and detectron2 from source, which pip alone cannot).
"""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.1",
    "torchvision>=0.16",
    "numpy",
    "omegaconf>=2.3",
    "tqdm",
    "tensorboard",
    "pillow",
    "mpmath",
    "safetensors",
    "matplotlib",
]
EXTRAS = {
    "segmentation": [
        "mmengine>=0.10",
        "mmcv>=2.0.0rc4,<2.2.0",
        "mmsegmentation>=1.2",
        "ftfy",
        "regex",
    ],
    # detectron2 itself is not on PyPI: a cluster builds it from source; scripts/install.sh builds
    # v0.6.
    "detection": [
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "termcolor",
        "yacs",
        "tabulate",
        "cloudpickle",
        "opencv-python-headless",
    ],
    "slurm": ["submitit>=1.5"],
    # scikit-learn: the digits set of the classify task
    "data": ["imgviz", "h5py", "scipy", "scikit-learn"],
    "test": [
        "pytest>=8",
        "pytest-timeout",
        "pytest-xdist",
        "ruff",
        "jax",
        "jaxlib",
        "dm-haiku",
        "pandas",
        "scikit-learn",
    ],
    "bench": ["lightly"],
}
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name != "bench" for req in reqs})

setup(
    name="ssl-hsic",
    version="0.1.0",
    description="SSL-HSIC pretraining of image backbones and their transfer evaluation, locally or on SLURM.",
    python_requires=">=3.10",
    packages=find_packages(include=["common*", "pretrain*", "transfer*", "slurm*"]),
    package_data={"": ["*.yaml"], "transfer": ["splits/*.txt", "splits/*.md"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "ssl-hsic-pretrain=pretrain.__main__:entry",
            "ssl-hsic-transfer=transfer.__main__:entry",
            "ssl-hsic-slurm=slurm.__main__:entry",
        ]
    },
)
