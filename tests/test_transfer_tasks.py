"""Transfer tasks: linear / kNN, depth, segmentation (real mmseg), detection (real detectron2)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.config import load_config
from common.errors import UserError
from common.schedule import cosine_schedule
from pretrain.networks import build_resnet
from tests.helpers import run_cli
from transfer import export
from transfer.backbone import resolve_backbone
from transfer.features import topk_accuracy
from transfer.scenes import CLASSES, file_safe
from transfer.tasks import segmentation
from transfer.tasks.depth import (
    FCRN,
    UpProjection,
    berhu_loss,
    colour,
    depth_metrics,
    depth_sums,
    metrics_from_sums,
    unpool,
)
from transfer.tasks.detection import Config as DetectionConfig
from transfer.tasks.linear_knn import knn_scores, train_linear

# ------------------------------------------------------------------------------------
# classification


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 2, 2, 1])
    result = topk_accuracy(scores, labels, ks=(1, 2))
    # top-1 hits rows 0 and 2; top-2 also row 3 (label 1 is second), never row 1 (label 2 is last)
    assert result == {"top1": 50.0, "top2": 75.0}


def test_knn_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    scores = knn_scores(train, labels, test, num_classes=2, k=2, temperature=0.5)
    sims = (
        torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(test, dim=1)[0]
    )
    top = sims.topk(2)
    expected = torch.zeros(2)
    for s, i in zip(top.values, top.indices):
        expected[labels[i]] += math.exp(s / 0.5)
    assert torch.allclose(scores[0], expected)


def linear_args(tmp_path, backbone="random:resnet18", *extra):
    return [
        "linear",
        "--backbone",
        backbone,
        "--config",
        "configs/transfer/linear_fashion_mnist.yaml",
        f"run_dir={tmp_path / 'run'}",
        "data.limit_train=600",
        "data.limit_test=200",
        "data.num_workers=0",
        "linear.epochs=3",
        f"cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def test_linear_caches_features_and_reruns_identically(tmp_path):
    first = run_cli("transfer", *linear_args(tmp_path))
    assert first.returncode == 0, first.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["feature_cache_hit"] is False and 0 <= metrics["metrics"]["top1"] <= 100
    assert metrics["backbone"]["weights"] == "random" and len(metrics["backbone"]["sha256"]) == 64
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and test features
    second = run_cli(
        "transfer", *linear_args(tmp_path, "random:resnet18", f"run_dir={tmp_path / 'again'}")
    )
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
    assert (
        result.returncode == 2
        and "vgg.pth: looks like a VGG / AlexNet-style network, not a ResNet" in result.stderr
    )
    result = run_cli(
        "transfer", *linear_args(tmp_path, "random:resnet18", "data.root=/nonexistent")
    )
    assert result.returncode == 2 and "Fashion-MNIST not found in /nonexistent" in result.stderr
    for split, classes in (("train", ("a", "b", "c")), ("val", ("a", "b"))):
        for name in classes:
            (tmp_path / "images" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / name / "0.png")
    result = run_cli(
        "transfer",
        *linear_args(
            tmp_path,
            "random:resnet18",
            "data.dataset=imagefolder",
            f"data.root={tmp_path / 'images'}",
            "data.test_split=val",
        ),
    )
    assert (
        result.returncode == 2
        and "the train split has 3 classes and the val split 2" in result.stderr
    )
    assert not (tmp_path / "run").exists()


def test_warmup_then_cosine_schedule_by_formula():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    schedule = cosine_schedule(optimizer, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [2.0 * k / 4 for k in range(4)] + [
        2.0 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 6)) for k in range(4, 11)
    ]
    assert lrs == pytest.approx(expected)  # 0 at step 0, the peak at step 4, 0 at step 10


def test_the_classifier_ema_is_what_is_scored(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 2
    labels = torch.arange(96) % 3
    features = centres[labels] + torch.randn(96, 8, generator=generator)
    protocol = SimpleNamespace(
        epochs=3,
        batch_size=16,
        optimizer="sgd",
        lr=0.05,
        nesterov=True,
        warmup_steps=5,
        ema=0.9,
        weight_decay=0.0,
        standardize=False,
    )
    metrics = train_linear(
        features[:64],
        labels[:64],
        features[64:],
        labels[64:],
        3,
        protocol,
        0,
        "cpu",
        tmp_path / "state.pt",
    )
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    average, head = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    average.load_state_dict(state["average"])
    head.load_state_dict(state["head"])
    assert not torch.equal(average.weight, head.weight)
    assert state["optimizer"]["param_groups"][0]["nesterov"] is True
    with torch.no_grad():
        assert metrics == topk_accuracy(average(features[64:]), labels[64:])


def test_linear_chooses_its_lr_on_held_out_training_images(tmp_path):
    result = run_cli(
        "transfer",
        *linear_args(
            tmp_path, "random:resnet18", "linear.lr_grid=[1e-5,3e-3]", "linear.heldout=150"
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    held_out = record["heldout_top1"]
    assert set(held_out) == {"1e-05", "0.003"} and record["heldout"] == 150
    assert record["chosen_lr"] == max((1e-5, 3e-3), key=lambda lr: held_out[f"{lr:g}"])
    # Adam at 1e-5 for 3 epochs barely moves from its init
    assert held_out["0.003"] > held_out["1e-05"]
    result = run_cli(
        "transfer",
        *linear_args(
            tmp_path, "random:resnet18", "linear.lr_grid=[1e-3]", f"run_dir={tmp_path / 'bad'}"
        ),
    )
    assert (
        result.returncode == 2
        and "linear.lr_grid needs linear.heldout between 1 and 599" in result.stderr
    )
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------- depth


def test_depth_metrics_by_hand():
    prediction = torch.tensor([[1.0, 2.0], [3.0, 9.0]])
    target = torch.tensor([[1.0, 1.0], [4.0, 0.0]])  # the last pixel is invalid
    m = depth_metrics(prediction, target)
    assert m["delta1"] == pytest.approx(100 / 3)  # ratios 1, 2, 4/3
    assert m["delta2"] == pytest.approx(200 / 3)  # 4/3 < 1.5625
    assert m["delta3"] == pytest.approx(200 / 3)  # 2 > 1.953
    assert m["rms"] == pytest.approx(math.sqrt((0 + 1 + 1) / 3))
    assert m["rel"] == pytest.approx((0 + 1 + 0.25) / 3)
    assert m["log10"] == pytest.approx((0 + math.log10(2) + abs(math.log10(0.75))) / 3)


def test_berhu_by_hand():
    prediction, target = torch.tensor([1.0, 2.0, 6.0, 5.0]), torch.tensor([1.5, 2.0, 1.0, 0.0])
    c = 0.2 * 5.0
    expected = (0.5 + 0.0 + (25 + c * c) / (2 * c)) / 3
    assert berhu_loss(prediction, target).item() == pytest.approx(expected)


@pytest.mark.parametrize("arch, size", [("resnet18", (96, 128)), ("resnet50", (228, 304))])
def test_up_projection_decoder_returns_the_input_resolution(arch, size):
    model = FCRN(build_resnet(arch), 512 if arch == "resnet18" else 2048).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 1, *size)


def test_up_projection_is_the_5x5_conv_of_the_unpooled_map_in_value_and_gradient():
    """Laina et al. figure 2c written out (unpool, then the two 5x5 convs of padding 2), against the
    block's fast
    form, float64, odd sizes included."""
    torch.manual_seed(0)
    block = UpProjection(6, 4).double().train()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    main, shortcut = block.main, block.shortcut
    unpooled = unpool(x)
    expected = F.relu(
        main[1:](F.conv2d(unpooled, main[0].weight, padding=2))
        + shortcut[1:](F.conv2d(unpooled, shortcut[0].weight, padding=2))
    )
    weights = [x, main[0].weight, shortcut[0].weight, main[3].weight]
    probe = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * probe).sum(), weights)
    actual = block(x)
    grads = torch.autograd.grad((actual * probe).sum(), weights)
    assert actual.shape == (2, 4, 6, 10)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_depth_trains_evaluates_and_resumes(scenes, tmp_path):
    args = [
        "depth",
        "--backbone",
        "random:resnet18",
        "--config",
        "configs/transfer/depth_scenes.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.root={scenes / 'nyu'}",
        "data.resize=[96,96]",
        "data.crop=[96,96]",
        "batch_size=4",
        "data.num_workers=0",
        "checkpoint_every=2",
    ]
    result = run_cli("transfer", *args, "steps=4")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"delta1", "delta2", "delta3", "rms", "rel", "log10"}
    assert (
        0 <= metrics["delta1"] <= metrics["delta2"] <= metrics["delta3"] <= 100
        and metrics["rms"] > 0
    )
    assert torch.load(tmp_path / "run" / "depth_last.pt", weights_only=True)["step"] == 4
    result = run_cli("transfer", "depth", *args[1:], "steps=4", "seed=1")
    assert (
        result.returncode == 2
        and "holds a depth run of another config (differs at seed)" in result.stderr
    )


# ------------------------------------------------------------------------------------ segmentation


def seg_args(scenes, tmp_path, backbone="random:resnet18", *extra):
    return [
        "segmentation",
        "--backbone",
        backbone,
        "--config",
        "configs/transfer/segmentation_scenes.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.root={scenes / 'voc' / 'VOC2012'}",
        "data.scale=[96,96]",
        "data.crop=[64,64]",
        "data.num_workers=0",
        "schedule.iterations=4",
        "schedule.batch_size=2",
        "schedule.checkpoint_interval=2",
        "head_channels=32",
        *extra,
    ]


def test_segmentation_trains_and_mmseg_evaluates(scenes, tmp_path):
    """On VOC's augmented layout, as mmsegmentation's voc_aug converter leaves it: train.txt +
    aug.txt."""
    result = run_cli(
        "transfer",
        *seg_args(
            scenes, tmp_path, "random:resnet18", "data.aug_list=ImageSets/Segmentation/aug.txt"
        ),
    )
    assert result.returncode == 0, result.stderr
    assert "ConcatDataset" in next((tmp_path / "run" / "mmseg").glob("*.py")).read_text()
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics = record["metrics"]
    assert (
        0 <= metrics["mIoU"] <= 100 and 0 <= metrics["aAcc"] <= 100 and 0 <= metrics["mAcc"] <= 100
    )
    per_class = [v for k, v in metrics.items() if k.startswith("IoU.")]
    assert per_class and metrics["mIoU"] == pytest.approx(np.mean(per_class), abs=0.01)
    # mmseg's own checkpoints stay in the run dir
    assert (tmp_path / "run" / "mmseg" / "iter_4.pth").exists()


def test_a_missing_augmented_layout_is_refused_at_the_start_naming_the_expected_paths(
    scenes, tmp_path
):
    result = run_cli(
        "transfer",
        *seg_args(
            scenes,
            tmp_path,
            "random:resnet18",
            "data.aug_labels=SegmentationClassAugRaw",
            "data.aug_list=ImageSets/Segmentation/aug.txt",
        ),
    )
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(
        f"error: segmentation data incomplete under data.root={scenes / 'voc' / 'VOC2012'}: "
    )
    assert (
        "SegmentationClassAugRaw missing" in message
        and "tools/dataset_converters/voc_aug.py" in message
    )
    assert not (tmp_path / "run").exists()


def test_segmentation_refuses_a_backbone_missing_a_layer(scenes, tmp_path):
    state = build_resnet("resnet18").state_dict()
    del state["layer3.1.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    result = run_cli("transfer", *seg_args(scenes, tmp_path, str(tmp_path / "partial.pth")))
    assert result.returncode == 2 and "missing 1 (layer3.1.conv2.weight)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_load_check_hook_catches_a_partial_mmseg_load(tmp_path):
    from transfer.mmseg_glue import register_modules

    register_modules()
    from mmseg.registry import HOOKS

    state = {f"backbone.{k}": v for k, v in build_resnet("resnet18").state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    hook = HOOKS.build(dict(type="BackboneLoadCheckHook", weights_file=str(tmp_path / "w.pth")))

    class Runner:  # the two attributes the hook reads
        iter = 0
        model = torch.nn.Module()

    # fresh random weights: nothing came from the file
    Runner.model.backbone = build_resnet("resnet18")
    with pytest.raises(UserError, match="did not load in full .* not loaded [1-9]"):
        hook.before_train(Runner)
    Runner.model.backbone.load_state_dict({k[len("backbone.") :]: v for k, v in state.items()})
    hook.before_train(Runner)


# ---------------------------------------------------------------------------------------- detection


def det_args(scenes, tmp_path, backbone="random:resnet18", *extra):
    coco = scenes / "coco"
    return [
        "detection",
        "--backbone",
        backbone,
        "--config",
        "configs/transfer/detection_scenes.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.train_json={coco / 'annotations' / 'instances_train.json'}",
        f"data.train_images={coco / 'train'}",
        f"data.test_json={coco / 'annotations' / 'instances_val.json'}",
        f"data.test_images={coco / 'val'}",
        "data.num_workers=0",
        "iterations=4",
        "batch_size=2",
        "warmup_iters=2",
        "checkpoint_period=2",
        "data.min_size_train=[96]",
        "data.min_size_test=96",
        *extra,
    ]


def test_detection_trains_and_evaluates_through_coco_evaluator_without_c_ops(scenes, tmp_path):
    from transfer.detectron2_glue import has_compiled_ops

    assert not has_compiled_ops()  # so COCOEvaluator takes its Python path
    result = run_cli(
        "transfer",
        *det_args(
            scenes,
            tmp_path,
            "random:resnet18",
            "base=COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
            "opts=[MODEL.ROI_HEADS.SCORE_THRESH_TEST,0.0]",
        ),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    log = (tmp_path / "run" / "detectron2" / "log.txt").read_text()
    # what metrics.json holds is what detectron2's evaluator printed (its "copypaste" lines: task,
    # names, values)
    copypaste = [line.split("copypaste: ")[1] for line in log.splitlines() if "copypaste: " in line]
    printed = {}
    for task, names, values in zip(copypaste[0::3], copypaste[1::3], copypaste[2::3]):
        printed.update(
            {
                f"{task.split(': ')[1]}.{n}": float(v)
                for n, v in zip(names.split(","), values.split(","))
                if v != "nan"
            }
        )
    assert {"bbox.AP", "bbox.APs", "segm.AP", "segm.AP50"} <= set(printed)
    assert metrics == pytest.approx(printed, abs=5e-5)  # printed to 4 decimals
    # pycocotools' Python COCOeval
    assert "COCOeval_opt" not in log and "Evaluation results for bbox" in log
    assert (tmp_path / "run" / "detectron2" / "model_final.pth").exists()


def test_detection_with_the_same_seed_reruns_to_the_same_weights(scenes, tmp_path):
    """detectron2 seeds its RNGs only in default_setup, which the adapter does not call: the seed
    must still hold."""

    def final_weights(name: str, seed: int) -> dict:
        run = tmp_path / name
        result = run_cli(
            "transfer",
            *det_args(scenes, run, "random:resnet18", f"seed={seed}", "iterations=3"),
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(run / "run" / "detectron2" / "model_final.pth", map_location="cpu")[
            "model"
        ]

    first, again, other = final_weights("a", 0), final_weights("b", 0), final_weights("c", 1)
    head = "roi_heads.box_predictor.cls_score.weight"  # initialised by detectron2, trained 3 steps
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[head], other[head])


def test_detection_refuses_a_pkl_of_another_architecture(tmp_path):
    from transfer.detectron2_glue import import_detectron2, load_backbone_strictly, model_config

    import_detectron2()
    from detectron2.modeling import build_model

    r50 = export.write(resolve_backbone("random:resnet50"), "detectron2", tmp_path / "r50.pkl")
    cfg = model_config(DetectionConfig(), resolve_backbone("random:resnet18"), r50, 10, False)
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(
        UserError, match=r"does not fit the detectron2 model: [1-9]\d* unmatched keys \(res"
    ):
        load_backbone_strictly(build_model(cfg), r50)


# ----------------------------------------------------------------------------------- VOC detection


def test_voc07_11_point_ap_by_hand_with_a_difficult_box_that_counts_neither_way(tmp_path):
    """detectron2's voc_eval, which PascalVOCDetectionEvaluator runs per class and IoU threshold."""
    from transfer.detectron2_glue import import_detectron2

    import_detectron2()
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval

    (tmp_path / "Annotations").mkdir()
    # (xmin, ymin, xmax, ymax), difficult
    boxes = [((1, 1, 10, 10), 0), ((20, 20, 29, 29), 1), ((40, 40, 49, 49), 0)]
    objects = "".join(
        f"<object><name>cat</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b, d in boxes
    )
    (tmp_path / "Annotations" / "im0.xml").write_text(
        f"<annotation><filename>im0.jpg</filename>{objects}</annotation>"
    )
    (tmp_path / "test.txt").write_text("im0\n")
    # scores 0.9 on the first box, 0.8 on the difficult one, 0.7 nowhere, 0.6 on the third box
    (tmp_path / "cat.txt").write_text(
        "im0 0.9 1 1 10 10\nim0 0.8 20 20 29 29\nim0 0.7 60 60 69 69\nim0 0.6 40 40 49 49\n"
    )
    _, _, ap = voc_eval(
        str(tmp_path / "{}.txt"),
        str(tmp_path / "Annotations" / "{}.xml"),
        str(tmp_path / "test.txt"),
        "cat",
        ovthresh=0.5,
        use_07_metric=True,
    )
    # 2 positives (the difficult box is not one); ranked TP, (ignored), FP, TP: recall .5 .5 1 at
    # precision 1 1 2/3. 11-point: recall thresholds 0 ... 0.5 reach precision 1, 0.6 ... 1.0 reach
    # 2/3
    assert ap == pytest.approx((6 * 1 + 5 * (2 / 3)) / 11)
    # were the difficult detection a false positive, the precision at recall 1 would be 1/2
    assert ap != pytest.approx((6 * 1 + 5 * 0.5) / 11)


def voc_args(scenes, tmp_path, *extra):
    return [
        *det_args(scenes, tmp_path),
        "data.format=voc",
        f"data.voc_root={scenes / 'voc'}",
        "data.voc_train=[VOC2007/trainval]",
        "data.voc_test=VOC2007/test",
        f"data.class_names=[{','.join(file_safe(c) for c in CLASSES[1:])}]",
        *extra,
    ]


def test_voc_detection_reads_the_voc_layout_and_scores_with_the_pascal_voc_evaluator(
    scenes, tmp_path
):
    result = run_cli(
        "transfer", *voc_args(scenes, tmp_path, "precise_bn=true", "precise_bn_iters=2")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the VOC evaluator's keys
    assert set(record["metrics"]) == {"bbox.AP", "bbox.AP50", "bbox.AP75"}
    assert record["protocol"].endswith("PascalVOCDetectionEvaluator")
    assert record["dataset"] == "voc:VOC2007/trainval->VOC2007/test"
    log = (tmp_path / "run" / "detectron2" / "log.txt").read_text()
    assert "using 2007 metric" in log  # VOC07 11-point AP


def test_a_missing_voc_layout_is_refused_naming_the_expected_paths(scenes, tmp_path):
    result = run_cli("transfer", *voc_args(scenes, tmp_path, "data.voc_test=VOC2007/val"))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: VOC set 'VOC2007/val' not found under data.voc_root={scenes / 'voc'}: "
            f"expected "
        )
    )
    assert "ImageSets/Main/val.txt" in result.stderr and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- depth protocol


def test_depth_metrics_pool_all_valid_pixels_of_the_test_set():
    """Two images, 1 and 3 valid pixels: the pooled rms is not the mean of the per-image rms."""
    # error 1 on one pixel
    first = (torch.tensor([[2.0, 9.0]]), torch.tensor([[1.0, 0.0]]))
    second = (torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]]))  # exact on three
    pooled = metrics_from_sums(depth_sums(*first) + depth_sums(*second))
    assert pooled["rms"] == pytest.approx(math.sqrt(1 / 4))  # per image: (1 + 0) / 2 = 0.5
    assert pooled["rel"] == pytest.approx(1 / 4)
    assert pooled["delta1"] == pytest.approx(75.0)  # 3 of 4 pixels within 1.25


def test_depth_trains_on_raw_frames_when_given_and_records_it(scenes, tmp_path):
    args = [
        "depth",
        "--backbone",
        "random:resnet18",
        "--config",
        "configs/transfer/depth_scenes.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.root={scenes / 'nyu'}",
        f"data.raw_root={scenes / 'nyu_raw'}",
        "data.resize=[64,64]",
        "data.crop=[64,64]",
        "batch_size=4",
        "data.num_workers=0",
        "steps=2",
    ]
    result = run_cli("transfer", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_frames"] == "raw"
    assert (
        "depth: training on 16 raw frames, testing on 6"
        in (tmp_path / "run" / "log.txt").read_text()
    )
    result = run_cli(
        "transfer", *args[:-1], f"run_dir={tmp_path / 'bad'}", f"data.raw_root={tmp_path}"
    )
    assert result.returncode == 2 and "holds no frame pairs <scene>/rgb_<k>.jpg" in result.stderr


def test_depth_colour_is_tensorflows_additive_brightness_hsv_saturation_and_hue_shift():
    # a red and a blue pixel, [3, 1, 2]
    rgb = torch.tensor([[[0.9, 0.2]], [[0.1, 0.2]], [[0.1, 0.6]]])
    keep = {
        "gray": torch.tensor([False]),
        "saturation": torch.tensor([1.0]),
        "hue": torch.tensor([0.0]),
    }
    shifted = colour(rgb, {**keep, "brightness": torch.tensor([0.1])})
    # x + delta, clipped (not x * factor)
    assert torch.allclose(shifted, (rgb + 0.1).clamp(0, 1), atol=1e-6)
    half_turn = colour(rgb, {**keep, "brightness": torch.tensor([0.0]), "hue": torch.tensor([0.5])})
    # red -> cyan
    assert torch.allclose(half_turn[:, 0, 0], torch.tensor([0.1, 0.9, 0.9]), atol=1e-6)
    grey = colour(
        rgb, {**keep, "brightness": torch.tensor([0.0]), "saturation": torch.tensor([0.0])}
    )
    # saturation 0: v everywhere (HSV)
    assert torch.allclose(grey[:, 0, 0], torch.full((3,), 0.9), atol=1e-6)


def test_segmentation_chooses_its_lr_on_held_out_training_images(scenes, tmp_path):
    result = run_cli(
        "transfer",
        *seg_args(
            scenes,
            tmp_path,
            "random:resnet18",
            "schedule.lr_grid=[0.001,0.05]",
            "data.heldout=4",
            "schedule.iterations=2",
            "data.aug_list=ImageSets/Segmentation/aug.txt",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    held_out = record["heldout_mIoU"]
    assert set(held_out) == {"0.001", "0.05"} and record["heldout"] == 4
    assert record["chosen_lr"] == max((0.001, 0.05), key=lambda lr: held_out[f"{lr:g}"])
    select = tmp_path / "run" / "select"
    held, fit = (
        (select / "heldout.txt").read_text().split(),
        (select / "fit_train.txt").read_text().split(),
    )
    aug = (select / "fit_aug.txt").read_text().split()
    listed = scenes / "voc" / "VOC2012" / "ImageSets" / "Segmentation"
    train, aug_all = (
        (listed / "train.txt").read_text().split(),
        (listed / "aug.txt").read_text().split(),
    )
    # held out of train + aug
    assert len(held) == 4 and sorted(held + fit + aug) == sorted(train + aug_all)
    assert not set(held) & set(fit + aug) and set(fit) <= set(train) and set(aug) <= set(aug_all)
    for image_id in held:  # each held-out label from the folder of the list that holds the image
        source = "SegmentationClass" if image_id in train else "SegmentationClassAug"
        assert (select / "heldout_labels" / f"{image_id}.png").resolve() == (
            scenes / "voc" / "VOC2012" / source / f"{image_id}.png"
        ).resolve()
    bad = run_cli(
        "transfer",
        *seg_args(scenes, tmp_path / "bad", "random:resnet18", "schedule.lr_grid=[0.01]"),
    )
    assert (
        bad.returncode == 2 and "schedule.lr_grid needs data.heldout between 1 and 15" in bad.stderr
    )


def test_the_voc_protocol_rescales_the_original_image_and_tests_at_its_original_size(scenes):
    """BYOL D.4: training rescales the original image by a ratio in [0.5, 2]; testing reads it as
    it is."""
    from mmseg.registry import TRANSFORMS

    from transfer import mmseg_glue

    mmseg_glue.register_modules()
    rescale = TRANSFORMS.build(dict(type="RandomRescale", ratio_range=(0.5, 2.0)))
    labels = np.arange(40 * 60, dtype=np.uint8).reshape(40, 60) % 7
    np.random.seed(0)
    ratios = []
    for _ in range(200):
        out = rescale.transform(
            {
                "img": np.zeros((40, 60, 3), np.uint8),
                "gt_seg_map": labels.copy(),
                "seg_fields": ["gt_seg_map"],
            }
        )
        height, width = out["img"].shape[:2]
        assert out["gt_seg_map"].shape == (height, width)
        assert set(np.unique(out["gt_seg_map"])) <= set(range(7))  # nearest: no interpolated labels
        assert abs(width / 60 - height / 40) < 0.05  # the aspect ratio kept
        ratios.append(width / 60)
    assert 0.5 - 0.02 <= min(ratios) < 0.6 and 1.9 < max(ratios) <= 2.0 + 0.02
    assert np.mean(ratios) == pytest.approx(1.25, abs=0.1)  # uniform on [0.5, 2]
    config = load_config(
        segmentation.Config,
        "configs/transfer/segmentation_voc_fcn.yaml",
        [f"data.root={scenes / 'voc' / 'VOC2012'}"],
    )
    cfg = mmseg_glue.model_config(
        config, resolve_backbone("random:resnet50"), Path("w.pth"), 21, False
    )
    train = [step["type"] for step in cfg["train_dataloader"]["dataset"]["datasets"][0]["pipeline"]]
    test = [step["type"] for step in cfg["val_dataloader"]["dataset"]["pipeline"]]
    assert train[:3] == ["LoadImageFromFile", "LoadAnnotations", "RandomRescale"]
    assert "Resize" not in test and "RandomResize" not in train
