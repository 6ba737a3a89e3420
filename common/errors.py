"""The project's one exception type for user mistakes."""


class UserError(Exception):
    """A mistake in what the user asked for: a bad config, missing data, a wrong checkpoint.

    The message says what is wrong and what would be right. Command-line entry points print it on
    one line, without a traceback, and exit with status 2 (see `common.cli.run_main`)."""
