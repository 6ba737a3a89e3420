"""The step table and the typed job (slurm.steps): a job's command line is rendered from its fields
and parses back to the same job; bad arguments are refused on one line before anything is submitted;
the local scheduler keeps
two jobs that would compute the same features apart."""

from __future__ import annotations

import pytest

from common.errors import UserError
from slurm.dispatch import next_ready
from slurm.graph import Node
from slurm.steps import Job, steps
from transfer.tasks import TASKS

JOBS = [
    Job(
        "pretrain",
        "configs/pretrain/fashion_mnist_resnet18.yaml",
        ["seed=3", "optim.epochs=2"],
        "runs/p",
    ),
    Job("supervised", "configs/pretrain/fashion_mnist_resnet18.yaml", ["seed=3"], "runs/s"),
    Job(
        "knn",
        "configs/transfer/linear_fashion_mnist.yaml",
        ["seed=1", "data.limit_train=300"],
        "runs/k",
        {"backbone": "ssl=runs/p/checkpoints/last.pt", "weights": "online"},
    ),
    Job(
        "export",
        options={
            "checkpoint": "runs/p/checkpoints/last.pt",
            "format": "all",
            "out": "runs/e",
            "weights": "ema",
            "arch": None,
        },
    ),
    Job(
        "report",
        inputs=["runs/k", "runs/p"],
        options={"out": "runs/r", "no_plots": True, "baseline": None, "pool": ["ssl"]},
    ),
]


@pytest.mark.parametrize("job", JOBS, ids=[job.step for job in JOBS])
def test_a_jobs_command_parses_back_to_the_same_job(job):
    entry = steps()[job.step].entry()
    assert job.command()[: len(entry)] == entry
    again = Job.from_argv(job.step, job.argv())
    assert again.command() == job.command()
    assert (again.config, again.run_dir, again.overrides) == (
        job.config,
        job.run_dir,
        job.overrides,
    )


def test_the_table_holds_both_trainings_the_tools_and_every_registered_task():
    table = steps()
    assert [name for name, step in table.items() if step.kind == "training"] == [
        "pretrain",
        "supervised",
    ]
    assert [name for name, step in table.items() if step.kind == "task"] == list(TASKS)
    assert table["supervised"].entry() == ["pretrain.supervised"]
    assert table["depth"].entry() == ["transfer", "depth"]


def test_an_unknown_step_and_bad_arguments_are_refused_on_one_line():
    with pytest.raises(
        UserError, match="unknown step 'pretrian'; choose one of pretrain, supervised, export"
    ):
        Job("pretrian")
    with pytest.raises(
        UserError,
        match=r"^python -m transfer knn: the following arguments are required: --backbone; "
        r"see `python -m transfer knn --help`$",
    ):
        Job.from_argv("knn", ["--config", "x.yaml"])
    with pytest.raises(UserError, match="unrecognized arguments: --epochs"):
        Job.from_argv("pretrain", ["--epochs", "3"])


def _node(
    name: str, backbone: str | None, config: str = "configs/transfer/linear_fashion_mnist.yaml"
) -> Node:
    options = {"backbone": backbone} if backbone else {}
    step = "knn" if backbone else "scenes"
    return Node(
        name,
        Job(step, config if backbone else None, [], f"runs/{name}", options),
        f"runs/{name}/done",
    )


def test_the_scheduler_keeps_jobs_that_share_features_apart_while_others_are_ready():
    linear, knn, other, scenes = (
        _node("linear", "a"),
        _node("knn", "a"),
        _node("knn-b", "b"),
        _node("scenes", None),
    )
    # knn on backbone a would extract the features linear on a is extracting: the job on b goes
    # first
    assert next_ready([knn, other], set(), [linear]) is other
    # with nothing else ready it still starts (both extract, as before)
    assert next_ready([knn], set(), [linear]) is knn
    assert next_ready([knn, other], set(), []) is knn  # the plan's order otherwise
    assert next_ready([scenes], set(), [linear]) is scenes
    waiting = Node(
        "late", Job("knn", "c.yaml", [], "runs/late", {"backbone": "c"}), "x", needs=["scenes"]
    )
    assert (
        next_ready([waiting], set(), []) is None
        and next_ready([waiting], {"scenes"}, []) is waiting
    )
