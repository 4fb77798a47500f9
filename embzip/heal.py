"""Healing: a short distillation of the factors against the original model, everything else frozen.

The factors are first made by a closed-form method; then only codes, decoder (and bias) are
trained so that the compressed model reproduces the original model's own outputs on unlabeled
text: the KL divergence of its next-token (or masked-token) distributions for LMs, the cosine
distance of its last hidden states for encoders. No labels, no task: the original model is the
teacher. Only rows of tokens that occur in the text (and the shared decoder) receive gradient.

Early stopping: the last `val_sequences` sequences of the text are held out; the distillation
loss on them is measured before training and every `eval_every` steps, and the factors with the
lowest held-out loss are returned, so healing never returns factors that fit held-out text
worse than the ones it started from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import options
from .errors import DataError
from .factors import Factors
from .models import ENCODER, outputs
from .progress import bar
from .splice import splice


@dataclass
class HealConfig:
    steps: int = 100  # optimizer steps
    lr: float = 1e-3  # Adam learning rate (cosine decay to 0)
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8  # sequences per step
    seed: int = 0
    eval_every: int = 20  # steps between held-out evaluations
    val_sequences: int = 8  # sequences held out at the end of the text for early stopping

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "eval_every", "val_sequences"):
            options.positive(f"heal {name}", getattr(self, name), integer=True)
        options.positive("heal lr", self.lr)
        options.seed("heal seed", self.seed)

    def settings(self) -> dict:
        return asdict(self)


def _sequences(tokenizer, lines: list[str], seq_len: int, vocab: int) -> torch.Tensor:
    ids = tokenizer("\n".join(lines), add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = ids[ids < vocab]
    n = len(ids) // seq_len
    if n < 2:
        raise DataError(f"the healing text has {len(ids)} tokens, fewer than two sequences of {seq_len}; give a "
                        "longer --weights-text")
    return ids[:n * seq_len].view(n, seq_len)


def _loss(opened, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if opened.kind == ENCODER:
        return (1 - torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    t = torch.log_softmax(teacher.float(), dim=-1)
    s = torch.log_softmax(student.float(), dim=-1)
    return torch.nn.functional.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def _snapshot(emb) -> Factors:
    return Factors(*(None if p is None else p.detach().clone().cpu()
                     for p in (emb.codes, emb.decoder, emb.bias, emb.norms)))


def heal(opened, factors: Factors, lines: list[str], config: HealConfig | None = None, *, head: str | None = None,
         progress: bool = False) -> tuple[Factors, dict]:
    """Distil `factors` against the original model on `lines`.

    Returns the factors with the lowest held-out loss and a history: the training loss per step,
    the held-out loss at each evaluation, and the step of the returned factors.
    """
    config = config or HealConfig()
    model = opened.model
    seqs = _sequences(opened.tokenizer, lines, config.seq_len, opened.vocab_size)
    n_val = min(config.val_sequences, len(seqs) // 2)
    seqs, val = seqs[:-n_val], seqs[-n_val:]
    gen = torch.Generator().manual_seed(config.seed)
    from .models import input_device

    device = input_device(model)  # accelerate-dispatched models included
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    swap = splice(model, factors, head)
    emb = swap.swaps[0][2]
    params = [p for p in (emb.codes, emb.decoder, emb.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    losses: list[float] = []
    history: dict = {"train_loss": losses, "val_loss": [], "best_step": 0}
    was_training = model.training
    model.eval()  # no dropout: the student matches the teacher exactly where the factors are exact

    def held_out() -> float:
        total = 0.0
        for i in range(0, len(val), config.batch_size):
            batch = val[i:i + config.batch_size].to(device)
            with torch.no_grad():
                swap.restore()
                teacher = outputs(model, batch)
                swap.reapply()
                total += _loss(opened, outputs(model, batch), teacher).item() * len(batch)
        return total / len(val)

    def evaluate(step: int) -> None:
        nonlocal best
        loss = held_out()
        history["val_loss"].append({"step": step, "loss": loss})
        if best is None or loss < min(v["loss"] for v in history["val_loss"][:-1]):
            best = _snapshot(emb)
            history["best_step"] = step

    best = None
    try:
        evaluate(0)
        with bar("heal", config.steps, enabled=progress, fields="loss {task.fields[loss]}", loss="-") as pbar:
            for _ in range(config.steps):
                batch = seqs[torch.randint(len(seqs), (config.batch_size,), generator=gen)].to(device)
                swap.restore()
                with torch.no_grad():
                    teacher = outputs(model, batch)
                swap.reapply()
                loss = _loss(opened, outputs(model, batch), teacher)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if len(losses) % config.eval_every == 0 or len(losses) == config.steps:
                    evaluate(len(losses))
                pbar.update(loss=f"{losses[-1]:.4f}")
                pbar.advance()
    finally:
        swap.restore()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    best.meta = dict(factors.meta)
    return best, history

