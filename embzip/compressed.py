"""A compressed V x d embedding: what every method produces and every command consumes.

Three storage kinds share one small interface, so the factors file, the spliced modules, the
sizes and the bench never branch on the method:

- ``lowrank`` (factors.py): codes V x k and a decoder k x d (svd, paper, wsvd, aware);
- ``quant`` (quant.py): integers per row or per group of a row, with scales (int8, int4);
- ``codebook`` (codebook.py): small integer indices into learned codebooks.

A kind is a subclass of `Compressed` registered under its name. It stores named tensors
(`tensors()`, rebuilt by `from_tensors`), decodes any rows in float32 (`decode`, a classmethod
over a dict of tensors so a module can call it on its own buffers), and its size is what it
stores: `stored_bytes()` counts every tensor at its stored dtype, packed integers as stored, and
`bits_per_weight()` divides by V x d.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, ClassVar, Iterator

import torch

from .errors import FactorsError

_CHUNK_ROWS = 4096  # rows per chunk of reconstruct() and metrics: small transients for large V
_KIND_MODULES = {"lowrank": "factors", "quant": "quant", "codebook": "codebook"}


def may_train(*tensors: torch.Tensor) -> bool:
    """Whether autograd may record a pass through `tensors` (grad enabled and one of them requires it): a head then
    computes the exact float32 way and keeps nothing it derived from them (healing, fine-tuning)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_exact = 0  # open exact_heads() blocks


@contextlib.contextmanager
def exact_heads() -> Iterator[None]:
    """Within the block, a compressed tied head computes few hidden states as it computes many: no generation-step
    shortcut that rounds (torch's fused int8 / int4 kernels, which work in bfloat16; a codebook's per-piece tables
    rounded to bfloat16). A measurement (perplexity, bench) runs in it, so its figures do not depend on how many
    positions a forward pass scores (the batch size, the stride, a masked LM's masks); a generation step outside it
    keeps the faster path."""
    global _exact
    _exact += 1
    try:
        yield
    finally:
        _exact -= 1


def step_shortcuts() -> bool:
    """Whether a head may take a generation step's rounding shortcut: not inside exact_heads()."""
    return _exact == 0


def storage_dtype(embedding_dtype: torch.dtype, *values: torch.Tensor, scales: tuple = ()) -> torch.dtype:
    """The float dtype compressed tensors are stored in: the embedding's own when it is 16-bit, else float16
    (32-bit scales and codebooks would add cost and no measurable accuracy), unless float16 would lose what is to
    be stored. Then bfloat16, float32's range in the same 16 bits. `values` (codes, decoders, offsets) are judged
    as a whole: a value beyond float16's range, or its total squared error above bfloat16's (values near 1e-6 sit
    below float16's normal range, where it has fewer bits). `scales` (each scaling its own row or group) are
    judged one by one: any above float16's range or below 2^-16, where float16 keeps fewer bits than bfloat16's 8
    (an int8 scale of 2.5e-8 rounds to 0 in float16: its row would decode to zeros)."""
    if embedding_dtype in _HALF:
        return embedding_dtype
    if any(_scale_lost(t) for t in scales) or any(t.is_floating_point() and _float16_loses(t) for t in values):
        return torch.bfloat16
    return torch.float16


_HALF = (torch.float16, torch.bfloat16)
_CHUNK = 1 << 20  # numbers read at a time by the checks below: no whole-size temporaries beside V x k codes


def _magnitudes(t: torch.Tensor):
    """|t| as float32, a chunk at a time, with NaN and Inf as 0 (check_finite reports those)."""
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i:i + _CHUNK].float().abs().nan_to_num_(0.0, posinf=0.0, neginf=0.0)


def _scale_lost(t: torch.Tensor) -> bool:
    big, small = torch.finfo(torch.float16).max, 2.0 ** -16
    return any(bool((size > big).any() or ((size > 0) & (size < small)).any()) for size in _magnitudes(t))


def _float16_loses(t: torch.Tensor) -> bool:
    """Whether float16 keeps `t` worse than bfloat16 in total. In its normal range float16's grid holds
    bfloat16's, so only values below it can make float16 the worse: only then are the errors summed."""
    small = False
    for size in _magnitudes(t):
        if size.max() > torch.finfo(torch.float16).max:
            return True
        small = small or bool(((size > 0) & (size < torch.finfo(torch.float16).tiny)).any())
    return small and _rounding_error(t, torch.float16) > _rounding_error(t, torch.bfloat16)


def _rounding_error(t: torch.Tensor, dtype: torch.dtype) -> float:
    """Squared error of the finite values of `t` rounded to `dtype`, a chunk at a time."""
    flat, total = t.detach().reshape(-1), 0.0
    for i in range(0, flat.numel(), _CHUNK):
        part = flat[i:i + _CHUNK].float()
        total += (part.to(dtype).float() - part).nan_to_num_(0.0).pow_(2).sum().item()
    return total


class Compressed:
    """Base class of the storage kinds. Subclasses set `kind` and implement the abstract parts."""

    kind: ClassVar[str] = ""
    exportable: ClassVar[bool] = True  # torch.export can trace its decoding (its layout is not read from tensors)
    meta: dict[str, Any]

    # -- what a kind implements ---------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Compressed":
        raise NotImplementedError

    @classmethod
    def decode(cls, tensors: dict[str, torch.Tensor], index: torch.Tensor | slice,
               derived: dict | None = None) -> torch.Tensor:
        """Rows `index` of the rebuilt embedding, in float32, from a dict of this kind's tensors. `derived`: as for
        head_logits (a codebook keeps its decoding tables there)."""
        raise NotImplementedError

    @classmethod
    def head_logits(cls, tensors: dict[str, torch.Tensor], hidden: torch.Tensor,
                    derived: dict | None = None) -> torch.Tensor | None:
        """For a tied head: hidden @ rows^T (hidden.shape[:-1] + (V,); float32, or the hidden states' dtype where
        the kind computes in it: int8 and int4 with 16-bit states) computed this kind's own way,
        without decoding whole rows (a codebook sums per-piece tables or multiplies stage by stage; int8 and
        int4 hand few states to a fused kernel); else None (the default), and the head decodes blocks of rows.
        `derived`: a dict the caller keeps while `tensors` stay the same, where a kind may keep what it derives
        from them once (the int4 kernel's layout); None: derive again at every call."""
        return None

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def size_label(self) -> str:
        """A short tag for file names: r256 for a rank, 2b for bits per weight."""
        return f"{self.bits_per_weight():.3g}b"

    # -- shared ---------------------------------------------------------------------------------
    @property
    def vocab(self) -> int:
        return self.shape[0]

    @property
    def hidden(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored float tensors (and of the rows a module hands the model)."""
        floats = [t.dtype for t in self.tensors().values() if t.is_floating_point()]
        return floats[0] if floats else torch.float32

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rebuilt rows in float32: one per id of a tensor of any shape (..., d), or a slice's."""
        if isinstance(index, torch.Tensor) and index.ndim != 1:
            return self.decode(self.tensors(), index.reshape(-1)).reshape(*index.shape, self.hidden)
        return self.decode(self.tensors(), index)

    def reconstruct(self) -> torch.Tensor:
        """The whole rebuilt V x d matrix, in float32."""
        return torch.cat([self.rows(slice(i, i + _CHUNK_ROWS)) for i in range(0, self.vocab, _CHUNK_ROWS)])

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes() / (self.vocab * self.hidden)

    def num_params(self) -> int:
        """Stored elements of the tensors (a byte packing two int4 values counts as one)."""
        return sum(t.numel() for t in self.tensors().values())

    def compression_ratio(self) -> float:
        """Bytes of the embedding at the dtype the source model stored it, over the bytes stored here."""
        bits = self.meta.get("source_bits") or torch.finfo(self.dtype).bits
        return self.vocab * self.hidden * bits / 8 / self.stored_bytes()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Compressed":
        """The same compressed matrix with float tensors cast to `dtype` (integers keep theirs). A kind whose layout
        is read from its tensors (a codebook: not `exportable`) cannot move to the meta device, which holds no
        values."""
        if device is not None and torch.device(device).type == "meta" and not self.exportable:
            raise ValueError(f"a {self.kind}'s layout is read from its stored tensors, and the meta device holds no "
                             "values: it cannot move there (a model holding one can)")
        moved = {name: t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
                 for name, t in self.tensors().items()}
        return type(self).from_tensors(moved, dict(self.meta))

    def __repr__(self) -> str:
        rank = getattr(self, "rank", None)
        method = self.meta.get("method") if isinstance(self.meta, dict) else None
        return (f"{type(self).__name__}({self.vocab} x {self.hidden}, kind={self.kind}"
                + ("" if rank is None else f", rank={rank}") + f", {self.bits_per_weight():.4g} bits per weight"
                + ("" if method is None else f", method={method}") + ")")

    def stored_as(self, embedding_dtype: torch.dtype) -> "Compressed":
        """Float tensors in the 16-bit dtype they are stored in for an embedding of `embedding_dtype`
        (storage_dtype: float16, or bfloat16 where the values need its range), integers as they are. For a float32
        embedding, tensors already at 16 bits (a factors file's) stay as they are."""
        floats = [t for t in self.tensors().values() if t.is_floating_point()]
        if embedding_dtype not in _HALF and all(t.dtype in _HALF for t in floats):
            return self  # stored already (a factors file): its dtype was chosen when it was made
        return self.to(dtype=storage_dtype(embedding_dtype, *floats))

    def check_finite(self, what: str = "the compressed embedding",
                     advice: str = "nothing was written (check the method's options)") -> None:
        """Refuse NaN or Inf in any float tensor, naming the tensor; `advice` says what follows and what to do."""
        for name, t in self.tensors().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).sum().item()
                raise FactorsError(f"{what} has {bad} NaN or Inf value(s) in tensor {name!r}; {advice}")


class TensorSet(Compressed):
    """A kind that is exactly its dict of named tensors; subclasses give `check(tensors) -> (V, d)`, which
    raises a FactorsError naming what is inconsistent."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None):
        self._tensors, self.meta = dict(tensors), {} if meta is None else meta
        self._shape = self.check(self._tensors)

    @classmethod
    def check(cls, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "TensorSet":
        return cls(tensors, meta)


def register(cls: type[Compressed]) -> type[Compressed]:
    """Class decorator: the kind named by `cls.kind`."""
    _KINDS[cls.kind] = cls
    return cls


_KINDS: dict[str, type[Compressed]] = {}


def kind_class(kind: str) -> type[Compressed]:
    if kind not in _KIND_MODULES:
        raise FactorsError(f"unknown compressed kind {kind!r}; known: {', '.join(_KIND_MODULES)}")
    if kind not in _KINDS:
        importlib.import_module(f".{_KIND_MODULES[kind]}", __package__)
    return _KINDS[kind]


def row_cosine_distance(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each row of `x_hat` with the same row of `x`; 0 for a zero row rebuilt as zero (its
    cosine is undefined: torch calls it 0, which would count a row kept exactly as fully lost)."""
    distance = 1 - torch.nn.functional.cosine_similarity(x_hat, x, dim=-1, eps=1e-12)
    both_zero = (x.abs().amax(-1) == 0) & (x_hat.abs().amax(-1) == 0)
    return distance.masked_fill_(both_zero, 0.0)


def reconstruction_metrics(embedding: torch.Tensor, compressed: Compressed) -> dict[str, float]:
    """Mean cosine distance, RMSE and MAE between the embedding and its rebuilt rows (chunked)."""
    if tuple(embedding.shape) != compressed.shape:
        raise FactorsError(f"the compressed embedding rebuilds a {compressed.shape} matrix but the model's is "
                           f"{tuple(embedding.shape)}")
    cos_sum = sq_sum = abs_sum = 0.0
    for i in range(0, compressed.vocab, _CHUNK_ROWS):
        x = embedding[i:i + _CHUNK_ROWS].float()
        x_hat = compressed.rows(slice(i, i + _CHUNK_ROWS)).to(x.device)
        cos_sum += row_cosine_distance(x_hat, x).sum().item()
        diff = x_hat - x
        sq_sum += diff.pow(2).sum().item()
        abs_sum += diff.abs().sum().item()
    n = embedding.numel()
    return {"cosine_distance": cos_sum / compressed.vocab, "rmse": (sq_sum / n) ** 0.5, "mae": abs_sum / n}
