"""Every seed the project derives from a run's seed, in one table.

A run has one seed (config.seed). Each random stream in it (the views of an image in an epoch, the
order of an epoch, the kernel draws of a step, a labelled subset) gets its own seed, a linear
function of the run seed and the stream's keys:

    derive_seed(seed, stream, k_1, ..., k_n) = (offset + c_0 seed + c_1 k_1 + ... + c_n k_n) mod 2^63

with (c_0, c_1, ..., c_n) and the offset from STREAMS[stream]. The coefficients are those each
stream was first written with, so every checkpoint and table made before this table existed is
reproduced bit for bit; the multipliers are primes (or products of primes) much larger than any key,
so that within one stream two keys of realistic size (epochs, steps, indices below the next
multiplier) never share a seed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stream:
    coefficients: tuple[int, ...]  # c_0 (the run seed's), then one per key
    offset: int = 0
    keys: tuple[str, ...] = ()  # what each key is, for the error message and the docs


STREAMS: dict[str, Stream] = {
    # pretraining (pretrain/)
    # weights, projector, predictor
    "pretrain.init": Stream((1,)),
    "pretrain.views": Stream((1_000_003 * 100_000_007, 100_000_007, 1), keys=("epoch", "index")),
    "pretrain.order": Stream((7_919, 1), keys=("epoch",)),
    "pretrain.kernel_draws": Stream((1_000_003 * 65_537, 65_537, 1), keys=("step", "draw")),
    # batch-wise colour, blur, solarize
    "pretrain.photometric": Stream((1_000_003 * 1_009, 1_009), keys=("step",)),
    "supervised.order": Stream((7_919, 1), keys=("epoch",)),
    "supervised.views": Stream((1_000_003, 1), keys=("step",)),
    # transfer tasks (transfer/)
    # a head, a decoder
    "task.init": Stream((1,)),
    # augmentation of a sample
    "task.views": Stream((1_000_003, 100_003, 1), keys=("epoch", "index")),
    "task.order": Stream((7_919, 1), keys=("epoch",)),
    "linear.order": Stream((1_000, 1), keys=("epoch",)),
    # a held-out or labelled subset
    "task.split": Stream((1,), offset=7_777),
}


def derive_seed(seed: int, stream: str, *keys: int) -> int:
    """The seed of one random stream of a run: see the module's docstring for the formula and
    STREAMS."""
    if stream not in STREAMS:
        raise KeyError(f"unknown seed stream '{stream}'; the streams are {', '.join(STREAMS)}")
    spec = STREAMS[stream]
    if len(keys) != len(spec.coefficients) - 1:
        raise TypeError(
            f"seed stream '{stream}' takes {len(spec.coefficients) - 1} keys "
            f"({', '.join(spec.keys) or 'none'}), got {len(keys)}"
        )
    value = spec.offset + sum(c * int(k) for c, k in zip(spec.coefficients, (seed, *keys)))
    return value % (2**63)
