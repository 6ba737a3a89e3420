"""The pipeline on a real SLURM cluster: one submission of the whole dependency graph, its status, a
failed
upstream step and the rerun that submits only what is missing."""

import contextlib
import io
import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from common.cli import run_main
from slurm import graph
from slurm.__main__ import main
from tests.helpers import TINY, run_cli

pytestmark = pytest.mark.slow


def write_pipeline(tmp_path: Path, pretrain_extra: list[str]) -> Path:
    executor = tmp_path / "executor.yaml"
    executor.write_text(
        json.dumps(
            {
                "cluster": "slurm",
                "timeout_min": 20,
                "cpus_per_task": 1,
                # pretraining and kNN as 2-task jobs (gloo on CPU), the CPU tools as one task
                "profiles": {
                    "report": {"timeout_min": 5},
                    "pretrain": {"timeout_min": 15, "tasks_per_node": 2},
                    "knn": {"tasks_per_node": 2},
                },
            }
        )
    )
    config = tmp_path / "pipeline.json"
    config.write_text(
        json.dumps(
            {
                "root": str(tmp_path / "root"),
                "executor": str(executor),
                "pretrain_config": "configs/pretrain/fashion_mnist_resnet18.yaml",
                "pretrain_overrides": [*TINY, "optim.epochs=1", *pretrain_extra],
                "use_scenes": False,
                "supervised": False,
                "tasks": {"knn": "configs/transfer/linear_fashion_mnist.yaml"},
                "task_overrides": {
                    "knn": [
                        "data.limit_train=300",
                        "data.limit_test=100",
                        "data.num_workers=0",
                        f"cache_dir={tmp_path / 'cache'}",
                    ]
                },
                "seeds": [0],
            }
        )
    )
    return config


def wait_until_settled(root: Path, timeout_s: float = 900) -> dict:
    """Poll the graph until no job is pending or running (NEVER counts as settled)."""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = graph.states(graph.load(root))
        if all(state not in graph.LIVE for state, _ in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"the graph did not settle: {states}")


def manifest_ids(root: Path) -> dict:
    return {
        job["name"]: job["job_id"]
        for job in json.loads((root / "manifest.json").read_text())["jobs"]
    }


@pytest.mark.timeout(2400)
def test_one_submission_a_failed_upstream_step_and_a_rerun_that_submits_only_what_is_missing(
    slurm_cluster, tmp_path
):
    root = tmp_path / "root"
    # 8 images, a batch of 16: pretraining fails in its job (at run time, not when the config loads)
    broken = write_pipeline(tmp_path, ["data.limit=8"])
    started = time.monotonic()
    result = run_cli("slurm", "pipeline", "--config", str(broken), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one dependency graph" in result.stdout
    assert not (root / "pretrain" / "metrics.json").exists()  # returned before the first job ended
    first = manifest_ids(root)
    assert set(first) == {
        "pretrain",
        "export",
        "verify",
        "knn/pretrained/seed0",
        "knn/random/seed0",
        "report",
    }
    assert all(first.values())

    states = wait_until_settled(root)
    assert states["pretrain"][0] == "FAILED" and "log " in states["pretrain"][1]
    assert states["knn/random/seed0"][0] == "DONE"  # needs nothing that failed
    for name in ("export", "verify", "knn/pretrained/seed0", "report"):
        assert (
            states[name][0] == "NEVER" and "needs pretrain, which ended FAILED" in states[name][1]
        ), states[name]
    status = run_cli("slurm", "status", str(root))
    assert status.returncode == 0 and "NEVER" in status.stdout and "needs pretrain" in status.stdout

    fixed = write_pipeline(tmp_path, [])
    result = run_cli("slurm", "pipeline", "--config", str(fixed), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    second = manifest_ids(root)
    assert second["knn/random/seed0"] == first["knn/random/seed0"]  # done: not submitted again
    assert all(
        second[name] != first[name]
        for name in ("pretrain", "export", "verify", "knn/pretrained/seed0", "report")
    )
    states = wait_until_settled(root)
    assert all(state == "DONE" for state, _ in states.values()), states
    table = (root / "report" / "report.md").read_text()
    assert (
        "### knn ·" in table
        and "| top1 |" in table
        and "| random-resnet18 (baseline) | ssl-hsic |" in table
    )
    record = json.loads((root / "knn" / "pretrained" / "seed0" / "metrics.json").read_text())
    assert record["backbone"]["weights"] == "ema" and record["world_size"] == 2
    assert (root / "pretrain" / "log.txt").read_text().count("processes: 2") >= 1
    assert json.loads((root / "export" / "verified.json").read_text())["arch"] == "resnet18"
    assert time.monotonic() - started < 1800


def test_bad_profiles_and_batches_are_refused_before_anything_is_submitted(tmp_path):
    config = write_pipeline(tmp_path, [])
    executor = tmp_path / "executor.yaml"
    executor.write_text(json.dumps({"cluster": "slurm", "profiles": {"pretrian": {"nodes": 2}}}))
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2 and result.stderr.startswith(
        "error: config key 'profiles' has a profile for "
        "'pretrian', which is no step; did "
        "you mean 'pretrain'?"
    )
    assert result.stderr.count("\n") == 1
    executor.write_text(json.dumps({"cluster": "slurm", "profiles": {"pretrain": {"nodes": 3}}}))
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == (
        "error: optim.batch_size=16 (the global batch) does not divide among the pretrain "
        "profile's 3 processes (nodes x tasks_per_node); choose a multiple of "
        "3\n"
    )
    executor.write_text(json.dumps({"cluster": "slurm", "profiles": {"knn": {"nodes": 0}}}))
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2 and result.stderr.startswith(
        "error: executor profile 'knn': config key 'nodes' is 0"
    )
    # every profile is checked when the file loads
    executor.write_text(json.dumps({"cluster": "slurm"}))
    result = run_cli(
        "slurm", "pipeline", "--config", str(config), "pretrain_overrides=[data.root=/nonexistent]"
    )
    assert (
        result.returncode == 2 and "pretraining data /nonexistent does not exist" in result.stderr
    )
    assert not (tmp_path / "root").exists()


def test_a_missing_partition_is_refused_before_anything_is_submitted(slurm_cluster, tmp_path):
    config = write_pipeline(tmp_path, [])
    (tmp_path / "executor.yaml").write_text(
        json.dumps({"cluster": "slurm", "profiles": {"knn": {"partition": "a100"}}})
    )
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: SLURM partition 'a100' does not exist on this cluster")
    assert not (tmp_path / "root" / "manifest.json").exists()


# ------------------------------------------------------------------------- the dry run is the
# submission


def dry_run_batches(stdout: str) -> dict[str, tuple[list[str], list[str]]]:
    """key -> (sbatch flags, names of the nodes it runs) from a pipeline dry run on SLURM."""
    batches: dict[str, tuple[list[str], list[str]]] = {}
    for line in stdout.splitlines():
        sbatch = re.fullmatch(r"\[pipeline\] (\S+): sbatch (.*)", line)
        command = re.fullmatch(r"\[pipeline\] (\S+)(?: \(array task \d+\))?: python -m .*", line)
        if sbatch:
            key = sbatch[1]
            batches[key] = (sbatch[2].split(" "), [])
        elif command:
            batches[key][1].append(command[1])
    return batches


def slurm_time(minutes: int) -> str:
    """--time=MINUTES as scontrol shows it: [D-]HH:MM:SS."""
    days, rest = divmod(minutes, 1440)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def test_the_dry_run_prints_the_flags_submission_passes_to_sbatch(slurm_cluster, tmp_path):
    """Held jobs (additional: {hold: true}, in the dry run too): nothing runs, everything stays
    pending, and
    scontrol shows what sbatch got; seeds 0 and 1 make job arrays, the supervised control a third
    backbone."""
    config = write_pipeline(tmp_path, [])
    pipeline = json.loads(config.read_text())
    config.write_text(json.dumps({**pipeline, "seeds": [0, 1], "supervised": True}))
    executor = tmp_path / "executor.yaml"
    executor.write_text(
        json.dumps({**json.loads(executor.read_text()), "additional": {"hold": True}})
    )
    root = tmp_path / "root"
    dry = run_cli("slurm", "pipeline", "--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert not root.exists()
    batches = dry_run_batches(dry.stdout)
    assert list(batches) == [
        "pretrain",
        "export",
        "verify",
        "supervised",
        "knn/pretrained",
        "knn/random",
        "knn/supervised",
        "report",
    ]
    flags = {
        key: dict(f.removeprefix("--").split("=", 1) for f in batch[0] if "=" in f)
        for key, batch in batches.items()
    }
    assert flags["knn/pretrained"]["array"] == "0-1%2" and "array" not in flags["pretrain"]
    assert flags["knn/pretrained"]["dependency"] == "afterok:{verify}"
    assert (
        flags["knn/supervised"]["dependency"] == "afterok:{supervised}"
        and "dependency" not in flags["knn/random"]
    )
    assert flags["report"]["dependency"] == "afterok:{knn/pretrained}:{knn/random}:{knn/supervised}"
    assert (
        flags["knn/random"]["job-name"] == "ssl-hsic:knn/random"
        and flags["pretrain"]["job-name"] == "ssl-hsic:pretrain"
    )
    assert (
        flags["pretrain"]["time"],
        flags["knn/random"]["time"],
        flags["report"]["time"],
        flags["export"]["time"],
    ) == ("15", "20", "5", "20")  # each profile's own limit, the default elsewhere
    assert batches["knn/random"][1] == ["knn/random/seed0", "knn/random/seed1"]

    result = run_cli("slurm", "pipeline", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = manifest_ids(root)
    base = {key: ids[nodes[0]].split("_")[0] for key, (_, nodes) in batches.items()}
    try:
        for key, (dry_flags, nodes) in batches.items():
            if len(nodes) > 1:
                assert [ids[n] for n in nodes] == [f"{base[key]}_{i}" for i in range(len(nodes))]
            # what submitit gave sbatch: the #SBATCH lines of the script it submitted
            folder = Path(flags[key]["output"]).parent
            script = (folder / f"{base[key]}_submission.sh").read_text()
            sent = [
                shlex.split(line)[1] for line in script.splitlines() if line.startswith("#SBATCH ")
            ]
            expected = [
                re.sub(r"\{([^}]+)\}", lambda m: ids.get(m[1]) or base[m[1]], f) for f in dry_flags
            ]
            assert sent == expected, key
            # what SLURM made of it
            shown = slurm_cluster.scontrol("show", "job", base[key]).stdout
            field = dict(re.findall(r"(\w+)=(\S+)", shown))
            assert field["JobName"] == flags[key]["job-name"] and field["JobState"] == "PENDING", (
                key
            )
            assert field["TimeLimit"] == slurm_time(int(flags[key]["time"])), key
            assert field.get("ArrayTaskId", None) == flags[key].get("array"), key
            named = {job_id: name for name, job_id in {**ids, **base}.items()}
            waits = [
                named[job_id.removesuffix("_*")]
                for job_id in re.findall(r"afterok:([\d_*]+)\(", shown)
            ]
            assert waits == re.findall(r"\{([^}]+)\}", flags[key].get("dependency", "")), key
        queue = subprocess.run(
            ["squeue", "-h", "-o", "%j", "-j", ",".join(base.values())],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        # squeue shows each job by its step
        assert sorted(queue) == sorted(f["job-name"] for f in flags.values())
    finally:
        subprocess.run(["scancel", *base.values()], capture_output=True)


# ------------------------------------------------------------------------- bad input on the slurm
# side


def _executor(tmp_path, document: dict) -> str:
    path = tmp_path / "executor.yaml"
    path.write_text(json.dumps({"cluster": "slurm", **document}))
    return str(path)


def _broken_manifest(root: Path) -> bool:
    (root / "manifest.json").write_text("{")  # cut short
    return True


BAD_SLURM_INPUT = {
    # case: (argv maker, what the one line must say)
    "status-not-a-run": (
        lambda t: ["status", str(t)],
        [" is not a submitted run", "holds no manifest.json"],
    ),
    "status-broken-manifest": (
        lambda t: _broken_manifest(t) and ["status", str(t)],
        ["manifest.json is not a job manifest", "resubmit"],
    ),
    "pipeline-repeated-seed": (
        lambda t: ["pipeline", "--config", str(write_pipeline(t, [])), "seeds=[0,1,0]"],
        ["'seeds' is [0, 1, 0]", "seed 0 appears 2 times", "e.g. [0, 1]"],
    ),
    "evaluate-repeated-seed": (
        lambda t: [
            "evaluate",
            "--backbone",
            "random:resnet18",
            "--task",
            "knn=configs/transfer/linear_fashion_mnist.yaml",
            "--seeds",
            "3",
            "3",
            "--root",
            str(t / "eval"),
        ],
        ["'seeds' is [3, 3]", "seed 3 appears 2 times", "e.g. [3]"],
    ),
    "profile-unknown-step": (
        lambda t: [
            "submit",
            "pretrain",
            "--executor",
            _executor(t, {"profiles": {"pretrian": {"nodes": 2}}}),
            "--dry-run",
        ],
        ["profile for 'pretrian', which is no step", "did you mean 'pretrain'?"],
    ),
    "profile-unknown-key": (
        lambda t: [
            "submit",
            "pretrain",
            "--executor",
            _executor(t, {"profiles": {"knn": {"gpus": 2}}}),
            "--dry-run",
        ],
        ["'profiles.knn' has the unknown key 'gpus'", "did you mean 'gpus_per_node'?"],
    ),
    "profile-not-a-mapping": (
        lambda t: [
            "submit",
            "pretrain",
            "--executor",
            _executor(t, {"profiles": {"knn": 4}}),
            "--dry-run",
        ],
        ["'profiles.knn' is 4", "it must be a mapping of timeout_min, "],
    ),
    # an unused profile too: every profile is checked when the file loads
    "profile-negative-time": (
        lambda t: [
            "submit",
            "pretrain",
            "--executor",
            _executor(t, {"profiles": {"classify": {"timeout_min": -5}}}),
            "--dry-run",
        ],
        ["profile 'classify'", "'timeout_min' is -5", "must be >= 1"],
    ),
    "profile-time-of-a-wrong-type": (
        lambda t: [
            "submit",
            "pretrain",
            "--executor",
            _executor(t, {"profiles": {"pretrain": {"timeout_min": "1d"}}}),
            "--dry-run",
        ],
        ["profile 'pretrain'", "'timeout_min' has the wrong type", "'1d'", "Integer"],
    ),
    "profile-signal-after-the-limit": (
        lambda t: [
            "submit",
            "pretrain",
            "--executor",
            _executor(t, {"profiles": {"pretrain": {"timeout_min": 1}}}),
            "--dry-run",
        ],
        ["profile 'pretrain'", "'signal_delay_s' is 90", "below the time limit", "60 s"],
    ),
    "submit-unknown-step": (
        lambda t: ["submit", "pretrian", "--dry-run"],
        ["unknown step 'pretrian'", "choose one of pretrain, supervised, "],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SLURM_INPUT))
def test_bad_slurm_input_is_refused_on_one_line_with_exit_2_and_nothing_written(case, tmp_path):
    make_argv, words = BAD_SLURM_INPUT[case]
    argv = make_argv(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = run_main(main, argv)
    message = stderr.getvalue()
    assert status == 2, message
    assert (
        message.count("\n") == 1 and message.startswith("error: ") and "Traceback" not in message
    ), message
    for word in words:
        assert word in message, (word, message)
    assert sorted(tmp_path.rglob("*")) == before
