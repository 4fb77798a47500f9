"""`embzip bench`: methods x ranks on one model, with quality, size and speed in one table.

One row per (method, rank) plus one for the original model. Quality is perplexity for LMs
(`--head input`, and `--head tied` where the head is tied; same masks/windows as the original)
and sentence-vector fidelity for encoders. Speed is the factorization time and the forward-pass
latency of the compressed model relative to the original, measured in the same run by
alternating the two on one fixed batch (and, for causal LMs, on one token: a generation step's
head). Factor files are cached in OUT/factors and re-used.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import jsonout, options
from .errors import FactorsError, OptionError, OutputError, RankError, usage
from .compressed import Compressed, reconstruction_metrics
from .factors import load_factors, save_factors
from .models import CAUSAL_LM, ENCODER, OpenedModel, input_device, refuse_embedding_only, resolve_device
from .methods import BITS, FIXED, RANK, Recipe, fit_method, recipe, resolve_size
from .modeldir import param_stats
from .outputs import check_output_folder
from .pipeline import check_finite, factorize, size_label
from .progress import bar
from .provenance import environment
from .splice import cache_decoded_head, splice, spliced

log = logging.getLogger("embzip")


@dataclass
class BenchConfig:
    """What to compare and on what."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # method names, fit, +heal
    ranks: list[int] | None = None  # low-rank methods: explicit ranks, or
    ratios: list[float] | None = None  # compression ratios of the embedding (bytes), or
    bits: list[float] | None = None  # bits per weight (codebook; low-rank too when no ranks or ratios)
    max_tokens: int = 1024  # perplexity: about this many scored tokens per evaluation
    sentences: int = 256  # fidelity: at most this many sentences
    batch_size: int = 8
    seed: int = 0
    latency_repeats: int = 5
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            raise OptionError(f"methods must be a list of method names, e.g. ['svd', 'int8'], got the string "
                              f"{self.methods!r} (the command line's --methods is split at commas)")
        if not self.methods:
            raise OptionError("give at least one method")
        self.device = resolve_device(self.device)  # "auto" picked once; a GPU asked of a machine without one refused
        options.distinct(options.flagged("methods"), self.methods)
        # fit is what `embzip fit` runs at these sizes: aware with ranks or ratios, codebook otherwise
        named = [self.runs(name) for name in self.methods]
        if len(set(named)) != len(named):
            twice = next(name for name in named if named.count(name) > 1)
            raise OptionError(f"{options.flagged('methods')} lists {twice} twice: fit is {twice} at these sizes")
        self.methods = named
        kinds = {recipe(name).spec.sized_by for name in self.methods}  # recipe raises naming the known methods
        if self.ranks is not None and self.ratios is not None:
            raise OptionError("give ranks or ratios, not both")
        self._check_sizes_are_used(kinds)
        for name in ("ranks", "ratios", "bits"):
            values = getattr(self, name)
            if values is not None and (not values or len(set(values)) != len(values)):
                raise OptionError(f"{options.flagged(name)} must be a non-empty list without repeats, got {values}")
            for value in values or ():
                options.positive(options.flagged(name), value, integer=name == "ranks")
        for name in ("max_tokens", "batch_size"):
            options.positive(options.flagged(name), getattr(self, name), integer=True)
        for name in ("sentences", "latency_repeats"):  # the library's alone
            options.positive(name, getattr(self, name), integer=True)
        options.seed(options.flagged("seed"), self.seed)

    def runs(self, name: str) -> str:
        """The method a listed name runs at these sizes: fit (+heal) as `embzip fit` would, others as named."""
        if name.partition("+")[0] != "fit":
            return name
        return name.replace("fit", fit_method(self.ranks is not None or self.ratios is not None), 1)

    def _check_sizes_are_used(self, kinds: set[str]) -> None:
        """A list of sizes no chosen method reads (`kinds`: how the methods are sized) is an error, not a no-op
        (see `sizes`)."""
        chosen = ",".join(self.methods)
        if self.ratios is not None and self.bits is not None:
            raise OptionError(f"give {options.flagged('ratios')} or {options.flagged('bits')}, not both: ratios size "
                              "every method that has sizes")
        if self.ranks is not None and RANK not in kinds:
            raise OptionError(f"{options.flagged('ranks')} size low-rank methods (svd, aware, wsvd, paper), and none "
                              f"of {chosen} is one")
        if self.ratios is not None and kinds <= {FIXED}:
            raise OptionError(f"{options.flagged('ratios')} size low-rank and codebook methods; {chosen} have one "
                              "size each")
        if self.bits is not None and BITS not in kinds and (RANK not in kinds or self.ranks is not None):
            raise OptionError(f"{options.flagged('bits')} size codebook methods (and low-rank ones without ranks), "
                              f"and none of {chosen} takes them" + (" here" if RANK in kinds else ""))


DEFAULT_METHODS = ("svd", "aware", "int8", "int4", "codebook")
DEFAULT_BITS = (1.0, 2.0, 4.0)


def default_ranks(vocab: int) -> list[int]:
    return [128, 256] if vocab > 100_000 else [32, 64, 128]


def sizes(config: BenchConfig, r: Recipe, vocab: int, hidden: int, dtype: torch.dtype) -> list[int | float | None]:
    """The sizes one method is benched at: ranks (low-rank), bits per weight (codebook), or its one size."""
    shape = dict(vocab=vocab, hidden=hidden, dtype=dtype)
    kind = r.spec.sized_by
    if kind == FIXED:
        return [resolve_size(r, **shape)]
    if kind == RANK and config.ranks is not None:
        return [resolve_size(r, rank=k, **shape) for k in config.ranks]
    if config.ratios is not None:
        return list(dict.fromkeys(resolve_size(r, ratio=x, **shape) for x in config.ratios))
    if kind == RANK and config.bits is None:  # the default ranks this matrix takes (a small hidden size, fewer)
        fitting = []
        for k in default_ranks(vocab):
            try:
                fitting.append(resolve_size(r, rank=k, **shape))
            except RankError:
                pass
        return fitting or [resolve_size(r, rank=k, **shape) for k in default_ranks(vocab)]  # none: the error
    return list(dict.fromkeys(resolve_size(r, bits=b, **shape) for b in (config.bits or DEFAULT_BITS)))


def _cache_name(method: str, size) -> str:
    label = size_label(size)
    return f"{method}{'-' + label if label else ''}.safetensors"


def model_key(opened: OpenedModel) -> str:
    """A digest of the model a bench's factor files are made from: the embedding's bytes and the model directory's
    files (names, sizes, modification and change times: the other layers make the model's own samples and metric;
    the change time moves on every write, also where a copy or `touch` put the old modification time back)."""
    import hashlib
    import os

    digest = hashlib.blake2b(digest_size=16)
    embedding = opened.embedding.detach()
    for i in range(0, embedding.shape[0], 65536):  # a block of rows at a time: no whole copy of a large matrix
        digest.update(embedding[i:i + 65536].contiguous().cpu().view(torch.uint8).numpy().data)
    folder = Path(opened.path)
    if folder.is_dir():
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file():
                info = entry.stat()
                digest.update(f"{entry.name}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def inputs_key(model: str, recipe: Recipe) -> str:
    """`model_key` with the bytes of the recipe's weights text: a cached factor file is reused only where both
    match, not after a model or a text was changed in place."""
    import hashlib

    digest = hashlib.blake2b(model.encode(), digest_size=16)
    text = recipe.weights_text
    if recipe.uses_text and text is not None and Path(text).expanduser().is_file():
        digest.update(Path(text).expanduser().read_bytes())
    return digest.hexdigest()


def _cached_factors(cache: Path | None, method: str, size, opened: OpenedModel, settings: dict,
                    key: str) -> Compressed | None:
    if cache is None or not (cache / _cache_name(method, size)).is_file():
        return None
    try:
        factors = load_factors(cache / _cache_name(method, size))
    except FactorsError:
        return None
    same = (factors.meta.get("method") == method and factors.meta.get("size") == size
            and factors.meta.get("source", {}).get("path") == opened.path
            and factors.shape == (opened.vocab_size, opened.hidden_size)
            and factors.meta.get("settings", {}) == settings and factors.meta.get("bench_inputs") == key)
    return factors if same else None


def _latency_batch(opened: OpenedModel, text) -> torch.Tensor:
    ids = opened.tokenizer("\n".join(text.lines[:64]), return_tensors="pt").input_ids[0] if opened.tokenizer else None
    ids = None if ids is None else ids[ids < opened.vocab_size]  # timing only: ids beyond the embedding left out
    if ids is None or len(ids) < 256:
        ids = torch.arange(256) % opened.vocab_size
    return ids[:256].view(4, 64)


def latency_ratios(model, factors: Compressed, head: str, batch: torch.Tensor, repeats: int,
                   step: torch.Tensor | None = None) -> dict[str, float | None]:
    """Median forward time with the factors over median time without, the runs alternated.

    `latency_ratio`: the compact modules as `apply` writes them, on `batch`. `latency_ratio_cached`: a
    compressed tied head that keeps its decoded matrix (splice.cache_decoded_head; None where there is no
    such head). `latency_ratio_step`: the compact modules on `step`, a single token with no key-value cache:
    a generation step's embedding and head work, next to a body lighter than a real step's, so the head
    weighs more than it does in generation (None without `step`)."""
    device = input_device(model)
    inputs = {"batch": batch.to(device)}
    if step is not None:
        inputs["step"] = step.to(device)

    def run(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=inputs[name])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    swap = splice(model, factors, head)
    head_module = model.get_output_embeddings()
    cacheable = cache_decoded_head(model, False)  # whether the spliced model has a compressed tied head
    timed = [("compact", "batch")] + [("cached", "batch")] * cacheable + [("compact", "step")] * (step is not None)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in timed}
    times.update({("original", name): [] for name in inputs})
    try:
        for variant, name in timed:  # warm-up; the cached head decodes here, once, and keeps the matrix
            if cacheable:
                head_module.cache_decoded = variant == "cached"
            run(name)
        swap.restore()
        for name in inputs:
            run(name)  # warm-up, original
        for _ in range(repeats):
            swap.restore()
            for name in inputs:
                times[("original", name)].append(run(name))
            swap.reapply()
            for variant, name in timed:
                if cacheable:
                    head_module.cache_decoded = variant == "cached"
                times[(variant, name)].append(run(name))
    finally:
        cache_decoded_head(model, False)  # frees the decoded matrix
        swap.restore()

    def ratio(variant: str, name: str) -> float | None:
        if (variant, name) not in timed:
            return None
        return statistics.median(times[(variant, name)]) / statistics.median(times[("original", name)])

    return {"latency_ratio": ratio("compact", "batch"), "latency_ratio_cached": ratio("cached", "batch"),
            "latency_ratio_step": ratio("compact", "step")}


class _Quality:
    """Scores the model as it is now (original or spliced) with fixed masks/windows/sentences."""

    def __init__(self, opened: OpenedModel, text, config: BenchConfig):
        self.opened, self.text, self.config = opened, text, config
        self.encoder = opened.kind == ENCODER
        if self.encoder:
            from .fidelity import sentence_vectors, sentences

            self.sentences = sentences(text, config.sentences)
            self.reference = sentence_vectors(opened.model, opened.tokenizer, self.sentences)
            self.protocol = {"name": "sentence-fidelity", "sentences": len(self.sentences), "pooling": "mean"}
        else:
            self.reference = self.perplexity()
            self.protocol = {**self.reference["protocol"], "tokens": self.reference["tokens"]}  # scored

    def perplexity(self) -> dict[str, Any]:
        from .scoring import perplexity

        c = self.config
        return perplexity(self.opened, self.text, max_tokens=c.max_tokens, batch_size=c.batch_size, seed=c.seed,
                          device=c.device)

    def original(self, heads: list[str]) -> dict[str, Any]:
        if self.encoder:
            return {"fidelity": 1.0, "similarity_spearman": 1.0}
        ppl = self.reference["perplexity"]
        return {k: v for h in heads for k, v in ((f"perplexity_{h}", ppl), (f"perplexity_ratio_{h}", 1.0))}

    def score(self, suffix: str) -> dict[str, Any]:
        if self.encoder:
            from .fidelity import compare, sentence_vectors

            return compare(self.reference, sentence_vectors(self.opened.model, self.opened.tokenizer, self.sentences))
        scored = self.perplexity()
        ppl, reference = scored["perplexity"], self.reference["perplexity"]
        # where a perplexity overflows (inf), the ratio still is exp(mean NLL difference), as `perplexity` reports
        gap = scored["mean_nll"] - self.reference["mean_nll"]
        ratio = ppl / reference if math.isfinite(ppl) and math.isfinite(reference) else \
            (math.exp(gap) if gap < 700 else math.inf)
        return {f"perplexity_{suffix}": ppl, f"perplexity_ratio_{suffix}": ratio}


RESULT_FILES = ("bench.json", "bench.csv", "bench.png")


def _check_same_model(out: Path, opened: OpenedModel) -> None:
    """Refuse an OUT that holds another model's bench: its factor files would stay beside this one's, and its
    bench.json would be replaced (the factor files of the same model at other settings are simply replaced); or
    that holds result files of the same names that no embzip bench wrote, which would be replaced."""
    present = [name for name in RESULT_FILES if (out / name).exists() or (out / name).is_symlink()]
    if not present:
        return
    previous = _previous_bench(out)
    if not (isinstance(previous, dict) and {"model", "path", "rows", "protocol"} <= previous.keys()):
        raise usage(OutputError(f"{out} holds {', '.join(present)}, which embzip bench did not write (it has no "
                                "bench.json of a bench), and this bench would replace them; give another --out, or "
                                "move them first"))
    path = previous["path"]
    hub_id = not Path(opened.source).expanduser().exists()  # its path is the cache's snapshot, a new one per commit
    if isinstance(path, str) and not _same_model_path(path, opened.path) and not (
            hub_id and previous.get("model") == opened.source):
        raise usage(OutputError(f"{out} holds the bench of another model ({previous.get('model', path)}); give "
                                "another --out, or remove it first"))


def _same_model_path(a: str, b: str) -> bool:
    """Whether two model paths as given name one model: the same string (a hub id), or one folder or file spelled
    two ways (relative and absolute, through a link)."""
    import os

    if a == b:
        return True
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:  # one of them is not on this disk (a hub id, a removed folder)
        return False


def bench(opened: OpenedModel, text, config: BenchConfig, *, out: str | Path | None = None,
          recipes: dict[str, Recipe] | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the comparison; returns {"model", "text", "protocol", "rows", ...} and writes OUT files. `recipes` gives
    some methods' recipes (each a recipe of the method it is listed under); the others take their defaults."""
    from .texts import Text

    if not isinstance(opened, OpenedModel):
        raise TypeError(f"opened must be a model opened by embzip.open_model(MODEL), got {type(opened).__name__}")
    if not isinstance(text, Text):
        raise TypeError(f"text must be a Text from embzip.load_text(PATH), got {type(text).__name__}")
    if not isinstance(config, BenchConfig):
        raise TypeError(f"config must be an embzip.BenchConfig, got {type(config).__name__}")
    refuse_embedding_only(opened, "the bench runs the model")
    recipes = {config.runs(name): r for name, r in (recipes or {}).items()}  # keyed "fit" too, as it was listed
    for name, given_recipe in recipes.items():
        if name not in config.methods:
            raise OptionError(f"recipes names {name!r}, which is not among the methods benched "
                              f"({', '.join(config.methods)})")
        if not isinstance(given_recipe, Recipe) or given_recipe.name != recipe(name).name:
            what = given_recipe.name if isinstance(given_recipe, Recipe) else type(given_recipe).__name__
            raise OptionError(f"recipes[{name!r}] must be a Recipe of {recipe(name).name}, got {what}")
    out = check_output_folder(out, inputs=[opened.path, opened.source]) if out is not None else None
    if out is not None:
        _check_same_model(out, opened)
    cache = out / "factors" if out is not None else None  # created when the first factors are saved
    model = opened.model
    embedding = opened.embedding.detach()
    check_finite(embedding, opened.embedding_name)
    vocab, hidden = embedding.shape
    given = {name: (recipes or {}).get(name) or recipe(name) for name in config.methods}
    recipes = {r.name: r for r in given.values()}  # rows are labelled by what runs: "fit" shows as "aware"
    plan = [(m, s) for m in recipes for s in sizes(config, recipes[m], vocab, hidden, embedding.dtype)]
    data_cache: dict = {}
    keys: dict[str, str] = {}  # inputs_key per method, for the factor files kept in OUT
    digest = None  # model_key, on first use
    whole = param_stats(model)
    emb_bytes = embedding.numel() * embedding.element_size()
    heads = ["input", "tied"] if opened.tied else ["input"]
    started = time.perf_counter()
    quality = _Quality(opened, text, config)
    rows: list[dict[str, Any]] = [{
        "method": "original", "size": "-", "rank": None, "bits_per_weight": float(8 * embedding.element_size()),
        "compression_ratio": 1.0, "embedding_params": vocab * hidden, "embedding_bytes": emb_bytes,
        "model_params": whole["params"], "model_bytes": whole["bytes"],
        "cosine_distance": 0.0, "rmse": 0.0, "mae": 0.0, **quality.original(heads),
        "fit_seconds": None, "latency_ratio": 1.0, "latency_ratio_cached": None,
        "latency_ratio_step": 1.0 if opened.kind == CAUSAL_LM else None, "cached": None,
    }]
    batch = _latency_batch(opened, text)
    step = batch[:1, :1] if opened.kind == CAUSAL_LM else None  # one generation step's new token
    interrupted = False
    try:
        with bar("bench", len(plan), enabled=progress, fields="{task.fields[row]}", row="") as pbar:
            for method, size in plan:
                pbar.update(row=f"{method} {size_label(size)}")
                settings = recipes[method].settings()
                if cache is not None and method not in keys:
                    digest = digest or model_key(opened)  # read once, on the first method that needs it
                    keys[method] = inputs_key(digest, recipes[method])
                key = keys.get(method)
                factors = _cached_factors(cache, method, size, opened, settings, key)
                cached = factors is not None
                if factors is None:
                    factors = factorize(opened, size, recipes[method], device=config.device, cache=data_cache)
                    if cache is not None:
                        factors.meta["bench_inputs"] = key
                        try:
                            cache.mkdir(parents=True, exist_ok=True)
                        except OSError as exc:
                            raise OutputError(f"could not create {cache}: {exc.strerror or exc}") from None
                        save_factors(factors, cache / _cache_name(method, size), force=True)
                n = factors.num_params()
                f_bytes = factors.stored_bytes()
                main_head = heads[-1]
                row = {
                    "method": method, "size": factors.size_label(), "rank": getattr(factors, "rank", None),
                    "bits_per_weight": factors.bits_per_weight(), "compression_ratio": factors.compression_ratio(),
                    "embedding_params": n, "embedding_bytes": f_bytes,
                    # whole model with the tied head (the real saving) or, untied, input side only
                    "model_params": whole["params"] - vocab * hidden + n,
                    "model_bytes": whole["bytes"] - emb_bytes + f_bytes,
                    **(factors.meta.get("metrics") or reconstruction_metrics(embedding, factors)),
                    "fit_seconds": factors.meta.get("seconds"), "cached": cached,
                }
                for head in heads:
                    with spliced(model, factors, head):
                        row.update(quality.score(head))
                row.update(latency_ratios(model, factors, main_head, batch, config.latency_repeats, step))
                if device_is_cuda(model):
                    row["peak_memory_bytes"] = _peak_memory(model, factors, main_head, batch)
                rows.append(row)
                pbar.advance()
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: keeping the %d finished row(s)", len(rows) - 1)
    report = {
        "model": opened.source, "path": opened.path, "kind": opened.kind, "tied": opened.tied,
        "vocab_size": vocab, "hidden_size": hidden, "dtype": str(embedding.dtype).removeprefix("torch."),
        "text": text.source, "protocol": quality.protocol, "device": config.device,
        "seconds": time.perf_counter() - started, "interrupted": interrupted, "environment": environment(),
        "rows": rows,
    }
    if out is not None:
        try:
            _write_results(report, out)
        except OSError as exc:
            raise OutputError(f"could not write the bench results to {out}: {exc.strerror or exc}") from None
    return report


def _write_results(report: dict[str, Any], out: Path) -> None:
    """The results into OUT, unless the run was interrupted and OUT holds an earlier run's complete bench (kept: a
    Ctrl-C never trades whole results for part of them). A signal while the results are written (the plot takes
    a second) makes the run an interrupted one: its finished rows are written again, or the complete bench kept."""
    from .outputs import identity

    if report["interrupted"] and _holds_complete_bench(out):
        _kept_earlier(report, out)
        return
    before = identity(out / "bench.json")
    try:
        write_outputs(report, out)
    except KeyboardInterrupt:
        report["interrupted"] = True
        if identity(out / "bench.json") != before:  # the signal was held until this run's files were in place
            log.warning("interrupted once the results were in place in %s", out)
            return
        if _holds_complete_bench(out):
            _kept_earlier(report, out)
            return
        log.warning("interrupted while writing the results: writing the %d finished row(s) again",
                    len(report["rows"]) - 1)
        write_outputs(report, out)


def _previous_bench(out: Path) -> Any:
    """What OUT's bench.json holds (None where there is none, or it does not parse)."""
    import json

    try:
        return json.loads((out / "bench.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _holds_complete_bench(out: Path) -> bool:
    previous = _previous_bench(out)
    return isinstance(previous, dict) and previous.get("interrupted") is False and bool(previous.get("rows"))


def _kept_earlier(report: dict[str, Any], out: Path) -> None:
    log.warning("interrupted: %s keeps the complete bench of an earlier run; this run's %d finished row(s) are not "
                "written there (they are in the table or --json output)", out, len(report["rows"]) - 1)


def device_is_cuda(model) -> bool:
    return input_device(model).type == "cuda"


def _peak_memory(model, factors: Compressed, head: str, batch: torch.Tensor) -> int:
    torch.cuda.reset_peak_memory_stats()
    with spliced(model, factors, head), torch.inference_mode():
        model(input_ids=batch.to("cuda"))
    return torch.cuda.max_memory_allocated()


COLUMNS = ["method", "size", "rank", "bits_per_weight", "compression_ratio", "embedding_params", "embedding_bytes",
           "model_params", "model_bytes", "cosine_distance", "rmse", "mae", "perplexity_input", "perplexity_ratio_input",
           "perplexity_tied", "perplexity_ratio_tied", "fidelity", "similarity_spearman", "fit_seconds", "latency_ratio",
           "latency_ratio_cached", "latency_ratio_step", "peak_memory_bytes", "cached"]


def columns(report: dict[str, Any]) -> list[str]:
    present = {k for row in report["rows"] for k in row}
    return [c for c in COLUMNS if c in present]


def _csv_cell(value: Any) -> Any:
    """A row's value in bench.csv as bench.json writes it: true / false, and empty where JSON has null (none, or a
    number that is not finite)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """bench.json, bench.csv and bench.png in `out`, put in place together (outputs.write_files)."""
    from .outputs import write_files

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns(report), extrasaction="ignore")
            writer.writeheader()
            writer.writerows({key: _csv_cell(value) for key, value in row.items()} for row in report["rows"])

    try:
        import matplotlib  # noqa: F401

        write_png = lambda path: plot(report, path)  # noqa: E731
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'embzip[plot]')")
        write_png = None  # and an older run's plot is removed with the rest replaced
    write_files(out, {"bench.json": lambda path: path.write_text(jsonout.dumps(report, indent=2) + "\n"),
                      "bench.csv": write_csv, "bench.png": write_png})


def quality_key(report: dict[str, Any]) -> tuple[str, str]:
    """The column to plot and its label."""
    if report["kind"] == ENCODER:
        return "fidelity", "sentence-vector fidelity (mean cosine)"
    if report["tied"]:
        return "perplexity_tied", "perplexity, tied head (log scale)"
    return "perplexity_input", "perplexity (log scale)"


def plot(report: dict[str, Any], path: Path) -> None:
    """Rate-distortion: bits per weight (log) against the perplexity ratio (log) or fidelity, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = quality_key(report)
    ratio_key = key.replace("perplexity_", "perplexity_ratio_")
    if key != "fidelity":
        key, label = ratio_key, label.replace("perplexity", "perplexity / original's")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for method in dict.fromkeys(r["method"] for r in report["rows"][1:]):
        pts = sorted((r["bits_per_weight"], r[key]) for r in report["rows"]
                     if r["method"] == method and r.get(key) is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    original = report["rows"][0]
    ax.axhline(original[key], color="black", linestyle="--", linewidth=1,
               label=f"original ({original['bits_per_weight']:g} bits per weight)")
    ax.set_xscale("log", base=2)
    if key != "fidelity":
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the embedding, everything stored counted (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{report['model']}: quality against size")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
