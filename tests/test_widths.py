"""The wider and deeper ResNets of the architecture table (resnet50x2 / x4, resnet200, resnet200x2)
through pretraining's heads, every export format, the real detectron2 and mmsegmentation ResNets,
and the task configs.

A random resnet50x2 (94M parameters) makes the full round: every format written and read back, and
the detectron2 / mmseg models loaded from the files give torchvision's feature maps. ResNet-200 is
checked on the meta device (no memory, no init): the registered detectron2 builders and mmseg's
ResNetTable build the keys and shapes of the canonical network, which is what their checkpoint
loaders match by name."""

import json
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from common.config import load_config
from common.errors import UserError
from pretrain.networks import OnlineNetwork, architecture, build_resnet, feature_width
from pretrain.schema import PretrainConfig
from tests.helpers import ROOT, randomise_batchnorm
from transfer import export
from transfer.backbone import Backbone, load_backbone
from transfer.tasks.depth import FCRN
from transfer.tasks.detection import Config
from transfer.tasks.segmentation import Config as SegmentationConfig
from transfer.verify import verify

WIDE = ("resnet50x2", "resnet50x4", "resnet200x2")


def canonical_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_resnet(arch).state_dict().items()}


def detectron2_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """The exported .pkl's keys (transfer.export.to_detectron2's renames) and the canonical
    shapes, without weights."""
    shapes = {
        k: s for k, s in canonical_shapes(arch).items() if not k.endswith("num_batches_tracked")
    }
    names = export.to_detectron2({k: torch.empty(0) for k in shapes})["model"]
    return dict(zip(names, shapes.values()))


def random_backbone(arch: str, seed: int = 0) -> Backbone:
    """A random network with non-trivial BN statistics, so that a BN mix-up shows in the
    features."""
    torch.manual_seed(seed)
    model = randomise_batchnorm(build_resnet(arch))
    return Backbone(model.state_dict(), arch, f"random:{arch}", "random init", "as-is")


@pytest.fixture(scope="module")
def x2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("x2") / "resnet50x2.pth"
    torch.save(random_backbone("resnet50x2").state_dict, path)
    return path


@pytest.fixture(scope="module")
def x2_exports(x2_file, tmp_path_factory):
    backbone = load_backbone(x2_file)
    return backbone, export.write_all(backbone, tmp_path_factory.mktemp("x2_export"))


# ------------------------------------------------------------------------------------------
# pretraining


@pytest.mark.parametrize("arch", WIDE)
def test_the_wide_pretraining_configs_differ_from_resnet50s_in_the_encoder_only(arch):
    base = OmegaConf.to_container(
        load_config(PretrainConfig, ROOT / "configs/pretrain/imagenet_resnet50.yaml", [])
    )
    wide = OmegaConf.to_container(
        load_config(PretrainConfig, ROOT / f"configs/pretrain/imagenet_{arch}.yaml", [])
    )
    assert wide["model"]["backbone"] == arch and wide["run_dir"] == f"runs/pretrain/imagenet_{arch}"
    for config in (base, wide):
        config["model"].pop("backbone"), config.pop("run_dir")
    assert wide == base


def test_the_online_network_of_resnet50x2_sizes_projector_and_probe_from_the_feature_width():
    """The network the trainer builds (pretrain.trainer), run on a 32 px batch: on the meta device,
    shapes only
    (a real resnet50x2 takes seconds to initialise; every layer's shape is checked all the same)."""
    with torch.device("meta"):
        network = OnlineNetwork("resnet50x2", 64, 16, 64, use_predictor=True, num_classes=10)
        features, projection, prediction = network(torch.empty(2, 3, 32, 32))
        logits = network.probe(features.detach())
    assert feature_width("resnet50x2") == 4096
    assert network.encoder.projector[0].in_features == 4096 and network.probe.in_features == 4096
    assert features.shape == (2, 4096) and projection.shape == prediction.shape == (2, 16)
    assert logits.shape == (2, 10)


# ------------------------------------------------------------------------------------------ export
# and verify


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_resnet50x2_round_trips_through_every_format(x2_exports, fmt):
    original, files = x2_exports
    again = load_backbone(files[fmt])
    assert again.arch == "resnet50x2" and again.state_dict.keys() == original.state_dict.keys()
    for key, value in original.state_dict.items():
        if not key.endswith("num_batches_tracked"):  # detectron2 has no batch counters
            assert torch.equal(again.state_dict[key], value), key


def test_the_sidecars_give_each_frameworks_channel_settings(x2_exports):
    _, files = x2_exports
    d2 = json.loads(files["detectron2"].with_name(files["detectron2"].name + ".json").read_text())[
        "loading"
    ]
    assert d2 == {
        "MODEL.RESNETS.DEPTH": 50,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": 128,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 512,
        "MODEL.RESNETS.NUM_GROUPS": 1,
        "MODEL.RESNETS.WIDTH_PER_GROUP": 128,
    }
    mm = json.loads(files["mmseg"].with_name(files["mmseg"].name + ".json").read_text())["loading"]
    assert mm == {"type": "ResNet", "depth": 50, "stem_channels": 128, "base_channels": 128}
    with open(files["detectron2"], "rb") as f:
        model = pickle.load(f)["model"]
    assert model["stem.conv1.weight"].shape == (128, 3, 7, 7) and model[
        "res5.2.conv3.weight"
    ].shape == (4096, 1024, 1, 1)


def test_verify_resnet50x2_in_detectron2_and_mmseg(x2_file):
    report = verify(load_backbone(x2_file), image_size=32)
    assert report.unused == {"detectron2": [], "mmseg": []}
    assert (
        set(report.max_abs_diff) == {"torchvision", "detectron2", "mmseg"}
        and report.worst() <= 1e-4
    )


def test_a_wrong_width_is_refused(x2_file, x2_exports):
    from transfer.detectron2_glue import load_backbone_strictly, pretrained_resnet

    with pytest.raises(
        UserError,
        match=r"does not load strictly into resnet50 .*looks like resnet50x2\): missing 0 "
        r"\(\), unexpected 0 \(\), wrong shape \d+ \(",
    ):
        load_backbone(x2_file, arch="resnet50")
    # detectron2 skips wrongly shaped tensors with a warning: verify reports each one, the detection
    # task refuses
    pkl = x2_exports[1]["detectron2"]
    model, problems = pretrained_resnet("resnet50", pkl)
    with open(pkl, "rb") as f:
        assert set(problems) == set(pickle.load(f)["model"])  # every tensor is twice as wide
    with pytest.raises(
        UserError, match=r"does not fit the detectron2 model: 265 unmatched keys .*check the arch"
    ):
        load_backbone_strictly(model, pkl)


# ------------------------------------------------------------------------------------------
# detectron2


def detection_config(tmp_path, name="detection_voc_r50_c4.yaml"):
    return load_config(Config, ROOT / "configs/transfer" / name, [f"run_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("arch", ["resnet50x2", "resnet200x2"])
def test_the_detectron2_config_carries_the_widths_and_builds_the_c4_head_to_fit(arch, tmp_path):
    from transfer.detectron2_glue import import_detectron2, model_config

    import_detectron2()
    from detectron2.modeling.roi_heads import Res5ROIHeads

    spec = architecture(arch)
    cfg = model_config(
        detection_config(tmp_path),
        Backbone({}, arch, "x", "x", "as-is"),
        tmp_path / "b.pkl",
        20,
        False,
    )
    r = cfg.MODEL.RESNETS
    assert (r.DEPTH, r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP, r.NUM_GROUPS) == (
        spec.depth,
        128,
        512,
        128,
        1,
    )
    assert cfg.MODEL.BACKBONE.NAME == (
        "build_resnet_backbone" if spec.depth == 50 else "build_resnet_table_backbone"
    )
    with torch.device("meta"):  # the C4 box head (res5) that Res5ROIHeads builds from MODEL.RESNETS
        res5, out_channels = Res5ROIHeads._build_res5_block(cfg)
    assert out_channels == spec.feature_width
    assert {
        f"res5.{k}": tuple(v.shape)
        for k, v in res5.state_dict().items()
        if not k.endswith("num_batches_tracked")
    } == {k: s for k, s in detectron2_shapes(arch).items() if k.startswith("res5.")}


def test_the_detectron2_fpn_config_switches_to_the_table_builder_for_resnet200(tmp_path):
    from transfer.detectron2_glue import model_config

    cfg = model_config(
        detection_config(tmp_path, "detection_coco_mask_rcnn_r50_fpn_1x.yaml"),
        Backbone({}, "resnet200", "x", "x", "as-is"),
        tmp_path / "b.pkl",
        3,
        False,
    )
    assert (
        cfg.MODEL.BACKBONE.NAME,
        cfg.MODEL.RESNETS.DEPTH,
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS,
    ) == ("build_resnet_table_fpn_backbone", 200, 256)


@pytest.mark.parametrize(
    "arch, builder",
    [
        ("resnet200", "build_resnet_table_backbone"),
        ("resnet200x2", "build_resnet_table_fpn_backbone"),
        ("resnet18", "build_resnet_table_backbone"),
        ("resnet50x2", "build_retinanet_resnet_table_fpn_backbone"),
    ],
)
def test_the_registered_detectron2_builders_build_the_canonical_resnet(arch, builder):
    """Every key and shape of the exported .pkl is one of the built backbone's
    (DetectionCheckpointer matches by
    name), for the plain, FPN and RetinaNet builders registered for depths detectron2 lacks."""
    from transfer.detectron2_glue import (
        TABLE_BUILDERS,
        configure_resnet,
        import_detectron2,
        register_table_backbones,
    )

    import_detectron2()
    register_table_backbones()
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    cfg = get_cfg()
    configure_resnet(cfg, arch)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1, cfg.MODEL.RESNETS.NORM = False, "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    with torch.device("meta"):
        model = BACKBONE_REGISTRY.get(builder)(cfg, ShapeSpec(channels=3))
    trunk = model.bottom_up if hasattr(model, "bottom_up") else model
    assert {k: tuple(v.shape) for k, v in trunk.state_dict().items()} == detectron2_shapes(arch)
    assert (
        trunk.output_shape()["res5"].channels == feature_width(arch)
        and builder in TABLE_BUILDERS.values()
    )


def test_the_table_builder_builds_detectron2s_own_resnet50():
    from transfer.detectron2_glue import (
        configure_resnet,
        import_detectron2,
        register_table_backbones,
    )

    import_detectron2()
    register_table_backbones()
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    cfg = get_cfg()
    configure_resnet(cfg, "resnet50")
    with torch.device("meta"):
        ours = BACKBONE_REGISTRY.get("build_resnet_table_backbone")(cfg, ShapeSpec(channels=3))
        theirs = BACKBONE_REGISTRY.get("build_resnet_backbone")(cfg, ShapeSpec(channels=3))
    assert repr(ours) == repr(theirs)


# ------------------------------------------------------------------------------------------
# mmsegmentation


@pytest.mark.parametrize("arch", ["resnet50x2", "resnet200x2"])
def test_the_segmentation_config_carries_the_widths(arch, tmp_path):
    from transfer.mmseg_glue import model_config

    spec = architecture(arch)
    root = tmp_path / "VOC2012"  # the layout mmseg_glue.dataset_config checks for
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for listing in ("train", "val"):
        (root / f"ImageSets/Segmentation/{listing}.txt").write_text("")
    config = load_config(
        SegmentationConfig,
        ROOT / "configs/transfer/segmentation_scenes.yaml",
        [f"run_dir={tmp_path / 'run'}", f"data.root={root}"],
    )
    cfg = model_config(
        config, Backbone({}, arch, "x", "x", "as-is"), tmp_path / "b.mmseg.pth", 11, False
    )
    backbone = cfg["model"]["backbone"]
    assert (
        backbone["type"],
        backbone["depth"],
        backbone["stem_channels"],
        backbone["base_channels"],
    ) == ("ResNet" if spec.depth == 50 else "ResNetTable", spec.depth, 128, 128)
    assert cfg["model"]["decode_head"]["in_channels"] == 4096


@pytest.mark.parametrize("arch", ["resnet200", "resnet50x4"])
def test_mmsegs_resnet_builds_the_canonical_resnet(arch):
    from mmseg.models.backbones.resnet import ResNet
    from mmseg.registry import MODELS

    from transfer.mmseg_glue import MMSEG_DEPTHS, register_modules, resnet_backbone

    assert tuple(ResNet.arch_settings) == MMSEG_DEPTHS
    register_modules()
    with torch.device("meta"):
        model = MODELS.build(resnet_backbone(arch, out_indices=(0, 1, 2, 3), style="pytorch"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == canonical_shapes(arch)
    assert model.feat_dim == feature_width(arch)


# ------------------------------------------------------------------------------------------ the
# other heads


def test_the_depth_decoder_takes_the_feature_width():
    with torch.device("meta"):
        model = FCRN(build_resnet("resnet50x2"), feature_width("resnet50x2"))
        out = model(torch.empty(1, 3, 64, 64))
    assert model.reduce[0].in_channels == 4096 and out.shape == (1, 1, 64, 64)
