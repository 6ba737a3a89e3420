"""python -m transfer linear|knn --backbone PATH --config FILE [key=value ...]: frozen-feature classification."""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  python -m transfer linear --backbone runs/fm/checkpoints/last.pt --config configs/transfer/linear_fashion_mnist.yaml
  python -m transfer knn --backbone random:resnet18 --config configs/transfer/linear_fashion_mnist.yaml run_dir=runs/knn0
Keys and defaults: transfer/schema.py (ClassificationConfig)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transfer.runner import add_task_arguments
    add_task_arguments(parser, EPILOG)


def classify(task: str, config, backbone, task_run):
    """The body of the linear and knn tasks (see transfer.runner.run_task)."""
    from pretrain.augment import eval_transform
    from pretrain.data import build_dataset
    from pretrain.errors import UserError
    from transfer.classification import (FeatureCache, Transformed, cached_features, extract, knn_scores,
                                         topk_accuracy, train_linear)
    from transfer.runner import pick_device
    d = config.data
    train_set = build_dataset(d.dataset, d.root, d.train_split, d.limit_train)
    test_set = build_dataset(d.dataset, d.root, d.test_split, d.limit_test)
    if list(train_set.classes) != list(test_set.classes):
        raise UserError(f"the {d.train_split} split has {len(train_set.classes)} classes and the {d.test_split} split "
                        f"{len(test_set.classes)}; both must hold the same class folders")
    num_classes = len(train_set.classes)
    task_run.start()
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
        scores = knn_scores(train_x, train_y, test_x, num_classes, config.knn.k, config.knn.temperature)
        metrics, protocol = topk_accuracy(scores, test_y), f"knn k={config.knn.k} T={config.knn.temperature}"
    else:
        feature_fn = None
        if config.linear.augment:  # the standard protocol: new random crops every epoch, so no cache
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
                               task_run.run_dir / "linear_last.pt", feature_fn)
        protocol = f"linear {config.linear.optimizer} {config.linear.epochs} epochs" + \
            (" augmented" if config.linear.augment else " cached features")
    return metrics, d.dataset, protocol, {"feature_cache_hit": bool(train_hit and test_hit)}


def run(args: argparse.Namespace) -> None:
    from transfer.runner import run_task
    from transfer.schema import ClassificationConfig
    run_task(args.command, ClassificationConfig, args, lambda *a: classify(args.command, *a))
