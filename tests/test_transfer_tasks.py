"""Transfer tasks: linear / kNN, depth, segmentation (real mmseg), detection (real detectron2)."""
import json
import math

import numpy as np
import pytest
import torch

from pretrain.errors import UserError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from transfer.scenes import write_all
    out = tmp_path_factory.mktemp("scenes")
    write_all(out, 16, 6, 96, 3)
    return out


# ------------------------------------------------------------------------------------ classification

def test_topk_accuracy_by_hand():
    from transfer.tasks.classification import topk_accuracy
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 2, 2, 1])
    result = topk_accuracy(scores, labels, ks=(1, 2))
    # top-1 hits rows 0 and 2; top-2 also row 3 (label 1 is second), never row 1 (label 2 is last)
    assert result == {"top1": 50.0, "top2": 75.0}


def test_knn_votes_by_hand():
    from transfer.tasks.classification import knn_scores
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    scores = knn_scores(train, labels, test, num_classes=2, k=2, temperature=0.5)
    sims = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(test, dim=1)[0]
    top = sims.topk(2)
    expected = torch.zeros(2)
    for s, i in zip(top.values, top.indices):
        expected[labels[i]] += math.exp(s / 0.5)
    assert torch.allclose(scores[0], expected)


def linear_args(tmp_path, backbone="random:resnet18", *extra):
    return ["linear", "--backbone", backbone, "--config", "configs/transfer/linear_fashion_mnist.yaml",
            f"run_dir={tmp_path / 'run'}", "data.limit_train=600", "data.limit_test=200", "data.num_workers=0",
            "linear.epochs=3", f"cache_dir={tmp_path / 'cache'}", *extra]


def test_linear_caches_features_and_reruns_identically(tmp_path):
    first = run_cli("transfer", *linear_args(tmp_path))
    assert first.returncode == 0, first.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["feature_cache_hit"] is False and 0 <= metrics["metrics"]["top1"] <= 100
    assert metrics["backbone"]["weights"] == "random" and len(metrics["backbone"]["sha256"]) == 64
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and test features
    second = run_cli("transfer", *linear_args(tmp_path, "random:resnet18", f"run_dir={tmp_path / 'again'}"))
    assert second.returncode == 0, second.stderr
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["feature_cache_hit"] is True and again["metrics"] == metrics["metrics"]
    rerun = run_cli("transfer", *linear_args(tmp_path))  # a finished run is reported, not repeated
    assert "already done" in rerun.stdout


def test_knn_runs(tmp_path):
    result = run_cli("transfer", "knn", *linear_args(tmp_path)[1:])
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "knn" and 10 < metrics["metrics"]["top1"] <= 100


def test_linear_refuses_bad_input(tmp_path):
    torch.save({"features.0.weight": torch.zeros(3, 3)}, tmp_path / "vgg.pth")
    result = run_cli("transfer", *linear_args(tmp_path, str(tmp_path / "vgg.pth")))
    assert result.returncode == 2 and "unknown layout, no ResNet backbone found" in result.stderr
    result = run_cli("transfer", *linear_args(tmp_path, "random:resnet18", "data.root=/nonexistent"))
    assert result.returncode == 2 and "Fashion-MNIST not found in /nonexistent" in result.stderr
    from PIL import Image
    for split, classes in (("train", ("a", "b", "c")), ("val", ("a", "b"))):
        for name in classes:
            (tmp_path / "images" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / name / "0.png")
    result = run_cli("transfer", *linear_args(tmp_path, "random:resnet18", "data.dataset=imagefolder",
                                              f"data.root={tmp_path / 'images'}", "data.test_split=val"))
    assert result.returncode == 2 and "the train split has 3 classes and the val split 2" in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- depth

def test_depth_metrics_by_hand():
    from transfer.tasks.depth import depth_metrics
    prediction = torch.tensor([[1.0, 2.0], [3.0, 9.0]])
    target = torch.tensor([[1.0, 1.0], [4.0, 0.0]])  # the last pixel is invalid
    m = depth_metrics(prediction, target)
    assert m["delta1"] == pytest.approx(100 / 3)             # ratios 1, 2, 4/3
    assert m["delta2"] == pytest.approx(200 / 3)             # 4/3 < 1.5625
    assert m["delta3"] == pytest.approx(200 / 3)             # 2 > 1.953
    assert m["rms"] == pytest.approx(math.sqrt((0 + 1 + 1) / 3))
    assert m["rel"] == pytest.approx((0 + 1 + 0.25) / 3)
    assert m["log10"] == pytest.approx((0 + math.log10(2) + abs(math.log10(0.75))) / 3)


def test_berhu_by_hand():
    from transfer.tasks.depth import berhu_loss
    prediction, target = torch.tensor([1.0, 2.0, 6.0, 5.0]), torch.tensor([1.5, 2.0, 1.0, 0.0])
    c = 0.2 * 5.0
    expected = (0.5 + 0.0 + (25 + c * c) / (2 * c)) / 3
    assert berhu_loss(prediction, target).item() == pytest.approx(expected)


@pytest.mark.parametrize("arch, size", [("resnet18", (96, 128)), ("resnet50", (228, 304))])
def test_up_projection_decoder_returns_the_input_resolution(arch, size):
    from pretrain.networks import build_resnet
    from transfer.tasks.depth import FCRN
    model = FCRN(build_resnet(arch), 512 if arch == "resnet18" else 2048).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 1, *size)


def test_depth_trains_evaluates_and_resumes(scenes, tmp_path):
    args = ["depth", "--backbone", "random:resnet18", "--config", "configs/transfer/depth_scenes.yaml",
            f"run_dir={tmp_path / 'run'}", f"data.root={scenes / 'nyu'}", "data.resize=[96,96]", "data.crop=[96,96]",
            "batch_size=4", "data.num_workers=0", "checkpoint_every=2"]
    result = run_cli("transfer", *args, "steps=4")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"delta1", "delta2", "delta3", "rms", "rel", "log10"}
    assert 0 <= metrics["delta1"] <= metrics["delta2"] <= metrics["delta3"] <= 100 and metrics["rms"] > 0
    assert torch.load(tmp_path / "run" / "depth_last.pt", weights_only=True)["step"] == 4
    result = run_cli("transfer", "depth", *args[1:], "steps=4", "seed=1")
    assert result.returncode == 2 and "holds a depth run of another config (differs at seed)" in result.stderr


# ------------------------------------------------------------------------------------ segmentation

def seg_args(scenes, tmp_path, backbone="random:resnet18", *extra):
    return ["segmentation", "--backbone", backbone, "--config", "configs/transfer/segmentation_scenes.yaml",
            f"run_dir={tmp_path / 'run'}", f"data.root={scenes / 'voc' / 'VOC2012'}", "data.scale=[96,96]",
            "data.crop=[64,64]", "data.num_workers=0", "schedule.iterations=4", "schedule.batch_size=2",
            "schedule.checkpoint_interval=2", "head_channels=32", *extra]


def test_segmentation_trains_and_mmseg_evaluates(scenes, tmp_path):
    result = run_cli("transfer", *seg_args(scenes, tmp_path))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics = record["metrics"]
    assert 0 <= metrics["mIoU"] <= 100 and 0 <= metrics["aAcc"] <= 100 and 0 <= metrics["mAcc"] <= 100
    per_class = [v for k, v in metrics.items() if k.startswith("IoU.")]
    assert per_class and metrics["mIoU"] == pytest.approx(np.mean(per_class), abs=0.01)
    assert (tmp_path / "run" / "mmseg" / "iter_4.pth").exists()  # mmseg's own checkpoints stay in the run dir


def test_segmentation_refuses_a_backbone_missing_a_layer(scenes, tmp_path):
    from pretrain.networks import build_resnet
    state = build_resnet("resnet18").state_dict()
    del state["layer3.1.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    result = run_cli("transfer", *seg_args(scenes, tmp_path, str(tmp_path / "partial.pth")))
    assert result.returncode == 2 and "missing 1 (layer3.1.conv2.weight)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_load_check_hook_catches_a_partial_mmseg_load(tmp_path):
    from pretrain.networks import build_resnet
    from transfer.mmseg_glue import register_modules
    register_modules()
    from mmseg.registry import HOOKS
    state = {f"backbone.{k}": v for k, v in build_resnet("resnet18").state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    hook = HOOKS.build(dict(type="BackboneLoadCheckHook", weights_file=str(tmp_path / "w.pth")))

    class Runner:  # the two attributes the hook reads
        iter = 0
        model = torch.nn.Module()
    Runner.model.backbone = build_resnet("resnet18")  # fresh random weights: nothing came from the file
    with pytest.raises(UserError, match="did not load in full .* not loaded [1-9]"):
        hook.before_train(Runner)
    Runner.model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items()})
    hook.before_train(Runner)


# ---------------------------------------------------------------------------------------- detection

def det_args(scenes, tmp_path, backbone="random:resnet18", *extra):
    coco = scenes / "coco"
    return ["detection", "--backbone", backbone, "--config", "configs/transfer/detection_scenes.yaml",
            f"run_dir={tmp_path / 'run'}", f"data.train_json={coco / 'annotations' / 'instances_train.json'}",
            f"data.train_images={coco / 'train'}", f"data.test_json={coco / 'annotations' / 'instances_val.json'}",
            f"data.test_images={coco / 'val'}", "data.num_workers=0", "iterations=4", "batch_size=2",
            "warmup_iters=2", "checkpoint_period=2", "data.min_size_train=[96]", "data.min_size_test=96", *extra]


def test_detection_trains_and_evaluates_through_coco_evaluator_without_c_ops(scenes, tmp_path):
    from transfer.detectron2_glue import has_compiled_ops
    assert not has_compiled_ops()  # so COCOEvaluator takes its Python path
    result = run_cli("transfer", *det_args(scenes, tmp_path, "random:resnet18",
                                           "base=COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
                                           "opts=[MODEL.ROI_HEADS.SCORE_THRESH_TEST,0.0]"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    for key in ("bbox.AP", "bbox.AP50", "bbox.AP75", "segm.AP", "segm.AP50"):
        assert 0 <= metrics[key] <= 100
    log = (tmp_path / "run" / "detectron2" / "log.txt").read_text()
    assert "COCOeval_opt" not in log and "Evaluation results for bbox" in log  # pycocotools' Python COCOeval
    assert (tmp_path / "run" / "detectron2" / "model_final.pth").exists()


def test_detection_with_the_same_seed_reruns_to_the_same_weights(scenes, tmp_path):
    """detectron2 seeds its RNGs only in default_setup, which the adapter does not call: the seed must still hold."""
    def final_weights(name: str, seed: int) -> dict:
        run = tmp_path / name
        result = run_cli("transfer", *det_args(scenes, run, "random:resnet18", f"seed={seed}", "iterations=3"),
                         timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(run / "run" / "detectron2" / "model_final.pth", map_location="cpu")["model"]

    first, again, other = final_weights("a", 0), final_weights("b", 0), final_weights("c", 1)
    head = "roi_heads.box_predictor.cls_score.weight"  # initialised by detectron2, trained 3 steps
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[head], other[head])


def test_detection_refuses_a_pkl_of_another_architecture(tmp_path):
    from transfer import export
    from transfer.backbone import resolve_backbone
    from transfer.detectron2_glue import detectron2_cfg, import_detectron2, load_backbone_strictly
    from transfer.tasks.detection import Config as DetectionConfig
    import_detectron2()
    from detectron2.modeling import build_model
    r50 = export.write(resolve_backbone("random:resnet50"), "detectron2", tmp_path / "r50.pkl")
    cfg = detectron2_cfg(DetectionConfig(), resolve_backbone("random:resnet18"), r50, 10, False)
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(UserError, match=r"does not fit the detectron2 model: [1-9]\d* unmatched keys \(res"):
        load_backbone_strictly(build_model(cfg), r50)
