"""The report: named backbones side by side with intervals and Welch's test, checked against
independent
computations; the long CSV; references; plots."""

import json
import math
import statistics

import pytest

from tests.helpers import run_cli
from transfer.backbone import fingerprint, resolve_backbone
from transfer.classify_datasets import DATASETS
from transfer.report import (
    LONG_COLUMNS,
    build_report,
    comparisons,
    load_records,
    load_references,
    markdown,
    metric_info,
)

# Student's t, 0.975 quantile, 1 and 2 degrees of freedom
T_975 = {1: 12.706204736174705, 2: 4.302652729749464}


def write_run(
    path,
    task,
    metrics,
    backbone,
    seed,
    dataset="scenes",
    protocol_id=None,
    config=None,
    varies=None,
):
    """A metrics.json; `varies`: its varies_with_seed (a bool for every metric; None: the field left
    out, as in
    files written before it existed)."""
    path.mkdir(parents=True)
    record = {
        "task": task,
        "dataset": dataset,
        "backbone": backbone,
        "protocol": "p",
        "metrics": metrics,
        "seed": seed,
        "config": config or {"batch_size": 8, "lr": 0.1, "data": {"test_split": "val"}},
        "code_version": "0",
        "wall_time_s": 1.0,
        "world_size": 1,
    }
    if protocol_id:
        record["protocol_id"] = protocol_id
    if varies is not None:
        record["varies_with_seed"] = dict.fromkeys(metrics, varies)
    (path / "metrics.json").write_text(json.dumps(record))
    return path


def named(name, fingerprint, path=None, weights="ema", arch="resnet18"):
    return {
        "name": name,
        "path": path or f"/ckpt/{name}.pth",
        "sha256": fingerprint * 64,
        "fingerprint": fingerprint * 64,
        "weights": weights,
        "arch": arch,
    }


RANDOM = {
    "name": "random-resnet18",
    "path": "random:resnet18",
    "sha256": "0" * 64,
    "fingerprint": "0" * 64,
    "weights": "random",
    "arch": "resnet18",
}
VALUES = {"ssl-hsic": [70.0, 74.0], "byol": [71.0, 72.0], "random-resnet18": [60.0, 61.0]}


@pytest.fixture
def three_backbones(tmp_path):
    """3 backbones x 2 seeds on segmentation; depth for one seed (n = 1: no interval, no test)."""
    backbones = {
        "ssl-hsic": named("ssl-hsic", "a"),
        "byol": named("byol", "b"),
        "random-resnet18": RANDOM,
    }
    dirs = []
    for name, backbone in backbones.items():
        for seed, value in enumerate(VALUES[name]):
            # each random seed draws other weights: another fingerprint, still the same baseline
            b = (
                {**backbone, "fingerprint": f"{seed}" * 64}
                if name.startswith("random")
                else backbone
            )
            dirs.append(
                write_run(tmp_path / f"seg_{name}_{seed}", "segmentation", {"mIoU": value}, b, seed)
            )
        dirs.append(
            write_run(
                tmp_path / f"depth_{name}",
                "depth",
                {"rms": {"ssl-hsic": 0.5, "byol": 0.55, "random-resnet18": 0.7}[name]},
                backbone,
                0,
            )
        )
    pretrain = write_run(
        tmp_path / "pretrain", "pretrain", {"loss": -0.3}, backbones["ssl-hsic"], 0, "fashion_mnist"
    )
    (pretrain / "history.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "step": s,
                    "loss": -s / 10,
                    "hsic_xy": s / 5,
                    "hsic_xx": 0.01,
                    "scale": 1.0,
                    "rankme": 10.0 + s,
                    "probe_top1": s / 10,
                }
            )
            + "\n"
            for s in range(1, 6)
        )
    )
    return [*dirs, pretrain]


def welch_by_formula(a, b):
    """Welch's t and its two-sided p from the t distribution's CDF, written out (not
    scipy.stats.ttest_ind)."""
    from scipy.special import stdtr

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stdtr(dof, -abs(t))


def test_three_backbones_two_seeds_give_columns_means_intervals_and_differences(
    three_backbones, tmp_path
):
    report = build_report(three_backbones, tmp_path / "out", plots=False, echo=False)
    seg = next(c for c in report["comparisons"] if c.task == "segmentation")
    by_name = {ident.name: summary for ident, summary in seg.summaries.items()}
    assert set(by_name) == {"ssl-hsic", "byol", "random-resnet18"}
    assert seg.baseline.name == "random-resnet18"
    for name, values in VALUES.items():
        s = by_name[name]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        half = T_975[1] * std / math.sqrt(2)
        assert (s.n, s.mean, s.std) == (2, pytest.approx(mean), pytest.approx(std))
        assert s.interval == pytest.approx((mean - half, mean + half))
    for ident in seg.summaries:
        if ident.name != "random-resnet18":
            diff, p = seg.difference(ident)
            assert diff == pytest.approx(statistics.fmean(VALUES[ident.name]) - 60.5)
            assert p == pytest.approx(
                welch_by_formula(VALUES[ident.name], VALUES["random-resnet18"])
            )
    assert seg.best is None  # ssl-hsic's mean is best, but its interval (n = 2) overlaps byol's
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| metric | random-resnet18 (baseline) | byol | ssl-hsic |" in md
    assert "| rms (lower is better) | 0.7 | 0.55; Δ -0.15 | 0.5; Δ -0.2 |" in md


def test_best_is_marked_only_beyond_the_intervals(tmp_path):
    dirs = []
    for name, values in {"good": [80.0, 80.5, 81.0], "weak": [60.0, 61.0, 62.0]}.items():
        for seed, value in enumerate(values):
            dirs.append(
                write_run(
                    tmp_path / f"{name}{seed}",
                    "linear",
                    {"top1": value},
                    named(name, name[0]),
                    seed,
                )
            )
    comparison = build_report(dirs, tmp_path / "out", plots=False, echo=False)["comparisons"][0]
    # no random init: no differences
    assert comparison.best.name == "good" and comparison.baseline is None
    assert (
        "**80.5 ± 0.5 (n=3; 95% CI 79.26–81.74)** best"
        in (tmp_path / "out" / "report.md").read_text()
    )


def test_two_pretrained_checkpoints_never_merge_even_under_one_name(tmp_path):
    """The bug this report replaced: every non-random backbone became one 'pretrained' row."""
    dirs = [
        write_run(
            tmp_path / "a",
            "knn",
            {"top1": 50.0},
            named("last", "a", "/runs/a/checkpoints/last.pt"),
            0,
        ),
        write_run(
            tmp_path / "b",
            "knn",
            {"top1": 90.0},
            named("last", "b", "/runs/b/checkpoints/last.pt"),
            0,
        ),
    ]
    comparison = build_report(dirs, tmp_path / "out", plots=False, echo=False)["comparisons"][0]
    assert sorted(s.mean for s in comparison.summaries.values()) == [50.0, 90.0]
    assert (
        "| metric | last [aaaaaaaa] | last [bbbbbbbb] |"
        in (tmp_path / "out" / "report.md").read_text()
    )


def test_a_recipe_pretrained_once_per_seed_pools_over_its_checkpoints_when_named(tmp_path):
    """The main job's pretrain_per_seed: seed k's runs evaluate seed k's checkpoint; `pooled` makes
    the recipe one
    column whose interval spans the pretraining seeds, the way random init's spans its draws."""
    values = {"ssl-hsic": [80.0, 82.0, 84.0], "random-resnet18": [70.0, 71.0, 72.0]}
    dirs = []
    for seed in range(3):
        dirs.append(
            write_run(
                tmp_path / f"ssl{seed}",
                "knn",
                {"top1": values["ssl-hsic"][seed]},
                named("ssl-hsic", "abc"[seed]),
                seed,
            )
        )
        dirs.append(
            write_run(
                tmp_path / f"random{seed}",
                "knn",
                {"top1": values["random-resnet18"][seed]},
                {**RANDOM, "fingerprint": f"{seed}" * 64},
                seed,
            )
        )
    apart = build_report(dirs, tmp_path / "apart", plots=False, echo=False)["comparisons"][0]
    assert len(apart.summaries) == 4  # three checkpoints of n = 1 and random init
    pooled = build_report(dirs, tmp_path / "out", plots=False, echo=False, pooled=["ssl-hsic"])[
        "comparisons"
    ][0]
    summary = {ident.name: s for ident, s in pooled.summaries.items()}
    assert summary["ssl-hsic"].values == [80.0, 82.0, 84.0]
    half = T_975[2] * 2.0 / math.sqrt(3)  # s = 2 for both
    assert summary["ssl-hsic"].interval == pytest.approx((82.0 - half, 82.0 + half))
    assert summary["random-resnet18"].interval == pytest.approx(
        (71.0 - T_975[2] / math.sqrt(3), 71.0 + T_975[2] / math.sqrt(3))
    )
    # 77.0 > 72.4: clear of random init
    assert pooled.best is not None and pooled.best.name == "ssl-hsic"
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| metric | random-resnet18 (baseline) | ssl-hsic |" in table and "n=3" in table


def knn_and_linear_over_evaluation_seeds(tmp_path, declare=True):
    """One checkpoint (ssl-hsic) evaluated with seeds 0 and 1, beside random init (new weights each
    seed): kNN is
    declared deterministic given the weights, the SGD linear probe is not."""
    values = {
        ("knn", "ssl-hsic"): [65.0, 65.0],
        ("knn", "random-resnet18"): [50.0, 52.0],
        ("linear", "ssl-hsic"): [70.0, 72.0],
        ("linear", "random-resnet18"): [40.0, 44.0],
    }
    dirs = []
    for (task, name), seeds in values.items():
        for seed, value in enumerate(seeds):
            backbone = (
                named("ssl-hsic", "a")
                if name == "ssl-hsic"
                else {**RANDOM, "fingerprint": f"{seed}" * 64}
            )
            dirs.append(
                write_run(
                    tmp_path / f"{task}_{name}_{seed}",
                    task,
                    {"top1": value},
                    backbone,
                    seed,
                    varies=(task != "knn") if declare else None,
                )
            )
    return dirs


def table_rows(md: str, task: str) -> list[str]:
    block = next(b for b in md.split("\n\n### ")[1:] if b.startswith(task))
    return block.splitlines()


def test_a_deterministic_metric_of_one_checkpoint_is_one_value_without_interval_or_marks(tmp_path):
    """The user's `65 ± 0 (n=2; 95% CI 65–65)`: kNN over two evaluation seeds of one checkpoint
    counts nothing that
    varies. A naive Welch's test against random init would mark it (one-sample t = 14, 1 dof: p = 0.045)."""
    report = build_report(
        knn_and_linear_over_evaluation_seeds(tmp_path), tmp_path / "out", plots=False, echo=False
    )
    knn = next(c for c in report["comparisons"] if c.task == "knn")
    ssl = next(i for i in knn.summaries if i.name == "ssl-hsic")
    assert knn.summaries[ssl].deterministic and knn.summaries[ssl].interval == (65.0, 65.0)
    assert knn.difference(ssl) == (14.0, None) and knn.best is None
    md = (tmp_path / "out" / "report.md").read_text()
    knn_rows, linear_rows = table_rows(md, "knn"), table_rows(md, "linear")
    half = T_975[1] * math.sqrt(2) / math.sqrt(2)
    assert knn_rows[2:5] == [
        "| metric | random-resnet18 (baseline) | ssl-hsic |",
        "|---|---|---|",
        f"| top1 | 51 ± 1.4 (n=2; 95% CI {51 - half:.4g}–{51 + half:.4g}) | "
        "65 (deterministic; n=2 evaluation seeds, one value); Δ +14 |",
    ]
    assert knn_rows[6:] == [
        "n counts: random-resnet18: random-init seeds (each seed draws new weights); ssl-hsic: "
        "evaluation seeds of one "
        "checkpoint (fixed weights; only the task's seed changes).",
        "Deterministic given the weights (declared by the task): top1; a fixed checkpoint's column "
        "of it is one "
        "value, without interval or test.",
    ]
    # the linear probe's seed draws its head's init and batch order: one checkpoint's spread is
    # real, with its test
    p = welch_by_formula([70.0, 72.0], [40.0, 44.0])
    assert (
        f"| top1 | 42 ± 2.8 (n=2; 95% CI 16.59–67.41) | 71 ± 1.4 (n=2; 95% CI 58.29–83.71); Δ +29"
        f"{'**' if p < 0.01 else '*' if p < 0.05 else ''} |" in linear_rows
    )
    assert not any(line.startswith("Deterministic") for line in linear_rows)


def test_a_declared_deterministic_column_whose_runs_differ_is_warned_about_not_hidden(tmp_path):
    dirs = [
        write_run(
            tmp_path / f"knn{seed}",
            "knn",
            {"top1": value},
            named("ssl-hsic", "a"),
            seed,
            varies=False,
        )
        for seed, value in enumerate([65.0, 65.5])
    ]
    build_report(dirs, tmp_path / "out", plots=False, echo=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert (
        "| top1 | 65.25 (declared deterministic, yet its n=2 values differ: 65–65.5; see the "
        "warning) |" in md
    )
    assert (
        "Warning: top1 of ssl-hsic is declared not to vary with the evaluation seed, yet its 2 "
        "runs give 65, 65.5: "
        "the runs differ in something else (data, code version, hardware); check them."
    ) in md
    assert "CI" not in md.split("### ")[1]


def test_metrics_json_without_the_declaration_still_reports_as_varying_but_equal_values_get_no_interval(
    tmp_path,
):
    """Runs written before `varies_with_seed`: counted as varying (intervals and tests where they
    spread), but n >= 2
    equal values get no zero-width interval and no test: `all equal`, not `deterministic`."""
    report = build_report(
        knn_and_linear_over_evaluation_seeds(tmp_path, declare=False),
        tmp_path / "out",
        plots=False,
        echo=False,
    )
    knn = next(c for c in report["comparisons"] if c.task == "knn")
    ssl = next(i for i in knn.summaries if i.name == "ssl-hsic")
    assert knn.summaries[ssl].varies is None and not knn.summaries[ssl].deterministic
    assert knn.difference(ssl) == (14.0, None)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 65 (n=2, all equal; no interval); Δ +14 |" in md
    assert "71 ± 1.4 (n=2; 95% CI 58.29–83.71)" in md and "Deterministic" not in md
    import pandas as pd

    frame = pd.read_csv(tmp_path / "out" / "report.csv")
    assert frame.varies_with_seed.isna().all()


def test_intervals_are_clipped_to_the_metrics_range(tmp_path):
    """A top-1 over three seeds of 10, 90 and 50 % has the t interval 50 ± 99.4: [0, 100] holds it.
    Depth's rms is an
    error: clipped at 0 below, not above."""
    top1, rms = [10.0, 90.0, 50.0], [0.1, 2.0]
    dirs = [
        write_run(
            tmp_path / f"lin{seed}",
            "linear",
            {"top1": v},
            named("ssl-hsic", "a"),
            seed,
            varies=True,
        )
        for seed, v in enumerate(top1)
    ]
    dirs += [
        write_run(
            tmp_path / f"depth{seed}",
            "depth",
            {"rms": v, "delta1": 100.0 - v},
            named("ssl-hsic", "a"),
            seed,
            varies=True,
        )
        for seed, v in enumerate(rms)
    ]
    report = build_report(dirs, tmp_path / "out", plots=False, echo=False)
    by_metric = {c.metric: next(iter(c.summaries.values())) for c in report["comparisons"]}
    assert T_975[2] * statistics.stdev(top1) / math.sqrt(3) > 99  # unclipped: -49.4 to 149.4
    assert by_metric["top1"].interval == (0.0, 100.0)
    half = T_975[1] * statistics.stdev(rms) / math.sqrt(2)
    assert by_metric["rms"].interval == (0.0, pytest.approx(1.05 + half))
    assert by_metric["delta1"].interval == (pytest.approx(98.95 - half), 100.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| top1 | 50 ± 40 (n=3; 95% CI 0–100) |" in md
    assert f"| rms (lower is better) | 1.05 ± 1.3 (n=2; 95% CI 0–{1.05 + half:.4g}) |" in md
    ranges = {
        name: metric_info(name).range
        for name in (
            "top1@10%",
            "linear.mean_per_class",
            "finetune.voc07_map",
            "bbox.AP50",
            "segm.APl",
            "mIoU",
            "IoU.cat",
            "delta3",
        )
    }
    assert set(ranges.values()) == {(0.0, 100.0)}
    assert metric_info("log10").range == (0.0, math.inf) and metric_info("log10").lower_is_better
    assert metric_info("something_new").range == (-math.inf, math.inf)


def test_the_table_and_the_csv_say_what_n_counts(tmp_path):
    """A recipe pooled over its pretraining seeds, the same checkpoints apart (each an evaluation of
    fixed weights),
    and random init; a pooled recipe with fewer distinct weights than runs is warned about."""
    import pandas as pd

    dirs = []
    for seed in range(2):
        dirs.append(
            write_run(
                tmp_path / f"ssl{seed}",
                "linear",
                {"top1": 80.0 + seed},
                named("ssl-hsic", "ab"[seed]),
                seed,
                varies=True,
            )
        )
        dirs.append(
            write_run(
                tmp_path / f"random{seed}",
                "linear",
                {"top1": 60.0 + seed},
                {**RANDOM, "fingerprint": f"{seed}" * 64},
                seed,
                varies=True,
            )
        )
    build_report(dirs, tmp_path / "pooled", plots=False, echo=False, pooled=["ssl-hsic"])
    build_report(dirs, tmp_path / "apart", plots=False, echo=False)
    pooled_md, apart_md = ((tmp_path / d / "report.md").read_text() for d in ("pooled", "apart"))
    assert (
        "n counts: random-resnet18: random-init seeds (each seed draws new weights); ssl-hsic: "
        "pretraining seeds "
        "(each seed pretrained its own weights)."
    ) in pooled_md
    assert (
        "n counts: random-resnet18: random-init seeds (each seed draws new weights); ssl-hsic "
        "[aaaaaaaa], ssl-hsic "
        "[bbbbbbbb]: evaluation seeds of one checkpoint (fixed weights; only the task's seed "
        "changes)."
    ) in apart_md
    assert "Warning" not in pooled_md
    for out, ssl in (("pooled", "pretraining_seeds"), ("apart", "evaluation_seeds")):
        frame = pd.read_csv(tmp_path / out / "report.csv")
        assert frame.groupby("weights")["n_counts"].unique().map(list).to_dict() == {
            "ema": [ssl],
            "random": ["random_init_seeds"],
        }
        assert frame.varies_with_seed.tolist() == [True] * 4
    again = write_run(
        tmp_path / "ssl_again", "linear", {"top1": 80.5}, named("ssl-hsic", "a"), 2, varies=True
    )
    build_report([*dirs, again], tmp_path / "twice", plots=False, echo=False, pooled=["ssl-hsic"])
    assert (
        "Warning: ssl-hsic pools 3 runs over 2 distinct weights: n counts runs, not pretrainings, "
        "and the interval "
        "treats repeated evaluations of one checkpoint as independent."
    ) in (tmp_path / "twice" / "report.md").read_text()


def test_the_long_csv_has_one_row_per_run_and_metric_that_pandas_reads(three_backbones, tmp_path):
    import pandas as pd

    build_report(three_backbones, tmp_path / "out", plots=False, echo=False)
    frame = pd.read_csv(tmp_path / "out" / "report.csv")
    assert list(frame.columns) == LONG_COLUMNS
    # 6 segmentation runs, 3 depth runs, the pretraining run (one metric each)
    assert len(frame) == 6 + 3 + 1
    seg = frame[frame.task == "segmentation"]
    assert seg.groupby("backbone")["value"].mean().to_dict() == {
        n: statistics.fmean(v) for n, v in VALUES.items()
    }
    row = seg.iloc[0]
    assert (row.split, row.global_batch, row.world_size) == ("val", 8, 1)
    assert json.loads(row.hyperparameters) == {"batch_size": 8, "lr": 0.1}


def test_a_published_reference_shows_only_for_its_protocol(tmp_path):
    ours = write_run(
        tmp_path / "ours",
        "linear",
        {"top1": 70.0},
        named("ssl-hsic", "a"),
        0,
        "imagenet",
        protocol_id="imagenet-linear-byol",
    )
    other = write_run(
        tmp_path / "other", "linear", {"top1": 30.0}, named("ssl-hsic", "a"), 0, "fashion_mnist"
    )
    build_report([ours, other], tmp_path / "out", plots=False, echo=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("Published with this protocol:") == 1
    assert "* BYOL (ResNet-50): top1 74.3 — Grill et al., NeurIPS 2020, Table 1a" in md
    assert "SSL-HSIC (ResNet-50)" not in md  # its protocol id is imagenet-linear-sslhsic


def test_a_reference_naming_a_dataset_shows_only_beside_that_datasets_runs(tmp_path):
    """One protocol id covers the twelve classification datasets: a reference with a dataset field
    matches only
    runs of that dataset; one without matches every dataset of its protocol id and task."""
    runs = [
        write_run(
            tmp_path / name,
            "classify",
            {f"linear.{metric}": 80.0},
            named("ssl-hsic", "a"),
            0,
            name,
            protocol_id="kornblith-transfer-byol",
        )
        for name, metric in (("pets", "mean_per_class"), ("flowers102", "mean_per_class"))
    ]
    references = [
        {
            "protocol_id": "kornblith-transfer-byol",
            "task": "classify",
            "dataset": "pets",
            "metric": "linear.mean_per_class",
            "value": 11.1,
            "method": "A",
            "arch": "ResNet-50",
            "source": "pets paper",
        },
        {
            "protocol_id": "kornblith-transfer-byol",
            "task": "classify",
            "dataset": "flowers102",
            "metric": "linear.mean_per_class",
            "value": 22.2,
            "method": "B",
            "arch": "ResNet-50",
            "source": "flowers",
        },
        {
            "protocol_id": "kornblith-transfer-byol",
            "task": "classify",
            "metric": "linear.top1",
            "value": 33.3,
            "method": "C",
            "arch": "ResNet-50",
            "source": "every dataset",
        },
        {
            "protocol_id": "kornblith-transfer-byol",
            "task": "classify",
            "dataset": "cars",
            "metric": "linear.top1",
            "value": 44.4,
            "method": "D",
            "arch": "ResNet-50",
            "source": "cars paper",
        },
    ]
    md = markdown(comparisons(load_records(runs)), references)
    blocks = {block.splitlines()[0]: block for block in md.split("\n\n### ")[1:]}
    pets = blocks["classify · pets · kornblith-transfer-byol"]
    flowers = blocks["classify · flowers102 · kornblith-transfer-byol"]
    assert "linear.mean_per_class 11.1 — pets paper" in pets and "22.2" not in pets
    assert "linear.mean_per_class 22.2 — flowers" in flowers and "11.1" not in flowers
    assert all("33.3 — every dataset" in b for b in (pets, flowers))
    assert "44.4" not in md  # no cars run


def test_every_reference_is_well_formed():
    """Each entry names its protocol, task, metric, value, method, arch and a source with its table;
    a dataset,
    where given, is one the classification table knows."""
    known = set(DATASETS)
    references = load_references()
    assert references
    for r in references:
        assert {"protocol_id", "task", "metric", "value", "method", "arch", "source"} <= set(r), r
        assert isinstance(r["value"], (int, float)) and (
            "Table" in r["source"] or "README" in r["source"]
        ), r
        assert r.get("dataset") in ({None} | known), r
    keys = [
        (r["protocol_id"], r["task"], r.get("dataset"), r["metric"], r["method"], r["arch"])
        for r in references
    ]
    assert len(keys) == len(set(keys)), "duplicate reference"


def test_report_cli_writes_plots_embedded_in_report_md(three_backbones, tmp_path):
    result = run_cli(
        "transfer",
        "report",
        *map(str, three_backbones),
        "--out",
        str(tmp_path / "out"),
        "--baseline",
        "byol",
    )
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["pretrain_pretrain.png", "task_depth.png", "task_segmentation.png"]
    assert all((tmp_path / "out" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(f"]({p})" in md for p in pngs)
    assert "| metric | byol (baseline) | random-resnet18 | ssl-hsic |" in md
    bad = run_cli(
        "transfer",
        "report",
        *map(str, three_backbones),
        "--out",
        str(tmp_path / "bad"),
        "--baseline",
        "moco",
    )
    assert bad.returncode == 2 and "baseline 'moco' names no backbone of these runs" in bad.stderr


def test_report_refuses_unfinished_runs(tmp_path):
    (tmp_path / "run").mkdir()
    result = run_cli("transfer", "report", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "metrics.json does not exist" in result.stderr


def test_a_real_task_run_records_its_backbone_name_and_fingerprint(tmp_path):
    args = [
        "knn",
        "--backbone",
        "baseline=random:resnet18",
        "--config",
        "configs/transfer/linear_fashion_mnist.yaml",
        f"run_dir={tmp_path / 'run'}",
        "data.limit_train=100",
        "data.limit_test=50",
        "data.num_workers=0",
        f"cache_dir={tmp_path / 'cache'}",
        "protocol_id=fm-knn",
    ]
    result = run_cli("transfer", *args)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["backbone"]["name"] == "baseline" and record["protocol_id"] == "fm-knn"
    # kNN: deterministic given the weights
    assert record["varies_with_seed"] == {"top1": False, "top5": False}
    assert record["backbone"]["fingerprint"] == fingerprint(
        resolve_backbone("random:resnet18", 0).state_dict
    )
