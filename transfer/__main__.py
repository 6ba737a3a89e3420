"""python -m transfer <command> ...: export backbones and evaluate them on transfer tasks."""

from __future__ import annotations

import sys
from functools import partial
from typing import Sequence

from common.cli import run_main, subcommand_parser
from transfer import commands as tools
from transfer.runner import add_task_arguments, run_task
from transfer.tasks import TASKS


def commands() -> dict:
    """The tools (transfer.commands) and one command per registered task (transfer.tasks)."""

    def task_command(name, args):
        run_task(name, args.backbone, args.weights, args.config, args.overrides)

    table = {
        "export": (
            "write a backbone as torchvision / safetensors / detectron2 / mmseg files",
            tools.export_arguments,
            tools.run_export,
        ),
        "verify": (
            "check an exported backbone gives the same features in all three frameworks",
            tools.verify_arguments,
            tools.run_verify,
        ),
    }
    for name, task in TASKS.items():
        table[name] = (
            task.help,
            partial(add_task_arguments, epilog=task.load().EXAMPLES),
            partial(task_command, name),
        )
    table["scenes"] = (
        "generate dense-task scenes in VOC, COCO and NYU formats",
        tools.scenes_arguments,
        tools.run_scenes,
    )
    table["report"] = (
        "a table (md, csv) and plots from finished runs' metrics.json",
        tools.report_arguments,
        tools.run_report,
    )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = subcommand_parser("python -m transfer", __doc__.split(":", 1)[1].strip(), commands())
    args = parser.parse_args(argv)
    args.run(args)


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
