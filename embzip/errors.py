"""Errors raised by embzip. The CLI prints their message on one line and exits non-zero."""


class EmbzipError(Exception):
    """Base class: the message says what happened, what was given and how to fix it."""

    exit_code = 1


class ModelError(EmbzipError):
    """A model could not be found, opened or understood."""


class RankError(EmbzipError):
    """A rank or compression ratio that is impossible or saves nothing."""

    exit_code = 2


class FactorsError(EmbzipError):
    """A factors file is missing, malformed, of another version, or does not fit a model."""


class OutputError(EmbzipError):
    """An output path exists, or its directory is missing or not writable."""


class DataError(EmbzipError):
    """Input data that cannot be used: NaN/Inf in a matrix, empty or too short text."""


class Interrupted(EmbzipError):
    """The user pressed Ctrl-C; nothing was written."""

    exit_code = 130


class OptionError(EmbzipError, ValueError):
    """An option value out of range: not finite, not positive, a duplicate, an empty list."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised like Ctrl-C so the same cleanup runs. The CLI exits 143."""

    exit_code = 143
