"""The transfer report: metrics.json files -> tables that compare named backbones, a long CSV, and plots.

Each run dir holds one metrics.json (docs/design.md gives its schema); the report reads nothing else, except a
pretraining run's history.jsonl for its curves.

Backbones. A run's metrics.json names its backbone (backbone.name) and fingerprints its weights
(backbone.fingerprint, the sha256 of the tensors). Runs are grouped by task, dataset, protocol and backbone. A
backbone is its name and its fingerprint, so two checkpoints never merge, even under one name (they are shown
as `name [fingerprint]`); random init is its name and architecture instead, since every seed draws other weights.
Names passed as `pooled` are recipes pretrained once per seed (the main job's `pretrain_per_seed`): their runs pool
over the weights, like random init's, so seed-to-seed spread includes the pretraining's.

Statistics over seeds, per backbone: the mean, the sample standard deviation s, n, and the 95% confidence
interval mean ± t(0.975, n-1) s / sqrt(n). Against the baseline (random init unless named):
Δ = mean_b - mean_0, with Welch's t-test (unequal variances; scipy.stats.ttest_ind(equal_var=False)):

    t = Δ / sqrt(s_b²/n_b + s_0²/n_0),
    ν = (s_b²/n_b + s_0²/n_0)² / ((s_b²/n_b)²/(n_b - 1) + (s_0²/n_0)²/(n_0 - 1)),

marked * for p < 0.05 and ** for p < 0.01 (no test with fewer than 2 runs on a side). "best" (bold) goes to the
best mean, lower being better for the error metrics, only where its interval lies clear of every other
backbone's interval.

Published references (transfer/references.yaml) are shown beside a table only where its protocol id and task
match, and, for a reference that names a dataset, the table's dataset too.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import UserError
from transfer.names import default_name

LOWER_IS_BETTER = {"rms", "rel", "log10", "loss"}
REFERENCES = Path(__file__).with_name("references.yaml")


# ------------------------------------------------------------------------------------------- records

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


@dataclass(frozen=True)
class Identity:
    """What makes two runs the same backbone."""
    name: str
    key: str          # the weights' fingerprint, or random:ARCH
    random: bool


def identity(record: dict, pooled: frozenset = frozenset()) -> Identity:
    backbone = record.get("backbone") or {}
    path = str(backbone.get("path", ""))
    random = backbone.get("weights") == "random" or path.startswith("random:")
    name = backbone.get("name") or default_name(path or "backbone")
    if random:
        key = f"random:{backbone.get('arch', path.split(':')[-1])}"
    elif name in pooled:
        key = f"seeds:{name}"
    else:
        key = str(backbone.get("fingerprint") or backbone.get("sha256") or path)
    return Identity(name, key, random)


def labels(identities: set[Identity]) -> dict[Identity, str]:
    """Each backbone's column label: its name, with the fingerprint where two backbones share a name."""
    by_name = defaultdict(list)
    for ident in identities:
        by_name[ident.name].append(ident)
    return {ident: ident.name if len(group) == 1 else f"{ident.name} [{ident.key.replace('random:', '')[:8]}]"
            for group in by_name.values() for ident in group}


def group_key(record: dict) -> tuple[str, str, str]:
    return record["task"], record.get("dataset", ""), record.get("protocol_id") or record.get("protocol", "")


# ------------------------------------------------------------------------------------------- statistics

@dataclass
class Summary:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% confidence interval of the mean (t distribution); the mean itself when n = 1."""
        if self.n < 2:
            return self.mean, self.mean
        from scipy import stats
        half = stats.t.ppf(0.975, self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


def welch_p(a: Summary, b: Summary) -> float | None:
    """Welch's two-sided p-value for equal means, or None with fewer than 2 values on a side."""
    if a.n < 2 or b.n < 2:
        return None
    if a.std == 0 and b.std == 0:
        return 0.0 if a.mean != b.mean else 1.0
    from scipy import stats
    return float(stats.ttest_ind(a.values, b.values, equal_var=False).pvalue)


def stars(p: float | None) -> str:
    return "" if p is None else "**" if p < 0.01 else "*" if p < 0.05 else ""


def best_clear_of_the_rest(summaries: dict, lower_is_better: bool):
    """The backbone with the best mean, if its interval lies clear of every other one's; else None (also when a
    backbone has a single run: no interval)."""
    if len(summaries) < 2 or any(s.n < 2 for s in summaries.values()):
        return None
    sign = -1 if lower_is_better else 1
    best = max(summaries, key=lambda k: sign * summaries[k].mean)
    low, high = summaries[best].interval
    for other, summary in summaries.items():
        if other == best:
            continue
        o_low, o_high = summary.interval
        if (low <= o_high) if not lower_is_better else (high >= o_low):
            return None
    return best


# ------------------------------------------------------------------------------------------- tables

@dataclass
class Comparison:
    """One (task, dataset, protocol, metric): a summary per backbone and the differences to the baseline."""
    task: str
    dataset: str
    protocol: str
    metric: str
    summaries: dict          # Identity -> Summary
    baseline: Identity | None
    best: Identity | None

    def difference(self, ident: Identity) -> tuple[float, float | None] | None:
        if self.baseline is None or ident == self.baseline or self.baseline not in self.summaries:
            return None
        mine, base = self.summaries[ident], self.summaries[self.baseline]
        return mine.mean - base.mean, welch_p(mine, base)


def choose_baseline(identities: set[Identity], baseline: str | None) -> Identity | None:
    if baseline:
        for ident in identities:
            if baseline in (ident.name, ident.key):
                return ident
        return None
    randoms = sorted((i for i in identities if i.random), key=lambda i: i.name)
    return randoms[0] if randoms else None


def comparisons(records: list[dict], baseline: str | None = None, pooled: frozenset = frozenset()) -> list[Comparison]:
    groups: dict[tuple, dict[Identity, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["task"] == "pretrain":
            continue
        for metric, value in record["metrics"].items():
            if metric.startswith("IoU."):  # per-class IoU stays in metrics.json; the table shows mIoU
                continue
            groups[(*group_key(record), metric)][identity(record, pooled)].append(float(value))
    out = []
    for (task, dataset, protocol, metric), by_backbone in sorted(groups.items(), key=lambda kv: kv[0]):
        summaries = {ident: Summary(values) for ident, values in by_backbone.items()}
        out.append(Comparison(task, dataset, protocol, metric, summaries, choose_baseline(set(summaries), baseline),
                              best_clear_of_the_rest(summaries, metric in LOWER_IS_BETTER)))
    return out


def cell(comparison: Comparison, ident: Identity) -> str:
    s = comparison.summaries.get(ident)
    if s is None:
        return "–"
    low, high = s.interval
    text = f"{s.mean:.4g}" if s.n == 1 else f"{s.mean:.4g} ± {s.std:.2g} (n={s.n}; 95% CI {low:.4g}–{high:.4g})"
    if comparison.best == ident:
        text = f"**{text}** best"
    if (diff := comparison.difference(ident)) is not None:
        text += f"; Δ {diff[0]:+.3g}{stars(diff[1])}"
    return text


def load_references() -> list[dict]:
    import yaml
    return yaml.safe_load(REFERENCES.read_text())["references"] if REFERENCES.exists() else []


def matches(reference: dict, task: str, dataset: str, protocol: str) -> bool:
    """A published reference belongs beside a table of this protocol id and task; one that names a dataset (one
    protocol id covering several datasets, like the twelve of kornblith-transfer-byol) only beside that dataset's."""
    return (reference["protocol_id"] == protocol and reference["task"] == task
            and reference.get("dataset") in (None, dataset))


def markdown(comparisons_: list[Comparison], references: list[dict]) -> str:
    by_group: dict[tuple, list[Comparison]] = defaultdict(list)
    for c in comparisons_:
        by_group[(c.task, c.dataset, c.protocol)].append(c)
    blocks = []
    for (task, dataset, protocol), rows in by_group.items():
        identities = set().union(*(c.summaries for c in rows))
        names = labels(identities)
        baseline = rows[0].baseline
        order = sorted(identities, key=lambda i: (i != baseline, names[i]))
        header = "| metric | " + " | ".join(names[i] + (" (baseline)" if i == baseline else "") for i in order) + " |"
        lines = [f"### {task} · {dataset} · {protocol}", "", header, "|---|" + "---|" * len(order)]
        for c in rows:
            arrow = " (lower is better)" if c.metric in LOWER_IS_BETTER else ""
            lines.append(f"| {c.metric}{arrow} | " + " | ".join(cell(c, i) for i in order) + " |")
        published = [r for r in references if matches(r, task, dataset, protocol)]
        if published:
            lines += ["", "Published with this protocol:"]
            lines += [f"* {r['method']} ({r['arch']}): {r['metric']} {r['value']} — {r['source']}" for r in published]
        blocks.append("\n".join(lines))
    legend = ("Mean ± sample std over seeds (n runs; 95% CI of the mean, t distribution). Δ: difference to the "
              "baseline column, Welch's t-test * p < 0.05, ** p < 0.01. **best**: the best mean, its interval "
              "clear of every other backbone's.")
    return legend + "\n\n" + "\n\n".join(blocks)


# ------------------------------------------------------------------------------------------- long CSV

LONG_COLUMNS = ["backbone", "fingerprint", "backbone_path", "weights", "arch", "task", "protocol", "protocol_id",
                "dataset", "split", "seed", "world_size", "global_batch", "hyperparameters", "metric", "value",
                "run_dir"]


def _split(config: dict) -> str:
    data = config.get("data") or {}
    return str(data.get("test_split") or data.get("voc_test") or data.get("val_list") or data.get("test_json") or "")


def _global_batch(config: dict) -> str:
    for path in (("batch_size",), ("schedule", "batch_size"), ("linear", "batch_size"), ("optim", "batch_size")):
        node = config
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int):
            return str(node)
    return ""


def long_rows(records: list[dict], pooled: frozenset = frozenset()) -> list[dict]:
    """One row per run and metric (tidy: pandas reads it as is; pivot on `metric` for a wide table)."""
    names = labels({identity(r, pooled) for r in records})
    rows = []
    for record in records:
        ident, backbone, config = identity(record, pooled), record.get("backbone") or {}, record.get("config") or {}
        hyper = {k: v for k, v in config.items() if k not in ("run_dir", "data", "device", "cache_dir")}
        for metric, value in record["metrics"].items():
            rows.append({"backbone": names[ident], "fingerprint": ident.key, "backbone_path": backbone.get("path", ""),
                         "weights": backbone.get("weights", ""), "arch": backbone.get("arch", ""),
                         "task": record["task"], "protocol": record.get("protocol", ""),
                         "protocol_id": record.get("protocol_id", ""), "dataset": record.get("dataset", ""),
                         "split": _split(config), "seed": record.get("seed", ""),
                         "world_size": record.get("world_size", 1), "global_batch": _global_batch(config),
                         "hyperparameters": json.dumps(hyper, sort_keys=True, default=str), "metric": metric,
                         "value": value, "run_dir": record["run_dir"]})
    return rows


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, LONG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ------------------------------------------------------------------------------------------- plots

def plot_pretraining(records: list[dict], out_dir: Path) -> list[Path]:
    """The curves of each pretraining run: loss, the HSIC terms, the bandwidth, RankMe, the online probe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    titles = {"loss": "loss", "hsic_xy": "HSIC(Z, Y)", "hsic_xx": "HSIC(Z, Z)", "scale": "kernel bandwidth",
              "rankme": "effective rank (RankMe)", "probe_loss": "online probe loss", "probe_top1": "online probe top-1"}
    written = []
    for record in (r for r in records if r["task"] == "pretrain"):
        history_path = Path(record["run_dir"]) / "history.jsonl"
        if not history_path.exists():
            continue
        history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
        keys = [k for k in titles if any(k in h for h in history)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*points))
            ax.set_title(titles[key])
            ax.set_xlabel("step")
        fig.tight_layout()
        run_dir = Path(record["run_dir"])  # pretrain/ or, one per seed, pretrain/seedK/
        label = f"{run_dir.parent.name}_{run_dir.name}" if run_dir.name.startswith("seed") else run_dir.name
        path = out_dir / f"pretrain_{label}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_tasks(comparisons_: list[Comparison], out_dir: Path) -> list[Path]:
    """Per task: a panel per metric, a bar per backbone with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_task: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons_:
        by_task[c.task].append(c)
    written = []
    for task, rows in by_task.items():
        names = labels(set().union(*(c.summaries for c in rows)))
        fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows) + 1, 3.2), squeeze=False)
        for ax, c in zip(axes[0], rows):
            order = sorted(c.summaries, key=lambda i: (i != c.baseline, names[i]))
            means = [c.summaries[i].mean for i in order]
            errors = [[m - c.summaries[i].interval[0] for i, m in zip(order, means)],
                      [c.summaries[i].interval[1] - m for i, m in zip(order, means)]]
            ax.bar(range(len(order)), means, yerr=errors, capsize=3, color=[f"C{k}" for k in range(len(order))])
            ax.set_xticks(range(len(order)), [names[i] for i in order], rotation=30, ha="right", fontsize=8)
            ax.set_title(c.metric + (" ↓" if c.metric in LOWER_IS_BETTER else ""), fontsize=9)
        fig.suptitle(f"{task} ({rows[0].dataset}), mean and 95% CI over seeds", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"task_{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------- report

def build_report(run_dirs: list[str | Path], out_dir: str | Path, plots: bool = True, echo: bool = True,
                 baseline: str | None = None, pooled: list[str] = ()) -> dict:
    """Write report.md, report.csv (long) and the plots into out_dir; return {"comparisons", "rows", "files"}.
    `pooled`: backbone names whose runs pool over their weights (one recipe, pretrained once per seed)."""
    records = load_records(run_dirs)
    pooled = frozenset(pooled)
    found = comparisons(records, baseline, pooled)
    if baseline and found and all(c.baseline is None for c in found):
        raise UserError(f"baseline '{baseline}' names no backbone of these runs; choose one of "
                        f"{', '.join(sorted({identity(r).name for r in records if r['task'] != 'pretrain'}))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = long_rows(records, pooled)
    (out / "report.csv").write_text(csv_text(rows))
    files = [out / "report.md", out / "report.csv"]
    figures = (plot_pretraining(records, out) + plot_tasks(found, out)) if plots else []
    table = markdown(found, load_references())
    embedded = "\n".join(f"![{f.stem}]({f.name})" for f in figures)
    (out / "report.md").write_text(f"# Transfer report\n\n{len(records)} runs.\n\n{embedded}\n\n{table}\n")
    files += figures
    if echo:
        print(table)
        print(f"\nwritten: {', '.join(str(f) for f in files)}")
    return {"comparisons": found, "rows": rows, "files": files}
