"""The heavy stack is real, not just importable: mmsegmentation, detectron2 and SLURM do actual
work."""

import math
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


def test_mmseg_fcn_on_a_torchvision_style_resnet_computes_its_loss():
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(
        dict(
            type="EncoderDecoder",
            data_preprocessor=dict(
                type="SegDataPreProcessor",
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                bgr_to_rgb=True,
                size=(64, 64),
            ),
            backbone=dict(
                type="ResNet",
                depth=18,
                num_stages=4,
                out_indices=(3,),
                dilations=(1, 1, 1, 2),
                strides=(1, 2, 2, 1),
                norm_cfg=dict(type="BN", requires_grad=True),
                style="pytorch",
            ),
            decode_head=dict(
                type="FCNHead",
                in_channels=512,
                in_index=0,
                channels=64,
                num_convs=2,
                dilation=6,
                num_classes=5,
                dropout_ratio=0.0,
                norm_cfg=dict(type="BN", requires_grad=True),
                align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0, avg_non_ignore=True),
            ),
            train_cfg=dict(),
            test_cfg=dict(mode="whole"),
        )
    )
    assert model.backbone.conv1.kernel_size == (7, 7)  # torchvision-style stem, not the deep stem
    model.eval()
    images = torch.rand(2, 3, 64, 64) * 255
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :4] = 255  # an ignored band
    samples = []
    for label in labels:
        sample = SegDataSample(gt_sem_seg=PixelData(data=label[None]))
        sample.set_metainfo(dict(img_shape=(64, 64), pad_shape=(64, 64), ori_shape=(64, 64)))
        samples.append(sample)
    batch = model.data_preprocessor(dict(inputs=list(images), data_samples=samples), training=True)
    losses = model(batch["inputs"], batch["data_samples"], mode="loss")
    logits = model(batch["inputs"], batch["data_samples"], mode="tensor")
    logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.isclose(losses["decode.loss_ce"], expected, rtol=1e-5), (losses, expected)


def test_detectron2_mask_rcnn_computes_its_losses():
    from transfer.detectron2_glue import import_detectron2

    import_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = get_cfg()
    cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.FORMAT = "RGB"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    # Zeroed classifier layers give logits of 0, so each cross-entropy must equal ln(number of
    # classes).
    for layer in (
        model.roi_heads.box_predictor.cls_score,
        model.proposal_generator.rpn_head.objectness_logits,
        model.roi_heads.mask_head.predictor,
    ):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    masks = torch.zeros(2, 128, 160, dtype=torch.bool)
    masks[0, 10:60, 20:90] = True
    masks[1, 70:120, 100:150] = True
    instances = Instances(
        (128, 160),
        gt_boxes=Boxes(torch.tensor([[20.0, 10.0, 90.0, 60.0], [100.0, 70.0, 150.0, 120.0]])),
        gt_classes=torch.tensor([3, 17]),
        gt_masks=BitMasks(masks),
    )
    with EventStorage():
        losses = model([{"image": torch.rand(3, 128, 160) * 255, "instances": instances}])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"].item() == pytest.approx(math.log(81), rel=1e-6)
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-6)
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.res5[0].conv1.weight.grad.abs().sum() > 0


def test_detectron2_shims_only_where_needed():
    from transfer.detectron2_glue import apply_shims, has_compiled_ops

    applied = apply_shims()
    assert Image.LINEAR == Image.BILINEAR and np.int is int  # v0.6 imports and runs its numpy paths
    assert set(applied) <= {
        "detectron2._C",
        "PIL.Image.LINEAR",
        "numpy.int",
        "numpy.float",
        "numpy.bool",
        "numpy.str",
    }
    assert not has_compiled_ops()  # this install exercises the path without detectron2._C


def test_sbatch_job_runs_on_the_local_cluster(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-o",
            str(out),
            "--wrap",
            "echo sum=$((20 + 22)) on $(hostname -s)",
        ],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert job.isdigit()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["scontrol", "show", "job", job], env=slurm_cluster.env, capture_output=True, text=True
        ).stdout
        if "JobState=COMPLETED" in state:
            break
        time.sleep(0.5)
    assert "JobState=COMPLETED" in state, state
    assert out.read_text().strip() == f"sum=42 on {slurm_cluster.host}"
