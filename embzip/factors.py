"""Low-rank factors, and the factors file that stores any compressed embedding.

Low-rank (kind ``lowrank``): row i of the embedding is rebuilt as ``codes[i] @ decoder +
decoder_bias``; when ``norms`` is present the rebuilt row is rescaled to length ``norms[i]``
(direction from the factors, length stored exactly).

The factors file is safetensors with a JSON metadata entry. Format version 5 (this one) stores
any kind (compressed.py: lowrank, quant, codebook) with its tensors at their compact dtypes
(uint8 indices, int4 packed two per byte, int8 tables with 16-bit scales, 16-bit floats). Version 3
added a codebook's focus stage (a stage over some rows only, `stage{s}.rows`); version 4 stores a
codebook's transform and codebooks as int8 with a 16-bit scale per row or column (`NAME.scale`),
which older readers would refuse as malformed, so they are told to upgrade; version 5 lets a codebook
leave out rows no token reaches (`absent`). Versions 1 to 4 keep loading (up to 3, a codebook's tables
as 16-bit floats). A tensor the format does not define is refused. Loading checks what the file claims
against what it holds. See docs/format.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .compressed import Compressed, kind_class, reconstruction_metrics, register  # noqa: F401 (re-exported)
from .errors import FactorsError, not_a_file, usage
from .outputs import atomic_write, check_output_file  # noqa: F401 (re-exported)
from .sizes import factored_params

FORMAT_NAME = "embzip.factors"
FORMAT_VERSION = 5
CODES = "codes"
DECODER = "decoder"
DECODER_BIAS = "decoder_bias"
NORMS = "norms"
META_KEY = "embzip"


@register
class Factors(Compressed):
    """Low-rank factors of a V x d embedding and what produced them."""

    kind = "lowrank"

    def __init__(self, codes: torch.Tensor, decoder: torch.Tensor, bias: torch.Tensor | None = None,
                 norms: torch.Tensor | None = None, meta: dict[str, Any] | None = None):
        self.codes, self.decoder, self.bias, self.norms = codes, decoder, bias, norms
        self.meta = {} if meta is None else meta
        if self.codes.ndim != 2 or self.decoder.ndim != 2 or self.codes.shape[1] != self.decoder.shape[0]:
            raise FactorsError(
                f"codes {tuple(self.codes.shape)} and decoder {tuple(self.decoder.shape)} do not chain: "
                "codes must be V x k and decoder k x d"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.hidden,):
            raise FactorsError(f"decoder bias has shape {tuple(self.bias.shape)}, expected ({self.hidden},)")
        if self.norms is not None and tuple(self.norms.shape) != (self.vocab,):
            raise FactorsError(f"norms have shape {tuple(self.norms.shape)}, expected ({self.vocab},)")
        if self.rank < 1:
            raise FactorsError(f"factors of rank {self.rank} rebuild nothing; the rank must be at least 1")
        for name, t in self.tensors().items():
            if not t.is_floating_point():
                raise FactorsError(f"low-rank tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                                   "expected a float dtype")

    @property
    def rank(self) -> int:
        return self.codes.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.decoder.shape[1])

    def size_label(self) -> str:
        return f"r{self.rank}"

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {CODES: self.codes, DECODER: self.decoder}
        if self.bias is not None:
            out[DECODER_BIAS] = self.bias
        if self.norms is not None:
            out[NORMS] = self.norms
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Factors":
        missing = [name for name in (CODES, DECODER) if name not in tensors]
        if missing:
            raise FactorsError(f"low-rank factors lack the tensor(s) {', '.join(missing)}")
        unknown = sorted(set(tensors) - {CODES, DECODER, DECODER_BIAS, NORMS})
        if unknown:
            raise FactorsError(f"low-rank factors hold {', '.join(unknown[:5])}, which the format does not define "
                               f"(only {CODES}, {DECODER}, {DECODER_BIAS}, {NORMS}; docs/format.md)")
        return cls(tensors[CODES], tensors[DECODER], tensors.get(DECODER_BIAS), tensors.get(NORMS), meta)

    @classmethod
    def decode(cls, tensors: dict[str, torch.Tensor], index: torch.Tensor | slice,
               derived: dict | None = None) -> torch.Tensor:
        out = tensors[CODES][index].float() @ tensors[DECODER].float()
        bias, norms = tensors.get(DECODER_BIAS), tensors.get(NORMS)
        if bias is not None:
            out = out + bias.float()
        if norms is not None:
            out = out * (norms[index].float() / out.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)
        return out

    def num_params(self) -> int:
        return factored_params(self.vocab, self.hidden, self.rank, bias=self.bias is not None,
                               norms=self.norms is not None)


def save_factors(factors: Compressed, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write any compressed embedding to a safetensors file atomically; returns the path.

    Refuses non-finite values (nothing is written), and with force an existing file inside the model the factors
    record as their source (its own weights). Tensors are written as they are: `embzip svd` / `fit` and
    `compress` store them at 16 bits (compressed.storage_dtype); factors made directly (svd_factors,
    aware_factors) are float32 until cast with `.to(dtype=...)`."""
    from safetensors.torch import save_file

    if not isinstance(factors, Compressed):
        raise TypeError(f"factors must be a compressed embedding (embzip.Factors, or what compress / load_factors "
                        f"return), got {type(factors).__name__}")
    source = factors.meta.get("source") if isinstance(factors.meta, dict) else None
    source = source if isinstance(source, dict) else {}
    inputs = [value for value in (source.get("path"), source.get("model")) if isinstance(value, str)]
    path = check_output_file(path, force, inputs=inputs)
    factors.check_finite()
    meta = dict(factors.meta)
    meta.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        embzip_version=__version__,
        kind=factors.kind,
        shape=list(factors.shape),
        dtype=str(factors.dtype).removeprefix("torch."),
        params=factors.num_params(),
        stored_bytes=factors.stored_bytes(),
        bits_per_weight=factors.bits_per_weight(),
        compression_ratio=factors.compression_ratio(),
        tensors={name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                 for name, t in factors.tensors().items()},
    )
    if isinstance(factors, Factors):
        meta["rank"] = factors.rank
    tensors = {name: t.detach().contiguous().cpu().clone() for name, t in factors.tensors().items()}
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), replace=force)
    factors.meta = meta
    return path


def _claims(path: Path, header: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """The format version and the metadata object a file claims, or a one-line error naming the problem."""
    try:
        version = int(header.get("format_version", ""))
    except ValueError:
        raise FactorsError(f"{path} has format_version {header.get('format_version')!r}, not an integer") from None
    if version > FORMAT_VERSION:
        raise FactorsError(
            f"{path} has factors format version {version}; this embzip ({__version__}) reads up to "
            f"version {FORMAT_VERSION}: upgrade embzip"
        )
    if version < 1:
        raise FactorsError(f"{path} has factors format version {version}; versions start at 1")
    try:
        meta = json.loads(header[META_KEY])
    except ValueError as exc:
        raise FactorsError(f"{path}: its '{META_KEY}' metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FactorsError(f"{path}: its '{META_KEY}' metadata is a JSON {type(meta).__name__}, expected an object")
    if "format_version" in meta and meta["format_version"] != version:  # written together: they must agree
        raise FactorsError(f"{path}: its header says format version {version} and its '{META_KEY}' metadata "
                           f"{meta['format_version']!r}; the file was altered, fit the factors again")
    for key, kind in (("source", dict), ("settings", dict), ("metrics", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise FactorsError(f"{path}: metadata {key!r} is a {type(meta[key]).__name__}, expected an object")
    return version, meta


def _check_claims(path: Path, meta: dict[str, Any], factors: Compressed) -> None:
    """What the metadata says about shape, rank, kind and tensors must be what the tensors are."""
    if "shape" in meta and list(meta["shape"]) != list(factors.shape):
        raise FactorsError(f"{path} claims shape {meta['shape']} but its tensors rebuild {list(factors.shape)}")
    if "rank" in meta and isinstance(factors, Factors) and meta["rank"] != factors.rank:
        raise FactorsError(f"{path} claims rank {meta['rank']} but its codes have rank {factors.rank}")
    for name, claim in (meta.get("tensors") or {}).items():
        t = factors.tensors().get(name)
        if t is None or list(t.shape) != list(claim.get("shape", [])) or \
                str(t.dtype).removeprefix("torch.") != claim.get("dtype"):
            raise FactorsError(f"{path} claims tensor {name!r} as {claim} but holds "
                               f"{None if t is None else (list(t.shape), str(t.dtype).removeprefix('torch.'))}")


def is_factors_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file whose metadata says embzip factors (reads the header only)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def load_factors(path: str | os.PathLike) -> Compressed:
    """Read a factors file (any kind; format version 1 to the current one), checking its format, version and claims."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a factors file is given by its path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise usage(FactorsError(f"factors file {path} is a directory; give the .safetensors file `embzip fit` or "
                                 "`embzip svd` wrote"))
    if not path.is_file():
        raise usage(FactorsError(f"factors file {path} {not_a_file(path)}"))
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FactorsError(f"{path} is not a safetensors file or is damaged ({str(exc).splitlines()[0]})") from None
    if header.get("format") != FORMAT_NAME or META_KEY not in header:
        raise FactorsError(f"{path} is a safetensors file but not embzip factors (no '{FORMAT_NAME}' metadata)")
    version, meta = _claims(path, header)
    kind = meta.get("kind", "lowrank") if version >= 2 else "lowrank"
    if not isinstance(kind, str):
        raise FactorsError(f"{path}: metadata 'kind' is {kind!r}, expected a name")
    try:
        factors = kind_class(kind).from_tensors(tensors, meta)
    except FactorsError as exc:
        raise FactorsError(f"{path}: {exc}") from None
    _check_claims(path, meta, factors)
    factors.check_finite(str(path), "the file is damaged or was written by another tool; fit the factors again")
    return factors
