"""BatchNorm over the global batch of all processes, on any device.

torch's SyncBatchNorm runs on GPUs only; `GlobalBatchNorm` does the same on the CPU (gloo), so that a
multi-process CPU run normalises exactly as one process with the whole batch does. Per channel, over the
n = sum_r n_r values of all ranks,

    mean = sum_r S1_r / n,   var = sum_r S2_r / n - mean^2,   y = (x - mean) / sqrt(var + eps) * weight + bias,

with S1_r, S2_r the per-rank sums of x and x^2, all-reduced with autograd (the gradient flows to every rank's
inputs, as in SyncBatchNorm). The running statistics move by momentum towards (mean, var * n / (n - 1)).
`convert_sync_batchnorm` picks torch's SyncBatchNorm on CUDA and this elsewhere.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d / 2d whose training statistics are those of the batch gathered over all processes."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import torch.distributed.nn.functional as dist_fn
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        local = torch.cat([x.sum(dims), x.square().sum(dims),
                           torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)])
        total = dist_fn.all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in `module` synchronised over processes: torch's SyncBatchNorm on CUDA, GlobalBatchNorm
    elsewhere (parameters and running statistics carried over)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted.to(device=next(module.buffers(), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
