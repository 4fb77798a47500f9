"""Compressed modules and splicing them into a transformers model, in memory.

`FactoredEmbedding` replaces the token embedding with low-rank factors: a lookup in the codes,
then the decoder (plus bias, and an exact per-row length when the factors keep norms).
`FactoredHead` replaces an output head tied to the embedding without ever forming the V x d
matrix:

    logits = (h @ D^T) @ C^T + h . b  (+ the head's own output bias)

Both are ordinary trainable modules, so a spliced model can be fine-tuned (healing does).

`CompressedEmbedding` holds any other kind (quantized, codebook) in its compact stored form as
buffers (uint8 indices, packed int4, 16-bit scales and codebooks) and decodes only the rows that
are looked up; `CompressedHead` computes a tied head's logits by decoding the matrix a chunk of
rows at a time, so the V x d matrix never exists whole, or, for few hidden states (a generation
step) where the kind can, without decoding a row (codebook: per-piece lookup tables; int8 and int4 on a
CPU: torch's fused weight-only kernels); unless
`cache_decoded_head` asks it to keep the decoded matrix (the original's speed for the original's
memory).

Modules keep the tensors at their stored dtype and hand the model rows (or logits) in the dtype
of the embedding they replace, so a spliced directory is as small as the factors file.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .compressed import Compressed, may_train, row_cosine_distance
from .errors import FactorsError, ModelError, OptionError
from .factors import Factors

HEADS = ("input", "tied")
_HEAD_CHUNK_ROWS = 32768  # rows a tied head decodes at a time on an accelerator (and when it fills its cache)
_HEAD_CHUNK_CPU = 2**20  # decoded entries per chunk on a CPU: a 4 MiB float32 block that stays in cache


def _block_rows(width: int, device: torch.device) -> int:
    """Rows of a V-row matrix a head converts or decodes at a time: a cache-sized block on a CPU (Gemma
    int8, one token: 0.05 s instead of 0.7 s with 32768-row blocks), 32768 rows elsewhere."""
    return _HEAD_CHUNK_ROWS if device.type != "cpu" else max(64, _HEAD_CHUNK_CPU // width)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _state_key(*tensors: torch.Tensor | None) -> tuple:
    """Identifies the contents of `tensors` for a cache: storage and in-place version of each (None skipped).
    Tensors made under torch.inference_mode keep no version counter: their storage alone identifies them, so
    an in-place change to one (possible only inside inference mode) is not seen."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors if t is not None)


def _kept(module: nn.Module, name: str, key: tuple, make: Callable[[], Any]) -> Any:
    """A value a head derives from its tensors (`make()`), kept on `module` under `name` until `key` (_state_key
    and whatever else it depends on) changes. The old value is dropped before the new one is made, so two never
    take memory at once. Kept as a plain attribute: never in the state dict. Made outside inference mode: a value
    made during `torch.inference_mode()` (a bench, a generation) could not take part in a later pass that autograd
    records (fine-tuning the layers around the head)."""
    kept = module.__dict__.setdefault("_kept_values", {})
    if name not in kept or kept[name][0] != key:
        kept.pop(name, None)
        with torch.inference_mode(False), torch.no_grad():
            kept[name] = (key, make())
    return kept[name][1]


def _derived_from(module: nn.Module, stored: dict[str, torch.Tensor]) -> dict | None:
    """A dict kept on `module` while the `stored` tensors stay the same, where a kind keeps what it derives from them
    (a codebook's decoding tables and transform, the int4 kernel's layout); like a decoded matrix, never in the state
    dict. None while a stored tensor is being trained (grad enabled and required): what is derived from it must
    then be derived again at every pass, so the backward pass reaches the tensor."""
    if may_train(*stored.values()) or _exporting():  # exported: nothing kept from a pass of fake tensors
        return None
    return _kept(module, "derived", _state_key(*stored.values()), dict)


def _forget(module: nn.Module, name: str) -> None:
    module.__dict__.get("_kept_values", {}).pop(name, None)


def _traced() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace records this pass: a check that reads a tensor's
    value back to Python (the token ids' range) would stop a compiled graph or fail an export there."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    return torch.jit.is_tracing() or _exporting() or bool(compiling())


def _exporting() -> bool:
    return bool(getattr(getattr(torch, "compiler", None), "is_exporting", lambda: False)())


def _refuse_export(kind) -> None:
    """A clear error where torch.export meets a kind whose decoding it cannot trace, instead of one from inside
    the tracer."""
    if not kind.exportable and _exporting():
        raise ModelError(f"torch.export cannot trace a {kind.kind} embedding: how it decodes is read from its stored "
                         "tensors. Export a dense copy instead (embzip apply --dense), or run the model as it is, "
                         "or with torch.compile")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes products in on `device_type` right now; None where it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch before 2.4 names the two devices' calls apart
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def _outside_autocast(forward: Callable) -> Callable:
    """A compact module's forward run with autocast off. Its decoding and products fill buffers of the dtype it
    chose (a codebook's per-piece tables, a block of logits), which autocast's silent casts of the products
    would break. A head takes its hidden states in autocast's dtype, as a Linear under autocast computes, and an
    embedding gives the rows it would without autocast, as nn.Embedding does."""

    @functools.wraps(forward)
    def run(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = _autocast_dtype(device_type)
        if dtype is None:
            return forward(self, x)
        if x.is_floating_point():
            x = x.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return forward(self, x)

    return run


class _CompactEmbedding(nn.Module):
    """What the compact embedding modules share: shape, padding index, a model's embedding scale, the dtype
    their rows come out in, and a clear error for code that reads a dense `.weight`.

    The output dtype follows the model's own casts (`model.half()`, `model.to(torch.bfloat16)`, `model.float()`),
    so the rows keep matching the layers they feed."""

    def __init__(self, shape: tuple[int, int], *, padding_idx: int | None, embed_scale: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        if embed_scale is not None:  # some models (Gemma) scale the looked-up rows; derived, so not saved
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    def stored(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """Moves (`model.to("cuda")`) reach the stored tensors; casts (`model.half()`) do not: their dtypes are the
        format the bits per weight count (16-bit factors, scales and gains, int8 tables), and rounding float16 to
        bfloat16 would cost accuracy for nothing. The rows come out in the new dtype all the same (out_dtype)."""
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype  # what a floating tensor becomes
        stored = {id(t) for t in self.stored().values()}

        def keeping_dtype(t: torch.Tensor) -> torch.Tensor:
            if id(t) in stored:
                target = fn(t.new_empty(0))
                if target.dtype != t.dtype:
                    return t.to(device=target.device)
            return fn(t)

        return super()._apply(keeping_dtype, recurse)

    def _scaled(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        raise AttributeError(
            f"{type(self).__name__} keeps the embedding compact and has no dense `weight`: call it on token ids for "
            f"their rows, or use .matrix() for the whole decoded {self.num_embeddings} x {self.embedding_dim} "
            f"matrix. Changing the vocabulary (resize_token_embeddings) needs the original model, compressed "
            f"again after the change") from None


class FactoredEmbedding(_CompactEmbedding):
    """Token embedding rebuilt from low-rank factors: row i = codes[i] @ decoder + bias."""

    def __init__(self, factors: Factors, *, padding_idx: int | None = None, embed_scale: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(factors.shape, padding_idx=padding_idx, embed_scale=embed_scale, dtype=dtype or factors.dtype)
        # buffers, as every compressed kind's stored tensors: the model's dtype (`model.dtype`, its first floating
        # parameter) stays the layers' own, an optimiser over model.parameters() leaves the 16-bit factors alone
        # (Adam in float16 overflows them), and casts keep their format (_apply)
        for name in ("codes", "decoder", "bias", "norms"):
            t = getattr(factors, name)
            self.register_buffer(name, None if t is None else t.detach().clone())

    def stored(self) -> dict[str, torch.Tensor]:
        return {name: t for name in ("codes", "decoder", "bias", "norms") if (t := getattr(self, name)) is not None}

    @_outside_autocast
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._scaled(self._rows(input_ids))

    def _rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        dt = self.out_dtype
        out = _as(nn.functional.embedding(input_ids, self.codes), dt) @ _as(self.decoder, dt)
        if self.bias is not None:
            out = out + _as(self.bias, dt)
        if self.norms is not None:
            out = out * (_as(self.norms[input_ids], dt) / out.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)
        return out

    def matrix(self) -> torch.Tensor:
        """The whole rebuilt V x d matrix (without the embedding scale a model may apply to its inputs)."""
        return self._rows(torch.arange(self.num_embeddings, device=self.codes.device))

    def row_scale(self) -> torch.Tensor:
        """norms[i] / ||codes[i] @ decoder + bias||, for a head that must honour kept norms (V values)."""
        dt = self.out_dtype
        codes, decoder = _as(self.codes, dt), _as(self.decoder, dt)
        gram = decoder @ decoder.T  # k x k: ||c D + b||^2 = c G c^T + 2 c (D b) + b.b
        sq = ((codes @ gram) * codes).sum(-1)
        if self.bias is not None:
            bias = _as(self.bias, dt)
            sq = sq + 2 * codes @ (decoder @ bias) + bias @ bias
        return _as(self.norms, dt) / sq.clamp_min(1e-24).sqrt()

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.codes.shape[1]}, "
                f"bias={self.bias is not None}, norms={self.norms is not None}")


class _TiedHead(nn.Module):
    """An output head that reads the embedding module it is tied to (and keeps the old head's bias)."""

    def __init__(self, embedding: nn.Module, bias: nn.Parameter | None = None):
        super().__init__()
        self._embedding = (embedding,)  # a tuple, so the shared tensors are not registered twice
        self.bias = bias
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def embedding(self):
        return self._embedding[0]

    @property
    def weight(self) -> torch.Tensor:
        """The V x d matrix, decoded whole on every access: for model code that reads `head.weight` instead of
        calling the head (MobileBERT's masked-LM head does). It costs what the dense matrix does, so embzip's own
        paths never read it; calling the head computes the same logits without it."""
        return self.embedding.matrix()


class FactoredHead(_TiedHead):
    """An output head tied to a FactoredEmbedding: logits from the factors, never the V x d matrix."""

    @_outside_autocast
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        dt = hidden.dtype
        reduced = hidden @ _as(emb.decoder, dt).T
        if emb.codes.dtype == dt or hidden.device.type != "cpu" or torch.is_grad_enabled():
            logits = reduced @ _as(emb.codes, dt).T
        else:  # codes stored in another dtype: converted a cache-sized block at a time, not all V rows at once
            logits = reduced.new_empty(*reduced.shape[:-1], self.out_features)
            rows = _block_rows(emb.codes.shape[1], hidden.device)
            for i in range(0, self.out_features, rows):
                logits[..., i:i + rows] = reduced @ emb.codes[i:i + rows].to(dt).T
        if emb.bias is not None:
            logits = logits + (hidden @ _as(emb.bias, dt)).unsqueeze(-1)
        if emb.norms is not None:
            logits = logits * _as(self._row_scale(emb), dt)
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)  # under autocast too, as a Linear with its bias
        return logits

    def _row_scale(self, emb: FactoredEmbedding) -> torch.Tensor:
        """row_scale() is V*k^2 work: cache it while the factors are unchanged (no grad, same versions)."""
        if may_train(emb.codes):
            return emb.row_scale()
        return _kept(self, "row_scale", _state_key(emb.codes, emb.decoder, emb.bias, emb.norms), emb.row_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the factored embedding"


def buffer_name(tensor_name: str) -> str:
    """The module buffer (and state-dict entry) that holds a compressed tensor."""
    return tensor_name.replace(".", "__")


class CompressedEmbedding(_CompactEmbedding):
    """Token embedding kept compressed (quantized or codebook): decodes only the looked-up rows."""

    def __init__(self, compressed: Compressed, *, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        super().__init__(compressed.shape, padding_idx=padding_idx, embed_scale=embed_scale,
                         dtype=dtype or compressed.dtype)
        self.kind = type(compressed)
        self.names = tuple(compressed.tensors())
        for name, t in compressed.tensors().items():  # buffer names cannot hold ".": stage0.codes -> stage0__codes
            self.register_buffer(buffer_name(name), t.detach().clone())
        self.meta = dict(compressed.meta)

    def stored(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, buffer_name(name)) for name in self.names}

    def compressed(self) -> Compressed:
        return self.kind.from_tensors(self.stored(), dict(self.meta))

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        _refuse_export(self.kind)
        stored = self.stored()
        return self.kind.decode(stored, index, _derived_from(self, stored))

    def matrix(self) -> torch.Tensor:
        """The whole decoded V x d matrix in the model's dtype (without the embedding scale)."""
        return self.rows(slice(None)).to(self.out_dtype)

    @_outside_autocast
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and not _traced():  # as nn.Embedding: a stray -100 (a label's ignore index) would read
            low, high = (int(v) for v in torch.aminmax(input_ids))  # row V - 100; one pass, one read back
            if low < 0 or high >= self.num_embeddings:
                raise IndexError(f"token ids must be in 0..{self.num_embeddings - 1}, got {low}..{high}")
        return self._scaled(self.rows(input_ids.reshape(-1)).view(*input_ids.shape, self.embedding_dim).to(self.out_dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind.kind}"


class CompressedHead(_TiedHead):
    """An output head tied to a CompressedEmbedding: the kind's own logits, or a chunk of decoded rows at a time.

    Decoding all V rows on every forward pass is what makes a compact tied head slower than a dense
    one. A kind may compute the logits without decoding rows (`head_logits`: a codebook sums
    per-piece tables for few hidden states, which makes a generation step as fast as the original's,
    and multiplies stage by stage for many; int8 and int4 hand few states on a CPU to torch's fused
    kernels, the int4 one reading a layout of its own that the head derives once). With
    `cache_decoded = True` the head decodes the matrix once (in the dtype of the hidden
    states; again only when the stored tensors change, move or are replaced) and keeps it: forward
    passes then cost what the original head's do, and memory grows by that V x d matrix. The cache is
    a plain attribute, never part of the state dict, so a saved directory stays compact.
    """

    cache_decoded = False

    @_outside_autocast
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cache_decoded:
            logits = hidden @ self._decoded(hidden).T
        else:
            logits = self._chunked(hidden)
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)  # under autocast too, as a Linear with its bias
        return logits

    def _chunked(self, hidden: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        _refuse_export(emb.kind)
        own = emb.kind.head_logits(emb.stored(), hidden, self._derived())
        if own is not None:  # the kind's way without decoding rows (a codebook: per-piece tables, stage by stage;
            return own.to(hidden.dtype)  # int8 and int4: a fused kernel for few states)
        logits = hidden.new_empty(*hidden.shape[:-1], self.out_features)
        rows = _block_rows(self.in_features, hidden.device)
        for i in range(0, self.out_features, rows):
            block = emb.rows(slice(i, i + rows)).to(device=hidden.device, dtype=hidden.dtype)
            logits[..., i:i + block.shape[0]] = hidden @ block.T
        return logits

    def _derived(self) -> dict | None:
        """What the kind derived from the stored tensors for its head_logits (the int4 kernel's layout, a
        codebook's tables), kept until those tensors change, move or are replaced (_derived_from): the
        embedding's own dict, so tables the lookups and the head both use are made once."""
        return _derived_from(self.embedding, self.embedding.stored())

    def _decoded(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole decoded matrix (V x d) in the hidden states' dtype and device, decoded when its key changes."""
        key = (hidden.dtype, hidden.device) + _state_key(*self.embedding.stored().values())
        return _kept(self, "decoded", key, lambda: torch.cat([
            self.embedding.rows(slice(i, i + _HEAD_CHUNK_ROWS)).to(device=hidden.device, dtype=hidden.dtype)
            for i in range(0, self.out_features, _HEAD_CHUNK_ROWS)]))

    @property
    def cached_matrix(self) -> torch.Tensor | None:
        """The decoded matrix a `cache_decoded` head keeps (None before its first forward pass, or when off)."""
        return self.__dict__.get("_kept_values", {}).get("decoded", (None, None))[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the compressed embedding"


EMBEDDINGS = (FactoredEmbedding, CompressedEmbedding)


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise FactorsError(f"could not find {type(target).__name__} inside {type(model).__name__}")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def cache_decoded_head(model: nn.Module, on: bool = True) -> bool:
    """Make a spliced model's compressed tied head keep its decoded matrix (see CompressedHead), or stop.

    Returns whether the model has such a head; low-rank heads and untied models have nothing to cache."""
    head = model.get_output_embeddings()
    if not isinstance(head, CompressedHead):
        return False
    head.cache_decoded = on
    if not on:
        _forget(head, "decoded")
    return True


def default_head(model: nn.Module) -> str:
    from .models import is_tied

    return "tied" if is_tied(model) else "input"


REBUILT = "embzip_rebuilt"  # set on an embedding module whose matrix densify() replaced by the factors' rebuilt one


def is_compressed(embedding: nn.Module) -> bool:
    """Whether the module is one of embzip's compressed embeddings, or a plain one densify() filled with a rebuilt
    matrix. Any other module is not: one without a vocab x hidden weight is refused by models.check_token_embedding,
    never taken for compressed."""
    return isinstance(embedding, EMBEDDINGS) or bool(getattr(embedding, REBUILT, False))


def check_fits(model: nn.Module, factors: Compressed) -> None:
    """Refuse factors whose shape is not the model's embedding shape, naming both."""
    emb = model.get_input_embeddings()
    if is_compressed(emb):
        raise FactorsError("this model's embedding is already compressed; splice into the original model instead")
    from .models import check_token_embedding

    check_token_embedding(emb, f"this {type(model).__name__}")
    shape = tuple(emb.weight.shape)
    if factors.shape != shape:
        raise FactorsError(
            f"the factors rebuild a {factors.shape[0]} x {factors.shape[1]} embedding but the model's is "
            f"{shape[0]} x {shape[1]}: they were made for another model ({factors.meta.get('source', {}).get('model', '?')})"
        )


_SOURCE_ROWS = 4096  # rows check_source compares: 16 runs of 256 neighbours, spread over the vocabulary
_SOURCE_SLACK = 0.25  # how much further (mean cosine distance) they may be than from the embedding fitted


def check_source(model: nn.Module, factors: Compressed) -> None:
    """Refuse factors that do not fit `model` (check_fits), and factors made for another model of the same shape:
    they rebuild this model's embedding much worse than the one they were fitted to.

    A factors file records the mean cosine distance between its rows and the embedding it was made from
    (metrics.cosine_distance). Measured again on this model's rows (4096 spread over the vocabulary, a standard
    error below 0.01) it comes out the same for the model they were made from, near 1 for an unrelated matrix
    (unrelated directions), and a little higher for a fine-tuned copy. Factors more than 0.25 further than
    recorded are refused; factors without the record (made by hand) are not checked. svd_factors and aware_factors
    record it."""
    check_fits(model, factors)  # first: a compressed model, or factors of another shape
    metrics = factors.meta.get("metrics") if isinstance(factors.meta, dict) else None
    recorded = metrics.get("cosine_distance") if isinstance(metrics, dict) else None
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)):
        return
    weight = model.get_input_embeddings().weight
    rows = _runs_of_rows(weight.shape[0], _SOURCE_ROWS)
    distances = []
    with torch.no_grad():
        for part in rows.split(256):  # a few MB at a time, whatever the width
            x = weight[part.to(weight.device)].float().cpu()
            x_hat = factors.rows(part).float().cpu()
            distances.append(row_cosine_distance(x_hat, x))
    measured = float(torch.cat(distances).mean())
    if math.isnan(measured):  # NaN or Inf rows in the model: no comparison can pass them
        raise ModelError(f"this model's embedding holds NaN or Inf values (in the {len(rows)} rows compared with the "
                         "factors); fix the checkpoint")
    if measured > recorded + _SOURCE_SLACK:
        source = factors.meta.get("source", {}).get("model", "?")
        raise FactorsError(
            f"these factors rebuild this model's embedding at mean cosine distance {measured:.2f} ({len(rows)} rows) "
            f"but the one they were made from ({source}) at {recorded:.2f}: they were made for another model of "
            "the same shape")


def _runs_of_rows(n: int, count: int, runs: int = 16) -> torch.Tensor:
    """`count` row numbers of n, in `runs` runs of neighbouring rows spread evenly from the first row to the last
    (every row when n <= count). An embedding read from a memory-mapped checkpoint pages in only what is near
    the rows read: rows spread one by one over Llama-3-8B's 128256 paged in most of its 1 GB, and `apply`'s
    peak memory went from 0.6 to 1.5 GB (docs/method.md, "Memory")."""
    if n <= count:
        return torch.arange(n)
    length = count // runs
    starts = torch.linspace(0, n - length, runs).round().long()
    return (starts.unsqueeze(1) + torch.arange(length)).reshape(-1).unique()


def check_head(model: nn.Module, head: str | None) -> str:
    """`head` (None: the model's default), refused when it is not a head name or is "tied" on a model whose output
    head is not tied to its embedding."""
    from .models import is_tied

    head = head or default_head(model)
    if head not in HEADS:
        raise OptionError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "tied" and not is_tied(model):
        raise OptionError("head 'tied' (--head tied) needs an output head tied to the embedding, and this model has "
                          "none; use --head input (head='input')")
    return head


def splice(model: nn.Module, factors: Compressed, head: str | None = None):
    """Replace the embedding (and, with head='tied', the tied output head) by factored modules.

    Returns a `Swap`: calling it puts the original modules back.
    """
    check_fits(model, factors)  # first: an embedding already compressed is named as such
    head = check_head(model, head)
    old_emb = model.get_input_embeddings()
    weight = old_emb.weight
    emb_path = _module_path(model, old_emb)
    common = dict(padding_idx=getattr(old_emb, "padding_idx", None), embed_scale=getattr(old_emb, "embed_scale", None),
                  dtype=weight.dtype)
    moved = factors.to(device=weight.device)
    if isinstance(factors, Factors):
        new_emb, head_cls = FactoredEmbedding(moved, **common), FactoredHead
    else:
        new_emb, head_cls = CompressedEmbedding(moved, **common), CompressedHead
    swaps = [(emb_path, old_emb, new_emb)]
    if head == "tied":
        old_head = model.get_output_embeddings()
        swaps.append((_module_path(model, old_head), old_head, head_cls(new_emb, getattr(old_head, "bias", None))))
    swap = Swap(model, swaps)
    swap.reapply()
    return swap


class Swap:
    """The module swaps of one splice: call it (or .restore()) to put the originals back, .reapply() to redo."""

    def __init__(self, model: nn.Module, swaps: list[tuple[str, nn.Module, nn.Module]]):
        self.model, self.swaps = model, swaps

    def restore(self) -> None:
        for path, old, _ in reversed(self.swaps):
            _set_module(self.model, path, old)
        unprotect(self.model)

    def reapply(self) -> None:
        for path, _, new in self.swaps:
            _set_module(self.model, path, new)
        protect(self.model)

    __call__ = restore


_GUARDED = ("save_pretrained", "tie_weights", "resize_token_embeddings")


def protect(model: nn.Module) -> None:
    """transformers' own save would write the compressed tensors under the base config: a directory it then loads
    with a random embedding. A model holding a compressed embedding saves as a compressed directory instead, its
    tie_weights leaves the compressed modules alone, and a resize that changes nothing is let through. So does
    every transformers model inside it that holds the embedding (`model.model`, `model.bert`: a base saved on
    its own loads back as itself)."""
    for holder in _holders(model):
        holder.save_pretrained = _SaveCompact(holder)
        holder.tie_weights = _KeepTies(holder)
        holder.resize_token_embeddings = _SameVocabulary(holder)


def holds_compact(model: nn.Module) -> bool:
    """Whether a model's input embedding or output head is one of embzip's compact modules (a user may have set
    dense ones in their place: the model is then dense again, and transformers' own methods serve it)."""
    return isinstance(model.get_input_embeddings(), _CompactEmbedding) or \
        isinstance(model.get_output_embeddings(), _TiedHead)


def unprotect(model: nn.Module) -> None:
    """transformers' own methods back, on the model and the models inside it (Swap.restore)."""
    for module in model.modules():
        for name in _GUARDED:
            if isinstance(module.__dict__.get(name), (_SaveCompact, _KeepTies, _SameVocabulary)):
                del module.__dict__[name]


def _holders(model: nn.Module) -> list[nn.Module]:
    """`model` and the transformers models inside it whose modules include its input embedding."""
    from transformers import PreTrainedModel

    embedding = model.get_input_embeddings()
    return [model] + [m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)
                      and any(sub is embedding for sub in m.modules())]


class _KeepTies:
    """A spliced model's tie_weights (which transformers and accelerate call, e.g. before dispatching a model):
    nothing to do. A tied compressed head reads the compressed embedding itself, and a head kept with
    `head="input"` keeps the original matrix on purpose; transformers' own tie_weights would look for the
    embedding's `.weight`, which a compressed embedding does not have, and fail. Once no compact module is left,
    transformers' own runs."""

    def __init__(self, model: nn.Module | None = None):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = getattr(self, "model", None)  # None: unpickled from a version that kept no model here
        if model is not None and not holds_compact(model):
            return type(model).tie_weights(model, *args, **kwargs)
        return None


class _SameVocabulary:
    """A spliced model's resize_token_embeddings: a call that changes nothing (no size, or the size it has, as
    code that resizes to its tokenizer's length does) returns the embedding; any other size is refused, as the
    compressed rows cannot be extended (the embedding's `.weight` error says what to do instead)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, **kwargs):
        if not holds_compact(self.model):  # dense again: transformers' own resize
            return type(self.model).resize_token_embeddings(self.model, new_num_tokens, pad_to_multiple_of, **kwargs)
        embedding = self.model.get_input_embeddings()
        size = embedding.num_embeddings
        target = size if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target != size:
            embedding.weight  # raises the AttributeError that says what to do
        return embedding


class _SaveCompact:
    """A spliced model's save_pretrained (modeldir.save_compact); an object rather than a bound function, so the
    model still deep-copies and pickles."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, **kwargs) -> None:
        from .modeldir import save_compact

        save_compact(self.model, save_directory, **kwargs)


@contextmanager
def spliced(model: nn.Module, factors: Compressed, head: str | None = None) -> Iterator[nn.Module]:
    """Within the block, `model` uses the factors; the original modules come back on exit."""
    restore = splice(model, factors, head)
    try:
        yield model
    finally:
        restore()


def densify(model: nn.Module, factors: Compressed, head: str | None = None) -> None:
    """Write the rebuilt matrix into the model's own embedding (no size saving; any tool can load it).

    With head='input' on a tied model, the output head is untied and keeps the original matrix.
    """
    from .models import is_tied

    head = head or default_head(model)
    check_fits(model, factors)
    emb = model.get_input_embeddings()
    if head == "input" and is_tied(model):
        out = model.get_output_embeddings()
        out.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    with torch.no_grad():
        emb.weight.copy_(factors.reconstruct().to(emb.weight.dtype))
    setattr(emb, REBUILT, True)
