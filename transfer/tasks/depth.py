"""Monocular depth estimation transfer in plain PyTorch (BYOL appendix D.6, after Laina et al. 2016,
FCRN).

The backbone's last stage (stride 32) -> 1x1 conv to 1024 channels -> 4 up-projection blocks (512,
256, 128, 64 channels, each x2) -> 3x3 conv to one channel -> bilinear resize to the input
resolution. Trained with the reverse Huber (berHu) loss on valid pixels (ground truth > 0):

    berHu(x) = |x|                    if |x| <= c
             = (x^2 + c^2) / (2c)     otherwise,        c = 0.2 max |x| over the batch

Metrics pooled over all valid pixels of the test set (as Laina's and BYOL's tables): pct of pixels
with
max(d/d*, d*/d) < 1.25^n (n = 1, 2, 3), rms = sqrt(mean (d - d*)^2), rel = mean |d - d*| / d*,
log10 = mean |log10 d - log10 d*|.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from common.checks import NON_NEGATIVE, POSITIVE_INT, checked, each, greater_than, one_of
from common.distributed import check_global_batch, detect, init_distributed
from common.errors import UserError
from common.files import remove_partial_writes
from common.rundir import Progress, pick_device
from common.schedule import cosine_schedule
from common.seeds import derive_seed
from pretrain.batch_augment import adjust_brightness, adjust_hue, adjust_saturation, grayscale
from pretrain.networks import feature_width
from pretrain.sync_batchnorm import convert_sync_batchnorm
from transfer.nyu import NyuRawFrames, build_depth_dataset
from transfer.runner import TaskResult
from transfer.tasks.contract import TaskConfig

log = logging.getLogger("transfer")


# -------------------------------------------------------------------------------------------- model


def unpool(x: Tensor) -> Tensor:
    """Laina's 2x unpooling: each value to the top-left of its 2x2 block, zeros elsewhere."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, 2 * h, 2 * w)
    out[:, :, ::2, ::2] = x
    return out


def unpooled_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(unpool(x)) for a 5x5 conv with padding 2, without the zeros (Laina et al.'s fast
    up-convolution).

    Three of the four unpooled positions are zero, so the product is a transposed convolution of x
    itself, stride 2, with the kernel flipped and its channel axes swapped:

        conv2d(unpool(x), W, padding=2) = conv_transpose2d(x, flip(W)^T, stride=2, padding=2, output_padding=1)

    (left padding 5 - 1 - 2 = 2 as the conv's; the unpooled map's trailing zero row / column is output_padding).
    A quarter of the multiply-adds; the same parameters, so checkpoints are unchanged."""
    weight = conv.weight.flip(2, 3).transpose(0, 1)
    return F.conv_transpose2d(x, weight, conv.bias, stride=2, padding=2, output_padding=1)


class UpProjection(nn.Module):
    """unpool -> [5x5 conv, BN, ReLU, 3x3 conv, BN] + [5x5 conv, BN] -> ReLU (Laina et al., figure
    2c); the
    unpooling and the 5x5 convs are computed together (unpooled_conv)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        main = self.main[1:](unpooled_conv(x, self.main[0]))
        shortcut = self.shortcut[1:](unpooled_conv(x, self.shortcut[0]))
        return F.relu(main + shortcut)


class FCRN(nn.Module):
    """A torchvision ResNet trunk (up to layer4) and the up-projection decoder; output [N, 1, H,
    W] in metres."""

    def __init__(self, backbone: nn.Module, width: int):
        super().__init__()
        self.backbone = backbone
        self.reduce = nn.Sequential(nn.Conv2d(width, 1024, 1, bias=False), nn.BatchNorm2d(1024))
        self.decoder = nn.Sequential(
            UpProjection(1024, 512),
            UpProjection(512, 256),
            UpProjection(256, 128),
            UpProjection(128, 64),
        )
        self.predict = nn.Conv2d(64, 1, 3, padding=1)

    def features(self, x: Tensor) -> Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, images: Tensor) -> Tensor:
        depth = self.predict(self.decoder(self.reduce(self.features(images))))
        return F.interpolate(depth, size=images.shape[-2:], mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------ loss, metrics


def berhu_loss(prediction: Tensor, target: Tensor, world_size: int = 1) -> Tensor:
    """Reverse Huber over the valid pixels (target > 0) of the global batch, threshold c = 0.2 max
    |error|.

    Under several processes the maximum and the count of valid pixels are those of all ranks'
    batches, and the sum is scaled by the world size because DDP averages the ranks' gradients: the
    gradient is then the one process's gradient on the whole batch."""
    valid = target > 0
    error = (prediction - target)[valid].abs()
    count = valid.sum().to(prediction.dtype)
    largest = error.max().detach() if error.numel() else prediction.new_zeros(())
    if world_size > 1:
        dist.all_reduce(count)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if count == 0:
        return prediction.sum() * 0
    c = (0.2 * largest).clamp_min(1e-6)
    return torch.where(error <= c, error, (error**2 + c**2) / (2 * c)).sum() * (world_size / count)


def depth_sums(prediction: Tensor, target: Tensor, min_depth: float = 1e-3) -> Tensor:
    """Over the valid pixels (target > 0) of one image, float64: [n, #(ratio < 1.25), #(< 1.25^2),
    #(< 1.25^3),
    sum (d - d*)^2, sum |d - d*| / d*, sum |log10 d - log10 d*|], predictions clamped at min_depth.
    """
    valid = target > 0
    d, t = prediction[valid].clamp_min(min_depth).double(), target[valid].double()
    ratio = torch.maximum(d / t, t / d)
    return torch.stack(
        [
            torch.tensor(float(d.numel()), dtype=torch.float64),
            (ratio < 1.25).sum().double(),
            (ratio < 1.25**2).sum().double(),
            (ratio < 1.25**3).sum().double(),
            ((d - t) ** 2).sum(),
            ((d - t).abs() / t).sum(),
            (torch.log10(d) - torch.log10(t)).abs().sum(),
        ]
    )


def metrics_from_sums(sums: Tensor) -> dict[str, float]:
    """The standard metrics pooled over all valid pixels the sums cover (of one image, or of the
    test set):
    delta_n in %, rms = sqrt(mean (d - d*)^2), rel = mean |d - d*| / d*, log10 = mean |log10 d - log10 d*|."""
    n = sums[0].item()
    return {
        "delta1": 100 * sums[1].item() / n,
        "delta2": 100 * sums[2].item() / n,
        "delta3": 100 * sums[3].item() / n,
        "rms": (sums[4].item() / n) ** 0.5,
        "rel": sums[5].item() / n,
        "log10": sums[6].item() / n,
    }


def depth_metrics(prediction: Tensor, target: Tensor, min_depth: float = 1e-3) -> dict[str, float]:
    """The standard metrics over the valid pixels (target > 0) of one image."""
    return metrics_from_sums(depth_sums(prediction, target, min_depth))


# ------------------------------------------------------------------------------------------- data


def draw_colour() -> dict[str, Tensor]:
    """One image's colour augmentation of the protocol (BYOL D.6, TensorFlow's image ops), from the
    global RNG: grayscale with p 0.3, brightness shift delta in [-0.1255, 0.1255], saturation factor
    in [0.5, 1.5], hue shift
    in [-0.2, 0.2] (a fraction of the hue circle)."""
    return {
        "gray": torch.rand(1) < 0.3,
        "brightness": torch.empty(1).uniform_(-0.1255, 0.1255),
        "saturation": torch.empty(1).uniform_(0.5, 1.5),
        "hue": torch.empty(1).uniform_(-0.2, 0.2),
    }


def colour(rgb: Tensor, draws: dict[str, Tensor]) -> Tensor:
    """[3, H, W] in [0, 1]: grayscale (when drawn), then x + delta, the saturation scaled in HSV,
    the hue
    shifted, each clipped to [0, 1] (pretrain.batch_augment's official ops, on a batch of one)."""
    x = rgb[None]
    if bool(draws["gray"]):
        x = grayscale(x).expand(-1, 3, -1, -1)
    x = adjust_brightness(x.clone(), draws["brightness"])
    x = adjust_saturation(x, draws["saturation"])
    return adjust_hue(x, draws["hue"])[0]


class DepthPairs(torch.utils.data.Dataset):
    """(image, depth) -> resized, centre-cropped (eval) or augmented (train: flip, colour) float
    tensors; the
    augmentation of image i in epoch e is drawn from (seed, e, i), whichever process or worker reads
    it."""

    def __init__(
        self, dataset, resize: tuple[int, int], crop: tuple[int, int], train: bool, seed: int
    ):
        self.dataset, self.resize, self.crop, self.train, self.seed = (
            dataset,
            tuple(resize),
            tuple(crop),
            train,
            seed,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rgb, depth = self.dataset[index]
        (w, h), (cw, ch) = self.resize, self.crop
        if rgb.shape[-2:] != (h, w):
            rgb = TF.resize(rgb, [h, w], antialias=True)
            depth = F.interpolate(depth[None, None], size=(h, w), mode="nearest")[0, 0]
        top, left = (h - ch) // 2, (w - cw) // 2
        rgb, depth = (
            rgb[:, top : top + ch, left : left + cw].float() / 255,
            depth[top : top + ch, left : left + cw],
        )
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "task.views", self.epoch, index))
                if torch.rand(()) < 0.5:
                    rgb, depth = rgb.flip(-1), depth.flip(-1)
                rgb = colour(rgb, draw_colour())
        image = TF.normalize(rgb, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        return image, depth.float()


# ------------------------------------------------------------------------------------------ config


@dataclass
class DepthData:
    # folder: NYU-style, what `transfer scenes` writes
    kind: str = checked("folder", one_of("folder", "nyu_mat"))
    # NYU raw frames ('sync' layout) to train on; empty: the labelled train split
    raw_root: str = ""
    root: str = "runs/scenes/nyu"  # the folder, or nyu_depth_v2_labeled.mat
    splits_file: str = ""  # nyu_mat: splits.mat
    train_split: str = "train"
    test_split: str = "val"
    # (w, h): NYU frames are halved, 640x480 -> 320x240
    resize: tuple[int, int] = checked((128, 128), each(POSITIVE_INT, 2))
    crop: tuple[int, int] = checked((128, 128), each(POSITIVE_INT, 2))  # (w, h): NYU: 304 x 228
    num_workers: int = checked(1, NON_NEGATIVE)


@dataclass
class Config(TaskConfig):
    run_dir: str = "runs/depth"
    data: DepthData = field(default_factory=DepthData)
    steps: int = checked(300, POSITIVE_INT)
    # the global batch, split over the processes
    batch_size: int = checked(8, POSITIVE_INT)
    # SGD momentum 0.9, cosine decay
    lr: float = checked(0.01, greater_than(0))
    weight_decay: float = checked(5e-4, NON_NEGATIVE)
    checkpoint_every: int = checked(100, POSITIVE_INT)
    log_every: int = checked(50, POSITIVE_INT)
    # bfloat16 autocast on GPUs (the loss and metrics stay in float32)
    bf16: bool = True


def global_batches(length: int, batch_size: int, seed: int, epoch: int) -> Tensor:
    """[batches, batch_size] sample indices of one epoch: a seeded permutation, the last partial
    batch dropped."""
    order = torch.randperm(
        length, generator=torch.Generator().manual_seed(derive_seed(seed, "task.order", epoch))
    )
    return order[: length // batch_size * batch_size].view(-1, batch_size)


def train_and_evaluate(
    config: Config, backbone, run_dir: Path, device, save: bool = True
) -> dict[str, float]:
    """Train the FCRN head and the backbone; return the test metrics. Resumes from
    run_dir/depth_last.pt (which rank 0 writes, when `save`).

    `batch_size` is the global batch: under W processes each step's batch is the one a single
    process would take, split in W slices; BatchNorm runs over the global batch (SyncBatchNorm /
    GlobalBatchNorm) and DDP averages the gradients, so the run follows the one-process run up to
    float noise."""

    d = config.data
    processes = detect()
    world, rank = processes.world_size, processes.rank
    train_set = DepthPairs(training_frames(d), d.resize, d.crop, True, config.seed)
    test_set = DepthPairs(
        build_depth_dataset(d.kind, d.root, d.test_split, d.splits_file),
        d.resize,
        d.crop,
        False,
        config.seed,
    )
    log.info(
        "depth: training on %d %s frames, testing on %d",
        len(train_set),
        "raw" if d.raw_root else "labelled",
        len(test_set),
    )
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.bf16
    )
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the depth training split has {len(train_set)} images, fewer than one batch of "
            f"{config.batch_size}; lower batch_size"
        )
    torch.manual_seed(derive_seed(config.seed, "task.init"))
    model = FCRN(backbone.model(), feature_width(backbone.arch)).to(device)
    if processes.is_distributed:
        model = convert_sync_batchnorm(model, device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
    )
    schedule = cosine_schedule(optimizer, config.steps)
    saved = Progress(
        run_dir / "depth_last.pt", "step", model=model, optimizer=optimizer, schedule=schedule
    )
    if save:  # rank 0 alone writes it; a killed write leaves a .tmp of 400 MB at ResNet-18
        remove_partial_writes(run_dir, log, "depth_last.pt")
    step = saved.restore()
    if step:
        log.info("depth: resuming at step %d of %d", step, config.steps)
    trained = model
    if processes.is_distributed:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    progress = tqdm(
        total=config.steps, initial=step, desc="depth", disable=rank != 0 or not sys.stderr.isatty()
    )
    model.train()
    share = config.batch_size // world
    while step < config.steps:
        epoch, first = divmod(step, steps_per_epoch)
        train_set.epoch = epoch
        mine = global_batches(len(train_set), config.batch_size, config.seed, epoch)[
            first:, rank * share : (rank + 1) * share
        ]
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=mine.tolist(), num_workers=d.num_workers
        )
        for images, depths in loader:
            with autocast:
                prediction = trained(images.to(device))[:, 0]
            loss = berhu_loss(prediction.float(), depths.to(device), world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            progress.update(1)
            if step % config.log_every == 0:
                log.info(
                    "depth: step %d/%d berHu %.4f",
                    step,
                    config.steps,
                    _mean_over_ranks(loss.detach() / world),
                )
            if save and (step % config.checkpoint_every == 0 or step == config.steps):
                saved.save(step)
            if step >= config.steps:
                break
    progress.close()
    return evaluate(model, test_set, device, autocast)


def training_frames(d: DepthData):
    return (
        NyuRawFrames(d.raw_root)
        if d.raw_root
        else build_depth_dataset(d.kind, d.root, d.train_split, d.splits_file)
    )


def _mean_over_ranks(value: Tensor) -> float:
    """The sum over ranks of each rank's share of the global loss: the global batch's loss."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value.item()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device, autocast=None) -> dict[str, float]:
    """The metrics pooled over all valid pixels of the test set; under W processes rank r scores
    images r,
    r + W, ... and the sums are added over ranks."""

    processes = detect()
    model.eval()
    sums = torch.zeros(7, dtype=torch.float64)
    for index in range(processes.rank, len(dataset), processes.world_size):
        image, depth = dataset[index]
        with autocast or contextlib.nullcontext():
            prediction = model(image[None].to(device))[0, 0].float().cpu()
        sums += depth_sums(prediction, depth)
    if processes.is_distributed:
        dist.all_reduce(sums)
    return metrics_from_sums(sums)


# ------------------------------------------------------------------------------------------- task

EXAMPLES = """\
examples:
  python -m transfer scenes --out runs/scenes
  python -m transfer depth --backbone runs/fm/checkpoints/last.pt --config configs/transfer/depth_scenes.yaml
  python -m transfer depth --backbone r50.pth --config configs/transfer/depth_nyu.yaml
Keys and defaults: transfer/tasks/depth.py (Config)."""


def prepare(config: Config) -> None:
    check_global_batch("batch_size", config.batch_size, detect().world_size)
    d = config.data
    for split in (d.train_split, d.test_split):
        build_depth_dataset(d.kind, d.root, split, d.splits_file)
    if d.raw_root:
        NyuRawFrames(d.raw_root)


def run(config: Config, backbone, task_run, data) -> TaskResult:
    d = config.data
    processes = init_distributed()
    metrics = train_and_evaluate(
        config, backbone, task_run.run_dir, pick_device(config.device), processes.rank == 0
    )
    return TaskResult(
        metrics,
        f"{d.kind}:{Path(d.root).name}",
        f"fcrn up-projection, berHu, {config.steps} steps",
        {"world_size": processes.world_size, "train_frames": "raw" if d.raw_root else "labelled"},
    )
