"""BatchNorm over the global batch of all processes, on any device.

torch's SyncBatchNorm runs on GPUs only; `GlobalBatchNorm` does the same on the CPU (gloo), so that
a multi-process CPU run normalises exactly as one process with the whole batch does. Per channel,
over the
n = sum_r n_r values of all ranks, from each rank's count n_r, mean m_r and sum of squared deviations Q_r
(Chan et al.'s pairwise combination, stable where E[x^2] - E[x]^2 is not):

    mean = sum_r n_r m_r / n,   var = sum_r (Q_r + n_r (m_r - mean)^2) / n,
    y = (x - mean) / sqrt(var + eps) * weight + bias,

the per-rank statistics all-gathered with autograd (the gradient flows to every rank's inputs, as in
SyncBatchNorm). The running statistics move by momentum towards (mean, var * n / (n - 1)).
`convert_sync_batchnorm` picks torch's SyncBatchNorm on CUDA and this elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d / 2d whose training statistics are those of the batch gathered over all
    processes."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: Tensor) -> Tensor:
        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        local_mean = x.mean(dims)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        local_q = (x - local_mean.view(shape)).square().sum(dims)
        local_n = torch.full((channels,), x.numel() // channels, dtype=x.dtype, device=x.device)
        counts, means, qs = torch.stack(
            dist_fn.all_gather(torch.stack([local_n, local_mean, local_q]))
        ).unbind(1)
        count = counts.sum(0)
        mean = (counts * means).sum(0) / count
        var = (qs + counts * (means - mean).square()).sum(0) / count
        count = count[0]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in `module` synchronised over processes: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm
    elsewhere (the same parameter and buffer objects, so an optimizer made before still updates
    them)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        converted = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        ).to(device)
        for name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            # the same objects, as torch's conversion: an optimizer keeps them
            setattr(converted, name, tensor)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
