"""The generated scenes as an mmsegmentation dataset: PascalVOCDataset's loading with the scenes' 11 classes.

mmsegmentation only narrows a dataset's METAINFO classes to a subset, so the scenes need their own class.
Importing this module registers it (name: GeneratedScenesDataset); it imports mmseg, so only the
segmentation adapter and tests import it.
"""
from mmseg.datasets import PascalVOCDataset
from mmseg.registry import DATASETS

from transfer.scenes import CLASSES, voc_palette

_palette = voc_palette()


@DATASETS.register_module(force=True)
class GeneratedScenesDataset(PascalVOCDataset):
    METAINFO = dict(classes=CLASSES, palette=[_palette[3 * i:3 * i + 3] for i in range(len(CLASSES))])
