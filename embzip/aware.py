"""Data-aware SVD: spend the rank where the model's real inputs and outputs are.

Plain SVD minimises ||E - C D||_F, treating every token row and every hidden direction alike.
A model does not: it reads frequent tokens far more often than rare ones, and its output head
scores rows only along the directions its final hidden states h actually take. Data-aware SVD
minimises

    sum_i w_i || (E_i - C_i D) M^(1/2) ||^2,     M = I + gamma * S / mean(eig(S))

with w_i from token counts on a corpus (weights.py) and S = E[h h^T] the second moment of the
hidden states entering a tied output head, measured on the same corpus (gamma = 0, i.e. M = I,
for models without one). Its exact minimiser is closed-form: with V_k the top right singular
vectors of W^(1/2) E M^(1/2), the codes are C = E M^(1/2) V_k and the decoder D = V_k^T M^(-1/2)
(each row's code is optimal in the metric M whatever its weight). With `keep_norms`, the factors
code each row's direction and its exact length is stored beside them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import options
from .factors import Factors
from .svd import check_inputs, factor_rows, project, record_fit, top_directions


@dataclass
class AwareConfig:
    """Settings of data-aware SVD."""

    row_weights: bool = True  # weight rows by token counts
    output_metric: float = 4.0  # gamma: weight of the hidden-state metric (0: plain Euclidean)
    keep_norms: bool = False  # store exact row norms; factors code directions only
    metric_tokens: int = 8192  # tokens of the corpus (spread across it) used to estimate S

    def __post_init__(self) -> None:
        options.non_negative(options.flagged("output_metric"), self.output_metric)
        options.positive(options.flagged("metric_tokens"), self.metric_tokens, integer=True)

    def settings(self) -> dict:
        return asdict(self)


def _sqrt_and_inverse(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(metric.double())
    evals = evals.clamp_min(evals.max() * 1e-10)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T


def normalised_metric(second_moment: torch.Tensor | None, gamma: float, hidden: int) -> torch.Tensor:
    """M = I + gamma * S / mean eigenvalue of S (float64)."""
    metric = torch.eye(hidden, dtype=torch.float64)
    if second_moment is not None and gamma > 0:
        s = second_moment.double()
        metric = metric + gamma * s / (s.trace() / hidden)
    return metric


def aware_factors(embedding: torch.Tensor, rank: int, *, weights: torch.Tensor | None = None,
                  metric: torch.Tensor | None = None, keep_norms: bool = False, device: str = "cpu",
                  measure: bool = True) -> Factors:
    """Weighted, metric-aware truncated SVD of `embedding`; plain SVD when both are None. Made in float32, with the
    embedding's bits and (with `measure`) its fit recorded as in svd_factors."""
    device = check_inputs(embedding, rank, weights, metric, device)
    meta = {"source_bits": torch.finfo(embedding.dtype).bits}
    e, norms = embedding, None  # read in row chunks throughout: no float32 copy of a bf16 matrix
    if keep_norms:
        norms = torch.cat([embedding[i:i + 16384].float().norm(dim=1) for i in range(0, embedding.shape[0], 16384)])
        e = _Transformed(embedding, None, 1 / norms.clamp_min(1e-12))
    if metric is None:
        plain = factor_rows(e, rank, weights=weights, device=device)
        factors = Factors(plain.codes, plain.decoder, norms=norms, meta=meta)
        return record_fit(factors, embedding) if measure else factors
    root, inv_root = _sqrt_and_inverse(metric)
    directions, _ = top_directions(_Transformed(e, root.float()), rank, weights, device)
    codes = project(e, (root.float() @ directions), device)
    decoder = (directions.T.double() @ inv_root).float().contiguous()
    factors = Factors(codes, decoder, norms=norms, meta=meta)
    return record_fit(factors, embedding) if measure else factors


class _Transformed:
    """Rows of E (as float32), each scaled by `scale` and multiplied by R, computed chunk by chunk on slicing
    (so no pass ever holds a transformed copy of E)."""

    def __init__(self, e, r: torch.Tensor | None, scale: torch.Tensor | None = None):
        self.e, self.r, self.scale = e, r, scale
        self.shape = (e.shape[0], e.shape[1] if r is None else r.shape[1])

    def __getitem__(self, index) -> torch.Tensor:
        rows = self.e[index].float()
        if self.scale is not None:
            rows = rows * self.scale[index].unsqueeze(1)
        return rows if self.r is None else rows @ self.r


def spread_sample(lines: list[str], chars: int) -> list[str]:
    """Lines taken evenly across the whole text (every register of a mixed corpus), about `chars` long."""
    total = sum(len(line) + 1 for line in lines)
    if total <= chars:
        return lines
    step = total / chars
    picked, position = [], 0.0
    for i in range(0, len(lines)):
        if i >= position:
            picked.append(lines[i])
            position = i + step
    return picked


def hidden_second_moment(model, tokenizer, lines: list[str], tokens: int, *, seq_len: int = 256,
                         batch_size: int = 4) -> torch.Tensor | None:
    """E[h h^T] of the hidden states entering the output head, over about `tokens` tokens of `lines`.

    None when the model has no output head. The head runs on an empty slice (scoring.head_inputs),
    so no V-sized logits are computed.
    """
    from .models import for_statistics, input_device
    from .scoring import head_inputs

    if model.get_output_embeddings() is None:
        return None
    model = for_statistics(model)  # a copy in the dtype this CPU multiplies fastest, where it fits
    head = model.get_output_embeddings()
    ids = tokenizer("\n".join(spread_sample(lines, chars=tokens * 8)), add_special_tokens=False,
                    return_tensors="pt").input_ids[0]
    ids = ids[ids < model.get_input_embeddings().num_embeddings][:tokens]
    n_seq = max(1, len(ids) // seq_len)
    chunks = ids[:n_seq * seq_len].view(n_seq, -1) if len(ids) >= seq_len else ids.view(1, -1)
    total = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)
    count = 0
    device = input_device(model)  # accelerate-dispatched models included
    with torch.inference_mode():
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i:i + batch_size].to(device)
            h = head_inputs(model, head, ids, torch.ones_like(ids), "measure the metric of its tied head's inputs "
                            "(give --output-metric 0 to fit without it)")
            h = h.reshape(-1, h.shape[-1]).double().cpu()
            total += h.T @ h
            count += h.shape[0]
    return total / max(count, 1)
