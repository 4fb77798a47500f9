"""The input-side metric of an encoder: how far its sentence vectors turn when token rows move.

A model without an output head is judged by its sentence vectors (fidelity.py: the cosine between
the original and the compressed model's mean-pooled vectors). An error e in the row of the token at
position t turns the unit sentence vector u by about J_t e (J_t: the Jacobian of u with respect to
the vector that position reads from the embedding), and 1 - cos = |J_t e|^2 / 2 to second order.
So the errors that matter are not those of plain squared error: on all-MiniLM-L6-v2 the mean

    G = E_t[J_t^T J_t]    (over the token positions of the weights text's sentences)

has eigenvalues from near 0 (the direction the embedding LayerNorm removes) to 7x their mean, and
the largest tenth of its directions holds a third of its trace. Codebook compression codes the rows
of an encoder in the metric M = I + gamma G / mean eig(G), as it codes a tied head's rows in the
metric of the hidden states (aware.normalised_metric).

G comes from random probes: for p ~ N(0, I), E[J^T p p^T J] = J^T J, and J_t^T p for every
position of a batch of sentences is one backward pass of p . u, which costs about one forward pass.
Sentences, pooling and truncation are fidelity.py's, so the metric measures what `embzip perplexity`
and `bench` report. The estimate is noisy, and the noise costs fidelity: on all-MiniLM-L6-v2 at 2 bpw
(validation texts, four seeds, 256 sentences of the bundled weights text) 1, 4, 8 and 16 probes gave
0.99185, 0.99208, 0.99221 and 0.99251 on English (0.99149 without the metric), in 4, 10, 18 and 30 s
on 2 CPU cores. PROBES = 8 keeps a small encoder's fit well under a minute (docs/method.md).

The same passes say what a reading of each row costs: the trace of J_t^T J_t, the mean of
|J_t e|^2 over random directions e. It is far from equal: on all-MiniLM-L6-v2 the tokens in every
sentence ([CLS], [SEP]) and the most frequent ones (. , the of) cost 0.08-0.16 of the mean over the
rows read, and the median row 0.42 of it; mean pooling after attention lets the model absorb what it sees
everywhere. The token counts weight a row by how often it is read, and `row_scale` by what a reading
costs, so a row's weight becomes its expected share of the fidelity lost. Rows the sentences show a
few times are shrunk toward the rare tokens' cost, and rows they never show get that cost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .texts import Text

PROBES = 8  # random probes per batch of sentences (see the module's docstring for what fewer and more gave)
SHRINK = 1.0  # occurrences of the rare tokens' cost added to each row's own (row_scale)


class Sensitivity(NamedTuple):
    moment: torch.Tensor  # G (d x d, float64): the mean over positions of J^T J
    rows: torch.Tensor  # per row (V, float64): the sum over the positions that read it of trace(J^T J)
    counts: torch.Tensor  # per row (V, float64): the positions that read it


def sentence_sensitivity(model, tokenizer, text: Text, *, sentences: int = 256, probes: int = PROBES,
                         batch_size: int = 16, max_length: int = 128, seed: int = 0,
                         progress: bool = False) -> Sensitivity:
    """G and each row's share of it, over the token positions of `text`'s sentences (fidelity.sentences, batched,
    cut and pooled by fidelity.pooled_batches as fidelity.sentence_vectors is): J is the Jacobian of the unit
    mean-pooled sentence vector with respect to the row a position reads."""
    from .fidelity import pooled_batches, sentences as split
    from .progress import bar

    lines = split(text, limit=sentences, need=1, purpose="to measure the encoder's metric (--input-metric 0 fits "
                  "without it)")
    embedding = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    vocab, d = embedding.weight.shape
    total = torch.zeros(d, d, dtype=torch.float64)
    rows_cost = torch.zeros(vocab, dtype=torch.float64)
    counts = torch.zeros(vocab, dtype=torch.float64)
    looked: list[torch.Tensor] = []

    def keep(module, args, out):  # the rows as the model reads them, as a leaf the gradient is taken against
        rows = out.detach().requires_grad_(True)
        looked.append(rows)
        return rows

    hook = embedding.register_forward_hook(keep)
    try:
        with torch.enable_grad(), bar("encoder metric", len(lines), enabled=progress) as b:
            for batch, pooled in pooled_batches(model, tokenizer, lines, batch_size=batch_size, max_length=max_length):
                unit = pooled.float() / pooled.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
                rows, real = looked[0], batch["attention_mask"].bool()  # the first lookup of this batch's pass
                looked.clear()
                ids = batch["input_ids"][real].cpu()
                for k in range(probes):
                    probe = torch.randn(unit.shape, generator=gen).to(unit.device)
                    grad, = torch.autograd.grad((unit * probe).sum(), rows, retain_graph=k < probes - 1)
                    g = grad[real].double().cpu()
                    total += g.T @ g
                    rows_cost.index_add_(0, ids, g.pow(2).sum(1))
                counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
                b.advance(len(batch["input_ids"]))
    finally:
        hook.remove()
    return Sensitivity(total / (probes * max(counts.sum().item(), 1)), rows_cost / probes, counts)


def row_scale(sensitivity: Sensitivity, shrink: float = SHRINK) -> torch.Tensor:
    """Per row (V, float64), what one of its readings costs relative to a rare token's: (cost + shrink * c0) /
    (count + shrink) / c0, c0 the median cost of a reading over the rows read once or twice (over all rows read,
    where none is). A row never read gets 1: its token-count weight stays as it was."""
    cost, counts = sensitivity.rows, sensitivity.counts
    seen = counts > 0
    if not bool(seen.any()):
        return torch.ones_like(counts)
    rare = seen & (counts <= 2)
    pick = rare if bool(rare.any()) else seen
    c0 = (cost[pick] / counts[pick]).median().clamp_min(1e-300)
    return (cost + shrink * c0) / (counts + shrink) / c0
