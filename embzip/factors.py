"""The factors file: low-rank factors of one embedding matrix, with the metadata to trust them.

Row i of the embedding is rebuilt as ``codes[i] @ decoder + decoder_bias``; when ``norms`` is
present the rebuilt row is rescaled to length ``norms[i]`` (direction from the factors, length
stored exactly). Files are safetensors with a JSON metadata entry; see docs/format.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import FactorsError, OutputError
from .sizes import compression_ratio, factored_params

FORMAT_NAME = "embzip.factors"
FORMAT_VERSION = 1
CODES = "codes"
DECODER = "decoder"
DECODER_BIAS = "decoder_bias"
NORMS = "norms"
META_KEY = "embzip"
_CHUNK_ROWS = 4096  # rows per chunk of reconstruct() and metrics: small transients for large V


@dataclass
class Factors:
    """Low-rank factors of a V x d embedding and what produced them."""

    codes: torch.Tensor  # V x k
    decoder: torch.Tensor  # k x d
    bias: torch.Tensor | None = None  # d
    norms: torch.Tensor | None = None  # V
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codes.ndim != 2 or self.decoder.ndim != 2 or self.codes.shape[1] != self.decoder.shape[0]:
            raise FactorsError(
                f"codes {tuple(self.codes.shape)} and decoder {tuple(self.decoder.shape)} do not chain: "
                "codes must be V x k and decoder k x d"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.hidden,):
            raise FactorsError(f"decoder bias has shape {tuple(self.bias.shape)}, expected ({self.hidden},)")
        if self.norms is not None and tuple(self.norms.shape) != (self.vocab,):
            raise FactorsError(f"norms have shape {tuple(self.norms.shape)}, expected ({self.vocab},)")

    @property
    def vocab(self) -> int:
        return self.codes.shape[0]

    @property
    def rank(self) -> int:
        return self.codes.shape[1]

    @property
    def hidden(self) -> int:
        return self.decoder.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.vocab, self.hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.codes.dtype

    def num_params(self) -> int:
        return factored_params(self.vocab, self.hidden, self.rank, bias=self.bias is not None,
                               norms=self.norms is not None)

    def compression_ratio(self) -> float:
        return compression_ratio(self.vocab, self.hidden, self.rank, bias=self.bias is not None,
                                 norms=self.norms is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {CODES: self.codes, DECODER: self.decoder}
        if self.bias is not None:
            out[DECODER_BIAS] = self.bias
        if self.norms is not None:
            out[NORMS] = self.norms
        return out

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Factors":
        def conv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return Factors(conv(self.codes), conv(self.decoder), conv(self.bias), conv(self.norms), dict(self.meta))

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rebuilt rows ``index`` of the embedding, in float32."""
        out = self.codes[index].float() @ self.decoder.float()
        if self.bias is not None:
            out = out + self.bias.float()
        if self.norms is not None:
            out = out * (self.norms[index].float() / out.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)
        return out

    def reconstruct(self) -> torch.Tensor:
        """The whole rebuilt V x d matrix, in float32."""
        return torch.cat([self.rows(slice(i, i + _CHUNK_ROWS)) for i in range(0, self.vocab, _CHUNK_ROWS)])


def reconstruction_metrics(embedding: torch.Tensor, factors: Factors) -> dict[str, float]:
    """Mean cosine distance, RMSE and MAE between the embedding and its rebuilt rows (chunked)."""
    if tuple(embedding.shape) != factors.shape:
        raise FactorsError(f"factors rebuild a {factors.shape} matrix but the embedding is {tuple(embedding.shape)}")
    cos_sum = sq_sum = abs_sum = 0.0
    for i in range(0, factors.vocab, _CHUNK_ROWS):
        x = embedding[i:i + _CHUNK_ROWS].float()
        x_hat = factors.rows(slice(i, i + _CHUNK_ROWS)).to(x.device)
        cos_sum += (1 - torch.nn.functional.cosine_similarity(x_hat, x, dim=-1, eps=1e-12)).sum().item()
        diff = x_hat - x
        sq_sum += diff.pow(2).sum().item()
        abs_sum += diff.abs().sum().item()
    n = embedding.numel()
    return {
        "cosine_distance": cos_sum / factors.vocab,
        "rmse": (sq_sum / n) ** 0.5,
        "mae": abs_sum / n,
    }


def check_output_file(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an output path that exists (unless force) or whose directory is missing or read-only."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name such as {path / 'factors.safetensors'}")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")
    return path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_factors(factors: Factors, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write factors to a safetensors file atomically; returns the path."""
    from safetensors.torch import save_file

    path = check_output_file(path, force)
    meta = dict(factors.meta)
    meta.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        embzip_version=__version__,
        rank=factors.rank,
        shape=list(factors.shape),
        dtype=str(factors.dtype).removeprefix("torch."),
        params=factors.num_params(),
        compression_ratio=factors.compression_ratio(),
    )
    tensors = {name: t.detach().contiguous().cpu().clone() for name, t in factors.tensors().items()}
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    factors.meta = meta
    return path


def load_factors(path: str | os.PathLike) -> Factors:
    """Read a factors file, checking its format and version."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FactorsError(f"factors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FactorsError(f"{path} is not a safetensors file ({exc})") from None
    if header.get("format") != FORMAT_NAME or META_KEY not in header:
        raise FactorsError(f"{path} is a safetensors file but not embzip factors (no '{FORMAT_NAME}' metadata)")
    version = int(header.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise FactorsError(
            f"{path} has factors format version {version}; this embzip ({__version__}) reads up to "
            f"version {FORMAT_VERSION}: upgrade embzip"
        )
    missing = [name for name in (CODES, DECODER) if name not in tensors]
    if missing:
        raise FactorsError(f"{path} lacks the tensor(s) {', '.join(missing)}")
    return Factors(tensors[CODES], tensors[DECODER], tensors.get(DECODER_BIAS), tensors.get(NORMS),
                   json.loads(header[META_KEY]))
