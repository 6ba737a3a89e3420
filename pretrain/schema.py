"""The pretraining config schema. Defaults are the small Fashion-MNIST config; the ImageNet values (docs/loss.md)
live in configs/pretrain/imagenet_resnet50.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"          # fashion_mnist | imagefolder
    root: str = "/usr/share/datasets/fashion-mnist"
    split: str = "train"                    # imagefolder: the sub-folder to read (train/...)
    image_size: int = 32                    # crop size of the views
    num_workers: int = 2
    on_corrupt: str = "error"               # error | skip: what a corrupt or unreadable image does
    limit: int = 0                          # use only the first N images (0 = all); for quick trials


@dataclass
class AugmentConfig:
    """BYOL's two-view augmentation; each pair is (view 1, view 2)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batched: bool = False                   # colour, blur, solarize per batch on the training device (the
    #                                         workers only crop and flip): pretrain/batch_augment.py. For GPUs
    #                                         and small images; on a CPU at 224 the per-image path is faster


@dataclass
class ModelConfig:
    backbone: str = "resnet18"              # resnet18 | resnet34 | resnet50 (torchvision, unchanged)
    projector_hidden: int = 4096
    embedding_dim: int = 256                # d: the projection the loss sees
    predictor_hidden: int = 4096
    use_target: bool = True                 # False: the paper's no-target variant (no predictor, no EMA target)
    sync_bn: bool = True                    # SyncBatchNorm when distributed


@dataclass
class LossConfig:
    num_features: int = 512                 # D, random Fourier features
    gamma: float = 3.0
    kernel: str = "imq"                     # imq | gaussian
    estimator: str = "rff"                  # rff | exact
    init_scale: float = 1.0
    scale_lr: float = 3e-4                  # Adam on the kernel bandwidth


@dataclass
class OptimConfig:
    name: str = "lars"                      # lars | sgd | adamw
    batch_size: int = 4096                  # global
    base_lr: float = 0.4                    # lr = base_lr * batch_size / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    eta: float = 1e-3                       # LARS trust coefficient
    epochs: int = 1000
    warmup_epochs: float = 10.0
    max_steps: int = 0                      # stop after this many steps (0 = the full schedule)


@dataclass
class EmaConfig:
    target_tau: float = 0.99                # tau_k = 1 - (1 - tau) (cos(pi k / K) + 1) / 2
    eval_tau: float = 0.999                 # the EMA of the online network that gets exported


@dataclass
class TrainConfig:
    amp: bool = True                        # bf16 autocast on CUDA
    channels_last: bool = True              # on CUDA
    cpu_amp: bool = False                   # bf16 autocast + channels_last on the CPU too (fast with avx512_bf16/AMX)
    compile: bool = False                   # torch.compile the networks
    deterministic: bool = False
    log_every: int = 10                     # steps
    checkpoint_every: int = 500             # steps; also at the end and on preemption
    rankme_every: int = 100                 # steps; effective rank of the embeddings (0 = off); a multiple of log_every


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: Optional[str] = None            # cuda | cpu; None picks cuda when available
