"""The bench table as people read it (rich, on stdout) and as Markdown for the README."""

from __future__ import annotations

import functools
from typing import Any

from .benchmark import columns

SHORT = {
    "bits_per_weight": "bpw", "compression_ratio": "CR", "embedding_params": "emb params", "embedding_bytes": "emb MiB", "model_params": "model params",
    "model_bytes": "model MiB", "cosine_distance": "cos dist", "perplexity_input": "ppl input",
    "perplexity_ratio_input": "x orig", "perplexity_tied": "ppl tied", "perplexity_ratio_tied": "x orig",
    "similarity_spearman": "sim rho", "fit_seconds": "fit s", "latency_ratio": "latency x",
    "latency_ratio_cached": "cached x", "latency_ratio_step": "step x", "peak_memory_bytes": "peak MiB",
}
HIDDEN = {"cached", "rank", "mae"}  # in the JSON and CSV; the table keeps to what a reader compares


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{value / 2**20:,.1f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key == "bits_per_weight":
            return f"{value:.3g}"
        if key.startswith(("perplexity_ratio", "latency_ratio")):
            return f"{value:.2f}"
        if key.startswith("perplexity"):
            return f"{value:,.2f}" if value < 1e5 else f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    # a column empty in every row (`cached x` where no head can cache) is left out of the table, not the CSV
    cols = [c for c in columns(report) if c not in HIDDEN and any(r.get(c) is not None for r in report["rows"])]
    return [SHORT.get(c, c) for c in cols], [[_cell(c, r.get(c)) for c in cols] for r in report["rows"]]


def title(report: dict[str, Any]) -> str:
    p = report["protocol"]
    what = ", ".join(f"{k}={v}" for k, v in p.items() if k in ("name", "tokens", "window", "stride", "sentences"))
    return f"{report['model']} ({report['kind']}, V={report['vocab_size']}, d={report['hidden_size']}) on {report['text']}: {what}"


@functools.cache
def _stdout_console_class():
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError("standard output's reader went away")

    return StdoutConsole


def stdout_console(**options):
    """A rich Console on stdout that lets a reader gone away (`| head`) raise BrokenPipeError to its caller, as a
    plain write does: rich's own handling exits there and then, before the command can say what it wrote."""
    return _stdout_console_class()(**options)


def table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = rows(report)
    t = Table(title=title(report), title_justify="left")
    for name in header:
        t.add_column(name, justify="left" if name == "method" else "right")
    for r in body:
        t.add_row(*r)
    import sys

    from rich.measure import Measurement

    # Never a number cut to an ellipsis (rich's way of fitting a table to a narrow terminal): the table is printed
    # at its own width, one line a row, and a terminal narrower than that wraps the lines.
    console = stdout_console()
    width = Measurement.get(console, console.options.update(width=10**4), t).maximum
    stdout_console(width=max(width, console.width) if sys.stdout.isatty() else width).print(t)
    if report.get("interrupted"):
        Console(stderr=True).print("[yellow]interrupted: the table holds the rows finished before Ctrl-C or SIGTERM[/]")


def markdown(report: dict[str, Any]) -> str:
    header, body = rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"
