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
metric of the hidden states (aware.normalised_metric); the token counts stay the row weights.

G comes from random probes: for p ~ N(0, I), E[J^T p p^T J] = J^T J, and J_t^T p for every
position of a batch of sentences is one backward pass of p . u, which costs about one forward pass.
Sentences, pooling and truncation are fidelity.py's, so the metric measures what `embzip perplexity`
and `bench` report. The estimate is noisy, and the noise costs fidelity: on all-MiniLM-L6-v2 at 2 bpw
(validation texts, four seeds, 256 sentences of the bundled weights text) 1, 4, 8 and 16 probes gave
0.99185, 0.99208, 0.99221 and 0.99251 on English (0.99149 without the metric), in 4, 10, 18 and 30 s
on 2 CPU cores. PROBES = 8 keeps a small encoder's fit well under a minute (docs/method.md).
"""

from __future__ import annotations

import torch

from .texts import Text


PROBES = 8  # random probes per batch of sentences (see the module's docstring for what fewer and more gave)


def sentence_metric(model, tokenizer, text: Text, *, sentences: int = 256, probes: int = PROBES, batch_size: int = 16,
                    max_length: int = 128, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """G (d x d, float64): the mean over the token positions of `text`'s sentences (fidelity.sentences) of
    J^T J, J the Jacobian of the unit mean-pooled sentence vector with respect to the position's row."""
    from .fidelity import sentences as split
    from .models import input_device
    from .progress import bar

    lines = split(text, limit=sentences, need=1, purpose="to measure the encoder's metric (--input-metric 0 fits "
                  "without it)")
    device = input_device(model)
    embedding = model.get_input_embeddings()
    base = getattr(model, "base_model", model)
    gen = torch.Generator().manual_seed(seed)
    d = embedding.weight.shape[1]
    total = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    looked: list[torch.Tensor] = []

    def keep(module, args, out):  # the rows as the model reads them, as a leaf the gradient is taken against
        rows = out.detach().requires_grad_(True)
        looked.append(rows)
        return rows

    hook = embedding.register_forward_hook(keep)
    try:
        with torch.enable_grad(), bar("encoder metric", len(lines), enabled=progress) as b:
            for i in range(0, len(lines), batch_size):
                batch = tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt").to(device)
                looked.clear()
                hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
                unit = pooled.float() / pooled.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
                rows, real = looked[0], batch["attention_mask"].bool()
                for k in range(probes):
                    probe = torch.randn(unit.shape, generator=gen).to(unit.device)
                    grad, = torch.autograd.grad((unit * probe).sum(), rows, retain_graph=k < probes - 1)
                    g = grad[real].double().cpu()
                    total += g.T @ g
                count += int(real.sum())
                b.advance(len(lines[i:i + batch_size]))
    finally:
        hook.remove()
    return total / (probes * max(count, 1))
