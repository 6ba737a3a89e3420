"""What pretraining buys in the main job, over seeds: the margins table of BENCHMARKS.md.

Runs the main job (`slurm.pipeline`, configs/pipeline/demo.yaml, which pretrains once per seed) for
the given seeds under OUT, with the demo's own task configs and overrides, then prints per task and
seed the headline metric of SSL-HSIC, random init and the supervised control, the margin SSL-HSIC -
random init (for depth rms, lower is better: random - SSL-HSIC), and per task the mean of each
backbone with its 95% interval over seeds (t distribution, as the report) and whether SSL-HSIC's
interval lies above random init's.

    .venv/bin/python bench/margins.py [--seeds 0 1 2] [--tasks linear knn ...] [--out runs/demo]
        [--pipeline key=value ...]     (pipeline overrides, e.g. "pretrain_overrides=[optim.epochs=2]")

Finished steps are skipped on a rerun, so `--out runs/demo` reuses what `make demo` / `make
demo-full` ran."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADLINE = {
    "linear": ("top1", 1),
    "knn": ("top1", 1),
    "linear/1000": ("top1", 1),
    "knn/1000": ("top1", 1),
    "finetune": ("top1@1%", 1),
    "finetune@10": ("top1@10%", 1),
    "classify/digits": ("linear.top1", 1),
    "classify/digits@finetune": ("finetune.top1", 1),
    # metric, sign of better
    "segmentation": ("mIoU", 1),
    "detection": ("bbox.AP", 1),
    "depth": ("rms", -1),
}
KINDS = ("pretrained", "random", "supervised")


def run_pipeline(seeds: list[int], tasks: list[str], out: Path, overrides: list[str]) -> None:
    from common.config import load_config
    from slurm.pipeline import Pipeline, PipelineConfig

    config = load_config(
        PipelineConfig, "configs/pipeline/demo.yaml", [f"root={out}", f"seeds={seeds}", *overrides]
    )
    config.tasks = {task: path for task, path in config.tasks.items() if task in tasks}
    Pipeline(config).run()


def metric(out: Path, seed: int, row: str, kind: str) -> float | None:
    task = row.split("@")[0]
    path = out / task / kind / f"seed{seed}" / "metrics.json"
    return json.loads(path.read_text())["metrics"][HEADLINE[row][0]] if path.exists() else None


def table(seeds: list[int], rows: list[str], out: Path) -> str:
    from transfer.report import Summary

    lines = [
        "| task | metric | seed | SSL-HSIC | random init | supervised | margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name, sign = HEADLINE[row]
        values = {kind: [metric(out, seed, row, kind) for seed in seeds] for kind in KINDS}
        for k, seed in enumerate(seeds):
            ssl, random_init, supervised = (values[kind][k] for kind in KINDS)
            margin = f"{sign * (ssl - random_init):+.2f}" if None not in (ssl, random_init) else "–"
            cells = " | ".join(
                "–" if v is None else f"{v:.2f}" for v in (ssl, random_init, supervised)
            )
            lines.append(f"| {row.split('@')[0]} | {name} | {seed} | {cells} | {margin} |")
        summaries = {kind: Summary([v for v in values[kind] if v is not None]) for kind in KINDS}
        if min(s.n for s in (summaries["pretrained"], summaries["random"])) >= 2:
            cells = " | ".join(
                f"{s.mean:.2f} [{s.interval[0]:.2f}, {s.interval[1]:.2f}]" if s.n else "–"
                for s in summaries.values()
            )
            ssl, random_init = summaries["pretrained"].interval, summaries["random"].interval
            clear = ssl[0] > random_init[1] if sign > 0 else ssl[1] < random_init[0]
            lines.append(
                f"| {row.split('@')[0]} | {name} | mean [95% CI] | {cells} | "
                f"{'**clear**' if clear else 'overlap'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    tasks = sorted({row.split("@")[0] for row in HEADLINE})
    parser.add_argument("--tasks", nargs="+", default=tasks, choices=tasks)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument(
        "--pipeline", nargs="*", default=[], metavar="key=value", help="pipeline overrides"
    )
    parser.add_argument(
        "--table-only", action="store_true", help="print the table of what has run; run nothing"
    )
    args = parser.parse_args()
    if not args.table_only:
        run_pipeline(args.seeds, args.tasks, args.out, args.pipeline)
    print(table(args.seeds, [row for row in HEADLINE if row.split("@")[0] in args.tasks], args.out))


if __name__ == "__main__":
    main()
