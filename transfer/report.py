"""The transfer report: metrics.json files -> a Markdown and CSV table (+ PNG plots).

Each run dir holds one metrics.json (docs/design.md gives its schema); the report reads nothing else, except a pretraining
run's history.jsonl for its curves. Results are grouped by (task, metric, backbone); over seeds the table shows
the mean and the sample standard deviation. A task run on a pretrained backbone and on random init of the same
architecture gives a comparison row: pretrained, random init, difference.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

from pretrain.errors import UserError

# Metrics where lower is better (the difference column is still pretrained - random).
LOWER_IS_BETTER = {"rms", "rel", "log10", "loss"}


def load_records(run_dirs: list[str | Path]) -> list[dict]:
    records = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.exists():
            raise UserError(f"{path} does not exist: pass run dirs of finished runs")
        record = json.loads(path.read_text())
        record["run_dir"] = str(run_dir)
        records.append(record)
    return records


def backbone_kind(record: dict) -> str:
    backbone = record.get("backbone") or {}
    if backbone.get("weights") == "random" or str(backbone.get("path", "")).startswith("random:"):
        return "random init"
    return "pretrained"


def summarize(values: list[float]) -> tuple[float, float, int]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {std:.2g} (n={n})"


def comparison_rows(records: list[dict]) -> list[dict]:
    """One row per (task, dataset, metric): pretrained and random-init mean/std/n and their difference."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["task"] == "pretrain":
            continue
        for metric, value in record["metrics"].items():
            if metric.startswith("IoU."):  # per-class IoU stays in metrics.json; the table shows mIoU
                continue
            groups[(record["task"], record["dataset"], metric)][backbone_kind(record)].append(value)
    rows = []
    for (task, dataset, metric), by_kind in sorted(groups.items()):
        row = {"task": task, "dataset": dataset, "metric": metric}
        for kind in ("pretrained", "random init"):
            if by_kind.get(kind):
                row[kind] = summarize(by_kind[kind])
        if "pretrained" in row and "random init" in row:
            row["difference"] = row["pretrained"][0] - row["random init"][0]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | dataset | metric | pretrained | random init | difference |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [fmt(*row[k]) if k in row else "–" for k in ("pretrained", "random init")]
        diff = f"{row['difference']:+.4g}" if "difference" in row else "–"
        arrow = " (lower is better)" if row["metric"] in LOWER_IS_BETTER else ""
        lines.append(f"| {row['task']} | {row['dataset']} | {row['metric']}{arrow} | {cells[0]} | {cells[1]} | {diff} |")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["task", "dataset", "metric", "pretrained_mean", "pretrained_std", "pretrained_n",
                     "random_mean", "random_std", "random_n", "difference"])
    for row in rows:
        p, r = row.get("pretrained", ("", "", 0)), row.get("random init", ("", "", 0))
        writer.writerow([row["task"], row["dataset"], row["metric"], *p, *r, row.get("difference", "")])
    return out.getvalue()


def plot_pretraining(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for record in (r for r in records if r["task"] == "pretrain"):
        history_path = Path(record["run_dir"]) / "history.jsonl"
        if not history_path.exists():
            continue
        history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
        keys = [k for k in ("loss", "hsic_xy", "hsic_xx", "scale", "rankme") if any(k in h for h in history)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*points))
            ax.set_title("effective rank (RankMe)" if key == "rankme" else key)
            ax.set_xlabel("step")
        fig.tight_layout()
        path = out_dir / f"pretrain_{Path(record['run_dir']).name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_tasks(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    for task, task_rows in by_task.items():
        fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(task_rows)), 3))
        width = 0.38
        for offset, kind in ((-width / 2, "pretrained"), (width / 2, "random init")):
            xs = [i + offset for i, row in enumerate(task_rows) if kind in row]
            means = [row[kind][0] for row in task_rows if kind in row]
            stds = [row[kind][1] for row in task_rows if kind in row]
            ax.bar(xs, means, width, yerr=stds, label=kind, capsize=3)
        ax.set_xticks(range(len(task_rows)), [row["metric"] for row in task_rows], rotation=30)
        ax.set_title(f"{task} ({task_rows[0]['dataset']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"task_{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def build_report(run_dirs: list[str | Path], out_dir: str | Path, plots: bool = True, echo: bool = True) -> dict:
    """Write report.md, report.csv (and plots) into out_dir; return {"rows", "files"}."""
    records = load_records(run_dirs)
    rows = comparison_rows(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "report.md").write_text(f"# Transfer report\n\n{len(records)} runs.\n\n{table}\n")
    (out / "report.csv").write_text(csv_text(rows))
    files = [out / "report.md", out / "report.csv"]
    if plots:
        files += plot_pretraining(records, out) + plot_tasks(rows, out)
    if echo:
        print(table)
        print(f"\nwritten: {', '.join(str(f) for f in files)}")
    return {"rows": rows, "files": files}


