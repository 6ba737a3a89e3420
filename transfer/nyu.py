"""Readers of NYU Depth v2 and of its generated stand-in (ImageNet is read by
pretrain.data.ImageFolder; VOC and COCO by mmsegmentation's and detectron2's own loaders, which
transfer/tasks/segmentation.py and transfer/tasks/detection.py point at the folders).

* NYU Depth v2: `NyuRawFrames` reads the raw training frames in the 'sync' folder layout.
  `NyuLabeledMat` reads the official nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5) with the standard
  795 / 654 split from splits.mat; `NyuFolder` reads the folder layout that `transfer.scenes` writes
  (and that many NYU ports use): <split>.txt lines 'rgb.png depth.png', depth as uint16 millimetres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.errors import UserError


class NyuFolder(Dataset):
    """root/<split>.txt: 'rgb_path depth_path' per line (relative to root); depth PNGs in
    millimetres."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        listing = self.root / f"{split}.txt"
        if not listing.is_file():
            raise UserError(
                f"NYU-style depth set not found: {listing} is missing; generate one with `python "
                f"-m "
                "transfer scenes --out DIR` or point data.root at a folder with "
                "train.txt / test.txt"
            )
        self.items = [line.split() for line in listing.read_text().splitlines() if line.strip()]
        if not self.items:
            raise UserError(f"{listing} lists no images")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb_path, depth_path = (self.root / p for p in self.items[index])
        rgb = torch.from_numpy(np.asarray(Image.open(rgb_path).convert("RGB")).copy()).permute(
            2, 0, 1
        )
        depth = torch.from_numpy(np.asarray(Image.open(depth_path), dtype=np.float32) / 1000.0)
        return rgb, depth


class NyuLabeledMat(Dataset):
    """The official labeled NYU Depth v2 file: 'images' (N, 3, W, H) uint8 and 'depths' (N, W, H)
    float metres,
    stored column-major by MATLAB (so W before H here); splits.mat holds 1-based trainNdxs /
    testNdxs."""

    def __init__(self, mat_path: str | Path, splits_path: str | Path, split: str):
        import h5py
        import scipy.io

        if split not in ("train", "test"):
            raise UserError(f"NYU Depth v2 has splits train and test, not '{split}'")
        for path in (mat_path, splits_path):
            if not Path(path).is_file():
                raise UserError(
                    f"{path} does not exist; NYU Depth v2 needs nyu_depth_v2_labeled.mat and "
                    f"splits.mat"
                )
        self.file = h5py.File(mat_path, "r")
        for key in ("images", "depths"):
            if key not in self.file:
                raise UserError(
                    f"{mat_path} has no '{key}' dataset: not the official labeled NYU Depth v2 file"
                )
        splits = scipy.io.loadmat(str(splits_path))
        key = "trainNdxs" if split == "train" else "testNdxs"
        self.indices = np.asarray(splits[key]).reshape(-1).astype(np.int64) - 1

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(self.indices[index])
        # 3, H, W
        rgb = torch.from_numpy(np.ascontiguousarray(self.file["images"][i].transpose(0, 2, 1)))
        # H, W
        depth = torch.from_numpy(np.ascontiguousarray(self.file["depths"][i].T.astype(np.float32)))
        return rgb, depth


class NyuRawFrames(Dataset):
    """NYU Depth v2 raw frames, synchronised and projected, in the folder layout of the widely used
    'sync' set (BTS, Lee et al. 2019; about 24k frames of 249 training scenes):
    root/<scene>/rgb_<k>.jpg with root/<scene>/sync_depth_<k>.png (uint16 millimetres, 0 = no reading)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(
                f"NYU raw frames not found: {self.root} is not a folder; expected "
                "<raw_root>/<scene>/rgb_<k>.jpg with sync_depth_<k>.png beside each"
            )
        self.items = [
            (rgb, rgb.with_name("sync_depth_" + rgb.stem[len("rgb_") :] + ".png"))
            for rgb in sorted(self.root.glob("*/rgb_*.jpg"))
        ]
        self.items = [(rgb, depth) for rgb, depth in self.items if depth.exists()]
        if not self.items:
            raise UserError(
                f"{self.root} holds no frame pairs <scene>/rgb_<k>.jpg + <scene>/sync_depth_<k>.png"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb_path, depth_path = self.items[index]
        rgb = torch.from_numpy(np.asarray(Image.open(rgb_path).convert("RGB")).copy()).permute(
            2, 0, 1
        )
        depth = torch.from_numpy(np.asarray(Image.open(depth_path), dtype=np.float32) / 1000.0)
        return rgb, depth


def build_depth_dataset(kind: str, root: str, split: str, splits_file: str = "") -> Dataset:
    if kind == "folder":
        return NyuFolder(root, split)
    if kind == "nyu_mat":
        return NyuLabeledMat(root, splits_file, split)
    raise UserError(f"unknown depth dataset '{kind}'; choose folder or nyu_mat (data.kind)")
