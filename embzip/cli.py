"""The `embzip` command line: each command parses options, calls one library function, prints.

Heavy libraries (torch, transformers) are imported inside commands so `embzip --help` is instant.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from . import jsonout
from .errors import EmbzipError, Terminated, resource_problem
from .options import SELF_TOKENS
from .progress import stderr


def _error_line(label: str, message: str) -> None:
    from rich.markup import escape

    stderr.print(f"[bold red]{label}:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True,
                 emoji=False)  # a user's "a:b:c" stays as typed (rich would turn ":b:" into an emoji)


def _usage_errors() -> tuple[type, ...]:
    """Typer's usage-error base class: its own (typer >= 0.20 vendors click) and click's."""
    found = [getattr(typer, "TyperException", None)]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(t for t in found if isinstance(t, type))


class _OneLineErrors(TyperGroup):
    """Usage errors as one line on stderr with exit 2, like embzip's own errors (not typer's boxed panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        if sys.stdout is None:  # started with stdout closed (`>&-`): every command's result would vanish, exit 0
            _error_line("error", "standard output is closed: embzip prints its results there; redirect it to a file, "
                                 "or to /dev/null to discard them")
            sys.exit(2)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _usage_errors() as exc:
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `embzip`: the help, as before
                print(ctx.get_help())
                sys.exit(getattr(exc, "exit_code", 2))
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            _error_line("error", message + where)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            _error_line("error", "aborted")
            sys.exit(1)
        except (BrokenPipeError, _StdoutGone):  # the help or version's reader went away (`| head`): quiet
            _stdout_to_devnull()
            sys.exit(1)
        except OSError as exc:  # the help or version could not be written (`> /dev/full`); a command's own failures
            problem = resource_problem(exc)  # are its wrapper's (`command`)
            if problem is None:
                raise
            _stdout_to_devnull()
            _error_line("error", f"could not print to standard output: {problem}")
            sys.exit(1)
        _finished()
        sys.exit(code if isinstance(code, int) else 0)


def _finished() -> None:
    """The command is done and has said so: a Ctrl-C or SIGTERM while Python tears down (most of a second with
    torch loaded) changes nothing, so it no longer turns a finished run into a silent exit 130 or 143."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


app = typer.Typer(
    cls=_OneLineErrors,
    name="embzip",
    help="Compress the token embedding of a transformer model into codebooks, low-rank factors or packed integers, without retraining.\n\n"
         "MODEL is a hub id (bert-base-uncased), a local transformers directory, a .gguf file, or a demo "
         "name (demo:minilm, demo:gemma-3-270m). Omit it to use the default demo model, Gemma-3-270M.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"embzip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print embzip's version and exit.")] = False) -> None:
    """Compress the token embedding of a transformer model into codebooks, low-rank factors or packed integers,
    without retraining."""


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Head(str, Enum):
    input = "input"
    tied = "tied"


class Method(str, Enum):  # the names of embzip.methods.REGISTRY (tests check they agree)
    aware = "aware"
    codebook = "codebook"
    int8 = "int8"
    int4 = "int4"
    wsvd = "wsvd"
    paper = "paper"
    svd = "svd"


class Init(str, Enum):
    random = "random"
    svd = "svd"


# Options shared by several commands, defined once so they mean the same everywhere.
ModelArg = Annotated[Optional[str], typer.Argument(
    help="Hub id, model directory, .gguf file or demo name; omitted: demo:gemma-3-270m.", show_default=False)]
RankOpt = Annotated[Optional[int], typer.Option("--rank", "-k", help="Rank k of the factors.", show_default=False)]
RatioOpt = Annotated[Optional[float], typer.Option(
    "--ratio", "-r", help="Compression ratio of the embedding to reach: its bytes at the model's dtype over the "
                          "bytes stored (a float32 model's factors are 16-bit). Picks the largest rank with at least "
                          "this ratio.", show_default=False)]
BitsOpt = Annotated[Optional[float], typer.Option(
    "--bits", "-b", help="Size budget in bits per weight of the V x d embedding, everything stored counted "
                         "(16 = the bf16 matrix). Low-rank methods take the largest rank that fits.",
    show_default=False)]
def _file_path(value: str) -> Path:
    """--out for a file: a trailing slash names a folder (pathlib would drop it and write a file of that name)."""
    from .outputs import names_a_folder

    if names_a_folder(value):
        raise typer.BadParameter(f"{value} names a folder; give a file name such as {value}factors.safetensors")
    return Path(value)


OutFileOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", parser=_file_path, metavar="<path>",
    help="Factors file to write. Default: named after the model, method and size, in the current directory: "
         "MODEL.METHOD-SIZE.safetensors, such as gemma-3-270m.int4.safetensors (or codebook-2b, svd-r256 for the "
         "size).", show_default=False)]
DeviceOpt = Annotated[Device, typer.Option(help="Where to compute: auto uses a GPU when torch sees one.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output (a directory only if embzip "
                                                            "wrote it; never the input or the current directory).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or informational lines on stderr; "
                                                                "warnings and errors still show.")]
HeadOpt = Annotated[Optional[Head], typer.Option(
    help="input: compress the input embedding only and keep the original output head (what the paper measured). "
         "tied: the tied output head uses the factors too (the real saving). (default: tied when the model's head "
         "is tied, else input)", show_default=False)]
TextOpt = Annotated[Optional[Path], typer.Option(
    "--text", help="A UTF-8 text file to score, one paragraph or sentence per line.", show_default=False)]
DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="A datasets dataset as NAME[:CONFIG[:SPLIT]], e.g. wikitext:wikitext-2-raw-v1 (split "
                      "default test; a local folder of text files: DIR::train). Its 'text' column is read, or else "
                      "the string column holding the most text (named in the output). Without --text or --dataset: a "
                      "public-domain English sample shipped with embzip (Alice in Wonderland, ch. I-IV).",
    show_default=False)]
BatchOpt = Annotated[int, typer.Option(help="Sequences per forward pass.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the scoring: which tokens a masked LM's perplexity masks (causal "
                                           "LMs and encoders draw nothing). The same seed gives the same result on "
                                           "CPU. `bench` fits every method with its own seed, as `embzip fit` does "
                                           "without --seed.", min=0, max=2**64 - 1)]
FitSeedOpt = Annotated[Optional[int], typer.Option(
    help="Random seed of what draws: paper, codebook, aware's samples of a tied causal LM, healing (refused where "
         "nothing is drawn). The same seed gives the same result on CPU. Default: each method's own, as `embzip "
         "bench` and the library use (1 for --method paper, the paper's recipe; 0 for everything else).",
    min=0, max=2**64 - 1, show_default=False)]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Run Python code that comes with the model (its config or tokenizer auto_map); "
                                "off by default: only for models you trust.")]


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("embzip")
    logger.handlers[:] = [RichHandler(console=stderr, show_time=False, show_path=False)]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)  # quiet keeps warnings only
    logger.propagate = False
    for noisy in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:  # huggingface_hub sets its own level when it is first imported: quiet it through its own call
        try:  # (its retry lines, "Retrying in 8s", while the hub cannot be reached; shown without --quiet)
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()
        except ImportError:
            pass
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if quiet:  # transformers' own weight-loading bars too, and datasets' (a local folder's "Generating train split")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()


class _StdoutGone(Exception):
    """Printing a command's result failed: the reader of stdout went away."""


def _flush_stdout() -> None:
    with _printing():
        sys.stdout.flush()


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so what is left in its buffer does not fail again when Python exits."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file behind sys.stdout
        pass


def _what_was_written() -> str:
    """For a signal's message: what the command had already put in place (a signal can arrive just after)."""
    from .outputs import written

    done = written()
    if len(done) > 2:  # bench's factor files
        return f"after writing {len(done)} files, the last {done[-1]}"
    return f"after writing {' and '.join(done)}" if done else "nothing was written"


def command(fn):
    """Register a command that turns EmbzipError and Ctrl-C into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .outputs import forget_written, received_signal, received_sigterm, sigterm_as_interrupt, written

        _setup_logging(kwargs.get("quiet", False))
        forget_written()
        with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C, then exits 143
            try:
                result = fn(*args, **kwargs)
                _flush_stdout()  # a reader that went away is seen here, where the command can say what it wrote
                return result
            except _StdoutGone:  # (`| head`): quiet, as in a pipeline, unless the output is in place
                _stdout_to_devnull()
                if written():
                    _error_line("error", f"standard output's reader went away ({_what_was_written()})")
                raise typer.Exit(1) from None
            except EmbzipError as exc:
                _error_line("error", str(exc))
                raise typer.Exit(exc.exit_code) from None
            except Terminated:
                _error_line("terminated", _what_was_written())
                raise typer.Exit(Terminated.exit_code) from None
            except KeyboardInterrupt:
                _error_line("interrupted", _what_was_written())
                raise typer.Exit(130) from None
            except Exception as exc:  # memory or disk space that ran out: one line too; anything else is a bug
                if received_signal():  # what a Ctrl-C or SIGTERM swallowed mid-import left behind
                    terminated = received_sigterm()
                    _error_line("terminated" if terminated else "interrupted", _what_was_written())
                    raise typer.Exit(Terminated.exit_code if terminated else 130) from None
                problem = resource_problem(exc)
                if problem is None:
                    raise
                _error_line("error", f"{problem} ({_what_was_written()})")
                raise typer.Exit(1) from None

    return app.command()(wrapper)


def _command_line(ctx: typer.Context) -> str:
    """The running command rebuilt from its parsed parameters, for provenance records."""
    import shlex

    words = ["embzip", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False or param.name in ("as_json", "quiet", "force"):
            continue
        value = getattr(value, "value", value)
        if param.param_type_name == "argument":
            words.append(str(value))
        else:
            words.append(param.opts[0]) if value is True else words.extend([param.opts[0], str(value)])
    return shlex.join(words)


@contextmanager
def _printing():
    """Around a command's printing of its result: stdout's reader gone becomes _StdoutGone (other broken pipes, a
    worker's or a socket's, stay what they are)."""
    try:
        yield
    except BrokenPipeError:
        raise _StdoutGone from None


def _print_json(document: dict[str, Any]) -> None:
    with _printing():
        sys.stdout.write(jsonout.dumps(document) + "\n")


def _emit(summary: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        _print_json(summary)
        return
    from rich.table import Table
    from rich.text import Text

    from .report import stdout_console

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a long path wraps whole instead of ending in "…"
    for key, value in summary.items():
        table.add_row(key, Text(_summary_cell(value)))  # as it is: a path's "[x]" or ":b:" is not markup or an emoji
    with _printing():
        stdout_console().print(table)


def _summary_cell(value: Any) -> str:
    """A summary value as people read it: "-" for none, a mapping as key=value pairs (--json keeps the types)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_summary_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_summary_cell(v) for v in value)
    return str(value)


@command
def info(model: ModelArg = None, trust_remote_code: TrustOpt = False, as_json: JsonOpt = False,
         quiet: QuietOpt = False) -> None:
    """Show a model's token embedding: shape, share of all parameters, bits per weight (32 or 16 for a plain
    matrix; what a compressed directory stores), tied output head, kind, and how many of its rows belong to
    tokens the tokenizer can never produce (unreachable_rows: a codebook leaves them out when the head is not
    tied)."""
    from .models import open_model
    from .reach import unreachable_rows

    opened = open_model(model, load="embedding", trust_remote_code=trust_remote_code)
    described = opened.describe()
    if opened.tokenizer is not None:
        described["unreachable_rows"] = len(unreachable_rows(opened.tokenizer, described["vocab_size"]))
    _emit(described, as_json, "model")


@command
def svd(model: ModelArg = None, rank: RankOpt = None, ratio: RatioOpt = None, bits: BitsOpt = None,
        out: OutFileOpt = None,
        device: DeviceOpt = Device.auto, force: ForceOpt = False, trust_remote_code: TrustOpt = False,
        as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Baseline: truncated SVD of the embedding, codes = U_k S_k, decoder = Vh_k (no bias).

    Example: embzip svd bert-base-uncased --rank 128 --out bert.svd128.safetensors
    """
    from .pipeline import compress

    _, summary = compress(model, "svd", rank=rank, ratio=ratio, bits=bits, out=out, force=force, device=device.value,
                          progress=not quiet, trust_remote_code=trust_remote_code)  # `fit --method wsvd` weights it
    _emit(summary, as_json, "embzip svd")


PAPER, DATA, CODEBOOK, QUANT, HEAL = ("Method paper", "Data-aware methods (aware, wsvd, codebook)", "Method codebook",
                                     "Method int4", "Healing (low-rank and codebook methods)")


def _opt(help: str, panel: str | None = None, *, flag: str | None = None, **kw):
    """An option of `embzip fit` shown under `panel` in --help (its default is the parameter's); `flag`: an on/off
    option's one name, without the --no- form that would widen every row of --help's table."""
    return typer.Option(*([flag] if flag else []), help=help, rich_help_panel=panel, **kw)


@command
def fit(ctx: typer.Context, model: ModelArg = None, rank: RankOpt = None, ratio: RatioOpt = None,
        bits: BitsOpt = None, out: OutFileOpt = None,
        method: Annotated[Optional[Method], typer.Option(
            help="aware: data-aware SVD (token-count row weights; for tied heads, errors measured in the metric of "
                 "the model's hidden states). codebook: rows as indices into learned codebooks, token-weighted, in "
                 "the same metric (sized by --bits). int8 / int4: plain quantization baselines. wsvd: SVD weighted "
                 "by token counts. paper: the paper's autoencoder recipe. svd: as `embzip svd`. Default: aware "
                 "with --rank or --ratio, codebook otherwise (--bits, default 2).", show_default=False)] = None,
        weights_text: Annotated[Optional[Path], _opt("Text whose token counts weight the rows and whose hidden "
                                                     "states give the metric (default: an English sample shipped "
                                                     "with embzip, distinct from the perplexity sample).", DATA,
                                                     show_default=False)] = None,
        weights_dataset: Annotated[Optional[str], _opt("Or a datasets dataset NAME[:CONFIG[:SPLIT]] for the "
                                                       "token counts.", DATA, show_default=False)] = None,
        weight_power: Annotated[Optional[float], _opt("Row weight = (count + floor) ** power (default: 1; "
                                                      "codebook on a tied head: 0.5 below 3 bits per weight, "
                                                      "0.75 from 3).", DATA,
                                                      show_default=False)] = None,
        weight_floor: Annotated[float, _opt("Added to every token count, so unseen tokens keep some weight.",
                                            DATA)] = 1.0,
        output_metric: Annotated[float, _opt("aware, codebook: weight of the hidden-state metric for a tied "
                                                  "output head (0: plain Euclidean).", DATA)] = 4.0,
        metric_tokens: Annotated[int, _opt("aware, codebook: tokens of the weights text used to measure the "
                                                 "hidden-state metric.", DATA)] = 8192,
        self_tokens: Annotated[int, _opt("aware, codebook on a causal LM: tokens the model samples from its start "
                                         "token, whose predicted token distributions and hidden states join the "
                                         "weights text's (a multilingual model writes many languages; the bundled "
                                         "text is English). 0: the text alone. On Gemma-3-270M the default takes "
                                         "about 20-25 s on 2 CPU cores with bf16 instructions and 1.5 to 2.5 minutes "
                                         "on others, once: later fits of the same model and settings read it from "
                                         "the cache ($EMBZIP_CACHE/samples).", DATA)] = SELF_TOKENS,
        sample_languages: Annotated[float, _opt("aware, codebook on a causal LM: share of the sampled sequences "
                                                "that start from an opening in one of 32 other languages, so a "
                                                "model whose own samples are mostly English also writes those. It "
                                                "trades English quality for theirs (docs/method.md): 0.5 for a "
                                                "model used mostly in other languages.", DATA)] = 0.0,
        keep_norms: Annotated[bool, _opt("aware, wsvd: store each row's exact length (V more numbers, "
                                                "counted in the size); the factors code directions.", DATA,
                                         flag="--keep-norms")] = False,
        focus: Annotated[float, _opt("codebook: share of the budget for one more stage over only the rows whose "
                                     "token-weighted error is largest (the frequent tokens'); 0 turns it off. Used "
                                     "where that share pays for its codebook and at least as many rows.",
                                     CODEBOOK)] = 0.1,
        vocab_prior: Annotated[Optional[float], _opt(
            "codebook: the share of the weights text's total given to a prior from the order of the tokenizer's "
            "vocabulary (BPE and BERT's WordPiece vocabularies list their tokens by frequency on the tokenizer's "
            "training text), so rows the text (and a causal LM's own samples) never show still get weight by how "
            "common their token is; used where the order agrees with the text's counts. Default: 1 where the model's "
            "samples join the weights (a causal LM with a tied head), 0.5 otherwise; 0 turns it off.", CODEBOOK,
            min=0.0, show_default=False)] = None,
        input_metric: Annotated[float, _opt("codebook on an encoder without an LM head (a sentence encoder): weight "
                                            "of the metric of how far its sentence vectors turn when a row moves; "
                                            "the same backward passes on the weights text's sentences also scale "
                                            "each row's weight by what one reading of it costs (about 20 s for "
                                            "all-MiniLM-L6-v2 on 2 CPU cores, longer for larger models). 0: plain "
                                            "squared error and token counts alone, and only the embedding is "
                                            "read.", CODEBOOK, min=0.0)] = 4.0,
        code_unreachable: Annotated[bool, _opt("codebook: also code the rows of tokens the tokenizer can never "
                                               "produce (a WordPiece vocabulary's unused entries, ##!, ##. and the "
                                               "like). By default a model without a tied head leaves them out (their "
                                               "lookups return one shared fill row) and gives their bits to the "
                                               "other rows.", CODEBOOK, flag="--code-unreachable")] = False,
        min_piece_dim: Annotated[Optional[float], _opt("codebook: N, the fewest coordinates a piece has on average "
                                                        "in a stage every row has: a stage holds at most d / N pieces "
                                                        "and larger budgets add stages. Default: 2 with a tied head "
                                                        "(its compact head multiplies once per stage: fewer stages, "
                                                        "faster), else 4 (a little better quality; docs/method.md).",
                                                        CODEBOOK)] = None,
        group_size: Annotated[int, _opt("int4: numbers per group, each with a scale and an offset.",
                                        QUANT)] = 32,
        heal_steps: Annotated[int, _opt("After a low-rank or codebook method, distil the factors against the "
                                        "original model for this many steps on the weights text (0: no healing; "
                                        "codebooks: the centroids train, the indices stay). Slow on CPU for large "
                                        "models.", HEAL)] = 0,
        heal_lr: Annotated[Optional[float], _opt("Healing: Adam learning rate (default 1e-3; codebooks 5e-3, "
                                                 "relative to each codebook's RMS).", HEAL)] = None,
        weighted: Annotated[bool, _opt("Weight each row's loss by its token weight.", PAPER, flag="--weighted")] = False,
        epochs: Annotated[int, _opt("Passes over all embedding rows.", PAPER)] = 30,
        anneal_epochs: Annotated[int, _opt("First epochs, over which the L1 exponent falls from --alpha-start "
                                               "to --alpha-end.", PAPER)] = 20,
        batch_size: Annotated[int, _opt("Rows per Adam step.", PAPER)] = 32,
        lr: Annotated[float, _opt("Adam learning rate.", PAPER)] = 1e-3,
        lr_step: Annotated[int, _opt("Multiply the learning rate by --lr-gamma every this many epochs.",
                                     PAPER)] = 4,
        lr_gamma: Annotated[float, _opt("StepLR factor.", PAPER)] = 0.5,
        cos_weight: Annotated[float, _opt("Weight of the mean cosine distance.", PAPER)] = 0.1995,
        l1_weight: Annotated[float, _opt("Weight of the annealed L1 term.", PAPER)] = 0.0025,
        alpha_start: Annotated[float, _opt("L1 exponent at the first epoch.", PAPER)] = 1.0,
        alpha_end: Annotated[float, _opt("L1 exponent from --anneal-epochs on.", PAPER)] = 0.1,
        init: Annotated[Init, _opt("Start from PyTorch's random init or from the truncated SVD.",
                                   PAPER)] = Init.random,
        seed: FitSeedOpt = None, device: DeviceOpt = Device.auto, force: ForceOpt = False,
        trust_remote_code: TrustOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Compress the embedding: codebooks (best quality per byte), data-aware low rank, int8/int4 quantization
    baselines, or the paper's autoencoder.

    Size: --bits B for codebook (default 2; bits per weight, everything stored counted); --rank K, --ratio R or --bits B for low-rank methods (aware, wsvd, paper, svd); int8 and int4 have one size each. Without --method, --rank/--ratio mean aware and anything else means codebook. Options of one method are grouped below and refused with another method.

    --method paper is the recipe of "Direction is what you need" (arXiv 2106.08181), exactly: a linear autoencoder with loss 0.1995 * cosine distance + 0.0025 * annealed L1 (exponent 1.0 -> 0.1 over 20 epochs, then 10 more), Adam lr 1e-3, StepLR(4, 0.5), batch 32, seed 1; codes = encoder(E), the decoder (with bias) is kept. See docs/method.md for how the methods compare, with the numbers.

    Examples: embzip fit bert-base-uncased --rank 128 --json (aware); embzip fit --bits 4 (codebook)
    """
    from .aware import AwareConfig
    from .autoencoder import FitConfig
    from .codebook import CodebookConfig
    from .heal import HealConfig
    from .methods import REGISTRY, Recipe, fit_method
    from .pipeline import compress
    from .selfsample import SampleConfig
    from .weights import WeightConfig

    method_name = method.value if method is not None else fit_method(rank is not None or ratio is not None)
    _refuse_foreign_options(ctx, REGISTRY[method_name], heal_steps, weighted)
    if weights_text is not None and weights_dataset is not None:
        raise typer.BadParameter("give --weights-text or --weights-dataset, not both")
    if heal_steps < 0:
        raise typer.BadParameter(f"--heal-steps must be >= 0, got {heal_steps}")
    seeded = {} if seed is None else {"seed": seed}  # else each config's own default, as bench and the library use
    try:
        recipe = Recipe(
            method=method_name,
            fit=FitConfig(epochs=epochs, anneal_epochs=anneal_epochs, batch_size=batch_size, lr=lr, lr_step=lr_step,
                          lr_gamma=lr_gamma, cos_weight=cos_weight, l1_weight=l1_weight, alpha_start=alpha_start,
                          alpha_end=alpha_end, init=init.value, **seeded),
            weights=WeightConfig(floor=weight_floor, power=weight_power),
            aware=AwareConfig(output_metric=output_metric, keep_norms=keep_norms, metric_tokens=metric_tokens),
            codebook=CodebookConfig(focus=focus, unreachable=code_unreachable, min_piece_dim=min_piece_dim,
                                    vocab_prior=vocab_prior, input_metric=input_metric,
                                    **seeded), group=group_size,
            sample=SampleConfig(tokens=self_tokens, languages=sample_languages, **seeded),
            heal=HealConfig(steps=heal_steps, lr=heal_lr, **seeded) if heal_steps > 0 else None,
            weighted_paper=weighted,
            weights_text=None if weights_text is None else str(weights_text), weights_dataset=weights_dataset,
            given=frozenset(n for n in ("self_tokens", "sample_languages", "input_metric", "seed")
                             if _given(ctx, n)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _, summary = compress(model, recipe, rank=rank, ratio=ratio, bits=bits, out=out, force=force, device=device.value,
                          progress=not quiet, trust_remote_code=trust_remote_code)
    _emit(summary, as_json, "embzip fit")


_DATA_OPTIONS = ("weights_text", "weights_dataset")
_HEAL_OPTIONS = ("heal_steps", "heal_lr")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was given (command line or environment), not left at its default."""
    source = ctx.get_parameter_source(name)  # typer may vendor click: compare by name
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def _refuse_foreign_options(ctx: typer.Context, spec, heal_steps: int, weighted: bool = False) -> None:
    """An option given on the command line that the chosen method does not read is an error, not a no-op."""
    from .methods import HEALABLE, REGISTRY

    owned = {name for m in REGISTRY.values() for name in m.options} | set(_DATA_OPTIONS) | set(_HEAL_OPTIONS)
    mine = set(spec.options)
    if spec.uses_text or weighted or heal_steps > 0:  # paper reads a text only with --weighted
        mine |= set(_DATA_OPTIONS)
    if spec.kind in HEALABLE:
        mine |= set(_HEAL_OPTIONS)
    if weighted:
        mine |= {"weight_power", "weight_floor"}
    for name in sorted(owned - mine):
        if _given(ctx, name):
            users = [m.name for m in REGISTRY.values() if name in m.options]
            flag = "--" + name.replace("_", "-")
            if users:
                owners = f"--method {' / '.join(users)}"
            elif name in _DATA_OPTIONS:
                data_aware = [m.name for m in REGISTRY.values() if m.uses_text]
                owners = f"the methods that read a text ({', '.join(data_aware)}; paper with --weighted)"
            else:
                owners = "the low-rank and codebook methods"
            paper_reads = (*_DATA_OPTIONS, "weight_power", "weight_floor")  # paper with --weighted
            hint = "; give --weighted with it" if "weighted" in mine and name in paper_reads else ""
            raise typer.BadParameter(f"{flag} is an option of {owners}, not of {spec.name}{hint}")
    if heal_steps == 0 and _given(ctx, "heal_lr"):
        raise typer.BadParameter("--heal-lr sets how healing learns: give --heal-steps N (N > 0) with it")


@command
def apply(ctx: typer.Context, model: Annotated[str, typer.Argument(help="The model the factors were made from (as for svd/fit).")],
          factors: Annotated[Path, typer.Argument(help="Factors file from `embzip svd` or `embzip fit`.")],
          out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
          head: HeadOpt = None,
          dense: Annotated[bool, typer.Option("--dense", help="Write a plain transformers directory with the rebuilt "
                                                              "matrix (loads anywhere, saves no space).")] = False,
          force: ForceOpt = False, trust_remote_code: TrustOpt = False, as_json: JsonOpt = False,
          quiet: QuietOpt = False) -> None:
    """Splice factors into MODEL and write a model directory that loads and runs.

    Before the directory is kept, its files are checked against their sources and the embedding module is
    reloaded from them and compared (apply reads only the embedding, so a model of any size fits; --json's
    reload_check says what ran; a model loaded whole from Python is reloaded and its logits compared).
    Load it with embzip.load_model(DIR), or after `import embzip` with AutoModelForCausalLM /
    AutoModelForMaskedLM / AutoModel.from_pretrained(DIR); it holds no code. A compressed tied head stays
    compact in memory: a codebook head sums small per-piece tables for a generation step, otherwise it
    decodes its rows at each forward pass (slower for long batches, at 4 bits per weight and for
    int8/int4); pass cache_head=True to either to decode it once and run at the original's speed. With --dense, any
    transformers tool loads it.

    Example: embzip apply bert-base-uncased bert-base-uncased.aware-r128.safetensors --out bert-r128
    """
    from .factors import load_factors
    from .modeldir import apply_factors, check_output_dir
    from .models import open_model

    check_output_dir(out, force, (model,))
    loaded = load_factors(factors)
    opened = open_model(model, load="stream", trust_remote_code=trust_remote_code)  # the rest is copied from disk
    summary = apply_factors(opened, loaded, out, head=head.value if head else None, dense=dense, force=force,
                            command=_command_line(ctx))
    _emit(summary, as_json, "embzip apply")


@command
def perplexity(model: ModelArg = None,
               factors: Annotated[Optional[Path], typer.Option(
                   help="Also score the model with these factors spliced in, on the same masks or windows, and "
                        "report both and their ratio (an encoder: their sentence-vector fidelity).",
                   show_default=False)] = None,
               head: HeadOpt = None, text: TextOpt = None, dataset: DatasetOpt = None,
               max_tokens: Annotated[Optional[int], typer.Option(
                   help="Stop after scoring about this many tokens.", show_default=False)] = None,
               pseudo: Annotated[bool, typer.Option("--pseudo", help="Masked LMs: pseudo-perplexity (each token masked "
                                                                     "once) instead of 15% whole-word masking.")] = False,
               window: Annotated[Optional[int], typer.Option(
                   help="Causal LMs: tokens per window (default: min(context, 1024)).", show_default=False)] = None,
               stride: Annotated[Optional[int], typer.Option(
                   help="Causal LMs: new tokens scored per window (default: window / 2).", show_default=False)] = None,
               batch_size: BatchOpt = 8, seed: SeedOpt = 0, device: DeviceOpt = Device.auto,
               trust_remote_code: TrustOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Zero-shot perplexity, to see what compression cost.

    Masked LMs: the paper's protocol (line by line, lines under 20 tokens and = headings dropped, a line longer than the model's length cut there, with a warning and a count in the JSON's protocol, 15% whole-word masking with a fixed seed, exp of the mean masked-token loss), or --pseudo. Causal LMs: sliding window with stride, each token scored once, plus bits per byte. Encoders without an LM head have no perplexity: with --factors they get sentence-vector fidelity instead, as `embzip bench` reports it (3 to 256 sentences of the text, each embedded by mean pooling with and without the factors: the mean cosine of the two, and the rank correlation of the pairwise similarities).

    Example: embzip perplexity demo:gemma-3-270m --factors gemma-3-270m.codebook-2b.safetensors --head tied

    Example: embzip perplexity demo:minilm --factors minilm.codebook-2b.safetensors --text my-sentences.txt
    """
    from .factors import load_factors
    from .models import open_model, resolve_device
    from .scoring import check_options, perplexity as run
    from .texts import load_text

    check_options(window=window, stride=stride, max_tokens=max_tokens, batch_size=batch_size)
    loaded = load_factors(factors) if factors is not None else None
    source = load_text(text, dataset)
    device_name = resolve_device(device.value)
    opened = open_model(model, device=device_name, trust_remote_code=trust_remote_code)
    summary = run(opened, source, factors=loaded, head=head.value if head else None, pseudo=pseudo, window=window,
                  stride=stride, max_tokens=max_tokens, batch_size=batch_size, seed=seed, device=device_name,
                  progress=not quiet)
    _emit(summary, as_json, "embzip perplexity")


def _numbers(text: Optional[str], kind, name: str) -> Optional[list]:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} takes comma-separated numbers, got {text!r}") from None


@command
def bench(model: ModelArg = None,
          ranks: Annotated[Optional[str], typer.Option(help="Comma-separated ranks, e.g. 64,128,256.",
                                                       show_default=False)] = None,
          ratios: Annotated[Optional[str], typer.Option(help="Comma-separated compression ratios of the embedding, "
                                                        "e.g. 2.5,5,10 (instead of --ranks).",
                                                        show_default=False)] = None,
          bits: Annotated[Optional[str], typer.Option(
              help="Comma-separated sizes in bits per weight for codebook (default 1,2,4), and for low-rank "
                   "methods too when no --ranks or --ratios are given.", show_default=False)] = None,
          methods: Annotated[str, typer.Option(
              help="Comma-separated methods: svd (baseline), paper (the paper's autoencoder recipe), wsvd (SVD "
                   "weighted by token counts), aware (embzip's data-aware SVD), int8 and int4 (quantization "
                   "baselines), codebook (learned codebooks), fit (the default of `embzip fit`: aware with "
                   "--ranks or --ratios, codebook otherwise); add +heal to a low-rank or codebook method for a "
                   "short distillation after it, e.g. codebook+heal (slow on a CPU for large models). Default: svd, "
                   "aware, int8, int4 and codebook.", show_default=False)
          ] = "svd,aware,int8,int4,codebook",
          text: TextOpt = None, dataset: DatasetOpt = None,
          weights_text: Annotated[Optional[Path], typer.Option(
              help="Text for the data-aware methods' token counts and statistics (default: the English sample "
                   "shipped with embzip, distinct from the evaluation text).", show_default=False)] = None,
          self_tokens: Annotated[int, typer.Option(
              help="aware, codebook on a causal LM: tokens the model samples whose statistics join the weights "
                   "text's (see `embzip fit --help`); sampled once per run. 0: the text alone.")] = SELF_TOKENS,
          sample_languages: Annotated[float, typer.Option(
              help="Share of those sampled sequences that start in one of 32 other languages (see `embzip fit "
                   "--help`).")] = 0.0,
          out: Annotated[Optional[Path], typer.Option(
              "--out", "-o", help="Directory for bench.json, bench.csv, bench.png and the factor files (re-used by "
                                  "the next run with the same settings).", show_default=False)] = None,
          max_tokens: Annotated[int, typer.Option(help="Perplexity: tokens scored per evaluation.")] = 1024,
          batch_size: BatchOpt = 8, seed: SeedOpt = 0, device: DeviceOpt = Device.auto,
          trust_remote_code: TrustOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Methods and sizes side by side: quality, size and speed, plus the original model.

    Per row: size (rank, bits per weight), bits per weight of everything stored, compression ratio, parameters and bytes of the embedding and the whole model, cosine distance and RMSE, quality (perplexity with --head input and tied for LMs, on the same masks or windows as the original; sentence-vector fidelity and similarity rank correlation for encoders), fitting seconds, and forward latency relative to the original measured in the same run (latency x: the compact modules on a 4 x 64-token batch; cached x: a compressed tied head that keeps its decoded matrix, as load_model(DIR, cache_head=True) gives; step x, causal LMs: one token, the per-step cost of generation). Ctrl-C keeps the finished rows. Default: svd and aware at ranks 128,256 (Gemma-size vocabularies) or 32,64,128, int8, int4 (groups of 32), and codebook at 1, 2 and 4 bits per weight. With --out, bench.png plots quality against bits per weight, a line per method.

    Example: embzip bench demo:minilm --methods svd,aware,int4,codebook --bits 1,2,4 --out bench-minilm
    """
    from .benchmark import BenchConfig, bench as run
    from .models import model_spec, open_model, resolve_device
    from .outputs import check_output_folder, received_sigterm
    from .texts import load_text

    rank_list, ratio_list = _numbers(ranks, int, "--ranks"), _numbers(ratios, float, "--ratios")
    bits_list = _numbers(bits, float, "--bits")
    if rank_list is not None and ratio_list is not None:
        raise typer.BadParameter("give --ranks or --ratios, not both")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    device_name = resolve_device(device.value)
    try:  # every option is checked before anything is opened or written
        config = BenchConfig(methods=method_list, ranks=rank_list, ratios=ratio_list, bits=bits_list,
                             max_tokens=max_tokens, batch_size=batch_size, seed=seed, device=device_name)
        from .methods import recipe

        from .selfsample import SampleConfig

        sample = SampleConfig(tokens=self_tokens, languages=sample_languages)
        recipes = {m: recipe(m, weights_text=None if weights_text is None else str(weights_text), sample=sample)
                   for m in config.methods}  # fit named as what it runs at these sizes
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if weights_text is not None and not any(r.uses_text for r in recipes.values()):
        raise typer.BadParameter(f"--weights-text is read by the methods that read a text, and none of "
                                 f"{', '.join(method_list)} does")
    if out is not None:
        check_output_folder(out, inputs=[model_spec(model)])
    source = load_text(text, dataset)
    opened = open_model(model, device=device_name, trust_remote_code=trust_remote_code)
    report = run(opened, source, config, out=out, recipes=recipes, progress=not quiet)
    if as_json:
        _print_json(report)
    else:
        from .report import table

        with _printing():
            table(report)
    if report["interrupted"]:
        raise typer.Exit(143 if received_sigterm() else 130)


def main() -> None:
    app()
