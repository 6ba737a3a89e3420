"""python -m transfer linear|knn --backbone PATH --config FILE [key=value ...]: frozen-feature classification."""
from __future__ import annotations

import argparse

EPILOG = """\
--backbone takes any checkpoint `transfer export` accepts, or random:ARCH for the same network at random init.
examples:
  python -m transfer linear --backbone runs/fm/checkpoints/last.pt --config configs/transfer/linear_fashion_mnist.yaml
  python -m transfer knn --backbone random:resnet18 --config configs/transfer/linear_fashion_mnist.yaml run_dir=runs/knn0
Keys and defaults: transfer/schema.py (ClassificationConfig)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--backbone", required=True, help="checkpoint path, or random:ARCH")
    parser.add_argument("--weights", default="ema", choices=["ema", "online", "target"],
                        help="which network of a pretraining checkpoint (default: ema)")
    parser.add_argument("--config", metavar="FILE", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def evaluate(task: str, args: argparse.Namespace) -> dict:
    from pretrain.augment import eval_transform
    from pretrain.config import load_config
    from pretrain.data import build_dataset
    from pretrain.errors import UserError
    from transfer.backbone import resolve_backbone
    from transfer.classification import (FeatureCache, Transformed, cached_features, extract, knn_scores,
                                         topk_accuracy, train_linear)
    from transfer.runner import TaskRun, pick_device
    from transfer.schema import ClassificationConfig

    config = load_config(ClassificationConfig, args.config, args.overrides)
    backbone = resolve_backbone(args.backbone, config.seed, args.weights)
    run = TaskRun(task, config, backbone)
    if (done := run.finished()) is not None:
        print(f"{task}: already done in {run.run_dir}: {done['metrics']}")
        return done
    d = config.data
    train_set = build_dataset(d.dataset, d.root, d.train_split, d.limit_train)
    test_set = build_dataset(d.dataset, d.root, d.test_split, d.limit_test)
    if list(train_set.classes) != list(test_set.classes):
        raise UserError(f"the {d.train_split} split has {len(train_set.classes)} classes and the {d.test_split} split "
                        f"{len(test_set.classes)}; both must hold the same class folders")
    num_classes = len(train_set.classes)
    run.start()
    device = pick_device(config.device)
    model = backbone.model()
    transform = eval_transform(d.image_size, d.mean, d.std, d.resize_ratio)
    cache = FeatureCache(config.cache_dir)

    def features(dataset, split, limit):
        description = {"dataset": d.dataset, "root": d.root, "split": split, "limit": limit, "transform": repr(transform)}
        return cached_features(backbone, model, Transformed(dataset, transform), description, cache,
                               config.extract_batch_size, d.num_workers, device)
    train_x, train_y, train_hit = features(train_set, d.train_split, d.limit_train)
    test_x, test_y, test_hit = features(test_set, d.test_split, d.limit_test)
    if task == "knn":
        metrics = topk_accuracy(knn_scores(train_x, train_y, test_x, num_classes, config.knn.k,
                                           config.knn.temperature), test_y)
        protocol = f"knn k={config.knn.k} T={config.knn.temperature}"
    else:
        feature_fn = None
        if config.linear.augment:
            import torch
            from torchvision.transforms import InterpolationMode, v2
            train_transform = v2.Compose([
                v2.ToImage(), v2.RandomResizedCrop(d.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(d.mean), list(d.std))])

            def feature_fn(epoch):
                torch.manual_seed(config.seed * 1000 + epoch)
                return extract(model, Transformed(train_set, train_transform), config.extract_batch_size,
                               d.num_workers, device)[0]
        metrics = train_linear(train_x, train_y, test_x, test_y, num_classes, config.linear, config.seed, device,
                               run.run_dir / "linear_last.pt", feature_fn)
        protocol = f"linear {config.linear.optimizer} {config.linear.epochs} epochs" + \
            (" augmented" if config.linear.augment else " cached features")
    result = run.finish(metrics, d.dataset, protocol, extra={"feature_cache_hit": bool(train_hit and test_hit)})
    print(f"{task}: {', '.join(f'{k} {v:.2f}' for k, v in metrics.items())}  ({run.run_dir})")
    return result


def run_linear(args: argparse.Namespace) -> None:
    evaluate("linear", args)


def run_knn(args: argparse.Namespace) -> None:
    evaluate("knn", args)


run = run_linear  # subcommand_parser reads module.run; the knn command goes through transfer.knn_cli
