"""What every command-line entry point shares: user errors on one line, exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from common.errors import UserError

USER_ERROR_EXIT = 2


def run_main(
    main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None
) -> int:
    """Run `main(argv)`; a UserError is printed as one line on stderr and gives exit status 2."""
    try:
        main(argv)
    except UserError as error:
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def config_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """An argparse parser with the project's `--config FILE [key=value ...]` convention."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE [key=value ...]`."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config; its keys override the built-in defaults"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides applied after the config file, e.g. optim.lr=0.1",
    )


def subcommand_parser(
    prog: str, description: str, commands: dict[str, tuple[str, Callable, Callable]]
) -> argparse.ArgumentParser:
    """A parser with one sub-command per entry {name: (one-line help, add_arguments(parser),
    run(args))}."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (help_text, add_arguments, run) in commands.items():
        command = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.set_defaults(run=run)
        add_arguments(command)
    return parser
