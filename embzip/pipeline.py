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
from .models import OpenedModel, open_model, resolve_device
from .methods import Recipe, make_factors
from .methods import recipe as make_recipe
from .sizes import resolve_rank

log = logging.getLogger("embzip")


def check_finite(embedding: torch.Tensor, name: str) -> None:
    """Refuse a matrix with NaN or Inf, naming how many rows and the first one."""
    bad_rows = (~torch.isfinite(embedding)).any(dim=1).nonzero().flatten()
    if len(bad_rows):
        raise DataError(f"the embedding {name} has NaN or Inf in {len(bad_rows)} row(s), first row {bad_rows[0].item()}; "
                        "fix the checkpoint before compressing it")


def default_out(source: str, method: str, rank: int) -> Path:
    """A file name in the current directory such as gemma-3-270m.svd-r256.safetensors."""
    stem = Path(source.removeprefix("demo:").rstrip("/")).name.removesuffix(".gguf")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem) or "model"
    return Path(f"{stem}.{method}-r{rank}.safetensors")


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
    opened = model if isinstance(model, OpenedModel) else open_model(model, device=device)
    embedding = opened.embedding.detach()
    vocab, hidden = embedding.shape
    rank = resolve_rank(rank, ratio, vocab, hidden, bias=recipe.bias, norms=recipe.norms)
    out_path = None
    if write:
        out_path = check_output_file(out or default_out(opened.source, method, rank), force)
    check_finite(embedding, opened.embedding_name)
    factors = factorize(opened, rank, recipe, device=device, progress=progress)
    metrics, seconds = factors.meta["metrics"], factors.meta["seconds"]
    if write:
        save_factors(factors, out_path, force=force)
        log.info("wrote %s", out_path)
    params_before = vocab * hidden
    summary = {
        "method": method,
        "model": opened.source,
        "rank": rank,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "compression_ratio": factors.compression_ratio(),
        "params_before": params_before,
        "params_after": factors.num_params(),
        "bytes_before": params_before * embedding.element_size(),
        "bytes_after": factors.num_params() * factors.codes.element_size(),
        "dtype": str(factors.dtype).removeprefix("torch."),
        **metrics,
        "seconds": seconds,
        "device": device,
        "out": None if out_path is None else str(out_path),
    }
    return factors, summary
