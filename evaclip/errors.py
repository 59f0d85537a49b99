"""Errors a user can act on. The CLI prints their message (no traceback) and exits with `exit_code`."""


class EvaclipError(Exception):
    """A problem with the user's input or environment, explained in the message."""

    exit_code = 1


class ConfigError(EvaclipError):
    """The configuration is invalid: raised before any work starts."""

    exit_code = 2


class CheckpointError(EvaclipError):
    """A weight file cannot be read safely or does not fit the architecture."""

    exit_code = 3
