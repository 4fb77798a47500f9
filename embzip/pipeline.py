"""From a model to a factors file: what `embzip svd` and `embzip fit` run."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .factors import Factors, check_output_file, reconstruction_metrics, save_factors
from .checkpoint import EmbeddingOnly
from .models import OpenedModel, open_model, resolve_device
from .methods import Recipe, make_factors
from .methods import recipe as make_recipe
from .sizes import resolve_rank

log = logging.getLogger("embzip")


def check_finite(embedding: torch.Tensor, name: str) -> None:
    """Refuse a matrix with NaN or Inf, naming how many rows and the first one (row chunks: no V x d mask)."""
    count, first = 0, None
    for i in range(0, embedding.shape[0], 4096):
        bad = torch.isfinite(embedding[i:i + 4096]).all(dim=1).logical_not_()
        if bad.any():
            count += int(bad.sum())
            first = i + int(bad.nonzero()[0]) if first is None else first
    if count:
        raise DataError(f"the embedding {name} has NaN or Inf in {count} row(s), first row {first}; "
                        "fix the checkpoint before compressing it")


def default_out(source: str, method: str, rank: int) -> Path:
    """A file name in the current directory such as gemma-3-270m.svd-r256.safetensors."""
    stem = Path(source.removeprefix("demo:").rstrip("/")).name.removesuffix(".gguf")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem) or "model"
    return Path(f"{stem}.{method}-r{rank}.safetensors")


def needs_model(recipe: Recipe) -> bool:
    """Whether `recipe` runs the model (healing; aware's hidden-state metric, used for tied heads only) or
    reads only the embedding matrix."""
    return recipe.heal is not None or (recipe.method == "aware" and recipe.aware.output_metric > 0)


def factorize(opened: OpenedModel, rank: int, recipe: Recipe, *, device: str = "cpu", progress: bool = False,
              cache: dict | None = None) -> Factors:
    """Factors of `opened`'s embedding at the embedding's dtype, with the metadata a factors file records
    (method, settings, source model, reconstruction metrics, seconds, device)."""
    embedding = opened.embedding.detach()
    start = time.perf_counter()
    factors, details = make_factors(opened, rank, recipe, device=device, progress=progress, cache=cache)
    seconds = time.perf_counter() - start
    factors = factors.to(dtype=embedding.dtype)
    factors.meta = {"method": recipe.name, **details, "source": opened.describe(),
                    "metrics": reconstruction_metrics(embedding, factors), "seconds": seconds, "device": device}
    return factors


def compress(model: str | OpenedModel | None, recipe: Recipe | str = "svd", *, rank: int | None = None,
             ratio: float | None = None, out: str | Path | None = None, force: bool = False, device: str = "cpu",
             progress: bool = False, write: bool = True) -> tuple[Factors, dict[str, Any]]:
    """Factorize a model's token embedding by `recipe` (a Recipe or a method name such as "svd",
    "paper", "aware") and, unless write=False, save the factors.

    Returns the factors and a summary dict (the --json output of `embzip svd` / `embzip fit`).
    """
    recipe = make_recipe(recipe) if isinstance(recipe, str) else recipe
    method = recipe.name
    device = resolve_device(device)
    if write and out is not None:
        check_output_file(out, force)  # fail before the slow part
    opened = model if isinstance(model, OpenedModel) else open_model(
        model, device=device, load="full" if recipe.heal is not None else "embedding")
    if opened is not model and opened.tied and needs_model(recipe) and isinstance(opened, EmbeddingOnly):
        opened = open_model(model, device=device)  # the tied head's hidden-state metric needs forward passes
    embedding = opened.embedding.detach()
    vocab, hidden = embedding.shape
    rank = resolve_rank(rank, ratio, vocab, hidden, bias=recipe.bias, norms=recipe.norms)
    out_path = None
    if write:
        out_path = check_output_file(out or default_out(opened.source, method, rank), force)
    check_finite(embedding, opened.embedding_name)
    factors = factorize(opened, rank, recipe, device=device, progress=progress)
    metrics, seconds = factors.meta["metrics"], factors.meta["seconds"]
    source, element_size = opened.source, embedding.element_size()
    if opened is not model:  # opened here: let go of the embedding (its mapped pages) before writing
        del opened, embedding
    if write:
        save_factors(factors, out_path, force=force)
        log.info("wrote %s", out_path)
    params_before = vocab * hidden
    summary = {
        "method": method,
        "model": source,
        "rank": rank,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "compression_ratio": factors.compression_ratio(),
        "params_before": params_before,
        "params_after": factors.num_params(),
        "bytes_before": params_before * element_size,
        "bytes_after": factors.num_params() * factors.codes.element_size(),
        "dtype": str(factors.dtype).removeprefix("torch."),
        **metrics,
        "seconds": seconds,
        "device": device,
        "out": None if out_path is None else str(out_path),
    }
    return factors, summary
