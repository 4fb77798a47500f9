"""From a model to a factors file: what `embzip svd` and `embzip fit` run."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, OptionError
from .compressed import Compressed, reconstruction_metrics
from .factors import check_output_file, save_factors
from .checkpoint import EmbeddingOnly
from .models import OpenedModel, model_spec, open_model, refuse_embedding_only, resolve_device
from .provenance import environment
from .methods import Recipe, bits_name, make_factors, resolve_size
from .methods.base import check_size, refuse_unused, samples, uses_encoder_metric
from .methods import recipe as make_recipe

log = logging.getLogger("embzip")


def check_finite(embedding: torch.Tensor, name: str, doing: str = "compressing it") -> None:
    """Refuse a matrix with NaN or Inf, naming how many rows and the first one (row chunks: no V x d mask)."""
    count, first = 0, None
    for i in range(0, embedding.shape[0], 4096):
        bad = torch.isfinite(embedding[i:i + 4096]).all(dim=1).logical_not_()
        if bad.any():
            count += int(bad.sum())
            first = i + int(bad.nonzero()[0]) if first is None else first
    if count:
        raise DataError(f"the embedding {name} has NaN or Inf in {count} row(s), first row {first}; "
                        f"fix the checkpoint before {doing}")


def size_label(size: int | float | None) -> str:
    """r256 for a rank, 2b for bits per weight, '' for a method of fixed size."""
    if size is None:
        return ""
    return f"r{size}" if isinstance(size, int) else f"{bits_name(size)}b"  # 4.0000000001 is not 4's file


def default_out(source: str, method: str, size: int | float | None) -> Path:
    """A file name in the current directory such as gemma-3-270m.svd-r256.safetensors."""
    stem = Path(source.removeprefix("demo:").rstrip("/")).name.removesuffix(".gguf")
    # letters of any script stay (a model folder named 模型 gives 模型.int8.safetensors); a leading "-" or "." would
    # make the name an option or a hidden file
    stem = re.sub(r"[^\w.-]+", "-", stem).lstrip("-.") or "model"
    label = size_label(size)
    return Path(f"{stem}.{method}{'-' + label if label else ''}.safetensors")


def needs_model(recipe: Recipe, opened: OpenedModel) -> bool:
    """Whether `recipe` runs `opened`'s model (healing; a tied head's hidden-state metric; a tied causal LM's own
    samples, methods.base.samples; an encoder's sentence-vector metric) or reads only the matrix."""
    if recipe.heal is not None or samples(recipe, opened) or uses_encoder_metric(recipe, opened):
        return True
    return bool(recipe.spec.needs_forward and opened.tied and recipe.aware.output_metric > 0)


def factorize(opened: OpenedModel, size: int | float | None, recipe: Recipe, *, device: str = "cpu",
              progress: bool = False, cache: dict | None = None) -> Compressed:
    """The compressed embedding with float tensors at the stored dtype (compressed.storage_dtype), and the
    metadata a factors file records (method, settings, source model, reconstruction metrics, seconds, device, and
    the versions and CPU it was made with: provenance.environment).
    Non-finite results are refused."""
    embedding = opened.embedding.detach()
    start = time.perf_counter()
    compressed, details = make_factors(opened, size, recipe, device=device, progress=progress, cache=cache)
    seconds = time.perf_counter() - start
    compressed = compressed.to(device="cpu").stored_as(embedding.dtype)
    compressed.check_finite(f"method {recipe.name}'s result")
    compressed.meta = {"method": recipe.name, **details, "source": opened.describe(),
                       "source_bits": torch.finfo(embedding.dtype).bits,
                       "metrics": reconstruction_metrics(embedding, compressed), "seconds": seconds, "device": device,
                       "environment": environment()}
    return compressed


def compress(model: str | os.PathLike | OpenedModel | None, recipe: Recipe | str = "svd", *, rank: int | None = None,
             ratio: float | None = None, bits: float | None = None, out: str | Path | None = None,
             force: bool = False, device: str = "cpu", progress: bool = False,
             write: bool = True, trust_remote_code: bool = False) -> tuple[Compressed, dict[str, Any]]:
    """Compress a model's token embedding by `recipe` (a Recipe or a method name such as "svd",
    "aware", "int4", "codebook") at a size given by `rank`, `ratio` or `bits` and, unless
    write=False, save it.

    Returns the factors and a summary dict (the --json output of `embzip svd` / `embzip fit`).
    """
    recipe = make_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a method name such as 'codebook' or an embzip.Recipe, got "
                        f"{type(recipe).__name__}")
    model = model if isinstance(model, OpenedModel) else model_spec(model)
    method = recipe.name
    device = resolve_device(device)
    check_size(recipe.spec, rank=rank, ratio=ratio, bits=bits)  # a size the method cannot take, named first
    if not write and out is not None:
        raise OptionError(f"out={str(out)!r} names a file to write, and write=False writes none: give one of them")
    if write and out is not None:
        check_output_file(out, force, inputs=[model if isinstance(model, str) else None, recipe.weights_text])  # first
    opened = model if isinstance(model, OpenedModel) else open_model(
        model, device=device, load="full" if recipe.heal is not None else "embedding",
        trust_remote_code=trust_remote_code)
    refuse_unused(recipe, opened)
    if isinstance(opened, EmbeddingOnly) and needs_model(recipe, opened):
        if opened is model:  # the caller's: not opened again behind its back
            refuse_embedding_only(opened, f"method {method} runs the model here")
        opened = open_model(model, device=device, trust_remote_code=trust_remote_code)  # forward passes needed
    embedding = opened.embedding.detach()
    vocab, hidden = embedding.shape
    size = resolve_size(recipe, rank=rank, ratio=ratio, bits=bits, vocab=vocab, hidden=hidden, dtype=embedding.dtype)
    out_path = None
    if write:
        label = recipe.spec.file_label(recipe) if recipe.spec.file_label else method  # int4 at another group: int4g16
        label += "-norms" if recipe.norms else ""  # row lengths stored: another size, so another name
        out_path = check_output_file(out or default_out(opened.source, label, size), force,
                                     inputs=[opened.path, opened.source, recipe.weights_text])
    check_finite(embedding, opened.embedding_name)
    factors = factorize(opened, size, recipe, device=device, progress=progress)
    metrics, seconds = factors.meta["metrics"], factors.meta["seconds"]
    source, element_size, embedding_dtype = opened.source, embedding.element_size(), embedding.dtype
    if opened is not model:  # opened here: let go of the embedding (its mapped pages) before writing
        del opened, embedding
    if write:
        save_factors(factors, out_path, force=force)
        log.info("wrote %s", out_path)
    params_before = vocab * hidden
    summary = {
        "method": method,
        "model": source,
        "kind": factors.kind,
        "rank": getattr(factors, "rank", None),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "bits_per_weight": factors.bits_per_weight(),
        "compression_ratio": factors.compression_ratio(),
        "params_before": params_before,
        "params_after": factors.num_params(),
        "bytes_before": params_before * element_size,
        "bytes_after": factors.stored_bytes(),
        **({"unreachable_rows": factors.meta["unreachable_rows"]} if "unreachable_rows" in factors.meta else {}),
        "embedding_dtype": str(embedding_dtype).removeprefix("torch."),  # the model's
        "stored_dtype": str(factors.dtype).removeprefix("torch."),  # the factors' floats (16-bit)
        **metrics,
        "seconds": seconds,
        "device": device,
        "out": None if out_path is None else str(out_path),
    }
    return factors, summary
