"""Pretrained against random init, over pretraining seeds: the margins table of BENCHMARKS.md.

For each seed S the main job (`slurm.pipeline`, configs/pipeline/demo.yaml) runs under OUT/seedS with the
pretraining seed S and task seed S: the small pretraining config, export + verification, then each chosen task
on the EMA network and on the same ResNet-18 at random init, with the task configs' own schedules (the demo's
shorter detection / depth overrides are dropped). Finished steps are skipped on a rerun; to reuse a finished
pretraining, copy its run dir to OUT/seedS/pretrain first.

    .venv/bin/python bench/margins.py [--seeds 0 1 2] [--tasks linear knn segmentation detection depth]
        [--out runs/margins]

Prints one row per (task, seed): the headline metric for both backbones and the margin (pretrained - random;
for depth rms, lower is better, random - pretrained), then the mean and the smallest margin per task.
About 10 minutes of pretraining per seed here, plus 0.5 (linear, kNN), 2 (segmentation), 5 (detection) and
3 (depth) minutes per task and backbone.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HEADLINE = {"linear": ("top1", 1), "knn": ("top1", 1), "segmentation": ("mIoU", 1), "detection": ("bbox.AP", 1),
            "depth": ("rms", -1)}  # metric, sign of "better"


def run_seed(seed: int, tasks: list[str], out: Path) -> None:
    from pretrain.config import load_config
    from slurm.pipeline import Pipeline, PipelineConfig
    config = load_config(PipelineConfig, "configs/pipeline/demo.yaml",
                         [f"root={out / f'seed{seed}'}", f"pretrain_overrides=[seed={seed}]", f"seeds=[{seed}]"])
    config.tasks = {task: path for task, path in config.tasks.items() if task in tasks}
    config.task_overrides = {}
    Pipeline(config).run()


def metric(out: Path, seed: int, task: str, kind: str) -> float:
    path = out / f"seed{seed}" / task / kind / f"seed{seed}" / "metrics.json"
    return json.loads(path.read_text())["metrics"][HEADLINE[task][0]]


def table(seeds: list[int], tasks: list[str], out: Path) -> str:
    lines = ["| task | metric | seed | pretrained | random init | margin |", "|---|---|---|---|---|---|"]
    for task in tasks:
        name, sign = HEADLINE[task]
        margins = []
        for seed in seeds:
            pretrained, random_init = metric(out, seed, task, "pretrained"), metric(out, seed, task, "random")
            margins.append(sign * (pretrained - random_init))
            lines.append(f"| {task} | {name} | {seed} | {pretrained:.2f} | {random_init:.2f} | {margins[-1]:+.2f} |")
        lines.append(f"| {task} | {name} | mean (min) | | | **{statistics.mean(margins):+.2f}** "
                     f"({min(margins):+.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(HEADLINE), choices=list(HEADLINE))
    parser.add_argument("--out", type=Path, default=Path("runs/margins"))
    args = parser.parse_args()
    for seed in args.seeds:
        run_seed(seed, args.tasks, args.out)
    print(table(args.seeds, args.tasks, args.out))


if __name__ == "__main__":
    main()
