"""Methods: how a compressed embedding is made. One module per method, behind one interface.

| method   | kind     | sized by | what it does |
|----------|----------|----------|--------------|
| svd      | lowrank  | rank     | truncated SVD (the baseline) |
| paper    | lowrank  | rank     | the paper's linear autoencoder, its exact recipe |
| wsvd     | lowrank  | rank     | SVD weighted by token counts on a corpus |
| aware    | lowrank  | rank     | weighted SVD in the metric of a tied head's hidden states |
| int8     | quant    | fixed    | one absmax scale per row, round to nearest |
| int4     | quant    | fixed    | groups of 32 with scale and offset, packed two per byte |
| codebook | codebook | bits     | indices into learned codebooks (codebook.py) |

Adding a method is one file here defining a `base.Method` and registering it, plus its tests.
A `Recipe` holds the method's name and every setting; `make_factors` runs it; any low-rank
or codebook method can be followed by healing (heal.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any

import torch

from ..autoencoder import FitConfig
from ..aware import AwareConfig
from ..codebook import CodebookConfig
from ..compressed import storage_dtype
from ..errors import OptionError, RankError
from ..heal import HealConfig, default_lr
from ..models import with_autograd
from ..selfsample import SampleConfig
from ..sizes import check_rank, factored_params, rank_for_ratio
from ..weights import WeightConfig
from . import svd, paper, wsvd, aware, int8, int4, codebook  # noqa: F401,E402  (each registers itself)
from .base import BITS, FIXED, RANK, REGISTRY, Inputs, Method, check_size

METHODS = tuple(REGISTRY)
HEALABLE = ("lowrank", "codebook")  # storage kinds healing can train
DEFAULT_FIT_METHOD = "aware"


@dataclass
class Recipe:
    """How to make a compressed embedding: the method, its settings, and the text data-aware parts read."""

    method: str = DEFAULT_FIT_METHOD
    fit: FitConfig = field(default_factory=FitConfig)  # method "paper"
    weights: WeightConfig = field(default_factory=WeightConfig)  # token-count row weights
    aware: AwareConfig = field(default_factory=AwareConfig)  # method "aware" (and keep_norms for wsvd)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)  # method "codebook"
    group: int = 32  # method "int4": numbers per group
    heal: HealConfig | None = None  # healing after a low-rank or codebook method; None: none
    sample: SampleConfig = field(default_factory=SampleConfig)  # the model's own samples (causal LMs, aware/codebook)
    weighted_paper: bool = False  # method "paper": weight each row's loss by its token weight
    weights_text: str | None = None  # a text file for token counts, the metric and healing
    weights_dataset: str | None = None  # or a dataset NAME[:CONFIG[:SPLIT]]
    # options given explicitly (the command line's), refused where the model's kind leaves them unused
    given: frozenset = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in REGISTRY:
            raise OptionError(f"unknown method {self.method!r}; known: {', '.join(REGISTRY)}")
        if self.heal is not None:
            if self.spec.kind not in HEALABLE:
                raise OptionError(f"healing trains low-rank factors or codebooks; method {self.method} makes neither")
            if self.heal.lr is None:
                self.heal = replace(self.heal, lr=default_lr(self.spec.kind))

    @property
    def spec(self) -> Method:
        return REGISTRY[self.method]

    @property
    def bias(self) -> bool:
        return self.method == "paper"

    @property
    def norms(self) -> bool:
        return self.method in ("wsvd", "aware") and self.aware.keep_norms

    @property
    def uses_text(self) -> bool:
        return self.spec.uses_text or self.weighted_paper or self.heal is not None

    @property
    def name(self) -> str:
        return self.method + ("+heal" if self.heal is not None else "")

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.method == "paper":
            out["fit"] = self.fit.settings()
            out["weighted_paper"] = self.weighted_paper
        if self.spec.uses_text or self.weighted_paper:
            out["weights"] = self.weights.settings()
        if self.method == "aware":
            out["aware"] = self.aware.settings()
        if self.method == "wsvd":
            out["keep_norms"] = self.aware.keep_norms
        if self.method == "codebook":  # the budget is the file's `size`, not the config's default bits
            out["codebook"] = {k: v for k, v in self.codebook.settings().items() if k != "bits"}
            # a tied head's metric is aware's setting, shared (--output-metric, --metric-tokens)
            out["codebook"].update(output_metric=self.aware.output_metric, metric_tokens=self.aware.metric_tokens)
        if self.method == "int4":
            out["group"] = self.group
        if self.heal is not None:
            out["heal"] = self.heal.settings()
        if self.spec.needs_forward:
            out["self_sample"] = self.sample.settings()
        if self.uses_text:
            out["weights_text"] = self.weights_text or self.weights_dataset or "embzip sample weights.txt"
        return out


def fit_method(ranked: bool) -> str:
    """What `embzip fit` runs without --method: aware when sized by --rank or --ratio, codebook otherwise."""
    return "aware" if ranked else "codebook"


def recipe(name: str, **overrides) -> Recipe:
    """A recipe from a bench method name: a method, or fit (the default of `embzip fit` without a rank: codebook;
    BenchConfig names what fit runs at its sizes first), each with an optional '+heal' suffix for low-rank and
    codebook methods (e.g. aware+heal, codebook+heal)."""
    base, _, extra = name.partition("+")
    if extra not in ("", "heal"):
        raise OptionError(f"unknown method suffix {'+' + extra!r} in {name!r}; only +heal exists")
    method = fit_method(False) if base == "fit" else base
    r = Recipe(method=method, **overrides)
    if extra == "heal" and r.heal is None:
        r = replace(r, heal=HealConfig())
    return r


def bits_name(bits: float) -> str:
    """Bits per weight as given, in four digits unless they would round it to another number (4.9999999 is not 5);
    a numpy float32's 4.1 is 4.1, as it prints."""
    try:
        value = float(str(bits))
    except ValueError:
        value = float(bits)
    short = f"{value:.4g}"
    return short if float(short) == value else repr(value)


def resolve_size(r: Recipe, *, rank: int | None = None, ratio: float | None = None, bits: float | None = None,
                 vocab: int, hidden: int, dtype: torch.dtype) -> int | float | None:
    """The size to make: a rank (low-rank methods), bits per weight (codebook) or None (fixed size).

    --ratio is bytes of the embedding at its dtype over bytes stored; --bits a budget in bits per
    weight, everything stored counted (a codebook recipe's own `codebook.bits` where none is given). A size a
    method cannot reach is refused, naming what it can.
    """
    for name, value in (("ratio", ratio), ("bits", bits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise RankError(f"{name} must be a number, got {value!r}")
    spec = r.spec
    check_size(spec, rank=rank, ratio=ratio, bits=bits)
    source_bits = torch.finfo(dtype).bits
    stored_bits = torch.finfo(storage_dtype(dtype)).bits
    dtype_text = str(dtype).removeprefix("torch.")
    if ratio is not None:
        if not (ratio > 1 and math.isfinite(ratio)):
            raise RankError(f"ratio (--ratio) must be a finite number greater than 1, got {ratio}")
        if spec.sized_by != RANK:  # a budget in bits; a refusal says what the ratio came to
            try:
                return resolve_size(r, bits=source_bits / ratio, vocab=vocab, hidden=hidden, dtype=dtype)
            except (RankError, OptionError) as e:  # a codebook's budget is refused as an OptionError
                raise RankError(f"ratio (--ratio) {ratio:g} is {source_bits / ratio:.4g} bits per weight for this "
                                f"{dtype_text} embedding: {e}") from None
    if bits is not None and not (0 < bits < source_bits):
        raise RankError(f"bits (--bits) must be more than 0 and less than {source_bits}, the embedding's own bits "
                        f"per weight ({dtype_text}), got {bits}")
    if spec.sized_by == RANK:
        kw = dict(bias=r.bias, norms=r.norms, source_bits=source_bits, stored_bits=stored_bits)
        if rank is not None:
            return int(check_rank(rank, vocab, hidden, **kw))  # a numpy integer is a rank too, named r8 and in JSON
        if ratio is not None:
            return rank_for_ratio(ratio, vocab, hidden, **kw)
        if bits is None:
            raise RankError(f"method {spec.name} needs a size: give exactly one of rank (--rank), ratio (--ratio) and "
                            "bits (--bits)")
        try:
            return rank_for_ratio(source_bits / bits, vocab, hidden, **kw)
        except RankError:
            one = stored_bits * factored_params(vocab, hidden, 1, bias=r.bias, norms=r.norms) / (vocab * hidden)
            raise RankError(f"no rank of {spec.name} fits in {bits_name(bits)} bits per weight for a {vocab} x "
                            f"{hidden} embedding ({stored_bits}-bit factors): rank 1 takes {one:.3g}; "
                            "use --method codebook for smaller sizes") from None
    if spec.sized_by == FIXED:
        own = spec.fixed_bits(vocab, hidden, dtype, r)
        if bits is not None and bits < own:
            raise RankError(f"method {spec.name} stores {own:.4g} bits per weight for this embedding and cannot "
                            f"reach {bits_name(bits)}; use --method codebook --bits {bits_name(bits)}")
        return None
    if bits is None:  # the recipe's own budget (CodebookConfig.bits, 2 by default) where no size is given
        bits = r.codebook.bits if spec.kind == "codebook" else spec.default_bits
    budget = float(bits)  # a float: bits=2 is "2b" in names, never rank 2
    return spec.check_bits(budget, vocab, hidden, dtype, r) if spec.check_bits else budget


@with_autograd
def make_factors(opened, size, recipe: Recipe, *, device: str = "cpu", progress: bool = False,
                 cache: dict | None = None) -> tuple[Any, dict[str, Any]]:
    """The compressed embedding of `opened` at `size` (a rank, bits, or None) by `recipe`, and the
    details to record. `cache` (a dict) keeps token counts and statistics between calls on one model."""
    inputs = Inputs(opened, recipe, device=device, progress=progress, cache=cache)
    compressed, details = recipe.spec.make(inputs, size, recipe)
    details = {"settings": recipe.settings(), "size": size, **inputs.details, **details}
    if recipe.heal is not None:
        from ..heal import heal

        config = replace(recipe.heal, seq_len=min(recipe.heal.seq_len, opened.max_length or recipe.heal.seq_len))
        if recipe.spec.kind == "lowrank":  # made in float32; a codebook's tables are already stored as they will be
            compressed = compressed.to(dtype=inputs.embedding.dtype)
        compressed, history = heal(opened, compressed, inputs.text().lines, config, progress=progress)
        details["heal"] = {"val_loss": history["val_loss"], "best_step": history["best_step"],
                           "train_loss_first": history["train_loss"][0], "train_loss_last": history["train_loss"][-1]}
    return compressed, details


__all__ = ["BITS", "DEFAULT_FIT_METHOD", "FIXED", "METHODS", "Method", "RANK", "REGISTRY", "Recipe", "bits_name",
           "fit_method", "make_factors", "recipe", "resolve_size"]
