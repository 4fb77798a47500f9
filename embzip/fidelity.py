"""Sentence-vector fidelity: how well a compressed encoder keeps its sentence embeddings.

For models without an LM head (sentence encoders), perplexity is undefined. Instead the text is
split into sentences, each is embedded by mean pooling the last hidden states over its tokens,
and the compressed model's vectors are compared with the original's:

- `fidelity`: mean cosine similarity between each sentence's original and compressed vector;
- `similarity_spearman`: Spearman rank correlation between the two models' pairwise sentence
  similarities (does the compressed model rank sentence pairs the same way?).
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from .errors import DataError
from .texts import Text

MIN_WORDS = 5


def sentences(text: Text, limit: int = 256, *, need: int = 3, purpose: str = "for fidelity") -> list[str]:
    """Sentences of at least MIN_WORDS words, in text order, at most `limit`; a DataError naming `purpose` when
    there are fewer than `need` (3 by default: the rank correlation of the pairwise similarities needs more than
    one pair)."""
    out = []
    for line in text.lines:
        for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
            if len(sentence.split()) >= MIN_WORDS:
                out.append(sentence)
                if len(out) == limit:
                    return out
    if len(out) < need:
        raise DataError(f"need at least {need} sentence{'s' if need > 1 else ''} of {MIN_WORDS}+ words in "
                        f"{text.source} {purpose}, found {len(out)}")
    return out


def pooled_batches(model, tokenizer, texts: list[str], *, batch_size: int, max_length: int = 128):
    """For each batch of `texts`: (the tokenized batch, its mean-pooled last hidden states in the model's dtype),
    under whatever grad mode the caller runs. A text is cut at `max_length` tokens, or at the model's positions
    where it has fewer; token ids the embedding has no row for are refused first."""
    from .models import check_token_ids, input_device, max_length as positions

    max_length = min(max_length, positions(model, tokenizer) or max_length)
    device = input_device(model)  # accelerate-dispatched models included
    base = getattr(model, "base_model", model)
    rows = model.get_input_embeddings().num_embeddings
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        check_token_ids(int(batch["input_ids"].max()), rows, tokenizer, type(model).__name__)
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        yield batch, (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def sentence_vectors(model, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states, one row per text (float32, CPU); cut as pooled_batches cuts them."""
    with torch.inference_mode():
        return torch.cat([pooled.float().cpu() for _, pooled in pooled_batches(
            model, tokenizer, texts, batch_size=batch_size, max_length=max_length)])


def _ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def compare(original: torch.Tensor, compressed: torch.Tensor) -> dict[str, float]:
    """Fidelity and similarity rank correlation between two sets of sentence vectors."""
    cos = torch.nn.functional.cosine_similarity(original, compressed, dim=-1)

    def pairwise(v):
        v = torch.nn.functional.normalize(v, dim=-1)
        sims = v @ v.T
        iu = torch.triu_indices(len(v), len(v), offset=1)
        return sims[iu[0], iu[1]]

    return {"fidelity": cos.mean().item(), "similarity_spearman": spearman(pairwise(original), pairwise(compressed))}


def score(opened, text: Text, factors, *, batch_size: int = 32, device: str = "cpu") -> dict[str, Any]:
    """How well the encoder `opened` keeps its sentence vectors on `text` with `factors` spliced into its input
    embedding: what `embzip perplexity MODEL --factors F` reports for an encoder, the measure `embzip bench` gives
    each encoder row."""
    from .models import evaluating
    from .splice import check_source, spliced

    check_source(opened.model, factors)  # before the slow part: factors of another shape or model
    started = time.perf_counter()
    texts = sentences(text)
    with evaluating(opened.model, device) as model:
        original = sentence_vectors(model, opened.tokenizer, texts, batch_size=batch_size)
        with spliced(model, factors, head="input"):
            compressed = sentence_vectors(model, opened.tokenizer, texts, batch_size=batch_size)
    return {**compare(original, compressed),
            "protocol": {"name": "sentence-fidelity", "sentences": len(texts), "pooling": "mean"},
            "model": opened.source, "text": text.source, "seconds": round(time.perf_counter() - started, 3)}
