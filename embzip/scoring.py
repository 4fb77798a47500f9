"""Perplexity of a model on a text, before and after splicing in compressed embedding factors.

Three labelled protocols (numbers from different protocols are not comparable):

- ``masked-wwm`` (masked LMs, the paper's protocol): line by line; blank lines, lines starting
  with "=" (wikitext headings) and lines under `min_tokens` tokens (no special tokens) are
  dropped; lines are truncated to the model's length. Whole words (the fast tokenizer's
  ``word_ids()``) are masked at 15%, at least one per line, chosen with a seeded
  ``torch.Generator``; every sub-token of a chosen word becomes the mask token (plain 100% mask,
  no 80/10/10). Perplexity = exp(mean loss over all masked tokens of all lines).
- ``pseudo`` (masked LMs): every token of every kept line is masked once, one at a time.
- ``causal-window`` (causal LMs): the lines joined with "\\n" form one stream (BOS prepended once
  if the tokenizer has one). Each input position predicts the next token; the first window of
  `window` positions scores all of them, each later window moves by `stride` and scores only its
  `stride` new positions with the `window - stride` earlier tokens as context (the transformers
  perplexity guide, with labels taken from the stream so stride == window loses nothing). Every
  token after the first is scored exactly once: tokens == stream length - 1. Bits per byte =
  total NLL in nats / ln 2 / bytes, where bytes is the UTF-8 length of the scored span of the
  joined text: from its start (or, with no BOS, from the end of the first token, which is only
  context) to its end (or to the end of the last scored token when `max_tokens` cut the stream),
  measured with the fast tokenizer's offsets.

Memory: logits over a 262k vocabulary for a whole batch would be huge, so the full model runs
with a forward pre-hook on ``model.get_output_embeddings()`` that keeps the hidden states entering
the output head and hands the head an empty slice. The head is then applied only to scored
positions, a few at a time (at most 256 MiB of float32 logits), with ``final_logit_softcapping``
when the config sets it (Gemma). This is generic (BERT's transform runs inside the model, Gemma's
scaling too); since a model could post-process logits in ways this does not know, each pass first
checks, on up to 16 tokens, that these logits equal the model's own, and refuses if they do not.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import options
from .compressed import Compressed, exact_heads
from .errors import DataError, ModelError, OptionError, usage
from .models import (CAUSAL_LM, ENCODER, OpenedModel, check_token_ids, evaluating, refuse_embedding_only,
                     resolve_device, text_config)
from .progress import bar
from .texts import Text

log = logging.getLogger("embzip")

MASK_PROB = 0.15
MIN_TOKENS = 20
MAX_WINDOW = 1024
_CHUNK = 4096  # most scored positions per head application
_LOGITS_BYTES = 256 * 2**20  # and at most this many bytes of float32 logits
_CHECK_TOKENS = 16


@dataclass
class _Job:
    """One sequence to run: its input ids, the positions whose prediction is scored, their labels."""

    ids: list[int]
    positions: list[int]
    labels: list[int]


def _masked_jobs(opened: OpenedModel, text: Text, *, pseudo: bool, min_tokens: int, seed: int,
                 max_tokens: int | None) -> tuple[list[_Job], int, int, int]:
    """Jobs for the masked protocols; returns (jobs, lines used, max length, lines cut at that length)."""
    tok = opened.tokenizer
    mask_id = tok.mask_token_id
    if mask_id is None:
        raise DataError(f"the tokenizer of {opened.source} has no mask token, so masked-LM perplexity is undefined")
    if not pseudo and not getattr(tok, "is_fast", False):
        raise ModelError(f"whole-word masking needs a fast tokenizer (word_ids()); {opened.source} has a slow one: "
                         "use pseudo-perplexity instead")
    max_len = opened.max_length or 512
    gen = torch.Generator().manual_seed(seed)
    jobs: list[_Job] = []
    lines = scored = cut = 0
    for line in text.lines:
        line = line.strip()
        if not line or line.startswith("="):
            continue
        enc = tok(line, truncation=True, max_length=max_len, return_special_tokens_mask=True, verbose=False)
        ids, special = enc["input_ids"], enc["special_tokens_mask"]
        check_token_ids(max(ids, default=-1), opened.vocab_size, tok, opened.source)
        real = [i for i, s in enumerate(special) if not s]
        if len(real) < min_tokens:
            continue
        cut += len(ids) >= max_len  # it fills the model's length: what was beyond it (if anything) is not scored
        if pseudo:
            for p in real:
                jobs.append(_Job(ids[:p] + [mask_id] + ids[p + 1:], [p], [ids[p]]))
            scored += len(real)
        else:
            word_ids = enc.word_ids()
            words = sorted({word_ids[i] for i in real if word_ids[i] is not None})
            k = max(1, round(MASK_PROB * len(words)))
            chosen = {words[i] for i in torch.randperm(len(words), generator=gen)[:k].tolist()}
            positions = [i for i in real if word_ids[i] in chosen]
            masked = list(ids)
            for p in positions:
                masked[p] = mask_id
            jobs.append(_Job(masked, positions, [ids[p] for p in positions]))
            scored += len(positions)
        lines += 1
        if max_tokens is not None and scored >= max_tokens:
            break
    if not jobs:
        raise DataError(f"no line of at least {min_tokens} tokens in {text.source}; give a longer text "
                        "(lines are scored one by one; headings starting with '=' are skipped)")
    jobs.sort(key=lambda job: len(job.ids))  # less padding; the sum of losses does not depend on order
    if cut:
        log.warning("%d of the %d lines scored fill the model's length (%d tokens with the special ones): what is "
                    "beyond that is not scored (masked LMs score a text line by line; break long lines to score "
                    "all of it)", cut, lines, max_len)
    return jobs, lines, max_len, cut


def _causal_jobs(opened: OpenedModel, text: Text, *, window: int | None, stride: int | None,
                 max_tokens: int | None) -> tuple[list[_Job], dict[str, Any], int]:
    """Jobs for the sliding-window protocol; returns (jobs, protocol, lines used)."""
    tok = opened.tokenizer
    joined = text.joined()
    fast = getattr(tok, "is_fast", False)
    enc = tok(joined, add_special_tokens=False, return_offsets_mapping=fast, verbose=False)
    text_ids = list(enc["input_ids"])
    check_token_ids(max(text_ids, default=-1), opened.vocab_size, tok, opened.source)
    bos = tok.bos_token_id
    ids = ([bos] if bos is not None else []) + text_ids
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]
    n = len(ids)
    if n < 2:
        raise DataError(f"the text {text.source} has {n} token(s); causal perplexity needs at least 2")
    limit = opened.max_length
    window = window if window is not None else min(limit or MAX_WINDOW, MAX_WINDOW)
    if limit is not None and window > limit:
        raise OptionError(f"window {window} is longer than the {limit} positions {opened.source} can take; "
                         f"use --window {limit} or less")
    stride = stride if stride is not None else max(1, window // 2)
    if not 1 <= stride <= window:
        raise OptionError(f"stride {stride} must be between 1 and the window ({window})")
    # Positions 0..n-2 predict tokens 1..n-1; each window feeds ids[begin:end] and scores [prev, end).
    jobs, prev = [], 0
    while prev < n - 1:
        end = min(prev + (window if prev == 0 else stride), n - 1)
        begin = max(0, end - window)
        jobs.append(_Job(ids[begin:end], list(range(prev - begin, end - begin)), ids[prev + 1:end + 1]))
        prev = end
    # The scored span of the text, in characters: tokens text_ids[first:last+1] are scored.
    first = 0 if bos is not None else 1
    last = n - 1 - (1 if bos is not None else 0)
    whole = last == len(text_ids) - 1
    if fast:
        offsets = enc["offset_mapping"]
        start = 0 if first == 0 else offsets[0][1]
        stop = len(joined) if whole else offsets[last][1]
        n_bytes = len(joined[start:stop].encode("utf-8"))
        lines = joined[:stop].count("\n") + 1
    else:
        n_bytes = len(tok.decode(text_ids[first:last + 1]).encode("utf-8"))
        lines = len(text.lines) if whole else tok.decode(text_ids[:last + 1]).count("\n") + 1
    protocol = {"name": "causal-window", "window": window, "stride": stride, "bos": bos is not None,
                "bytes": n_bytes}
    return jobs, protocol, lines


def _head_logits(model, head, hidden: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a head module was called with (a forward pre-hook's args), by position or keyword."""
    return args[0] if args else next(iter(kwargs.values()))


def head_inputs(model, head, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                purpose: str = "compute its perplexity in chunks") -> torch.Tensor:
    """The hidden states entering the output head, running the head on an empty slice only. A model whose code
    does not call its head once per forward is refused, naming what could not be done (`purpose`)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(head_input_of(args, kwargs))
        if args:
            return (args[0][..., :0, :],) + tuple(args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: kwargs[key][..., :0, :]}

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ModelError(f"{type(model).__name__} called its output head {len(captured)} times in one forward; "
                         f"embzip cannot {purpose}")
    return captured[0]


def _check_head(model, head, ids: list[int], device) -> None:
    """Refuse a model whose logits are not head(hidden) (+ softcapping): our chunked loss would be wrong."""
    input_ids = torch.tensor([ids[:_CHECK_TOKENS]], device=device)
    mask = torch.ones_like(input_ids)
    full = model(input_ids=input_ids, attention_mask=mask).logits.float()
    mine = _head_logits(model, head, head_inputs(model, head, input_ids, mask))
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    if mine.shape != full.shape or (mine - full).abs().max() > tol * (1 + full.abs().max()):
        raise ModelError(f"{type(model).__name__} post-processes its logits in a way embzip does not know, "
                         "so its perplexity cannot be computed in chunks")


def _exp(x: float) -> float:
    """exp(x), inf where it overflows; NaN stays NaN (a model whose losses are not finite), not an overflow."""
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 700 else math.inf


def _chunk_rows(vocab: int) -> int:
    return max(1, min(_CHUNK, _LOGITS_BYTES // (4 * vocab)))


def _score(model, jobs: list[_Job], *, batch_size: int, pad_id: int, chunk: int, device, description: str,
           progress: bool) -> float:
    """Total negative log-likelihood (nats) of all scored positions of all jobs."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output head (get_output_embeddings() is None)")
    total = 0.0
    with torch.inference_mode():
        _check_head(model, head, jobs[0].ids, device)
        with bar(description, sum(len(job.labels) for job in jobs), enabled=progress) as b:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start:start + batch_size]
                length = max(len(job.ids) for job in batch)
                input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), length), dtype=torch.long)
                rows, cols, labels = [], [], []
                for r, job in enumerate(batch):
                    input_ids[r, :len(job.ids)] = torch.tensor(job.ids)
                    attention[r, :len(job.ids)] = 1
                    rows += [r] * len(job.positions)
                    cols += job.positions
                    labels += job.labels
                hidden = head_inputs(model, head, input_ids.to(device), attention.to(device))
                picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
                labels_t = torch.tensor(labels, device=device)
                for i in range(0, len(labels), chunk):
                    logits = _head_logits(model, head, picked[i:i + chunk])
                    total += torch.nn.functional.cross_entropy(logits, labels_t[i:i + chunk], reduction="sum").item()
                b.advance(len(labels))
    return total


def check_options(*, window: int | None = None, stride: int | None = None, max_tokens: int | None = None,
                  batch_size: int = 8, seed: int = 0) -> None:
    """Refuse option values perplexity cannot use (None means the default; 0 never does)."""
    for name, value in (("window", window), ("stride", stride), ("max_tokens", max_tokens)):
        if value is not None:
            options.positive(options.flagged(name), value, integer=True)
    options.positive(options.flagged("batch_size"), batch_size, integer=True)
    options.seed(options.flagged("seed"), seed)


def _encoder_fidelity(opened: OpenedModel, text: Text, factors, *, head, pseudo, window, stride, max_tokens,
                      batch_size, device) -> dict[str, Any]:
    """`perplexity` of an encoder: the fidelity of `factors`, refusing what only an LM's perplexity takes."""
    if factors is None:
        from .splice import is_compressed

        if is_compressed(opened.model.get_input_embeddings()):  # a directory `apply` wrote: no factors to give
            raise ModelError(f"{opened.source} is an encoder with no LM head, so perplexity is undefined, and its "
                             "embedding is already compressed; for the sentence-vector fidelity, give the original "
                             "model and the factors: embzip perplexity ORIGINAL --factors FILE")
        raise usage(ModelError(f"{opened.source} is an encoder with no LM head, so perplexity is undefined; give "
                               "--factors FILE to measure how well its sentence vectors survive those factors "
                               "(sentence-vector fidelity), or use `embzip bench`"))  # the option is what is missing
    given = [name for name, value in (("--pseudo", pseudo), ("--window", window), ("--stride", stride),
                                      ("--max-tokens", max_tokens)) if value]
    if given:
        raise OptionError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for an LM's perplexity; "
                          f"{opened.source} is an encoder, scored by sentence-vector fidelity on up to 256 "
                          "sentences of the text")
    if head == "tied":
        raise OptionError(f"{opened.source} is an encoder with no output head; its factors replace the input "
                          "embedding (--head input)")
    if opened.tokenizer is None:
        raise ModelError(f"{opened.source} has no tokenizer; sentence-vector fidelity needs one to read the text")
    from .fidelity import score

    result = score(opened, text, factors, batch_size=batch_size, device=device)
    return {**result, "head": "input"}  # as an LM's result names the head the factors were scored with


def _refuse_non_finite(opened: OpenedModel) -> None:
    """The original model's loss on the text is NaN or Inf: name the embedding's bad rows where that is the cause."""
    from .pipeline import check_finite

    check_finite(opened.embedding.detach(), opened.embedding_name, doing="scoring it")
    raise ModelError(f"{opened.source} gives NaN or Inf losses on this text with its own weights (before any factors); "
                     "its checkpoint or its dtype cannot score it")


def perplexity(opened: OpenedModel, text: Text, *, factors=None, head: str | None = None, pseudo: bool = False,
               window: int | None = None, stride: int | None = None, max_tokens: int | None = None,
               min_tokens: int = MIN_TOKENS, batch_size: int = 8, seed: int = 0, device: str = "cpu",
               progress: bool = False) -> dict[str, Any]:
    """Perplexity of `opened` on `text` under a labelled protocol (see the module docstring).

    With `factors`, the same masks / windows are scored twice: the original model, then the model
    with the factors spliced in (`head`: "tied" or "input"; None picks "tied" for tied models).
    Returns the dict that `embzip perplexity --json` prints. An encoder without an LM head has no perplexity:
    with `factors` it gets their sentence-vector fidelity on `text` instead (fidelity.score). `factors` is a
    Compressed or the path of a factors file.
    """
    if not isinstance(opened, OpenedModel):
        raise TypeError(f"opened must be a model opened by embzip.open_model(MODEL), got {type(opened).__name__}")
    if not isinstance(text, Text):
        raise TypeError(f"text must be a Text from embzip.load_text(PATH), got {type(text).__name__}")
    refuse_embedding_only(opened, "perplexity runs the model")
    device = resolve_device(device)
    if factors is not None and not isinstance(factors, Compressed):
        from .factors import load_factors

        factors = load_factors(factors)
    check_options(window=window, stride=stride, max_tokens=max_tokens, batch_size=batch_size, seed=seed)
    model = opened.model
    if opened.kind == ENCODER:
        return _encoder_fidelity(opened, text, factors, head=head, pseudo=pseudo, window=window, stride=stride,
                                 max_tokens=max_tokens, batch_size=batch_size, device=device)
    if opened.tokenizer is None:
        raise ModelError(f"{opened.source} has no tokenizer; perplexity needs one to read the text")
    if pseudo and opened.kind == CAUSAL_LM:
        raise OptionError(f"pseudo-perplexity is for masked LMs; {opened.source} is a causal LM")
    if opened.kind != CAUSAL_LM and (window is not None or stride is not None):
        raise OptionError(f"window and stride (--window, --stride) are for causal LMs; {opened.source} is a masked "
                          "LM, scored line by line (see pseudo, --pseudo)")
    if factors is None and head is not None:
        raise OptionError("head (--head) says how factors (--factors) are spliced in; give the factors with it")
    if factors is not None:
        from .splice import check_head, check_source

        check_source(model, factors)  # before the slow part: a compressed model, factors of another shape or model
        check_head(model, head)  # or a tied head asked of a model without one
    started = time.perf_counter()
    if opened.kind == CAUSAL_LM:
        jobs, protocol, lines = _causal_jobs(opened, text, window=window, stride=stride, max_tokens=max_tokens)
    else:
        jobs, lines, max_len, cut = _masked_jobs(opened, text, pseudo=pseudo, min_tokens=min_tokens, seed=seed,
                                                 max_tokens=max_tokens)
        if pseudo:
            protocol = {"name": "pseudo", "mask": "each token masked once, one at a time", "min_tokens": min_tokens,
                        "max_length": max_len, "lines_at_max_length": cut}
        else:
            protocol = {"name": "masked-wwm", "mask_prob": MASK_PROB, "mask": "whole words, 100% mask token",
                        "seed": seed, "min_tokens": min_tokens, "max_length": max_len, "lines_at_max_length": cut}
    tokens = sum(len(job.labels) for job in jobs)
    pad_id = opened.tokenizer.pad_token_id
    settings = dict(batch_size=batch_size, pad_id=0 if pad_id is None else pad_id, device=device,
                    chunk=_chunk_rows(opened.vocab_size), progress=progress)
    with evaluating(model, device), exact_heads():  # the same figures whatever a pass scores (batch, stride, masks)
        nll = _score(model, jobs, description="perplexity", **settings)
        if not math.isfinite(nll):  # the original model itself: no figure to report, and none to compare with
            _refuse_non_finite(opened)
        result: dict[str, Any] = {}
        if factors is not None:
            from .splice import spliced

            head = head or ("tied" if opened.tied else "input")
            with spliced(model, factors, head=head):
                nll_compressed = _score(model, jobs, description=f"perplexity, factors spliced ({head} head)",
                                        **settings)
            result = {"perplexity_original": _exp(nll / tokens), "mean_nll_original": nll / tokens,
                      "ratio": _exp((nll_compressed - nll) / tokens), "head": head}
            nll, original = nll_compressed, nll
    if opened.kind == CAUSAL_LM:
        n_bytes = protocol["bytes"]
        protocol["bits_per_byte"] = nll / math.log(2) / n_bytes if n_bytes else None
        if factors is not None:
            result["bits_per_byte_original"] = original / math.log(2) / n_bytes if n_bytes else None
    return {"perplexity": _exp(nll / tokens), "mean_nll": nll / tokens, "protocol": protocol, "tokens": tokens,
            "lines": lines,
            "model": opened.source, "text": text.source, **result,
            "seconds": round(time.perf_counter() - started, 3)}
