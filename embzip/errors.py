"""Errors raised by embzip. The CLI prints their message on one line and exits non-zero."""

import errno


class EmbzipError(Exception):
    """Base class: the message says what happened, what was given and how to fix it."""

    exit_code = 1


_OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory")
_NO_SPACE = ("no space left on device", "disk quota exceeded")


def resource_problem(exc: BaseException) -> str | None:
    """What a failure that is the machine's, not the input's, says in one line (memory or disk space ran out), or
    None for any other failure. torch, safetensors and the OS report these as MemoryError, RuntimeError, OSError
    or SafetensorError with the reason in the text."""
    if out_of_memory(exc):
        text = " ".join(str(exc).split())
        detail = f" ({text[:160]})" if text else ""
        return f"not enough memory{detail}; close other programs, or use a machine with more memory"
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(s in str(exc).lower() for s in _NO_SPACE):
        return "no space left on the device being written; free some space or write elsewhere"
    return None


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(s in str(exc).lower() for s in _OUT_OF_MEMORY)


def not_a_file(path) -> str:
    """Why an input path that is not a regular file cannot be read as one: "is a directory", "does not exist", or
    that it is a pipe (bash's <(...)) or a device (/dev/stdin), which cannot be read twice as a file can."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        return "is a directory"
    if not path.exists():
        return "does not exist"
    return "is a pipe or a device, not a regular file (embzip may read an input twice)"


def usage(exc: EmbzipError) -> EmbzipError:
    """Mark `exc` as the command line's mistake, exit 2 like a bad option value: a path that does not exist or is
    of the wrong kind (a file where a folder was meant), an output already there without --force. What exists but
    cannot be used (a broken model, factors of another model) stays exit 1, like a machine's failure."""
    exc.exit_code = 2
    return exc


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
