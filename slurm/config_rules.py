"""The checks of the slurm package's configs that several of them share (pipeline, evaluate,
sweep)."""

from __future__ import annotations

from pathlib import Path

from common.checks import NON_NEGATIVE, Rule, each
from common.errors import UserError
from transfer.tasks import TASKS, task_of


def _known_tasks(value) -> bool:
    return isinstance(value, dict) and all(task_of(key) for key in value)


def _distinct_seeds(value) -> bool:
    """A non-empty list of integers >= 0, each once; a repeated seed raises a UserError naming it
    (it would plan
    the same runs twice, into one run dir)."""
    if not each(NON_NEGATIVE).test(value):
        return False
    repeated = next((seed for seed in value if value.count(seed) > 1), None)
    if repeated is not None:
        distinct = list(dict.fromkeys(value))
        raise UserError(
            f"config key 'seeds' is {value}; seed {repeated} appears {value.count(repeated)} "
            f"times: "
            f"list each seed once, e.g. {distinct}"
        )
    return True


SEEDS = Rule("a list of distinct integers >= 0", _distinct_seeds)


def _task_files(value) -> bool:
    return isinstance(value, dict) and all(
        task_of(key) and Path(path).is_file() for key, path in value.items()
    )


def _scene_sizes(value) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"train", "test", "size", "seed"}
        and all(isinstance(v, int) for v in value.values())
        and value["train"] >= 1
        and value["test"] >= 1
        and value["size"] >= 32
        and value["seed"] >= 0
    )


TASK_FILES = Rule(
    f"a mapping of tasks ({', '.join(TASKS)}; TASK/LABEL to run one several times) to existing "
    f"config "
    "files",
    _task_files,
)
TASK_OVERRIDES = Rule(
    f"a mapping of tasks ({', '.join(TASKS)}, or TASK/LABEL) to lists of key=value",
    lambda v: isinstance(v, dict) and all(task_of(t) and isinstance(o, list) for t, o in v.items()),
)
SCENE_SIZES = Rule("{train: >= 1, test: >= 1, size: >= 32, seed: >= 0}", _scene_sizes)
KNOWN_TASKS = Rule("a mapping of registered tasks (or TASK/LABEL) to config files", _known_tasks)
