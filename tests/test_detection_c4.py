"""MoCo's VOC detection protocol (configs/transfer/detection_voc_r50_c4.yaml): Faster R-CNN R50-C4
with the extra norm after res5 (Res5ROIHeadsExtraNorm), naiveSyncBN and PreciseBN.

* The detectron2 config the project builds from the VOC YAML is compared key by key with the one
  MoCo's own files give (facebookresearch/moco 7397dfe, detection/configs/Base-RCNN-C4-BN.yaml,
  pascal_voc_R_50_C4_24k.yaml, pascal_voc_R_50_C4_24k_moco.yaml on detectron2's defaults, copied
  below verbatim).
* The model is built and trained for a few iterations on the generated scenes through `python -m
  transfer detection` as 2 CPU processes on gloo (naiveSyncBN synchronises only over several
  processes). Each process runs the real entry point under a small probe that records, from inside
  the run, what the built model is (ROI head class, the type of every norm layer), what the strict
  load left in the weights, and the extra norm's statistics before and after detectron2's PreciseBN
  hook.
"""

import json
import math
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

from common.config import load_config
from common.errors import UserError
from tests.helpers import ROOT
from transfer.backbone import resolve_backbone
from transfer.scenes import CLASSES, file_safe
from transfer.tasks.detection import Config

# facebookresearch/moco @ 7397dfe (the last commit before the detection folder was removed),
# verbatim
MOCO_CONFIGS = {
    "Base-RCNN-C4-BN.yaml": """\
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  RPN:
    PRE_NMS_TOPK_TEST: 6000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "Res5ROIHeadsExtraNorm"
  BACKBONE:
    FREEZE_AT: 0
  RESNETS:
    # SyncBN seems to cause larger variance for unknown reasons
    NORM: "naiveSyncBN"
TEST:
  PRECISE_BN:
    ENABLED: True
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
""",
    "pascal_voc_R_50_C4_24k.yaml": """\
_BASE_: "Base-RCNN-C4-BN.yaml"
MODEL:
  MASK_ON: False
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  ROI_HEADS:
    NUM_CLASSES: 20
INPUT:
  MIN_SIZE_TRAIN: (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
  MIN_SIZE_TEST: 800
DATASETS:
  TRAIN: ('voc_2007_trainval', 'voc_2012_trainval')
  TEST: ('voc_2007_test',)
SOLVER:
  STEPS: (18000, 22000)
  MAX_ITER: 24000
  WARMUP_ITERS: 100
""",
    "pascal_voc_R_50_C4_24k_moco.yaml": """\
_BASE_: "pascal_voc_R_50_C4_24k.yaml"
MODEL:
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  WEIGHTS: "See Instructions"
  RESNETS:
    STRIDE_IN_1X1: False
INPUT:
  FORMAT: "RGB"
""",
}


def flatten(node, prefix=""):
    from detectron2.config import CfgNode

    out = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def test_the_voc_c4_config_is_mocos_detectron2_config(tmp_path):
    from transfer.detectron2_glue import dataset_names, import_detectron2, model_config

    import_detectron2()
    from detectron2.config import get_cfg

    for name, text in MOCO_CONFIGS.items():
        (tmp_path / name).write_text(text)
    moco = get_cfg()
    moco.merge_from_file(str(tmp_path / "pascal_voc_R_50_C4_24k_moco.yaml"))
    config = load_config(
        Config,
        ROOT / "configs/transfer/detection_voc_r50_c4.yaml",
        [f"data.voc_root={tmp_path / 'VOCdevkit'}", f"run_dir={tmp_path / 'run'}"],
    )
    ours = model_config(
        config, resolve_backbone("random:resnet50"), tmp_path / "backbone.pkl", 20, distributed=True
    )
    a, b = flatten(ours), flatten(moco)
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k] != b[k]}
    # what may differ, and why: the weights file and the dataset names (ours: the same VOC sets
    # registered under data.voc_root, checked below); the output folder; a fixed seed (MoCo: -1, a
    # random one); checkpoints every 2k iterations instead of 5k (more resume points, no effect on
    # training); VOC has no masks; no GPU here
    assert differ <= {
        "MODEL.WEIGHTS",
        "DATASETS.TRAIN",
        "DATASETS.TEST",
        "OUTPUT_DIR",
        "SEED",
        "SOLVER.CHECKPOINT_PERIOD",
        "INPUT.MASK_FORMAT",
        "MODEL.DEVICE",
    }, {k: (a[k], b[k]) for k in differ}
    assert dataset_names(config) == (tuple(a["DATASETS.TRAIN"]), tuple(a["DATASETS.TEST"]))
    assert [n.rsplit("_", 2)[-2:] for n in a["DATASETS.TRAIN"] + a["DATASETS.TEST"]] == [
        ["VOC2007", "trainval"],
        ["VOC2012", "trainval"],
        ["VOC2007", "test"],
    ]
    # the values the protocol hinges on, spelled out (all equal to MoCo's by the comparison above)
    assert (a["MODEL.ROI_HEADS.NAME"], a["MODEL.RESNETS.NORM"], a["MODEL.BACKBONE.FREEZE_AT"]) == (
        "Res5ROIHeadsExtraNorm",
        "naiveSyncBN",
        0,
    )
    assert (a["TEST.PRECISE_BN.ENABLED"], a["TEST.PRECISE_BN.NUM_ITER"], a["TEST.EVAL_PERIOD"]) == (
        True,
        200,
        0,
    )
    assert (
        a["SOLVER.MAX_ITER"],
        a["SOLVER.STEPS"],
        a["SOLVER.WARMUP_ITERS"],
        a["SOLVER.IMS_PER_BATCH"],
        a["SOLVER.BASE_LR"],
    ) == (24000, [18000, 22000], 100, 16, 0.02)
    # one process: plain BN (naiveSyncBN would be BN there too: detectron2 only syncs when world
    # size > 1)
    single = model_config(
        config, resolve_backbone("random:resnet50"), tmp_path / "backbone.pkl", 20, False
    )
    assert single.MODEL.RESNETS.NORM == "BN"


def test_a_c4_config_refuses_a_basic_block_resnet(tmp_path):
    from transfer.detectron2_glue import model_config

    config = load_config(
        Config, ROOT / "configs/transfer/detection_voc_r50_c4.yaml", [f"run_dir={tmp_path}"]
    )
    with pytest.raises(UserError, match="C4 model.*resnet18.*ResNet-50 or deeper"):
        model_config(
            config, resolve_backbone("random:resnet18"), tmp_path / "backbone.pkl", 20, False
        )


# Runs `python -m transfer ARGV` after wrapping the strict load and PreciseBN's update to record,
# per rank, into $C4_PROBE/rank<RANK>.pt: the ROI head class, every norm layer's type, the world
# size, a few weights as loaded, and the extra norm's buffers before / after PreciseBN.
PROBE = r"""
import os, runpy, sys
import torch
from transfer import detectron2_glue as glue
glue.import_detectron2()
from detectron2.engine import hooks
from detectron2.utils import comm
record = {"precise_bn_calls": 0}
out = os.path.join(os.environ["C4_PROBE"], f"rank{os.environ.get('RANK', '0')}.pt")
LOADED = ["backbone.stem.conv1.weight", "backbone.res4.5.conv3.norm.running_var", "roi_heads.res5.0.shortcut.weight",
          "roi_heads.res5.2.conv3.weight"]
load = glue.load_backbone_strictly
def load_backbone_strictly(model, weights):
    load(model, weights)
    state = model.state_dict()
    record["loaded"] = {k: state[k].clone() for k in LOADED}
    record["extra_norm_init"] = {k: v.clone() for k, v in model.roi_heads.res5.norm.state_dict().items()}
glue.load_backbone_strictly = load_backbone_strictly
update = hooks.PreciseBN.update_stats
def update_stats(self):
    model = getattr(self._model, "module", self._model)
    before = {k: v.clone() for k, v in model.roi_heads.res5.norm.state_dict().items()}
    update(self)
    record.update(
        precise_bn_calls=record["precise_bn_calls"] + 1, precise_bn_num_iter=self._num_iter,
        world_size=comm.get_world_size(),
        roi_heads=type(model.roi_heads).__name__, extra_norm_before=before,
        extra_norm_after={k: v.clone() for k, v in model.roi_heads.res5.norm.state_dict().items()},
        norms={n: type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "norm"},
        batchnorm_like={n: type(m).__name__ for n, m in model.named_modules()
                        if "BatchNorm" in type(m).__name__ or "BN" in type(m).__name__})
    torch.save(record, out)
hooks.PreciseBN.update_stats = update_stats
sys.argv = ["transfer", *sys.argv[1:]]
runpy.run_module("transfer", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_voc_c4_extra_norm_model_trains_with_naive_sync_bn_and_precise_bn_on_two_processes(
    scenes, tmp_path
):
    run, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    args = [
        "detection",
        "--backbone",
        "random:resnet50",
        "--config",
        "configs/transfer/detection_voc_r50_c4.yaml",
        f"run_dir={run}",
        f"data.voc_root={scenes / 'voc'}",
        "data.voc_train=[VOC2007/trainval]",
        "data.voc_test=VOC2007/test",
        f"data.class_names=[{','.join(file_safe(c) for c in CLASSES[1:])}]",
        "data.num_workers=0",
        "data.min_size_train=[96]",
        "data.max_size_train=128",
        "data.min_size_test=96",
        "data.max_size_test=128",
        "iterations=3",
        "batch_size=2",
        "warmup_iters=1",
        "checkpoint_period=100",
        "precise_bn_iters=2",
        "device=cpu",
        # speed only: fewer proposals through the res5 head (each is a 14x14 R50 res5 forward on
        # the CPU)
        "opts=[MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,16,MODEL.RPN.PRE_NMS_TOPK_TRAIN,200,"
        "MODEL.RPN.POST_NMS_TOPK_TRAIN,32,MODEL.RPN.PRE_NMS_TOPK_TEST,200,MODEL.RPN.POST_NMS_TOPK_TEST,16]",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "C4_PROBE": str(probe),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE, *args],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"rank {rank}: {err[-3000:]}"

    pkl = pickle.loads((run / "backbone.pkl").read_bytes())["model"]
    records = [torch.load(probe / f"rank{r}.pt") for r in range(2)]
    for rank, rec in enumerate(records):
        assert rec["world_size"] == 2 and rec["roi_heads"] == "Res5ROIHeadsExtraNorm"
        # naiveSyncBN everywhere: the stem, res2-res4 and the res5 box head, and the extra norm
        # after res5
        assert set(rec["norms"].values()) == {"NaiveSyncBatchNorm"}, rank
        assert set(rec["batchnorm_like"].values()) == {"NaiveSyncBatchNorm"}, rank
        assert set(rec["batchnorm_like"]) == set(rec["norms"])
        assert "roi_heads.res5.norm" in rec["norms"] and "backbone.stem.conv1.norm" in rec["norms"]
        assert {n.split(".")[1] for n in rec["norms"] if n.startswith("backbone.")} == {
            "stem",
            "res2",
            "res3",
            "res4",
        }
        # 3 blocks, shortcut, extra
        assert sum(n.startswith("roi_heads.res5.") for n in rec["norms"]) == 3 * 3 + 1 + 1
        # the strict load put the exported ResNet's tensors in place (res5 in the box head included)
        for key, value in rec["loaded"].items():
            source = key.replace("backbone.", "", 1).replace("roi_heads.", "", 1)
            assert torch.equal(value, torch.as_tensor(pkl[source])), key
        # the extra norm is new
        assert torch.equal(rec["extra_norm_init"]["running_var"], torch.ones(2048))
        # PreciseBN ran once, at the end, for the configured iterations, and re-estimated the extra
        # norm's stats
        assert rec["precise_bn_calls"] == 1 and rec["precise_bn_num_iter"] == 2
        before, after = rec["extra_norm_before"], rec["extra_norm_after"]
        assert not torch.allclose(before["running_mean"], after["running_mean"])
        assert not torch.allclose(before["running_var"], after["running_var"])
        assert torch.equal(before["weight"], after["weight"]) and torch.equal(
            before["bias"], after["bias"]
        )
        assert torch.isfinite(after["running_mean"]).all() and (after["running_var"] > 0).all()
    # naiveSyncBN: statistics of the global batch, the same in both ranks although each saw its own
    # images
    for key in ("running_mean", "running_var"):
        assert torch.allclose(
            records[0]["extra_norm_after"][key], records[1]["extra_norm_after"][key], atol=1e-6
        )

    record = json.loads((run / "metrics.json").read_text())
    assert set(record["metrics"]) == {"bbox.AP", "bbox.AP50", "bbox.AP75"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in record["metrics"].values())
    assert record["protocol"] == (
        "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml, 3 iterations, PascalVOCDetectionEvaluator"
    )
    assert record["protocol_id"] == "voc0712-fasterrcnn-c4-24k-moco"
    steps = [
        json.loads(line) for line in (run / "detectron2" / "metrics.json").read_text().splitlines()
    ]
    last = [step for step in steps if "total_loss" in step][-1]  # the training writer's last line
    assert last["iteration"] == 2
    evaluated = steps[-1]  # the evaluation's line: what metrics.json reports
    assert {k: evaluated[f"bbox/{k.split('.')[1]}"] for k in record["metrics"]} == pytest.approx(
        record["metrics"]
    )
    losses = {k: v for k, v in last.items() if k.startswith("loss_") or k == "total_loss"}
    assert {"total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()) and losses["total_loss"] > 0
    log = (run / "detectron2" / "log.txt").read_text()
    assert "Running precise-BN for 2 iterations" in log and "using 2007 metric" in log
    # every norm layer of the model (43 in the R50 trunk, 10 in res5, the extra one) had its
    # statistics re-estimated
    assert (
        len(records[0]["norms"]) == 54 and "Computing precise BN statistics for 54 BN layers" in log
    )
