"""The paper's linear autoencoder ("Direction is what you need", arXiv 2106.08181).

An encoder Linear(d -> k) and a decoder Linear(k -> d), both with bias, are trained on the rows
of the embedding with a loss that puts direction first:

    loss = cos_weight * mean(1 - cos(x_hat, x)) + l1_weight * mean((|x_hat - x| + eps) ** alpha)

where alpha falls linearly from `alpha_start` (first epoch) to `alpha_end` (epoch
`anneal_epochs`) and is then held until `epochs`. Adam with StepLR, shuffled rows. After
training the codes are encoder(E); the encoder is thrown away and the decoder kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import options
from .errors import OptionError
from .factors import Factors
from .models import with_autograd
from .progress import bar

INITS = ("random", "svd")


@dataclass
class FitConfig:
    """The training recipe; defaults are the paper's."""

    epochs: int = 30  # passes over all rows
    anneal_epochs: int = 20  # the first epochs, over which alpha falls from alpha_start to alpha_end
    batch_size: int = 32  # rows per Adam step
    lr: float = 1e-3  # Adam learning rate
    lr_step: int = 4  # StepLR: multiply the learning rate by lr_gamma every lr_step epochs
    lr_gamma: float = 0.5
    cos_weight: float = 0.1995  # weight of the mean cosine distance (0.9975 / 5 in the authors' config)
    l1_weight: float = 0.0025  # weight of the annealed L1 term
    alpha_start: float = 1.0
    alpha_end: float = 0.1
    eps: float = 1e-10  # added to |x_hat - x| before the power, as the authors do
    seed: int = 1
    init: str = "random"  # "random" (PyTorch's default Linear init) or "svd" (start from truncated SVD)

    def __post_init__(self) -> None:
        for name in ("epochs", "anneal_epochs", "batch_size", "lr_step"):
            options.positive(options.flagged(name), getattr(self, name), integer=True)
        for name in ("lr", "alpha_start", "alpha_end"):
            options.positive(options.flagged(name), getattr(self, name))
        options.positive("eps", self.eps)  # the library's alone
        for name in ("lr_gamma", "cos_weight", "l1_weight"):
            options.finite(options.flagged(name), getattr(self, name))
        options.seed(options.flagged("seed"), self.seed)
        if self.anneal_epochs > self.epochs:
            raise OptionError(f"anneal_epochs ({self.anneal_epochs}) cannot exceed epochs ({self.epochs}): give "
                              f"--anneal-epochs {self.epochs} or fewer with --epochs {self.epochs}")
        if not 0 < self.lr_gamma <= 1:
            raise OptionError(f"{options.flagged('lr_gamma')} must be in (0, 1], got {self.lr_gamma}")
        if self.cos_weight < 0 or self.l1_weight < 0 or self.cos_weight + self.l1_weight == 0:
            raise OptionError(f"loss weights {options.flagged('cos_weight')} and {options.flagged('l1_weight')} must be "
                              f">= 0 and not both 0, got {self.cos_weight}, {self.l1_weight}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")

    def alpha(self, epoch: int) -> float:
        """The L1 exponent at 0-based `epoch`."""
        if self.anneal_epochs == 1:
            return self.alpha_end
        t = min(epoch / (self.anneal_epochs - 1), 1.0)
        return self.alpha_start + (self.alpha_end - self.alpha_start) * t

    def settings(self) -> dict:
        return asdict(self)


def paper_loss(x_hat: torch.Tensor, x: torch.Tensor, alpha: float, config: FitConfig,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and its (unweighted) cosine-distance part; `weights` scale each row's loss."""
    cos_rows = 1 - nn.functional.cosine_similarity(x_hat, x, dim=-1)
    l1_rows = ((x_hat - x).abs() + config.eps).pow(alpha).mean(dim=-1)
    rows = config.cos_weight * cos_rows + config.l1_weight * l1_rows
    loss = rows.mean() if weights is None else (rows * weights).mean()
    return loss, cos_rows.mean()


class LinearAutoencoder(nn.Module):
    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.encoder = nn.Linear(hidden, rank)
        self.decoder = nn.Linear(rank, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def init_from_svd(self, embedding: torch.Tensor) -> None:
        from .svd import top_directions

        directions, _ = top_directions(embedding, self.encoder.out_features)
        with torch.no_grad():
            self.encoder.weight.copy_(directions.T)
            self.decoder.weight.copy_(directions)
            self.encoder.bias.zero_()
            self.decoder.bias.zero_()

    def factors(self, embedding: torch.Tensor, chunk: int = 32768) -> Factors:
        with torch.no_grad():
            codes = torch.cat([self.encoder(embedding[i:i + chunk]).cpu() for i in range(0, embedding.shape[0], chunk)])
            return Factors(codes, self.decoder.weight.T.contiguous().cpu(), self.decoder.bias.detach().clone().cpu())


@with_autograd
def fit_autoencoder(embedding: torch.Tensor, rank: int, config: FitConfig | None = None, *,
                    device: str = "cpu", progress: bool = False,
                    weights: torch.Tensor | None = None) -> tuple[Factors, list[dict]]:
    """Train the paper's autoencoder on the rows of `embedding`; returns factors and per-epoch history.

    `weights` (one per row, mean 1) scale each row's loss: the weighted-loss variant."""
    config = config or FitConfig()
    x_all = embedding.detach().to(device=device, dtype=torch.float32)
    w_all = None if weights is None else weights.to(device=device, dtype=torch.float32)
    n = x_all.shape[0]
    with torch.random.fork_rng(devices=[] if device == "cpu" else None):
        torch.manual_seed(config.seed)
        model = LinearAutoencoder(x_all.shape[1], rank).to(device)
    if config.init == "svd":
        model.init_from_svd(x_all)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    shuffler = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    steps = (n + config.batch_size - 1) // config.batch_size
    with bar(f"fit rank {rank}", config.epochs * steps, enabled=progress,
             fields="epoch {task.fields[epoch]} loss {task.fields[loss]} cos {task.fields[cos]}",
             epoch="-", loss="-", cos="-") as pbar:
        for epoch in range(config.epochs):
            alpha = config.alpha(epoch)
            order = torch.randperm(n, generator=shuffler).to(device)
            loss_sum = torch.zeros((), device=device)
            cos_sum = torch.zeros((), device=device)
            for step in range(steps):
                index = order[step * config.batch_size:(step + 1) * config.batch_size]
                x = x_all[index]
                loss, cos_dist = paper_loss(model(x), x, alpha, config, None if w_all is None else w_all[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * x.shape[0]
                cos_sum += cos_dist.detach() * x.shape[0]
                if step % 256 == 255:
                    pbar.advance(256)
            pbar.advance(steps % 256)
            scheduler.step()
            record = {"epoch": epoch + 1, "alpha": alpha, "loss": loss_sum.item() / n, "cosine_distance": cos_sum.item() / n}
            history.append(record)
            pbar.update(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{record['loss']:.5f}", cos=f"{record['cosine_distance']:.4f}")
    return model.factors(x_all), history
