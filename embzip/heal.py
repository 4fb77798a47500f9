"""Healing: a short distillation of the factors against the original model, everything else frozen.

The factors are first made by a closed-form method or by k-means; then only they are trained:
low-rank codes, decoder (and bias), or a codebook's centroids (its indices stay; the centroids are
trained as floats and rounded back to int8 tables at the end), so that the compressed model
reproduces the original model's own outputs on unlabeled text: the KL divergence of its next-token
(or masked-token) distributions for LMs, the cosine distance of its last hidden states for
encoders. No labels, no task: the original model is the teacher. Low rank: only rows of tokens
that occur in the text (and the shared decoder) receive gradient. Codebooks: every row moves with
the centroids it shares with the rows the text has.

Sequences: for LMs, windows of `seq_len` tokens cut from the running text; for encoders, the
text's sentences, each with the tokenizer's special tokens (as a sentence encoder is used), as
many per step as hold batch_size x seq_len tokens. A step's sentences are neighbours in the
order of their lengths (from a random start, wrapping around), so a batch is padded to little more
than its own length; every sentence is still drawn with the same probability.

Early stopping: the last `val_sequences` sequences of the text (for encoders, sentences holding as
many tokens) are held out; the distillation loss on them is measured before training and every
`eval_every` steps, and the factors with the lowest held-out loss are returned, so healing never
returns factors that fit held-out text worse than the ones it started from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch

from . import options
from .codebook import Codebook, round8, dequantized
from .errors import DataError
from .factors import Factors
from .models import ENCODER, outputs, with_autograd
from .progress import bar
from .splice import buffer_name, splice


LOWRANK_LR = 1e-3  # absolute
CODEBOOK_LR = 5e-3  # relative to each codebook's RMS (chosen on en_val, docs/method.md)


def default_lr(compressed_kind: str) -> float:
    return CODEBOOK_LR if compressed_kind == "codebook" else LOWRANK_LR


@dataclass
class HealConfig:
    steps: int = 100  # optimizer steps
    lr: float | None = None  # Adam learning rate, cosine decay to 0; None: LOWRANK_LR, or CODEBOOK_LR for codebooks
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8  # sequences per step
    seed: int = 0
    eval_every: int = 20  # steps between held-out evaluations
    val_sequences: int = 8  # sequences held out at the end of the text for early stopping

    def __post_init__(self) -> None:
        options.positive(options.flagged("heal steps", "heal-steps"), self.steps, integer=True)
        for name in ("seq_len", "batch_size", "eval_every", "val_sequences"):  # the library's alone
            options.positive(f"heal {name}", getattr(self, name), integer=True)
        if self.lr is not None:
            options.positive(options.flagged("heal lr", "heal-lr"), self.lr)
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


class _Sentences(NamedTuple):
    ids: torch.Tensor  # (n, longest) with the tokenizer's special tokens, padded
    mask: torch.Tensor  # (n, longest) attention mask
    per_batch: int  # sentences per step: as many tokens as batch_size sequences of seq_len


def _sentences(tokenizer, lines: list[str], config: HealConfig, vocab: int) -> _Sentences:
    """An encoder is used on sentences, [CLS] ... [SEP], not on windows cut from running text: it heals on them."""
    from .fidelity import MIN_WORDS, sentences
    from .texts import Text

    try:
        found = sentences(Text(lines, "the healing text"), limit=2**31)
    except DataError:
        raise DataError(f"the healing text has fewer than two sentences of {MIN_WORDS}+ words for an encoder to heal "
                        "on; give a longer --weights-text") from None
    enc = tokenizer(found, padding=True, truncation=True, max_length=config.seq_len, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ids = ids.masked_fill(ids >= vocab, tokenizer.unk_token_id or 0)
    mean_len = max(1.0, mask.sum().item() / len(ids))
    return _Sentences(ids, mask, max(1, round(config.batch_size * config.seq_len / mean_len)))


def _by_length(mask: torch.Tensor) -> torch.Tensor:
    """Sentence order by length: batches of neighbours need little padding."""
    return torch.sort(mask.sum(1), stable=True).indices


def _pick(n: int, per_batch: int, gen: torch.Generator, neighbours: bool) -> torch.Tensor:
    """A step's sequences: drawn at random, or (sentences sorted by length) `per_batch` neighbours from a
    random start, wrapping around. Either way every sequence is drawn with the same probability."""
    if not neighbours:
        return torch.randint(n, (per_batch,), generator=gen)
    return (torch.randint(n, (1,), generator=gen) + torch.arange(per_batch)) % n


def _run(model, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return outputs(model, ids)
    width = int(mask.sum(1).max())
    return outputs(model, ids[:, :width], mask[:, :width])


def _loss(opened, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if opened.kind == ENCODER:
        cos = torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)
        if mask is None:
            return (1 - cos).mean()
        mask = mask[:, :cos.shape[1]].to(cos.dtype)
        return ((1 - cos) * mask).sum() / mask.sum()
    t = torch.log_softmax(teacher.float(), dim=-1)
    s = torch.log_softmax(student.float(), dim=-1)
    return torch.nn.functional.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def _lowrank_parts(emb, lr: float) -> tuple[list[dict], Callable[[], Factors]]:
    params = [p for p in (emb.codes, emb.decoder, emb.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)

    def snapshot() -> Factors:
        return Factors(*(None if p is None else p.detach().clone().cpu()
                         for p in (emb.codes, emb.decoder, emb.bias, emb.norms)))

    return [{"params": params, "lr": lr}], snapshot


def _codebook_parts(emb, lr: float, original: Codebook) -> tuple[list[dict], Callable[[], Codebook]]:
    """Each stage's codebook becomes a float parameter of the spliced module (its int8 levels and scales leave
    it, so decoding reads the floats); a snapshot rounds them back to int8 with fresh per-column scales."""
    stored = original.tensors()
    groups, names = [], []
    for name in [n for n in emb.names if n.endswith(".codebook")]:
        book = torch.nn.Parameter(dequantized(stored, name).to(getattr(emb, buffer_name(name)).device))
        for n in (name, name + ".scale"):
            delattr(emb, buffer_name(n))
        emb.register_parameter(buffer_name(name), book)
        groups.append({"params": [book], "lr": lr * book.detach().pow(2).mean().sqrt().clamp_min(1e-12).item()})
        names.append(name)
    emb.names = tuple(n for n in emb.names if n.removesuffix(".scale") not in names or n in names)

    def snapshot() -> Codebook:
        tensors = dict(stored)
        for name in names:
            levels, scale = round8(getattr(emb, buffer_name(name)).detach().float().cpu(), 0,
                                   stored[name + ".scale"].dtype)
            tensors[name], tensors[name + ".scale"] = levels, scale.reshape(-1)
        return Codebook(tensors, dict(original.meta))

    return groups, snapshot


@with_autograd
def heal(opened, factors: Factors | Codebook, lines: list[str], config: HealConfig | None = None, *,
         head: str | None = None, progress: bool = False) -> tuple[Factors | Codebook, dict]:
    """Distil `factors` (low-rank factors or codebooks) against the original model on `lines`.

    Returns the factors with the lowest held-out loss and a history: the training loss per step,
    the held-out loss at each evaluation, and the step of the returned factors.
    """
    config = config or HealConfig()
    if not isinstance(factors, (Factors, Codebook)):
        raise TypeError(f"healing trains low-rank factors or codebooks, not {type(factors).__name__}")
    kind = "codebook" if isinstance(factors, Codebook) else "lowrank"
    lr = config.lr if config.lr is not None else default_lr(kind)
    model = opened.model
    if opened.kind == ENCODER:
        found = _sentences(opened.tokenizer, lines, config, opened.vocab_size)
        seqs, masks, per_batch = found.ids, found.mask, found.per_batch
        n_val = min(config.val_sequences * per_batch // config.batch_size, len(seqs) // 2)
    else:
        seqs, per_batch = _sequences(opened.tokenizer, lines, config.seq_len, opened.vocab_size), config.batch_size
        masks, n_val = None, min(config.val_sequences, len(seqs) // 2)
    n_val = max(n_val, 1)
    seqs, val = seqs[:-n_val], seqs[-n_val:]
    masks, val_masks = (None, None) if masks is None else (masks[:-n_val], masks[-n_val:])
    if masks is not None:  # each part in the order of length, so that neighbours share a batch
        order, val_order = _by_length(masks), _by_length(val_masks)
        seqs, masks, val, val_masks = seqs[order], masks[order], val[val_order], val_masks[val_order]
    gen = torch.Generator().manual_seed(config.seed)
    from .models import input_device

    device = input_device(model)  # accelerate-dispatched models included
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    swap = splice(model, factors, head)
    emb = swap.swaps[0][2]
    groups, snapshot = _codebook_parts(emb, lr, factors) if kind == "codebook" else _lowrank_parts(emb, lr)
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    losses: list[float] = []
    history: dict = {"train_loss": losses, "val_loss": [], "best_step": 0}
    was_training = model.training
    model.eval()  # no dropout: the student matches the teacher exactly where the factors are exact

    def held_out() -> float:  # the mean loss per held-out token
        total = tokens = 0.0
        for i in range(0, len(val), per_batch):
            batch = val[i:i + per_batch].to(device)
            mask = None if val_masks is None else val_masks[i:i + per_batch].to(device)
            with torch.no_grad():
                swap.restore()
                teacher = _run(model, batch, mask)
                swap.reapply()
                n = batch.numel() if mask is None else mask.sum().item()
                total += _loss(opened, _run(model, batch, mask), teacher, mask).item() * n
                tokens += n
        return total / tokens

    def evaluate(step: int) -> None:
        nonlocal best
        loss = held_out()
        history["val_loss"].append({"step": step, "loss": loss})
        if best is None or loss < min(v["loss"] for v in history["val_loss"][:-1]):
            best = snapshot() if step else factors  # unchanged factors as given (a codebook is not rounded again)
            history["best_step"] = step

    best = None
    try:
        evaluate(0)
        with bar("heal", config.steps, enabled=progress, fields="loss {task.fields[loss]}", loss="-") as pbar:
            for _ in range(config.steps):
                pick = _pick(len(seqs), per_batch, gen, neighbours=masks is not None)
                batch = seqs[pick].to(device)
                mask = None if masks is None else masks[pick].to(device)
                swap.restore()
                with torch.no_grad():
                    teacher = _run(model, batch, mask)
                swap.reapply()
                loss = _loss(opened, _run(model, batch, mask), teacher, mask)
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

