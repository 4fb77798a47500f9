"""Progress bars on stderr (rich), off when quiet so stdout stays clean for pipelines."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator


@functools.cache
def _stderr():
    """The stderr console, made on first use: importing rich draws from Python's `random` (rich.style), and a
    library call with no bar to draw must leave its caller's random stream as it was."""
    from rich.console import Console

    return Console(stderr=True)


def __getattr__(name: str):  # `progress.stderr`, the CLI's console, made when first asked for
    if name == "stderr":
        return _stderr()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Silent:
    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


class _Bar:
    def __init__(self, progress, task_id):
        self._progress, self._task = progress, task_id

    def update(self, **fields) -> None:
        known = {k: fields.pop(k) for k in ("completed", "total", "description") if k in fields}
        self._progress.update(self._task, **known, **fields)

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._task, amount)


@contextmanager
def bar(description: str, total: float | None, *, enabled: bool = True, fields: str = "",
        **initial: str) -> Iterator[_Bar | _Silent]:
    """A progress bar; `fields` is a rich format string over task fields given in `initial`,
    e.g. bar("fit", 100, fields="loss {task.fields[loss]}", loss="-")."""
    if not enabled:
        yield _Silent()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    if fields:
        columns.append(TextColumn(fields))
    with Progress(*columns, console=_stderr(), transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total, **initial))
