"""The transfer report: metrics.json files -> tables that compare named backbones, a long CSV, and
plots.

Each run dir holds one metrics.json (docs/design.md gives its schema); the report reads nothing
else, except a pretraining run's history.jsonl for its curves.

Backbones. A run's metrics.json names its backbone (backbone.name) and fingerprints its weights
(backbone.fingerprint, the sha256 of the tensors). Runs are grouped by task, dataset, protocol and
backbone. A backbone is its name and its fingerprint, so two checkpoints never merge, even under one
name (they are shown as `name [fingerprint]`); random init is its name and architecture instead,
since every seed draws other weights. Names passed as `pooled` are recipes pretrained once per seed
(the main job's `pretrain_per_seed`): their runs pool over the weights, like random init's, so
seed-to-seed spread includes the pretraining's.

What n counts, per column (a line under each table, the CSV's `n_counts`): pretraining seeds (a
`pooled` name: each seed pretrained its own weights), random-init seeds (each seed draws new
weights), or evaluation seeds of one checkpoint (fixed weights; only the task's own seed changes:
its head's init, data order, augmentation, held-out split). A metric whose run declares
`varies_with_seed: {metric: false}` in metrics.json (the task says so: kNN, and the L-BFGS linear
transfer of classify on a dataset with a standard validation split) cannot change with the
evaluation seed, so a fixed checkpoint's column of it is one value: shown once, "deterministic",
without ± or interval, and never tested nor marked best. Runs written before the field existed count
as varying. If a column declared deterministic still holds different values, the cell says so and a
warning line follows the table.

Statistics over seeds, per backbone: the mean, the sample standard deviation s, n, and the 95%
confidence interval mean ± t(0.975, n-1) s / sqrt(n), clipped to the metric's range (METRICS:
percentages to [0, 100],
errors to [0, inf)). Against the baseline (random init unless named): Δ = mean_b - mean_0, with Welch's t-test
(unequal variances; scipy.stats.ttest_ind(equal_var=False)):

    t = Δ / sqrt(s_b²/n_b + s_0²/n_0),
    ν = (s_b²/n_b + s_0²/n_0)² / ((s_b²/n_b)²/(n_b - 1) + (s_0²/n_0)²/(n_0 - 1)),

marked * for p < 0.05 and ** for p < 0.01. "best" (bold) goes to the best mean, lower being better
for the error metrics, only where its interval lies clear of every other backbone's interval.

A column is one value in effect, with no interval, no test on either side of it, and no "best" in
its row, when it
has a single run, when it is deterministic (above), or when its n >= 2 values are all equal (s = 0: a zero-width
interval would claim a certainty that no spread was seen to support; shown "all equal", whatever n
counts).

Published references (transfer/references.yaml) are shown beside a table only where its protocol id
and task match, and, for a reference that names a dataset, the table's dataset too."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from common.errors import UserError
from transfer.names import default_name
from transfer.tasks import lower_is_better

REFERENCES = Path(__file__).with_name("references.yaml")


# -------------------------------------------------------------------------------------------
# metrics

PERCENT = (0.0, 100.0)
ERROR = (0.0, math.inf)
UNBOUNDED = (-math.inf, math.inf)


@dataclass(frozen=True)
class Metric:
    """What the report knows of a metric: the range its values (and so its intervals) lie in, and
    its direction."""

    range: tuple[float, float] = UNBOUNDED
    lower_is_better: bool = False


# Every metric the tasks write, by its base name: a task prefix (linear., finetune., bbox., segm.)
# and a subset suffix (@10%) dropped. Every one of them is in percent (the tasks multiply fractions
# by 100), except depth's errors.
METRICS = {
    **{
        name: Metric(PERCENT)
        for name in (
            # linear, knn, finetune (top1@1%), supervised
            "top1",
            "top5",
            "train_top1",
            # classify (linear.<metric>, finetune.<metric>)
            "mean_per_class",
            "voc07_map",
            # segmentation (mmseg, x 100; IoU.<class> too)
            "mIoU",
            "mAcc",
            "aAcc",
            # detection (bbox.<metric>, segm.<metric>)
            "AP",
            "AP50",
            "AP75",
            "APs",
            "APm",
            "APl",
            # depth: % of pixels with max(d/d*, d*/d) < 1.25^n
            "delta1",
            "delta2",
            "delta3",
        )
    },
    **{name: Metric(ERROR) for name in ("rms", "rel", "log10")},  # depth's errors
    "loss": Metric(UNBOUNDED),  # the HSIC loss is negative
}
# Which way a metric improves: the tasks declare theirs in the registry; pretraining's loss improves
# downwards.
LOWER_IS_BETTER = lower_is_better() | {"loss"}


def metric_info(metric: str) -> Metric:
    """The METRICS entry of a metric name as metrics.json writes it (a name the table lacks:
    unbounded), with its
    direction from LOWER_IS_BETTER."""
    base = "mIoU" if metric.startswith("IoU.") else metric.split("@")[0].rsplit(".", 1)[-1]
    return replace(METRICS.get(base, Metric()), lower_is_better=base in LOWER_IS_BETTER)


# ------------------------------------------------------------------------------------------- what n
# counts

PRETRAINING_SEEDS, RANDOM_INIT_SEEDS, EVALUATION_SEEDS = (
    "pretraining_seeds",
    "random_init_seeds",
    "evaluation_seeds",
)
N_COUNTS = {
    PRETRAINING_SEEDS: "pretraining seeds (each seed pretrained its own weights)",
    RANDOM_INIT_SEEDS: "random-init seeds (each seed draws new weights)",
    EVALUATION_SEEDS: "evaluation seeds of one checkpoint (fixed weights; only the task's seed changes)",
}


# -------------------------------------------------------------------------------------------
# records


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
    key: str  # the weights' fingerprint, or random:ARCH, or seeds:NAME (pooled)
    random: bool

    @property
    def n_counts(self) -> str:
        """What the runs of this backbone differ in: a key of N_COUNTS."""
        return (
            RANDOM_INIT_SEEDS
            if self.random
            else PRETRAINING_SEEDS
            if self.key.startswith("seeds:")
            else EVALUATION_SEEDS
        )


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
        key = weights_of(record)
    return Identity(name, key, random)


def weights_of(record: dict) -> str:
    backbone = record.get("backbone") or {}
    return str(backbone.get("fingerprint") or backbone.get("sha256") or backbone.get("path", ""))


def varies_with_seed(record: dict, metric: str) -> bool | None:
    """The run's declaration (metrics.json `varies_with_seed`, written by the task): whether
    `metric`, given the backbone's weights and the data, may change with the run's seed; None where
    the run does not say (written
    before the field, or not by a transfer task). A bool applies to every metric, a mapping per
    metric."""
    declared = record.get("varies_with_seed")
    if isinstance(declared, dict):
        declared = declared.get(metric)
    return declared if isinstance(declared, bool) else None


def labels(identities: set[Identity]) -> dict[Identity, str]:
    """Each backbone's column label: its name, with the fingerprint where two backbones share a
    name."""
    by_name = defaultdict(list)
    for ident in identities:
        by_name[ident.name].append(ident)
    return {
        ident: ident.name
        if len(group) == 1
        else f"{ident.name} [{ident.key.replace('random:', '')[:8]}]"
        for group in by_name.values()
        for ident in group
    }


def group_key(record: dict) -> tuple[str, str, str]:
    return (
        record["task"],
        record.get("dataset", ""),
        record.get("protocol_id") or record.get("protocol", ""),
    )


# -------------------------------------------------------------------------------------------
# statistics


@dataclass
class Summary:
    """One backbone's values of one metric. `bounds`: the metric's range (intervals are clipped to
    it); `n_counts`: what its runs differ in (N_COUNTS); `varies`: the runs' declaration that the
    metric varies with the seed (False: every run declares it does not; None: not every run declares
    it); `weights`: how many distinct
    weights the runs evaluated (None: not known)."""

    values: list[float]
    bounds: tuple[float, float] = UNBOUNDED
    n_counts: str = EVALUATION_SEEDS
    varies: bool | None = None
    weights: int | None = None

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
    def deterministic(self) -> bool:
        """Declared not to vary, over evaluation seeds of one checkpoint: n counts nothing that
        changes it."""
        return self.n_counts == EVALUATION_SEEDS and self.varies is False

    @property
    def differs(self) -> bool:
        """Its values are not all equal (beyond float rounding)."""
        return self.n > 1 and max(self.values) - min(self.values) > 1e-9 * max(1.0, abs(self.mean))

    @property
    def single(self) -> bool:
        """One value in effect: a single run, a deterministic column, or n >= 2 equal values. No
        interval, no test,
        no best."""
        return self.n < 2 or self.deterministic or self.std == 0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% confidence interval of the mean (t distribution), clipped to the metric's range;
        the mean itself
        when the column is one value in effect (`single`)."""
        if self.single:
            return self.mean, self.mean
        from scipy import stats

        half = stats.t.ppf(0.975, self.n - 1) * self.std / math.sqrt(self.n)
        low, high = self.bounds
        return max(self.mean - half, low), min(self.mean + half, high)


def welch_p(a: Summary, b: Summary) -> float | None:
    """Welch's two-sided p-value for equal means, or None where a side is one value in effect (a
    single run, a
    deterministic column, all values equal): no test against a spread that was not seen."""
    if a.single or b.single:
        return None
    from scipy import stats

    return float(stats.ttest_ind(a.values, b.values, equal_var=False).pvalue)


def stars(p: float | None) -> str:
    return "" if p is None else "**" if p < 0.01 else "*" if p < 0.05 else ""


def best_clear_of_the_rest(summaries: dict, lower_is_better: bool):
    """The backbone with the best mean, if its interval lies clear of every other one's; else None
    (also when a
    backbone is one value in effect: a single run, deterministic, or all values equal)."""
    if len(summaries) < 2 or any(s.single for s in summaries.values()):
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
    """One (task, dataset, protocol, metric): a summary per backbone and the differences to the
    baseline."""

    task: str
    dataset: str
    protocol: str
    metric: str
    summaries: dict  # Identity -> Summary
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


def declared_together(declarations: list[bool | None]) -> bool | None:
    """The runs' declarations as one: False only where every run declares False; True where any
    declares True."""
    if any(d is True for d in declarations):
        return True
    return False if declarations and all(d is False for d in declarations) else None


def comparisons(
    records: list[dict], baseline: str | None = None, pooled: frozenset = frozenset()
) -> list[Comparison]:
    # (task, dataset, protocol, metric) -> backbone -> [(value, varies_with_seed, weights)]
    groups: dict[tuple, dict[Identity, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["task"] == "pretrain":
            continue
        ident = identity(record, pooled)
        for metric, value in record["metrics"].items():
            # per-class IoU stays in metrics.json; the table shows mIoU
            if metric.startswith("IoU."):
                continue
            groups[(*group_key(record), metric)][ident].append(
                (float(value), varies_with_seed(record, metric), weights_of(record))
            )
    out = []
    for (task, dataset, protocol, metric), by_backbone in sorted(
        groups.items(), key=lambda kv: kv[0]
    ):
        info = metric_info(metric)
        summaries = {
            ident: Summary(
                [v for v, _, _ in runs],
                info.range,
                ident.n_counts,
                declared_together([d for _, d, _ in runs]),
                len({w for _, _, w in runs}),
            )
            for ident, runs in by_backbone.items()
        }
        out.append(
            Comparison(
                task,
                dataset,
                protocol,
                metric,
                summaries,
                choose_baseline(set(summaries), baseline),
                best_clear_of_the_rest(summaries, info.lower_is_better),
            )
        )
    return out


def cell(comparison: Comparison, ident: Identity) -> str:
    s = comparison.summaries.get(ident)
    if s is None:
        return "–"
    if s.n == 1:
        text = f"{s.mean:.4g}"
    elif s.deterministic and s.differs:
        text = (
            f"{s.mean:.4g} (declared deterministic, yet its n={s.n} values differ: "
            f"{min(s.values):.4g}–{max(s.values):.4g}; see the warning)"
        )
    elif s.deterministic:
        text = f"{s.mean:.4g} (deterministic; n={s.n} evaluation seeds, one value)"
    elif s.single:
        text = f"{s.mean:.4g} (n={s.n}, all equal; no interval)"
    else:
        low, high = s.interval
        text = f"{s.mean:.4g} ± {s.std:.2g} (n={s.n}; 95% CI {low:.4g}–{high:.4g})"
    if comparison.best == ident:
        text = f"**{text}** best"
    if (diff := comparison.difference(ident)) is not None:
        text += f"; Δ {diff[0]:+.3g}{stars(diff[1])}"
    return text


def notes(rows: list[Comparison], names: dict[Identity, str], order: list[Identity]) -> list[str]:
    """The lines under a table: what n counts in each column, which metrics are deterministic,
    and warnings."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for ident in order:
        kinds[ident.n_counts].append(names[ident])
    lines = [
        "n counts: "
        + "; ".join(f"{', '.join(columns)}: {N_COUNTS[kind]}" for kind, columns in kinds.items())
        + "."
    ]
    fixed = [c.metric for c in rows if any(s.deterministic for s in c.summaries.values())]
    if fixed:
        lines.append(
            f"Deterministic given the weights (declared by the task): {', '.join(fixed)}; a fixed "
            "checkpoint's column of it is one value, without interval or test."
        )
    warnings = []
    for c in rows:
        for ident in order:
            s = c.summaries.get(ident)
            if s is not None and s.deterministic and s.differs:
                warnings.append(
                    f"Warning: {c.metric} of {names[ident]} is declared not to vary with the "
                    f"evaluation "
                    f"seed, yet its {s.n} runs give "
                    f"{', '.join(f'{v:.6g}' for v in s.values)}: "
                    "the runs differ in something else (data, code version, hardware); "
                    "check them."
                )
    pooled_twice = []
    for ident in order:
        runs = max((c.summaries[ident] for c in rows if ident in c.summaries), key=lambda s: s.n)
        if (
            runs.n_counts == PRETRAINING_SEEDS
            and runs.weights is not None
            and runs.weights < runs.n
        ):
            pooled_twice.append(
                f"Warning: {names[ident]} pools {runs.n} runs over {runs.weights} distinct "
                f"weights: "
                "n counts runs, not pretrainings, and the interval treats repeated "
                "evaluations of "
                "one checkpoint as independent."
            )
    return lines + warnings + pooled_twice


def load_references() -> list[dict]:
    return yaml.safe_load(REFERENCES.read_text())["references"] if REFERENCES.exists() else []


def matches(reference: dict, task: str, dataset: str, protocol: str) -> bool:
    """A published reference belongs beside a table of this protocol id and task; one that names a
    dataset (one
    protocol id covering several datasets, like the twelve of kornblith-transfer-byol) only beside
    that dataset's."""
    return (
        reference["protocol_id"] == protocol
        and reference["task"] == task
        and reference.get("dataset") in (None, dataset)
    )


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
        header = (
            "| metric | "
            + " | ".join(names[i] + (" (baseline)" if i == baseline else "") for i in order)
            + " |"
        )
        lines = [f"### {task} · {dataset} · {protocol}", "", header, "|---|" + "---|" * len(order)]
        for c in rows:
            arrow = " (lower is better)" if metric_info(c.metric).lower_is_better else ""
            lines.append(f"| {c.metric}{arrow} | " + " | ".join(cell(c, i) for i in order) + " |")
        lines += ["", *notes(rows, names, order)]
        published = [r for r in references if matches(r, task, dataset, protocol)]
        if published:
            lines += ["", "Published with this protocol:"]
            lines += [
                f"* {r['method']} ({r['arch']}): {r['metric']} {r['value']} — {r['source']}"
                for r in published
            ]
        blocks.append("\n".join(lines))
    legend = (
        "Mean ± sample std over seeds (n runs; 95% CI of the mean, t distribution, clipped to the "
        "metric's "
        "range: [0, 100] for percentages, [0, inf) for errors); what n counts is said under "
        "each table. Δ: "
        "difference to the baseline column, Welch's t-test * p < 0.05, ** p < 0.01. "
        "**best**: the best mean, "
        "its interval clear of every other backbone's. A column of one value in effect (a "
        "single run; "
        '"deterministic": a fixed checkpoint on a metric its task declares independent of '
        "the seed; or all "
        "values equal) shows that value alone, and no test or best involves it."
    )
    return legend + "\n\n" + "\n\n".join(blocks)


# ------------------------------------------------------------------------------------------- long
# CSV

LONG_COLUMNS = [
    "backbone",
    "fingerprint",
    "backbone_path",
    "weights",
    "arch",
    "task",
    "protocol",
    "protocol_id",
    "dataset",
    "split",
    "seed",
    "world_size",
    "global_batch",
    "hyperparameters",
    "metric",
    "value",
    "run_dir",
    "n_counts",
    "varies_with_seed",
]


def _split(config: dict) -> str:
    data = config.get("data") or {}
    return str(
        data.get("test_split")
        or data.get("voc_test")
        or data.get("val_list")
        or data.get("test_json")
        or ""
    )


def _global_batch(config: dict) -> str:
    for path in (
        ("batch_size",),
        ("schedule", "batch_size"),
        ("linear", "batch_size"),
        ("optim", "batch_size"),
    ):
        node = config
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int):
            return str(node)
    return ""


def long_rows(records: list[dict], pooled: frozenset = frozenset()) -> list[dict]:
    """One row per run and metric (tidy: pandas reads it as is; pivot on `metric` for a wide table).
    `n_counts`: what the seeds of this row's backbone column differ in (a key of N_COUNTS; empty for
    pretraining runs);
    `varies_with_seed`: the run's declaration for the metric (True, False, or empty where the run
    does not say)."""
    names = labels({identity(r, pooled) for r in records})
    rows = []
    for record in records:
        ident, backbone, config = (
            identity(record, pooled),
            record.get("backbone") or {},
            record.get("config") or {},
        )
        hyper = {
            k: v for k, v in config.items() if k not in ("run_dir", "data", "device", "cache_dir")
        }
        for metric, value in record["metrics"].items():
            rows.append(
                {
                    "backbone": names[ident],
                    "fingerprint": ident.key,
                    "backbone_path": backbone.get("path", ""),
                    "weights": backbone.get("weights", ""),
                    "arch": backbone.get("arch", ""),
                    "task": record["task"],
                    "protocol": record.get("protocol", ""),
                    "protocol_id": record.get("protocol_id", ""),
                    "dataset": record.get("dataset", ""),
                    "split": _split(config),
                    "seed": record.get("seed", ""),
                    "world_size": record.get("world_size", 1),
                    "global_batch": _global_batch(config),
                    "hyperparameters": json.dumps(hyper, sort_keys=True, default=str),
                    "metric": metric,
                    "value": value,
                    "run_dir": record["run_dir"],
                    "n_counts": ident.n_counts if record["task"] != "pretrain" else "",
                    "varies_with_seed": ""
                    if (v := varies_with_seed(record, metric)) is None
                    else v,
                }
            )
    return rows


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, LONG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ------------------------------------------------------------------------------------------- plots


def plot_pretraining(records: list[dict], out_dir: Path) -> list[Path]:
    """The curves of each pretraining run: loss, the HSIC terms, the bandwidth, RankMe, the
    online probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "loss": "loss",
        "hsic_xy": "HSIC(Z, Y)",
        "hsic_xx": "HSIC(Z, Z)",
        "scale": "kernel bandwidth",
        "rankme": "effective rank (RankMe)",
        "probe_loss": "online probe loss",
        "probe_top1": "online probe top-1",
    }
    written = []
    for record in (r for r in records if r["task"] == "pretrain"):
        history_path = Path(record["run_dir"]) / "history.jsonl"
        if not history_path.exists():
            continue
        history = [
            json.loads(line) for line in history_path.read_text().splitlines() if line.strip()
        ]
        keys = [k for k in titles if any(k in h for h in history)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*points))
            ax.set_title(titles[key])
            ax.set_xlabel("step")
        fig.tight_layout()
        run_dir = Path(record["run_dir"])  # pretrain/ or, one per seed, pretrain/seedK/
        label = (
            f"{run_dir.parent.name}_{run_dir.name}"
            if run_dir.name.startswith("seed")
            else run_dir.name
        )
        path = out_dir / f"pretrain_{label}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_tasks(comparisons_: list[Comparison], out_dir: Path) -> list[Path]:
    """Per task: a panel per metric, a bar per backbone with its 95% interval (none for a column
    of one value)."""
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
            errors = [
                [m - c.summaries[i].interval[0] for i, m in zip(order, means)],
                [c.summaries[i].interval[1] - m for i, m in zip(order, means)],
            ]
            ax.bar(
                range(len(order)),
                means,
                yerr=errors,
                capsize=3,
                color=[f"C{k}" for k in range(len(order))],
            )
            ax.set_xticks(
                range(len(order)), [names[i] for i in order], rotation=30, ha="right", fontsize=8
            )
            ax.set_title(
                c.metric + (" ↓" if metric_info(c.metric).lower_is_better else ""), fontsize=9
            )
        fig.suptitle(f"{task} ({rows[0].dataset}), mean and 95% CI over seeds", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"task_{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------- report


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    plots: bool = True,
    echo: bool = True,
    baseline: str | None = None,
    pooled: list[str] = (),
) -> dict:
    """Write report.md, report.csv (long) and the plots into out_dir; return {"comparisons", "rows",
    "files"}.
    `pooled`: backbone names whose runs pool over their weights (one recipe, pretrained once per
    seed)."""
    records = load_records(run_dirs)
    pooled = frozenset(pooled)
    found = comparisons(records, baseline, pooled)
    if baseline and found and all(c.baseline is None for c in found):
        raise UserError(
            f"baseline '{baseline}' names no backbone of these runs; choose one of "
            f"{', '.join(sorted({identity(r).name for r in records if r['task'] != 'pretrain'}))}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = long_rows(records, pooled)
    (out / "report.csv").write_text(csv_text(rows))
    files = [out / "report.md", out / "report.csv"]
    figures = (plot_pretraining(records, out) + plot_tasks(found, out)) if plots else []
    table = markdown(found, load_references())
    embedded = "\n".join(f"![{f.stem}]({f.name})" for f in figures)
    (out / "report.md").write_text(
        f"# Transfer report\n\n{len(records)} runs.\n\n{embedded}\n\n{table}\n"
    )
    files += figures
    if echo:
        print(table)
        print(f"\nwritten: {', '.join(str(f) for f in files)}")
    return {"comparisons": found, "rows": rows, "files": files}
