"""SSL-HSIC pretraining on the engine: `train(config)`, and `Pretrainer`, the engine of the SSL-HSIC
method (pretrain/methods/ssl_hsic.py) with the method's networks and steps reachable as attributes.

Run directory: config.yaml, checkpoints/last.pt (atomic; previous.pt), events (TensorBoard),
history.jsonl, log.txt, metrics.json. Rerunning resumes from checkpoints/last.pt and ends with the
same weights as an uninterrupted run."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from common.distributed import shutdown_distributed
from pretrain.engine import Engine
from pretrain.methods.ssl_hsic import (  # noqa: F401
    SSLHSIC,
    OnlineOnBothViews,
    TrainingDiverged,
    draws_per_rank,
    gather,
)

RESUMABLE_CHANGES = SSLHSIC.may_change


class Pretrainer(Engine):
    """The SSL-HSIC engine. Attributes it does not have are the method's (online, target, ema,
    loss_fn, ...);
    `train_step(view1, view2, labels)` takes one step at the engine's position and moves it on."""

    def __init__(self, config: DictConfig):
        super().__init__(SSLHSIC, config)

    def __getattr__(self, name: str):
        method = self.__dict__.get("method")
        if method is None:
            raise AttributeError(name)
        return getattr(method, name)

    def _loader(self, epoch: int, start_batch: int):
        return self.method.loader(epoch, start_batch)

    def _views(self, batch: dict):
        return self.method.views(batch, self.step)

    def train_step(self, view1, view2, labels=None) -> dict[str, float]:
        stats = self.method.update(view1, view2, labels, step=self.step)
        self.step += 1
        return stats


def train(config: DictConfig) -> dict[str, Any]:
    metrics = Pretrainer(config).run()
    shutdown_distributed()
    return metrics
