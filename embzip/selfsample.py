"""What the model itself writes: token statistics from text a causal LM samples from its start token.

Data-aware methods need to know which rows matter and which directions of the output head's
input space matter. A text corpus answers for its own language and domain only: embzip's bundled
weights text is English, so rows used by other languages got the weight of unseen tokens and
their quality collapsed at low bits. A causal LM sampled from its start token at temperature 1
writes text drawn from its own training distribution (on Gemma-3-270M: English prose, code,
Chinese, Ukrainian, Turkish, French, ...), with no corpus to ship or choose.

Two statistics per sampled position, both exact expectations rather than counts of draws:
- the next-token distribution p(. | context), summed over positions: expected token counts.
  Every token the model would predict gets weight, not only the ones the sample happens to draw.
- the hidden state entering the output head: its second moment E[h h^T], for the metric.

Where the model's samples are mostly English (Gemma-3-270M's are), `languages` starts a share of the
sequences from an opening written in one of 32 other languages (embzip/data/openings.txt: a few
words each, forced after the start token), so the model goes on in that language. Every position is
counted, forced ones too: what the model predicts there is its own distribution in a real text's
context. It trades English for the other languages (docs/method.md), so it is off by default.

The model runs in the dtype its CPU multiplies fastest (`models.for_statistics`: bfloat16 where there are
bf16 instructions; the attention of each step's one-token queries in float32, where torch's bfloat16 kernel is
several times slower: `models.float32_decode_attention`), 64 sequences at a time, and `draw` picks each token
in two exact steps, a block of ids by its mass, then a token in the block by the exponential race
`torch.multinomial` runs, so few random numbers are needed. Tokens of probability below 2^-24 are never drawn
(`_floored`); their expected counts are kept.

`cached_statistics` keeps each sample on disk (`$EMBZIP_CACHE/samples`, ~5 MB for Gemma-3-270M),
keyed by everything the statistics depend on: the sampler's version, the settings, the start token,
the openings' tokens, the device kind, the dtype the statistics run in and every byte of the model's
parameters. So a second `fit` of the same model at another size skips the sampling, and any change to
the model samples again.

`combine_counts` and `combine_moments` mix them with the text's statistics, each source
normalised to the same total, so neither the text's length nor the sample's decides the mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import options
from .errors import ModelError, OptionError

_OPENINGS = Path(__file__).parent / "data" / "openings.txt"
_BATCH = 64  # sequences sampled together
_BLOCK = 512  # ids per block of `draw`'s first step
_FLOOR = 2.0**-24  # a token whose probability is below this is never drawn (its expected count stays): _floored
_VERSION = 4  # of what sample_statistics computes; cached statistics of another version are never read
# 4: one-token attention of a bfloat16 model in float32; 3: `draw` picks a block, then a token in it; 2: a race
# over whole rows; 1: torch.multinomial
log = logging.getLogger("embzip")


@dataclass
class SampleConfig:
    """How much the model samples: `tokens` positions in sequences of `length`."""

    tokens: int = options.SELF_TOKENS  # 0: no sampling
    length: int = 128
    seed: int = 0
    languages: float = 0.0  # share of the sequences that start from an opening in another language

    def __post_init__(self) -> None:
        options.non_negative(options.flagged("self-sample tokens", "self-tokens"), self.tokens, integer=True)
        options.positive("self-sample length", self.length, integer=True)
        share = options.flagged("self-sample languages share", "sample-languages")
        options.finite(share, self.languages)
        if not 0 <= self.languages <= 1:
            raise OptionError(f"{share} must be between 0 and 1, got {self.languages}")

    def settings(self) -> dict:
        return asdict(self)


def start_token(model, tokenizer) -> int:
    """The id a sample starts from: BOS, else the model's decoder start or EOS token."""
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        for name in ("bos_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and value >= 0:
                return value
    raise ModelError(f"{type(model).__name__} has no start (BOS) or EOS token to sample from; "
                     "give --self-tokens 0 to count tokens on the weights text only")


def openings() -> list[tuple[str, str]]:
    """(language code, opening) of each line of the bundled openings file."""
    return [tuple(line.split("\t", 1)) for line in _OPENINGS.read_text(encoding="utf-8").splitlines() if line.strip()]


def opening_ids(tokenizer) -> list[list[int]]:
    """The token ids of each opening, as the sampler forces them and the cache key records them."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in openings()]


def _forced(tokenizer, config: SampleConfig, sequences: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    """Per sequence, the token ids forced after the start token ([] for a free one): a seeded choice of
    `config.languages` of the sequences, each given the next opening of a seeded shuffle of them (ids the
    embedding has no row for are left out)."""
    chosen = round(sequences * config.languages)
    if chosen == 0:
        return [[] for _ in range(sequences)]
    ids = opening_ids(tokenizer)
    order = torch.randperm(len(ids), generator=gen).tolist()
    which = torch.randperm(sequences, generator=gen).tolist()[:chosen]
    forced: list[list[int]] = [[] for _ in range(sequences)]
    for k, i in enumerate(which):
        forced[i] = [t for t in ids[order[k % len(ids)]] if t < vocab]
    return forced


def sample_statistics(model, tokenizer, config: SampleConfig, *, progress: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected token counts over the vocabulary, float64; E[h h^T] of the head's input, float64).

    The model samples `config.tokens` positions (sequences of `config.length`, several at once)
    with its KV cache, at temperature 1 and no truncation, seeded by `config.seed`.
    """
    from .models import float32_decode_attention, for_statistics, input_device
    from .progress import bar
    from .scoring import head_input_of

    if model.get_output_embeddings() is None:
        raise ModelError(f"{type(model).__name__} has no output head to sample with")
    model = for_statistics(model)  # a copy in the dtype this CPU multiplies fastest, where it fits
    device = input_device(model)
    head = model.get_output_embeddings()
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    vocab = model.get_input_embeddings().num_embeddings
    counts = torch.zeros(vocab, dtype=torch.float64)
    moment = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(  # by position or keyword, as scoring.head_inputs reads it
        lambda module, args, kwargs: seen.append(head_input_of(args, kwargs)[:, -1]), with_kwargs=True)
    sequences = max(1, -(-config.tokens // config.length))
    batch = min(sequences, _BATCH)
    start = start_token(model, tokenizer)
    forced = _forced(tokenizer, config, sequences, vocab, gen)
    # transformers 5 names the KV cache `cache`; earlier versions `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    buffer = None  # the probabilities of a batch, float32, reused by every step
    try:
        with torch.inference_mode(), float32_decode_attention(model), \
                bar("sampling from the model", -(-sequences // batch) * config.length, enabled=progress) as shown:
            for first in range(0, sequences, batch):
                prompts = forced[first:first + batch]
                n = len(prompts)
                ids = torch.full((n, 1), start, dtype=torch.long)
                past = None
                for step in range(config.length):
                    seen.clear()
                    out = model(input_ids=ids.to(device), use_cache=True, **{cache_arg: past})
                    past = getattr(out, cache_arg)
                    logits = out.logits[:, -1]
                    if buffer is None or buffer.shape[1] != logits.shape[1]:
                        buffer = torch.empty(batch, logits.shape[1], device=logits.device)
                    p = _probabilities(logits, buffer[:n])
                    counts += p[:, :vocab].sum(0).double().cpu()
                    h = seen[-1].double().cpu()
                    moment += h.T @ h
                    ids = draw(_floored(p), gen)
                    for j, prompt in enumerate(prompts):  # an opening's tokens replace what was drawn
                        if step < len(prompt):
                            ids[j, 0] = prompt[step]
                    shown.advance()
    finally:
        handle.remove()
    positions = sequences * config.length
    return counts, moment / positions


def draw(p: torch.Tensor, gen: torch.Generator, width: int = _BLOCK) -> torch.Tensor:
    """One token id per row of the probabilities `p` (n x V, summing to 1 or not), as an (n, 1) tensor, in two
    exact steps: a block of `width` consecutive ids, with probability its share of the row's mass (the blocks'
    float32 sums, accumulated in float64 and searched with one uniform number), then an id inside that block by
    the exponential race `torch.multinomial` runs (the argmax of p_j / E_j with E_j = -log U ~ Exp(1) is id j
    with probability p_j over the block's mass). It needs n x width random numbers instead of n x V: on
    Gemma-3-270M's 32 x 262144 probabilities 0.6 ms, where the race over whole rows took 25-45 ms measured alone
    (`torch.multinomial` 0.14 s); in the sampling loop, with `_probabilities`, 8192 tokens took 25-26 s against
    29-31 s. U is float32 on a grid of 2^-24, so an id whose share of its block's mass is near 2^-24 is drawn
    less often than that share says (`_floored`): after the floor, only ids of probability near 2^-24 in a
    block that holds nearly all of the row's mass. The random numbers come from `gen` on the CPU, whatever
    device `p` is on."""
    n, V = p.shape
    full = V // width * width
    sums = [p[:, :full].reshape(n, -1, width).sum(-1)] if full else []
    if full < V:
        sums.append(p[:, full:].sum(-1, keepdim=True))
    cumulative = torch.cat(sums, 1).double().cumsum_(1)
    u = torch.rand(n, 1, generator=gen, dtype=torch.float64).to(p.device) * cumulative[:, -1:]
    block = torch.searchsorted(cumulative, u, right=True).clamp_max_(cumulative.shape[1] - 1)
    ids = block * width + torch.arange(width, device=p.device)
    inside = p.gather(1, ids.clamp_max(V - 1)).float().masked_fill_(ids >= V, 0)
    e = torch.rand(inside.shape, generator=gen).to(p.device).log_().neg_()
    return ids.gather(1, torch.div(inside, e, out=e).argmax(dim=-1, keepdim=True))


def _floored(p: torch.Tensor) -> torch.Tensor:
    """p with every probability below _FLOOR (2^-24, or half of 1 / V for a larger vocabulary) set to 0, in place,
    for the draw alone. The race over whole rows that embzip's defaults were chosen with drew such tokens at
    a fraction of their probability, by accident: its E = -log U comes from float32 U on a grid of 2^-24, so
    a token of probability p wins only when its E is below about p times an Exp(1) number, which the grid
    makes rarer than it should be once p nears 2^-24 (on three of Gemma-3-270M's next-token distributions,
    32000 draws each, it drew tokens below 1e-6 of the row's largest 20-32 times where their mass said 35-50;
    `draw` drew them 41-59 times). Such a token is one the model all but rules out, and what it writes after
    one is text unlike any it is given; the floor keeps them out on purpose, as the race nearly did."""
    return p.masked_fill_(p < min(_FLOOR, 0.5 / p.shape[-1]), 0)


def _probabilities(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """softmax(logits) in float32, written in `out` (rows x V, kept from step to step so no V-wide tensor is made
    per step), within float32 rounding of the exact softmax (torch.softmax's fast exponential is off by up to
    2e-5 of a probability's value)."""
    out.copy_(logits)
    out.sub_(out.max(dim=-1, keepdim=True).values).exp_()
    return out.div_(out.sum(dim=-1, keepdim=True))


def fingerprint(model, tokenizer, config: SampleConfig) -> str | None:
    """A key for what `sample_statistics(model, tokenizer, config)` returns, or None when a parameter is not in
    memory (a model accelerate offloaded to disk or left on the meta device)."""
    from .models import input_device, statistics_dtype

    state = model.state_dict()
    if any(t.device.type == "meta" for t in state.values()):
        return None
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps({"version": _VERSION, "class": type(model).__name__, "settings": config.settings(),
                         "start": start_token(model, tokenizer),
                         "openings": opening_ids(tokenizer) if config.languages > 0 else [],
                         "device": input_device(model).type, "dtype": str(statistics_dtype(model))},
                        sort_keys=True).encode())
    hashed = set()  # a tied head's weight is the embedding's tensor: the same view's bytes are read once
    for name, t in state.items():
        view = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        h.update(f"{name} {t.dtype} {tuple(t.shape)} {view in hashed}".encode())
        if view not in hashed:
            hashed.add(view)
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cached_statistics(model, tokenizer, config: SampleConfig, *, progress: bool = False,
                      directory: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_statistics`, kept on disk under `directory` (default `$EMBZIP_CACHE/samples`) by its
    `fingerprint`. An unreadable file is sampled again and replaced; a cache that cannot be written is
    reported and the fit goes on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from .models import cache_dir
    from .outputs import remove_stale, temporary_beside

    key = fingerprint(model, tokenizer, config)
    if key is None:
        return sample_statistics(model, tokenizer, config, progress=progress)
    path = (directory or cache_dir() / "samples") / f"{key}.safetensors"
    if path.is_file():
        try:
            stored = load_file(path)
            counts, moment = stored["counts"], stored["moment"]
            _check_stored(counts, moment, model)
            log.info("the model's samples read from %s", path)
            return counts, moment
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            log.warning("sampling again: could not read %s (%s)", path, exc)
    out = sample_statistics(model, tokenizer, config, progress=progress)
    temporary = temporary_beside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)  # what runs killed while writing it left
        save_file({"counts": out[0].contiguous(), "moment": out[1].contiguous()}, temporary)
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("the model's samples were not cached in %s: %s", path.parent, exc)
    finally:  # a half-written file (an error, or a signal), where there is a folder to hold one
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return out


def _check_stored(counts: torch.Tensor, moment: torch.Tensor, model) -> None:
    """Raise ValueError unless a cached sample has the shapes `model` gives, finite values, non-negative counts
    with a positive total and a second moment with a positive trace (no sample gives zeros)."""
    vocab = model.get_input_embeddings().num_embeddings
    hidden = model.get_output_embeddings().in_features
    if counts.shape != (vocab,) or moment.shape != (hidden, hidden):
        raise ValueError(f"counts {tuple(counts.shape)} and moment {tuple(moment.shape)}, "
                         f"where this model gives ({vocab},) and ({hidden}, {hidden})")
    if not (torch.isfinite(counts).all() and torch.isfinite(moment).all() and (counts >= 0).all()):
        raise ValueError("values that are not finite, or negative counts")
    if not (counts.sum() > 0 and moment.trace() > 0):
        raise ValueError("counts or a second moment that are all zero")


def combine_counts(text_counts: torch.Tensor, sampled: torch.Tensor | None, prior: torch.Tensor | None = None,
                   prior_share: float = 0.0) -> torch.Tensor:
    """Text counts plus sampled expected counts (where there are any), the sample scaled to the text's total; with
    a `prior` over the rows (weights.vocabulary_prior), plus that prior scaled to `prior_share` of the text's
    total."""
    total = text_counts.sum()
    out = text_counts
    if sampled is not None:
        if total <= 0:  # no text: the sample alone, scaled to the vocabulary's size
            text_counts, total = torch.zeros_like(sampled), torch.tensor(float(len(sampled)), dtype=sampled.dtype)
        out = text_counts + sampled / sampled.sum().clamp_min(1e-300) * total
    if prior is not None and prior_share > 0:
        out = out + prior.to(out.dtype) / prior.sum().clamp_min(1e-300) * total * prior_share
    return out


def combine_moments(text_moment: torch.Tensor | None, sampled: torch.Tensor) -> torch.Tensor:
    """The two second moments, each scaled to unit trace, averaged."""
    sampled = sampled / sampled.trace().clamp_min(1e-300)
    if text_moment is None:
        return sampled
    return (text_moment / text_moment.trace().clamp_min(1e-300) + sampled) / 2
