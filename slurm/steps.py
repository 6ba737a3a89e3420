"""The one table of steps a job can run, and the job that names one.

Every reader of "which steps exist and how is each run" reads `STEPS` here: the job
(slurm.jobs.StepJob), the dry runs (the command each prints), the executor's profiles (which steps a
profile may name) and `slurm submit`.

    step          kind       what runs it (in a job: in-process; in a dry run: printed)
    pretrain      training   python -m pretrain --config FILE run_dir=DIR key=value ...
    supervised    training   python -m pretrain.supervised --config FILE run_dir=DIR key=value ...
    export ...    tool       python -m transfer export --checkpoint ... (export, verify, scenes, report)
    linear ...    task       python -m transfer linear --backbone B --weights W --config FILE run_dir=DIR key=value ...

A `Job` carries what a step runs on: (step, config, overrides, run_dir), plus the step's other
options (a task's backbone and weights, a tool's flags) and positional inputs (the report's run
dirs). Its command line is rendered from those fields, never stored, so a job's command and what the
job runs cannot disagree."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

from common.cli import add_config_arguments
from common.errors import UserError
from transfer.__main__ import commands
from transfer.tasks import TASKS

TOOLS = ("export", "verify", "scenes", "report")


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # "training" (an engine that checkpoints on signals), "tool" or "task"
    module: str  # python -m MODULE
    subcommand: str = ""  # the module's subcommand (transfer's tools and tasks)

    def entry(self) -> list[str]:
        return [self.module, *([self.subcommand] if self.subcommand else [])]

    def add_arguments(self) -> Callable[[argparse.ArgumentParser], None]:
        """The step's own command-line arguments (the same parser its entry point uses)."""
        if self.kind == "training":
            return add_config_arguments
        return commands()[self.name][1]


def steps() -> dict[str, Step]:
    """Every step: the two trainings, the transfer tools, then the registered transfer tasks."""
    table = [
        Step("pretrain", "training", "pretrain"),
        Step("supervised", "training", "pretrain.supervised"),
        *(Step(tool, "tool", "transfer", tool) for tool in TOOLS),
        *(Step(task, "task", "transfer", task) for task in TASKS),
    ]
    return {step.name: step for step in table}


def get_step(name: str) -> Step:
    table = steps()
    if name not in table:
        raise UserError(f"unknown step '{name}'; choose one of {', '.join(table)}")
    return table[name]


@dataclass
class Job:
    """What one job runs: a step on a config with overrides into a run dir, and the step's other
    options."""

    step: str
    config: str | None = None  # the step's YAML (training and tasks)
    # key=value over the config, run_dir excluded
    overrides: list[str] = field(default_factory=list)
    run_dir: str | None = None  # where the step writes (run_dir=...)
    options: dict[str, Any] = field(
        default_factory=dict
    )  # the step's flags: {"backbone": ..., "weights": ...}
    # positional arguments (the report's run dirs)
    inputs: list[str] = field(default_factory=list)

    def __post_init__(self):
        get_step(self.step)  # an unknown step is refused when the job is made

    def argv(self) -> list[str]:
        """The step's own arguments: inputs, --options, --config FILE, run_dir=DIR, then the
        overrides."""
        args = [str(item) for item in self.inputs]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif isinstance(value, (list, tuple)):
                args += [flag, *map(str, value)] if value else []
            elif value is not None and value is not False:
                args += [flag, str(value)]
        if self.config is not None:
            args += ["--config", str(self.config)]
        if self.run_dir is not None:
            args.append(f"run_dir={self.run_dir}")
        return args + [str(o) for o in self.overrides]

    def command(self) -> list[str]:
        """The `python -m` arguments that run this job as the job itself does."""
        return [*get_step(self.step).entry(), *self.argv()]

    @classmethod
    def from_argv(cls, step: str, argv: list[str]) -> "Job":
        """A job from a step's command line (`slurm submit STEP ARGS`), parsed by the step's own
        parser: arguments
        it would refuse are refused here, before anything is submitted."""
        spec = get_step(step)
        command = "python -m " + " ".join(spec.entry())
        parser = _RefusingParser(prog=command, add_help=False)
        spec.add_arguments()(parser)
        namespace = vars(parser.parse_args(argv))
        config = namespace.pop("config", None)
        overrides = list(namespace.pop("overrides", None) or [])
        run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)
        overrides = [o for o in overrides if not o.startswith("run_dir=")]
        positional = {
            a.dest for a in parser._actions if not a.option_strings and a.dest not in ("overrides",)
        }
        inputs = [item for dest in positional for item in (namespace.pop(dest, None) or [])]
        return cls(step, config, overrides, run_dir, namespace, inputs)


class _RefusingParser(argparse.ArgumentParser):
    """A parser whose errors are UserErrors (one line, exit status 2), not usage text and
    SystemExit."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")
