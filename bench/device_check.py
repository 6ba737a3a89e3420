"""The GPU device check: one command, at most 8 minutes on one H200, from a bare machine; one
markdown table.

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 bench/device_check.py --out $OUT/device_check.md

(bench/device_check.sh runs both; scripts/device_wheels.sh fills .whl/ on a machine with the
registries; docs/gpu.md.) The machine needs torch, torchvision, numpy, scipy, scikit-learn and
Pillow; .whl/ carries the rest (omegaconf, PyYAML, tqdm, tensorboard for the trainer's event files).
Each row runs a few steps of this project's own code and asserts what it claims; a failing row is
recorded and the others go on; the exit status is 1 when a row failed.

* SSL-HSIC's pretraining step (bench/pretrain_step.py: the trainer's step with SGD) on ResNet-50 at
  224 px in fp32, bf16 + channels_last, and bf16 + channels_last + torch.compile (a child process
  with its own time cap), at the largest of --batches that fits: images/s, the loss + bandwidth
  objective's share of the step (timed apart on the step's features), peak memory; asserts finite
  losses and parameters that move.
* BYOL's step written the same way (no lightly on the machine): images/s at the same batch, for the
  ratio.
* Two processes on the one GPU against one process with loss.total_draws=2 (tests/test_fidelity.py's
  check with the trainer itself: SyncBatchNorm in the online and target networks, the bandwidth
  gradient all-reduced): NCCL when it accepts two ranks on one device, else gloo with CUDA tensors;
  asserts the weights agree (1e-3 relative; fp32, TF32 off) and the ranks' weights bitwise.
* linear, kNN, finetune, classify and depth through transfer.runner.run_task (the tasks' own code
  end to end) on generated data, at the protocol's batch per GPU (configs/transfer/*_imagenet.yaml,
  classify_kornblith.yaml, depth_nyu.yaml; configs/slurm/cluster.yaml's GPUs per task): images/s end
  to end, peak memory, finite metrics.
* segmentation and detection when mmsegmentation / detectron2 import (not carried to a bare
  machine).

--device cpu --tiny runs the same rows small (ResNet-18, 32 px, batch 8, tiny heads; compile skipped): what
tests/test_device_check.py runs. --device cuda (the default) refuses on one line on a machine
without CUDA."""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import gzip
import json
import math
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (id, what the table calls it); the table lists them in this order
ROWS = [
    ("ssl-fp32", "SSL-HSIC step, fp32"),
    ("ssl-bf16", "SSL-HSIC step, bf16 + channels_last"),
    ("ssl-compile", "SSL-HSIC step, bf16 + channels_last + torch.compile"),
    ("byol-fp32", "BYOL step (plain torch), fp32"),
    ("byol-bf16", "BYOL step (plain torch), bf16 + channels_last"),
    ("two-process", "2 processes on one device = 1 process with 2 draws (trainer)"),
    ("linear", "linear (feature extraction + classifier)"),
    ("knn", "kNN (feature extraction)"),
    ("finetune", "finetune"),
    ("classify", "classify (finetune protocol)"),
    ("depth", "depth"),
    ("segmentation", "segmentation (mmsegmentation)"),
    ("detection", "detection (detectron2)"),
]
# the order the rows run in: the long torch.compile last, so that a slow compile cannot crowd out
# the others
RUN_ORDER = [
    "ssl-fp32",
    "ssl-bf16",
    "byol-fp32",
    "byol-bf16",
    "two-process",
    "linear",
    "knn",
    "finetune",
    "classify",
    "depth",
    "segmentation",
    "detection",
    "ssl-compile",
]


class CheckFailed(Exception):
    """An assertion of a row did not hold: the one-line reason."""


class NotRun(Exception):
    """The row cannot run here: the one-line reason."""


@dataclass
class Result:
    row: str
    status: str = "not run: pending"
    images_per_s: float | None = None
    memory_gib: float | None = None
    notes: str = ""


@dataclass
class Settings:
    device: str
    tiny: bool
    arch: str
    size: int
    heads: tuple[int, int, int]
    num_features: int
    batches: list[int]
    warmup: int
    timed: int
    step_cap_s: float  # timing of one precision's steps stops after this long
    compile_cap_s: float  # the compile row's child process is killed after this long
    work: Path
    deadline: float  # time.monotonic() after which rows are not started
    workers: int = 0
    cache: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# -----------------------------------------------------------------------------------------------
# helpers


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (CheckFailed, NotRun)):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 240 else text[:237] + "..."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides() -> list[str]:
    """TINY of tests/helpers.py, the tiny pretraining run of the CPU test (read, not imported:
    no pytest here)."""
    tree = ast.parse((ROOT / "tests" / "helpers.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "TINY" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise CheckFailed("tests/helpers.py no longer defines TINY")


# -------------------------------------------------------------------------------------------
# generated data


def write_idx(path: Path, array) -> None:
    """An IDX file as Fashion-MNIST's (uint8, big-endian dims), gzip'd: what
    pretrain.data.read_idx reads."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.tobytes())


def fashion_mnist(s: Settings, train: int = 1200, test: int = 400) -> Path:
    """Fashion-MNIST's four files with generated 28x28 images like its own: an object on a dark
    background, each image its own smooth texture (7x7 random values upsampled) inside an ellipse
    whose size, shape and brightness depend on the class (a task the networks can learn a little);
    labels balanced; written once per check. The background is noisy, not black: with flat black
    backgrounds (and with ten fixed class templates) the tiny pretraining run of the two-process row
    was chaotic, 1 and 2 processes ending 3e-3 and 1e-1 apart after 6 steps
    (2.7e-5 now; 2.4e-5 on the real Fashion-MNIST; the row now runs 3 steps, see row_two_processes).
    """
    if "fm" in s.cache:
        return s.cache["fm"]
    import numpy as np

    from pretrain.data import FASHION_MNIST_FILES

    rng = np.random.Generator(np.random.PCG64(0))
    shapes = rng.uniform(6, 13, (10, 2))  # ellipse half-axes per class
    levels = rng.uniform(120, 230, 10)  # mean brightness per class
    y, x = np.mgrid[0:28, 0:28]
    root = s.work / "fashion-mnist"
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
        coarse = torch.from_numpy(rng.normal(0, 40, (count, 1, 7, 7)).astype(np.float32))
        texture = torch.nn.functional.interpolate(
            coarse, size=(28, 28), mode="bicubic", align_corners=False
        )
        axes = shapes[labels] * rng.uniform(0.85, 1.15, (count, 2))
        centre = 13.5 + rng.uniform(-2, 2, (count, 2))
        inside = (
            ((x - centre[:, :1, None]) / axes[:, :1, None]) ** 2
            + ((y - centre[:, 1:, None]) / axes[:, 1:, None]) ** 2
        ) <= 1
        background = rng.uniform(0, 30, (count, 1, 1)) + rng.normal(0, 12, (count, 28, 28))
        images = np.clip(
            np.where(inside, levels[labels][:, None, None] + texture[:, 0].numpy(), background),
            0,
            255,
        )
        images_file, labels_file = FASHION_MNIST_FILES[split]
        write_idx(root / images_file, images.astype(np.uint8))
        write_idx(root / labels_file, labels)
    s.cache["fm"] = root
    return root


def depth_scenes(s: Settings, train: int, val: int, size: int) -> Path:
    """transfer.scenes' generated scenes (objects from the generated Fashion-MNIST) in the NYU
    folder layout."""
    from transfer.scenes import fashion_mnist_objects, generate, write_nyu

    fm = fashion_mnist(s)
    objects, labels = fashion_mnist_objects(str(fm), "train")
    root = s.work / "nyu"
    write_nyu(
        root,
        {
            "train": generate(train, size, 0, objects, labels),
            "val": generate(val, size, 1, objects, labels),
        },
    )
    return root


def all_scenes(s: Settings, train: int, val: int, size: int) -> dict[str, Path]:
    """Every layout transfer.scenes writes (VOC, COCO, ...): for segmentation and detection."""
    if "scenes" not in s.cache:
        from transfer.scenes import write_all

        s.cache["scenes"] = write_all(
            s.work / "scenes", train, val, size, 3, fashion_root=str(fashion_mnist(s))
        )
    return s.cache["scenes"]


# ------------------------------------------------------------------------------------------
# pretraining step


def measure_step(s: Settings, method: str, bf16: bool, compile: bool, batches: list[int]) -> dict:
    """Build the step at the first of `batches` whose warm-up fits in memory, time `s.timed` steps
    (within
    s.step_cap_s) and the loss's part on its own; assert finite losses and moved parameters."""
    from bench.pretrain_step import byol_step, ssl_hsic_step

    options = dict(compile=compile, heads=s.heads)
    if method == "ssl-hsic":
        build, options["num_features"] = ssl_hsic_step, s.num_features
    else:
        build = byol_step
    out_of_memory, step, started = [], None, time.monotonic()
    for batch in batches:
        free_memory(s.device)
        torch.manual_seed(0)
        try:
            step = build(s.arch, batch, s.size, s.device, bf16, **options)
            before = [p.detach().clone() for p in step.parameters]
            losses = [step.run() for _ in range(s.warmup)]
            sync(s.device)
            break
        except torch.cuda.OutOfMemoryError:
            out_of_memory.append(batch)
            # freed below, outside the handler (its traceback holds the tensors)
            step = before = losses = None
        if step is None:
            free_memory(s.device)
    else:
        raise CheckFailed(f"out of memory at every batch tried ({', '.join(map(str, batches))})")
    warmup_s = time.monotonic() - started
    sync(s.device)
    start, count = time.perf_counter(), 0
    while count < s.timed:
        losses.append(step.run())
        count += 1
        if time.perf_counter() - start > s.step_cap_s:
            break
    sync(s.device)
    step_s = (time.perf_counter() - start) / count
    loss_times = []
    for _ in range(max(2, count)):
        sync(s.device)
        tick = time.perf_counter()
        step.loss_part()
        sync(s.device)
        loss_times.append(time.perf_counter() - tick)
    values = [float(loss) for loss in losses]
    if not all(math.isfinite(v) for v in values):
        raise CheckFailed(f"a loss was not finite: {values}")
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, step.parameters))
    if moved == 0:
        raise CheckFailed("the steps left every parameter unchanged")
    result = {
        "batch": batch,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "loss_s": statistics.median(loss_times),
        "memory_gib": peak_gib(s.device),
        "losses": values,
        "out_of_memory": out_of_memory,
        "steps": count,
        "warmup_s": warmup_s,
        "moved": moved,
        "parameters": len(step.parameters),
    }
    del step, before, losses
    free_memory(s.device)
    return result


def step_notes(m: dict, batches: list[int], loss_name: str) -> str:
    tried = f" (largest fitting of {'/'.join(map(str, batches))})" if len(batches) > 1 else ""
    oom = (
        f"; out of memory at {', '.join(map(str, m['out_of_memory']))}"
        if m["out_of_memory"]
        else ""
    )
    return (
        f"batch {m['batch']}{tried}{oom}; {loss_name} {m['loss_s'] / m['step_s']:.1%} of a step "
        f"({m['loss_s'] * 1e3:.1f} of {m['step_s'] * 1e3:.0f} ms); loss {m['losses'][0]:.4f} "
        f"-> "
        f"{m['losses'][-1]:.4f} over {len(m['losses'])} steps; {m['moved']}/{m['parameters']} "
        f"tensors moved"
    )


def row_step(s: Settings, row: str, results: dict[str, Result]) -> Result:
    method = "ssl-hsic" if row.startswith("ssl") else "byol"
    bf16 = not row.endswith("fp32")
    batches = s.batches
    if method == "byol":  # at the batch SSL-HSIC ran at, for the ratio
        found = s.cache.get(f"ssl-hsic batch {'bf16' if bf16 else 'fp32'}")
        batches = [found] + [b for b in s.batches if b < found] if found else s.batches
    m = measure_step(s, method, bf16, False, batches)
    s.cache[f"{method} {'bf16' if bf16 else 'fp32'}"] = m
    if method == "ssl-hsic":
        s.cache[f"ssl-hsic batch {'bf16' if bf16 else 'fp32'}"] = m["batch"]
    notes = step_notes(
        m, batches, "loss + bandwidth objective" if method == "ssl-hsic" else "cosine loss"
    )
    if method == "byol":
        ssl = s.cache.get(f"ssl-hsic {'bf16' if bf16 else 'fp32'}")
        if ssl and ssl["batch"] == m["batch"]:
            notes += f"; SSL-HSIC / BYOL images/s = {ssl['images_per_s'] / m['images_per_s']:.3f}"
    if not bf16 and s.cuda:
        notes += "; fp32 = torch's defaults (cuDNN convolutions may use TF32)"
    return Result(row, "ok", m["images_per_s"], m["memory_gib"], notes)


def row_compile(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """bf16 + channels_last + torch.compile (OnlineOnBothViews compiled, as train.compile) in a
    child process killed after
    s.compile_cap_s, at the batch the eager bf16 step ran at."""
    if not s.cuda:
        raise NotRun(
            "torch.compile is checked on CUDA only (on a CPU its C++ build of the step takes "
            "minutes)"
        )
    batch = s.cache.get("ssl-hsic batch bf16") or s.batches[-1]
    cap = min(s.compile_cap_s, s.deadline - time.monotonic() - 5)
    if cap < 60:
        raise NotRun(f"{cap:.0f} s left of the check's time budget, too few for torch.compile")
    out = s.work / "compile.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--row",
        "ssl-compile",
        "--batch",
        str(batch),
        "--device",
        s.device,
        "--json",
        str(out),
        "--work",
        str(s.work / "compile"),
    ]
    if s.tiny:
        command.append("--tiny")
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=cap, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise CheckFailed(
            f"torch.compile + {s.warmup + s.timed} steps did not finish within the {cap:.0f} s cap"
        ) from None
    if child.returncode != 0 or not out.exists():
        tail = [line for line in child.stderr.splitlines() if line.strip()][-1:] or [
            f"exit status {child.returncode}"
        ]
        raise CheckFailed(f"the compile child failed: {tail[0].strip()[:200]}")
    m = json.loads(out.read_text())
    notes = step_notes(m, [batch], "loss + bandwidth objective")
    notes += f"; compile + {s.warmup} warm-up steps {m['warmup_s']:.0f} s"
    eager = s.cache.get("ssl-hsic bf16")
    if eager and eager["batch"] == m["batch"]:
        notes += f"; {m['images_per_s'] / eager['images_per_s']:.2f}x the eager bf16 step"
    return Result(row, "ok", m["images_per_s"], m["memory_gib"], notes)


# ------------------------------------------------------------------------------------- two
# processes


def _set_up_process(device: str, threads: int | None) -> None:
    """Deterministic kernels need cuBLAS's fixed workspace; TF32 off so that fp32 rounding is the
    CPU test's."""
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if threads:
        torch.set_num_threads(threads)


def _pretrain_config(run_dir: Path, overrides: list[str]):
    from common.config import load_config
    from pretrain.schema import PretrainConfig

    return load_config(
        PretrainConfig,
        ROOT / "configs/pretrain/fashion_mnist_resnet18.yaml",
        [f"run_dir={run_dir}", *tiny_overrides(), *overrides],
    )


def _nccl_probe_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    value = torch.full((4,), float(rank + 1), device="cuda")
    dist.all_reduce(value)
    torch.cuda.synchronize()
    if value[0].item() != world * (world + 1) / 2:
        raise RuntimeError(f"NCCL all_reduce gave {value[0].item()}")
    dist.destroy_process_group()


def _rank_worker(
    rank: int,
    world: int,
    port: int,
    backend: str,
    device: str,
    run_dir: str,
    out_dir: str,
    overrides: list[str],
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    _set_up_process(device, 1 if device == "cpu" else None)
    from common.distributed import init_distributed, shutdown_distributed
    from pretrain.trainer import Pretrainer

    init_distributed(backend)  # the trainer's own init_distributed then finds the group made
    trainer = Pretrainer(_pretrain_config(Path(run_dir), overrides))
    trainer.run()
    online = {k: v.cpu() for k, v in trainer.online.state_dict().items()}
    torch.save(
        {"scale": trainer.loss_fn.scale.detach().cpu().clone(), "online": online},
        Path(out_dir) / f"rank{rank}.pt",
    )
    shutdown_distributed()


def _reference_worker(index: int, device: str, runs: list[tuple[str, list[str]]]) -> None:
    _set_up_process(device, None)
    from pretrain.trainer import train

    for run_dir, overrides in runs:
        train(_pretrain_config(Path(run_dir), overrides))


def spawn(fn, args: tuple, processes: int, timeout: float) -> str | None:
    """Run fn(i, *args) in `processes` spawned processes; None when all succeed, else the first
    failure in a line."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=processes, join=False, start_method="spawn")
    end = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > end:
                for process in context.processes:
                    process.kill()
                return f"did not finish within {timeout:.0f} s"
    except Exception as error:  # ProcessRaisedException / ProcessExitedException
        for process in context.processes:
            if process.is_alive():
                process.kill()
        lines = [line for line in str(error).splitlines() if line.strip()]
        return (lines[-1] if lines else type(error).__name__).strip()[:200]
    return None


def largest_relative_difference(a: dict, b: dict) -> tuple[float, str]:
    """max over floating-point tensors of max |a - b| / max |a| (tests/test_fidelity.py's
    measure)."""
    return max(
        (
            (a[k].float() - b[k].float()).abs().max().item()
            / (a[k].float().abs().max().item() + 1e-12),
            k,
        )
        for k in a
        if a[k].is_floating_point()
    )


def row_two_processes(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """tests/test_fidelity.py::test_two_processes_follow_one_process_with_two_draws on the
    check's device."""
    fm = fashion_mnist(s)
    work = s.work / "two-process"
    (work / "ranks").mkdir(parents=True, exist_ok=True)
    # one epoch, 3 steps: on the generated data and oneDNN's AVX2 kernels, 6 steps had grown the
    # float noise to 7.3e-3 (a BN bias); 3 steps end within 3.3e-5 on AVX2 and AVX-512 kernels
    # alike, 1 draw 0.74 away
    common = [f"data.root={fm}", f"device={s.device}", "optim.epochs=1"]
    # the CPU test's fp32 numerics: no bf16 autocast, no channels_last (the trainer's CUDA defaults)
    if s.cuda:
        common += ["train.amp=false", "train.channels_last=false"]
    backend, notes = "gloo", []
    if s.cuda:
        refused = spawn(_nccl_probe_worker, (2, free_port()), 2, 60)
        if refused is None:
            backend = "nccl"
        else:
            notes.append(f"NCCL refused two ranks on one GPU ({refused}): gloo with CUDA tensors")

    def runs(extra: list[str], tag: str) -> str | None:
        """The 2-process run, then the two 1-process runs; None, or what failed."""
        timeout = min(180.0, max(60.0, s.deadline - time.monotonic()))
        failed = spawn(
            _rank_worker,
            (
                2,
                free_port(),
                backend,
                s.device,
                str(work / f"two{tag}"),
                str(work / "ranks"),
                common + extra + ["loss.total_draws=2"],
            ),
            2,
            timeout,
        )
        if failed:
            return f"the 2-process run ({backend}) failed: {failed}"
        references = [
            (str(work / f"draws2{tag}"), common + extra + ["loss.total_draws=2"]),
            (str(work / f"draws1{tag}"), common + extra + ["loss.draws=1"]),
        ]
        # a fresh process: cuBLAS's deterministic workspace must be set before its first call
        if s.cuda:
            failed = spawn(_reference_worker, (s.device, references), 1, timeout)
            return f"the 1-process runs failed: {failed}" if failed else None
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:  # here, saving a process start; the trainer's train.deterministic is undone after
            _reference_worker(0, s.device, references)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        return None

    tag = ""
    failed = runs([], "")
    # a kernel without a deterministic implementation
    if failed and "deterministic" in failed.lower() and s.cuda:
        notes.append(
            f"train.deterministic=true failed on CUDA ({failed}); compared with "
            f"train.deterministic=false"
        )
        tag = "-nondeterministic"
        failed = runs(["train.deterministic=false"], tag)
    if failed:
        raise CheckFailed(failed)
    two, draws2, draws1 = (
        torch.load(
            work / f"{name}{tag}" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True
        )
        for name in ("two", "draws2", "draws1")
    )
    worst = max(
        largest_relative_difference(draws2[part], two[part]) + (part,)
        for part in ("online", "target", "ema")
    )
    if worst[0] >= 1e-3:
        raise CheckFailed(
            f"{worst[2]}.{worst[1]} differs by {worst[0]:.2e} between 2 processes and 1 process "
            f"with 2 "
            "draws (limit 1e-3)"
        )
    apart = largest_relative_difference(draws1["online"], two["online"])[0]
    if apart <= 10 * worst[0]:
        raise CheckFailed(
            f"one draw ends {apart:.2e} away, not clearly farther than 2 draws ({worst[0]:.2e}): "
            f"the "
            "check cannot tell them apart"
        )
    ranks = [torch.load(work / "ranks" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    if not torch.equal(ranks[0]["scale"], ranks[1]["scale"]):
        raise CheckFailed("the ranks' kernel bandwidths differ")
    if abs(ranks[0]["scale"].item() - draws2["loss"]["scale"].item()) > 1e-6:
        raise CheckFailed(
            f"the bandwidth {ranks[0]['scale'].item()} differs from 1 process's "
            f"{draws2['loss']['scale'].item()}"
        )
    unequal = [
        k
        for k in ranks[0]["online"]
        if not torch.equal(ranks[0]["online"][k], ranks[1]["online"][k])
    ]
    if unequal:
        raise CheckFailed(
            f"the ranks' online networks differ at {unequal[0]} (and {len(unequal) - 1} more)"
        )
    sync_bn = "SyncBatchNorm" if s.cuda else "GlobalBatchNorm"
    notes.insert(
        0,
        f"backend {backend}, {sync_bn} in online + target, bandwidth gradient all-reduced; 3 "
        f"steps: "
        f"weights within {worst[0]:.1e} of 1 process with 2 draws (limit 1e-3), 1 draw "
        f"{apart:.1e} away; "
        "ranks bitwise equal" + ("; fp32, TF32 off" if s.cuda else ""),
    )
    return Result(row, "ok", None, None, "; ".join(notes))


# -------------------------------------------------------------------------------------------
# transfer tasks


def run_transfer(
    s: Settings, task: str, config: str, overrides: list[str]
) -> tuple[dict, float, float | None]:
    """transfer.runner.run_task on a random-init backbone (stdout to stderr: the table keeps
    stdout); returns
    (metrics.json's record, wall seconds, peak GiB); asserts finite metrics."""
    from transfer.runner import run_task

    free_memory(s.device)
    start = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        record = run_task(
            task,
            f"random:{s.arch}",
            "ema",
            str(ROOT / "configs" / "transfer" / config),
            [f"run_dir={s.work / 'runs' / task}", f"device={s.device}", *overrides],
        )
    wall = time.monotonic() - start
    bad = {k: v for k, v in record["metrics"].items() if not math.isfinite(v)}
    if bad:
        raise CheckFailed(f"metrics not finite: {bad}")
    return record, wall, peak_gib(s.device)


def shown(metrics: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {metrics[k]:.3g}" for k in keys if k in metrics)


def row_classification(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """linear / knn: the ImageNet protocol's extraction batch (512 per process) and, for linear, its
    augmented
    epochs (features recomputed each epoch: InceptionCrop + flip) and SGD with the classifier's EMA.
    """
    fm = fashion_mnist(s)
    train, test = (1000, 400) if s.cuda and not s.tiny else (200, 100)
    epochs = 2 if row == "linear" else 0
    overrides = [
        f"data.root={fm}",
        "data.dataset=fashion_mnist",
        "data.train_split=train",
        "data.test_split=test",
        f"data.limit_train={train}",
        f"data.limit_test={test}",
        f"data.num_workers={s.workers}",
        f"cache_dir={s.work / 'features' / row}",
    ]
    if s.tiny:
        config = "linear_fashion_mnist.yaml"
        overrides += ["linear.epochs=1", "extract_batch_size=100"]
    else:
        config = "linear_imagenet.yaml"
        overrides += [f"linear.epochs={max(epochs, 1)}", "linear.warmup_steps=0"]
    record, wall, memory = run_transfer(s, row, config, overrides)
    augmented = row == "linear" and not s.tiny
    images = train + test + (epochs * train if augmented else 0)
    batch = 100 if s.tiny else 512
    notes = (
        f"{shown(record['metrics'], ('top1', 'top5'))} (random init, generated data); extraction "
        f"batch {batch}, "
        f"fp32 (the task has no bf16); {images} images in {wall:.1f} s end to end"
    )
    if augmented:
        notes += f", {epochs} augmented epochs recomputed"
    return Result(row, "ok", images / wall, memory, notes)


def row_finetune(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """The semi-supervised protocol's batch per GPU: 1024 over cluster.yaml's 8 GPUs = 128."""
    fm = fashion_mnist(s)
    if s.tiny:
        config, batch, train, test, fraction, heldout = (
            "finetune_fashion_mnist.yaml",
            16,
            400,
            100,
            0.2,
            40,
        )
        extra = ["finetune.eval_batch_size=100"]
    else:
        config, batch, train, test, fraction, heldout = (
            "finetune_imagenet.yaml",
            128,
            1200,
            400,
            0.25,
            100,
        )
        extra = ["data.subsets=balanced"]
    overrides = [
        f"data.root={fm}",
        "data.dataset=fashion_mnist",
        "data.train_split=train",
        "data.test_split=test",
        f"data.limit_train={train}",
        f"data.limit_test={test}",
        f"data.fractions=[{fraction}]",
        f"data.heldout={heldout}",
        f"finetune.batch_size={batch}",
        "finetune.lr_grid=[0.02]",
        "finetune.epochs_grid=[1]",
        f"images.num_workers={s.workers}",
        *extra,
    ]
    record, wall, memory = run_transfer(s, row, config, overrides)
    labelled = next(iter(record["fractions"].values()))["labelled_images"]
    images = labelled // batch * batch + heldout + test
    notes = (
        f"{shown(record['metrics'], tuple(record['metrics']))} (random init); batch {batch} per "
        f"GPU, fp32 (the "
        f"task has no bf16); 1 epoch on {labelled} labelled images, {images} images in "
        f"{wall:.1f} s end to end"
    )
    return Result(row, "ok", images / wall, memory, notes)


def row_classify(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """Kornblith's fine-tuning transfer on scikit-learn's digits: batch 256 over 8 GPUs = 32 per
    GPU, a few steps for the choice and the refit on train + val. Its linear protocol is left out:
    its GPU part is the linear row's cached_features, the rest an L-BFGS + Newton sweep over 45
    penalties on the CPU (27 s for 512-d features on
    this project's CPU machine; tests/test_classify.py checks it against scikit-learn)."""
    steps, batch = (2, 16) if s.tiny else (4, 32)
    config = "classify_digits.yaml" if s.tiny else "classify_kornblith.yaml"
    overrides = [
        "data.dataset=digits",
        'data.root=""',
        "protocols=[finetune]",
        f"finetune.batch_size={batch}",
        f"finetune.steps={steps}",
        "finetune.lr_grid=[0.01]",
        "finetune.weight_decay_grid=[0.0]",
        "finetune.checkpoint_steps=0",
        f"images.num_workers={s.workers}",
    ]
    record, wall, memory = run_transfer(s, row, config, overrides)
    sizes = record["sizes"]
    images = 2 * steps * batch + sizes["val"] + sizes["test"]
    notes = (
        f"{shown(record['metrics'], tuple(record['metrics']))} (random init); finetune protocol, "
        f"batch {batch} "
        f"per GPU, {steps} steps x 2 (choice, refit on train + val), fp32 (the task has no "
        f"bf16); {images} images "
        f"in {wall:.1f} s end to end; linear protocol not run (its L-BFGS sweep is CPU work)"
    )
    return Result(row, "ok", images / wall, memory, notes)


def row_depth(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """NYU's protocol: batch 256 over 4 GPUs = 64 per GPU, 304 x 228 crops, bf16 autocast."""
    if s.tiny:
        config, batch, steps, train, val, size = "depth_scenes.yaml", 4, 2, 8, 2, 64
        extra = ["data.resize=[64,64]", "data.crop=[64,64]"]
    else:
        config, batch, steps, train, val, size = "depth_nyu.yaml", 64, 3, 64, 8, 96
        extra = [
            'data.raw_root=""',
            "data.kind=folder",
            'data.splits_file=""',
            "data.train_split=train",
            "data.test_split=val",
            "lr=0.01",
        ]
    root = depth_scenes(s, train, val, size)
    overrides = [
        f"data.root={root}",
        f"batch_size={batch}",
        f"steps={steps}",
        f"data.num_workers={s.workers}",
        *extra,
    ]
    record, wall, memory = run_transfer(s, row, config, overrides)
    images = steps * batch + val
    precision = "bf16 autocast" if s.cuda else "fp32 (bf16 autocast is for GPUs)"
    notes = (
        f"{shown(record['metrics'], ('rms', 'rel', 'delta1'))} (random init); batch {batch} per "
        f"GPU, "
        f"{'304 x 228' if not s.tiny else '64 x 64'} crops, {precision}; {images} images in "
        f"{wall:.1f} s end "
        "to end" + ("; lr 0.01 (the protocol's 0.16 is for 7,500 steps)" if not s.tiny else "")
    )
    return Result(row, "ok", images / wall, memory, notes)


def frameworks(kind: str) -> None:
    """NotRun unless mmsegmentation (with mmcv's ops) / detectron2 import."""
    try:
        if kind == "segmentation":
            import mmcv.ops  # noqa: F401
            import mmseg  # noqa: F401
        else:
            from transfer.detectron2_glue import import_detectron2

            import_detectron2()
            import pycocotools  # noqa: F401
        import h5py  # noqa: F401  (transfer.scenes writes NYU's .mat with it)
    except Exception as error:
        what = "mmsegmentation" if kind == "segmentation" else "detectron2"
        raise NotRun(
            f"{what} does not import here ({one_line(error)[:80]}): mmsegmentation / detectron2 "
            f"CUDA builds "
            "are not carried"
        ) from None


def row_segmentation(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """FCN on the generated scenes at the VOC protocol's batch per GPU (16 over 4 GPUs = 4)."""
    frameworks("segmentation")
    scenes = all_scenes(s, 16, 4, 96)
    batch, iterations = (2, 2) if s.tiny else (4, 4)
    overrides = [
        f"data.root={scenes['voc']}",
        "data.scale=[96,96]",
        "data.crop=[64,64]",
        f"data.num_workers={s.workers}",
        f"schedule.iterations={iterations}",
        f"schedule.batch_size={batch}",
        f"schedule.checkpoint_interval={iterations}",
        "head_channels=32" if s.tiny else "head_channels=256",
    ]
    record, wall, memory = run_transfer(s, row, "segmentation_scenes.yaml", overrides)
    images = batch * iterations + 4
    return Result(
        row,
        "ok",
        images / wall,
        memory,
        f"{shown(record['metrics'], ('mIoU', 'aAcc'))} (random init); "
        f"batch {batch} per GPU, {iterations} iterations; {images} images in {wall:.1f} "
        f"s end to end",
    )


def row_detection(s: Settings, row: str, results: dict[str, Result]) -> Result:
    """Faster R-CNN FPN on the generated COCO-format scenes at the VOC protocol's batch per GPU
    (16 over 8 = 2)."""
    frameworks("detection")
    coco = all_scenes(s, 16, 4, 96)["coco"]
    batch, iterations = 2, (2 if s.tiny else 4)
    overrides = [
        f"data.train_json={coco / 'annotations' / 'instances_train.json'}",
        f"data.train_images={coco / 'train'}",
        f"data.test_json={coco / 'annotations' / 'instances_val.json'}",
        f"data.test_images={coco / 'val'}",
        f"data.num_workers={s.workers}",
        f"iterations={iterations}",
        f"batch_size={batch}",
        "warmup_iters=1",
        f"checkpoint_period={iterations}",
        "data.min_size_train=[96]",
        "data.min_size_test=96",
    ]
    record, wall, memory = run_transfer(s, row, "detection_scenes.yaml", overrides)
    images = batch * iterations + 4
    return Result(
        row,
        "ok",
        images / wall,
        memory,
        f"{shown(record['metrics'], ('bbox.AP', 'bbox.AP50'))} (random "
        f"init); batch {batch} per GPU, {iterations} iterations; {images} images in "
        f"{wall:.1f} s end to end",
    )


RUNNERS = {
    "ssl-fp32": row_step,
    "ssl-bf16": row_step,
    "ssl-compile": row_compile,
    "byol-fp32": row_step,
    "byol-bf16": row_step,
    "two-process": row_two_processes,
    "linear": row_classification,
    "knn": row_classification,
    "finetune": row_finetune,
    "classify": row_classify,
    "depth": row_depth,
    "segmentation": row_segmentation,
    "detection": row_detection,
}
# a row starts only with this much budget left (default 15)
MIN_SECONDS = {"two-process": 45, "ssl-compile": 60}


# --------------------------------------------------------------------------------------------------
# table


def environment(s: Settings) -> str:
    parts = [f"torch {torch.__version__}", f"python {sys.version.split()[0]}"]
    if s.cuda:
        properties = torch.cuda.get_device_properties(0)
        parts.insert(
            0,
            f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, sm_{properties.major}"
            f"{properties.minor})",
        )
        parts += [f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}"]
        try:
            parts.append(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
        except Exception:
            pass
    else:
        parts.insert(0, f"CPU, {torch.get_num_threads()} threads")
    size = f"{s.arch}, {s.size} px, heads {'/'.join(map(str, s.heads))}, D = {s.num_features}"
    return f"{', '.join(parts)}; {size}{', --tiny' if s.tiny else ''}"


def table(s: Settings, results: dict[str, Result], total_s: float | None) -> str:
    def number(value: float | None, digits: int) -> str:
        return f"{value:.{digits}f}" if value is not None else "–"

    lines = [
        f"Device check ({time.strftime('%Y-%m-%d %H:%M')}): {environment(s)}"
        + (f"; {total_s:.0f} s in all" if total_s is not None else "; running"),
        "",
        "| row | status | images/s | peak memory (GiB) | notes |",
        "|---|---|---|---|---|",
    ]
    for row, name in ROWS:
        r = results[row]
        cells = [
            name,
            r.status,
            number(r.images_per_s, 1),
            number(r.memory_gib, 2),
            r.notes.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "images/s: images (two views each for the pretraining steps) per second; for the tasks end "
        "to end, "
        "data loading included. Peak memory: torch.cuda.max_memory_allocated over the row (– "
        "on a CPU).",
    ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# main


def settings(args) -> Settings:
    tiny = args.tiny
    cpus = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return Settings(
        device=args.device,
        tiny=tiny,
        arch="resnet18" if tiny else "resnet50",
        size=32 if tiny else 224,
        heads=(64, 32, 64) if tiny else (4096, 256, 4096),
        num_features=64 if tiny else 512,
        batches=args.batches or ([8] if tiny else [512, 256, 128]),
        warmup=1 if tiny else 2,
        timed=1 if tiny else 5,
        step_cap_s=30.0,
        compile_cap_s=args.compile_cap,
        work=args.work,
        deadline=time.monotonic() + args.budget,
        workers=0 if tiny or args.device == "cpu" else min(8, cpus),
    )


def run_one_row_as_child(args) -> int:
    """--row ssl-compile: the compile row's measurement, in this (child) process; its result as
    JSON."""
    s = settings(args)
    m = measure_step(s, "ssl-hsic", True, True, [args.batch])
    Path(args.json).write_text(json.dumps(m))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--tiny", action="store_true", help="ResNet-18 at 32 px, batch 8, tiny heads: the CPU test"
    )
    parser.add_argument(
        "--out", type=Path, help="write the table here too (markdown), updated after every row"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds; rows that would start later are not run",
    )
    parser.add_argument(
        "--compile-cap", type=float, default=240.0, help="seconds for the torch.compile row"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", help="pretraining batches to try, largest first"
    )
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=[r for r, _ in ROWS], metavar="ROW"
    )
    parser.add_argument(
        "--only", nargs="+", default=[], choices=[r for r, _ in ROWS], metavar="ROW"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the working folder (generated data, run dirs)"
    )
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda but torch {torch.__version__} sees no CUDA device here; run "
            f"this on a GPU "
            "machine, or pass --device cpu",
            file=sys.stderr,
        )
        return 2
    if args.batches:
        args.batches = sorted(set(args.batches), reverse=True)
    if args.row:
        args.work.mkdir(parents=True, exist_ok=True)
        return run_one_row_as_child(args)
    made_work = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="device_check-")) if made_work else args.work
    args.work.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu" and args.tiny and "OMP_NUM_THREADS" not in os.environ:
        # one thread, here and in the spawned processes: on a busy 2-core machine (the test suite's)
        # two threads made a step 10x slower (they wait on each other at every parallel region)
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    s = settings(args)
    started = time.monotonic()
    results = {row: Result(row) for row, _ in ROWS}
    wanted = [
        row for row in RUN_ORDER if (not args.only or row in args.only) and row not in args.skip
    ]
    for row in RUN_ORDER:
        if row not in wanted:
            results[row].status = "not run: " + (
                "skipped (--skip)" if row in args.skip else "not in --only"
            )
    try:
        for row in wanted:
            left = s.deadline - time.monotonic()
            if left < MIN_SECONDS.get(row, 15):
                results[row].status = f"not run: the check's {args.budget:.0f} s budget was spent"
                continue
            print(f"device_check: {row} ...", file=sys.stderr, flush=True)
            tick = time.monotonic()
            try:
                results[row] = RUNNERS[row](s, row, results)
            except NotRun as why:
                results[row].status = f"not run: {one_line(why)}"
            except (Exception, SystemExit) as error:
                traceback.print_exc(file=sys.stderr)
                results[row].status = f"failed: {one_line(error)}"
            finally:
                free_memory(s.device)
            print(
                f"device_check: {row}: {results[row].status} ({time.monotonic() - tick:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            if args.out:
                write_atomic(args.out, table(s, results, None))
    finally:
        if made_work and not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    text = table(s, results, time.monotonic() - started)
    if args.out:
        write_atomic(args.out, text)
    print(text, end="")
    return 1 if any(r.status.startswith("failed") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
