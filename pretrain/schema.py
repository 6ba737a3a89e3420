"""The pretraining config schema. Defaults are the small Fashion-MNIST config; the ImageNet values
(docs/loss.md)
live in configs/pretrain/imagenet_resnet50.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from common.checks import (
    DEVICE,
    NON_NEGATIVE,
    POSITIVE_INT,
    PROBABILITY,
    at_least,
    between,
    checked,
    each,
    greater_than,
    one_of,
)
from pretrain.networks import BACKBONES


@dataclass
class DataConfig:
    dataset: str = checked("fashion_mnist", one_of("fashion_mnist", "imagefolder"))
    root: str = "/usr/share/datasets/fashion-mnist"
    split: str = "train"  # imagefolder: the sub-folder to read (train/...)
    image_size: int = checked(32, at_least(8))  # crop size of the views
    num_workers: int = checked(2, NON_NEGATIVE)
    # what a corrupt or unreadable image does
    on_corrupt: str = checked("error", one_of("error", "skip"))
    limit: int = checked(0, NON_NEGATIVE)  # use only the first N images (0 = all); for quick trials


@dataclass
class AugmentConfig:
    """BYOL's two-view augmentation; each pair is (view 1, view 2)."""

    crop_scale: tuple[float, float] = checked((0.08, 1.0), each(between(0, 1), 2, ordered=True))
    crop_ratio: tuple[float, float] = checked(
        (3 / 4, 4 / 3), each(greater_than(0), 2, ordered=True)
    )
    flip_p: float = checked(0.5, PROBABILITY)
    jitter_p: float = checked(0.8, PROBABILITY)
    brightness: float = checked(0.4, NON_NEGATIVE)
    contrast: float = checked(0.4, NON_NEGATIVE)
    saturation: float = checked(0.2, NON_NEGATIVE)
    hue: float = checked(0.1, between(0, 0.5))
    grayscale_p: float = checked(0.2, PROBABILITY)
    blur_p: tuple[float, float] = checked((1.0, 0.1), each(PROBABILITY, 2))
    blur_sigma: tuple[float, float] = checked((0.1, 2.0), each(NON_NEGATIVE, 2, ordered=True))
    solarize_p: tuple[float, float] = checked((0.0, 0.2), each(PROBABILITY, 2))
    mean: tuple[float, float, float] = checked((0.485, 0.456, 0.406), each(between(0, 1), 3))
    std: tuple[float, float, float] = checked((0.229, 0.224, 0.225), each(greater_than(0), 3))
    # colour, blur, solarize per batch on the training device (the
    batched: bool = False
    #                                         workers only crop and flip):
    # pretrain/batch_augment.py. For GPUs                                         and small images;
    # false: the same ops per image in the workers


@dataclass
class ModelConfig:
    backbone: str = checked("resnet18", one_of(*BACKBONES))  # torchvision, unchanged
    projector_hidden: int = checked(4096, POSITIVE_INT)
    embedding_dim: int = checked(256, POSITIVE_INT)  # d: the projection the loss sees
    predictor_hidden: int = checked(4096, POSITIVE_INT)
    # False: the paper's no-target variant (no predictor, no EMA target)
    use_target: bool = True
    # BatchNorm over the global batch when distributed (online and target)
    sync_bn: bool = True
    # last BN scale of each residual block starts at 0 (the official ResNet)
    zero_init_residual: bool = True
    # a linear classifier on the detached features, trained alongside
    online_probe: bool = True
    #                                         (when the dataset has labels); its running top-1 is
    # logged


@dataclass
class LossConfig:
    num_features: int = checked(512, POSITIVE_INT)  # D, random Fourier features
    gamma: float = checked(3.0, NON_NEGATIVE)
    kernel: str = checked("imq", one_of("imq", "gaussian"))
    estimator: str = checked("rff", one_of("rff", "exact"))
    init_scale: float = checked(1.0, greater_than(0))
    scale_lr: float = checked(3e-4, NON_NEGATIVE)  # Adam on the kernel bandwidth
    # independent random-feature draws averaged per process; every process
    draws: int = checked(1, POSITIVE_INT)
    #                                        draws its own, so W processes average W x draws
    # (docs/loss.md)
    # > 0: the draws per step summed over all W processes, each rank
    total_draws: int = checked(0, NON_NEGATIVE)
    #                                              drawing total_draws / W (replaces draws); the
    # official run: 128


@dataclass
class OptimConfig:
    name: str = checked("lars", one_of("lars", "sgd", "adamw"))
    batch_size: int = checked(4096, at_least(2))  # global
    base_lr: float = checked(0.4, greater_than(0))  # lr = base_lr * batch_size / 256
    weight_decay: float = checked(1e-6, NON_NEGATIVE)
    momentum: float = checked(0.9, between(0, 1, open_high=True))
    eta: float = checked(1e-3, greater_than(0))  # LARS trust coefficient
    epochs: int = checked(1000, POSITIVE_INT)
    warmup_epochs: float = checked(10.0, NON_NEGATIVE)
    max_steps: int = checked(0, NON_NEGATIVE)  # stop after this many steps (0 = the full schedule)


@dataclass
class EmaConfig:
    target_tau: float = checked(0.99, PROBABILITY)  # tau_k = 1 - (1 - tau) (cos(pi k / K) + 1) / 2
    # the zero-debiased EMA of the online network that gets exported
    eval_tau: float = checked(0.999, PROBABILITY)


@dataclass
class TrainConfig:
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    # bf16 autocast + channels_last on the CPU too (fast with avx512_bf16/AMX)
    cpu_amp: bool = False
    compile: bool = False  # torch.compile the networks
    deterministic: bool = False
    log_every: int = checked(10, POSITIVE_INT)  # steps
    checkpoint_every: int = checked(500, POSITIVE_INT)  # steps; also at the end and on preemption
    # steps; effective rank of the embeddings (0 = off); a multiple
    rankme_every: int = checked(100, NON_NEGATIVE)
    #                                                 of log_every


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    seed: int = checked(0, NON_NEGATIVE)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: Optional[str] = checked(None, DEVICE)  # cuda | cpu; None picks cuda when available
