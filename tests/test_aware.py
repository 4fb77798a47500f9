"""Data-aware methods: weighted SVD, the hidden-state metric, kept norms, token weights, healing."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from embzip.aware import aware_factors, hidden_second_moment, normalised_metric
from embzip.cli import app
from embzip.factors import load_factors
from embzip.heal import CODEBOOK_LR, LOWRANK_LR, HealConfig, heal
from embzip.methods import Recipe, fit_method, make_factors, recipe
from embzip.models import open_model
from embzip.svd import svd_factors
from embzip.texts import Text
from embzip.weights import WeightConfig, row_weights, token_counts

from conftest import TEXT


def _matrix(v=120, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g) @ torch.diag(torch.linspace(2, 0.2, d)) + 0.1


def _objective(e, f, w, metric):
    root = torch.linalg.cholesky(metric.double())
    diff = (e.double() - f.reconstruct().double()) @ root
    return (w.double() * diff.pow(2).sum(1)).sum().item()


def test_weighted_svd_equals_plain_svd_under_uniform_weights():
    e = _matrix()
    a, b = aware_factors(e, 5, weights=torch.ones(len(e))), svd_factors(e, 5)
    assert torch.allclose(a.reconstruct(), b.reconstruct(), atol=1e-5)


def test_identity_metric_equals_weighted_svd():
    e, w = _matrix(), torch.rand(120, generator=torch.Generator().manual_seed(1)) + 0.1
    a = aware_factors(e, 5, weights=w, metric=torch.eye(16, dtype=torch.float64))
    assert torch.allclose(a.reconstruct(), aware_factors(e, 5, weights=w).reconstruct(), atol=1e-4)


def test_aware_factors_minimise_their_objective():
    e = _matrix()
    w = torch.rand(120, generator=torch.Generator().manual_seed(2)) * 10 + 0.1
    s = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    metric = normalised_metric(s @ s.T, 4.0, 16)
    best = _objective(e, aware_factors(e, 4, weights=w, metric=metric), w, metric)
    for other in (svd_factors(e, 4), aware_factors(e, 4, weights=w), aware_factors(e, 4, metric=metric)):
        assert best <= _objective(e, other, w, metric) * (1 + 1e-6)


def test_heavily_weighted_rows_are_rebuilt_better():
    e = _matrix()
    w = torch.ones(120)
    w[:3] = 1e4
    plain, weighted = svd_factors(e, 3), aware_factors(e, 3, weights=w)
    err = lambda f: (f.reconstruct()[:3] - e[:3]).norm().item()  # noqa: E731
    assert err(weighted) < 0.1 * err(plain)


def test_norms_are_exact_when_kept():
    e = _matrix()
    f = aware_factors(e, 3, weights=torch.rand(120) + 0.5, keep_norms=True)
    assert torch.allclose(f.reconstruct().norm(dim=1), e.norm(dim=1), rtol=1e-5)
    assert f.num_params() == 120 * 3 + 3 * 16 + 120


def test_row_weights_floor_power_and_mean():
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    w = row_weights(counts, WeightConfig(floor=1.0, power=1.0))
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 4.0, 1.0]) / 2.0)
    assert torch.allclose(row_weights(counts, WeightConfig(power=0.0)), torch.ones(4))
    assert torch.equal(row_weights(counts, WeightConfig()), w)  # no power given: 1
    with pytest.raises(ValueError, match=r"weight floor \(--weight-floor\) must be > 0"):
        WeightConfig(floor=0)


def test_token_counts_match_the_tokenizer(tiny):
    opened = open_model(tiny("gpt2"))
    text = Text(["the water the", "hot"], "test")
    counts = token_counts(opened.tokenizer, text, opened.vocab_size)
    vocab = opened.tokenizer.get_vocab()
    assert counts[vocab["the"]] == 2 and counts[vocab["water"]] == 1 and counts[vocab["hot"]] == 1
    assert counts[vocab["<s>"]] == 2  # each line is read as a sequence: its BOS counts too
    assert counts.sum() == 6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_counts_include_the_special_tokens_of_every_sequence(tiny, dtype):
    """[CLS] and [SEP] are in every input of a BERT: counted once per line, their rows weigh like frequent words
    instead of like tokens never seen."""
    opened = open_model(tiny("bert-encoder", dtype))
    text = Text(["the water the", "hot", "the"], "test")
    counts = token_counts(opened.tokenizer, text, opened.vocab_size)
    vocab = opened.tokenizer.get_vocab()
    assert counts[vocab["[CLS]"]] == 3 and counts[vocab["[SEP]"]] == 3 and counts[vocab["the"]] == 3
    assert counts[vocab["[PAD]"]] == 0 and counts.sum() == 5 + 6
    w = row_weights(counts)
    assert w[vocab["[CLS]"]] == w[vocab["the"]] > w[vocab["[PAD]"]]


@pytest.mark.parametrize("bf16_units", [False, True])
def test_hidden_second_moment_is_what_the_head_sees(tiny, monkeypatch, bf16_units):
    import embzip.models as models

    monkeypatch.setattr(models, "native_bf16", lambda: bf16_units)  # with bf16 units it runs on a bf16 copy
    opened = open_model(tiny("gpt2"))
    s = hidden_second_moment(opened.model, opened.tokenizer, TEXT.splitlines(), 60, seq_len=30, batch_size=2)
    from embzip.aware import spread_sample

    lines = spread_sample(TEXT.splitlines(), 60 * 8)
    ids = opened.tokenizer("\n".join(lines), add_special_tokens=False, return_tensors="pt").input_ids[0][:60]
    with torch.no_grad():
        h = opened.model(input_ids=ids.view(2, 30), output_hidden_states=True).hidden_states[-1].reshape(-1, 32)
    expected = (h.T @ h / 60).float()
    if bf16_units:  # bfloat16 keeps 8 bits of mantissa
        assert torch.linalg.norm(s.float() - expected) < 0.02 * torch.linalg.norm(expected)
    else:
        assert torch.allclose(s.float(), expected, atol=1e-4)
    assert hidden_second_moment(open_model(tiny("bert-encoder")).model, None, [], 10) is None


def test_aware_recipe_on_a_tied_model_uses_the_metric(tiny, text_file):
    opened = open_model(tiny("llama"))
    with_metric, details = make_factors(opened, 4, Recipe(method="aware", weights_text=text_file))
    without, _ = make_factors(opened, 4, Recipe(method="wsvd", weights_text=text_file))
    assert not torch.allclose(with_metric.reconstruct(), without.reconstruct(), atol=1e-4)
    assert details["settings"]["aware"]["output_metric"] == 4.0 and details["weights_coverage"]["distinct_tokens"] > 10


def test_seeded_aware_heal_repeats_and_lowers_the_loss(tiny, text_file):
    opened = open_model(tiny("gpt2"))
    lines = TEXT.splitlines()
    start = svd_factors(opened.embedding.detach(), 3)
    config = HealConfig(steps=15, lr=1e-2, seq_len=16, batch_size=4, seed=3)
    before = [p.detach().clone() for p in opened.model.parameters()]
    a, history = heal(opened, start, lines, config)
    b, _ = heal(opened, start, lines, config)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.decoder, b.decoder)
    losses = history["train_loss"]
    assert sum(losses[-3:]) < sum(losses[:3])
    held_out = {v["step"]: v["loss"] for v in history["val_loss"]}
    assert history["best_step"] > 0 and held_out[history["best_step"]] < held_out[0]
    assert all(torch.equal(x, y) for x, y in zip(before, opened.model.parameters()))  # only the factors train
    assert not any(p.requires_grad is False for p in opened.model.parameters())  # flags restored


def test_heal_stops_early_on_held_out_text(tiny):
    opened = open_model(tiny("gpt2"))
    start = svd_factors(opened.embedding.detach(), 3)
    wild = HealConfig(steps=6, lr=50.0, seq_len=16, batch_size=4, eval_every=2)  # diverges at once
    healed, history = heal(opened, start, TEXT.splitlines(), wild)
    assert history["best_step"] == 0 and torch.equal(healed.codes, start.codes)
    assert all(v["loss"] >= history["val_loss"][0]["loss"] for v in history["val_loss"])


def _codebook(opened, text_file):
    from embzip.aware import AwareConfig
    from embzip.selfsample import SampleConfig

    factors, _ = make_factors(opened, 8.0, Recipe(method="codebook", weights_text=text_file, aware=AwareConfig(
        metric_tokens=256), sample=SampleConfig(tokens=64)))
    return factors


def _held_out(opened, factors, config):
    """The held-out loss healing starts from: that of `factors` as given."""
    _, history = heal(opened, factors, TEXT.splitlines(), replace(config, steps=1))
    return history["val_loss"][0]["loss"]


@pytest.mark.parametrize("kind, dtype", [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "float32"),
                                         ("bert-encoder", "float32"), ("bert-encoder", "bfloat16")])
def test_codebook_heal_trains_the_centroids_only_and_keeps_its_gain_once_rounded(tiny, text_file, kind, dtype):
    opened = open_model(tiny(kind, dtype))  # llama: tied head; gpt2: its own head; bert-encoder: cosine loss
    start = _codebook(opened, text_file)
    config = HealConfig(steps=12, lr=0.02, seq_len=16, batch_size=4, eval_every=4)
    before = [p.detach().clone() for p in opened.model.parameters()]
    healed, history = heal(opened, start, TEXT.splitlines(), config)
    assert type(healed).check(healed.tensors()) == start.shape
    books = [name for name in start.tensors() if ".codebook" in name]
    assert books and all(healed.tensors()[name].dtype == start.tensors()[name].dtype for name in books)
    assert any(not torch.equal(healed.tensors()[name], start.tensors()[name]) for name in books)
    assert all(torch.equal(t, start.tensors()[name]) for name, t in healed.tensors().items() if name not in books)
    held_out = {v["step"]: v["loss"] for v in history["val_loss"]}
    assert history["best_step"] > 0 and held_out[history["best_step"]] < held_out[0]
    # the int8 tables the snapshot rounds to keep most of what training gained
    assert _held_out(opened, healed, config) < held_out[0] - 0.5 * (held_out[0] - held_out[history["best_step"]])
    assert all(torch.equal(x, y) for x, y in zip(before, opened.model.parameters()))
    assert not any(p.requires_grad is False for p in opened.model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_codebook_heal_trains_through_a_tied_head_that_multiplies_stage_by_stage(tiny, text_file, dtype, monkeypatch):
    import embzip.codebook as codebook

    opened = open_model(tiny("llama", dtype))
    start = _codebook(opened, text_file)
    monkeypatch.setattr(codebook, "_LOOKUP_LIMIT", 0)  # every forward pass of the head goes stage by stage
    staged, original = [], codebook.stage_logits
    monkeypatch.setattr(codebook, "stage_logits", lambda *a: staged.append(a[1].requires_grad) or original(*a))
    healed, history = heal(opened, start, TEXT.splitlines(),
                           HealConfig(steps=12, lr=0.02, seq_len=16, batch_size=4, eval_every=4))
    held_out = {v["step"]: v["loss"] for v in history["val_loss"]}
    assert any(staged) and history["best_step"] > 0 and held_out[history["best_step"]] < held_out[0]


def test_codebook_heal_that_never_helps_returns_the_codebooks_as_given(tiny, text_file):
    opened = open_model(tiny("llama"))
    start = _codebook(opened, text_file)
    healed, history = heal(opened, start, TEXT.splitlines(), HealConfig(steps=6, lr=50.0, seq_len=16, batch_size=4,
                                                                        eval_every=2))
    assert history["best_step"] == 0
    assert all(torch.equal(t, start.tensors()[name]) for name, t in healed.tensors().items())


def test_a_healed_codebook_stores_what_the_unhealed_one_does(tiny, text_file):
    from embzip.aware import AwareConfig
    from embzip.selfsample import SampleConfig

    opened = open_model(tiny("bert-encoder"))  # float32: the 16-bit gains and scales stay 16-bit
    kw = dict(method="codebook", weights_text=text_file, aware=AwareConfig(metric_tokens=256),
              sample=SampleConfig(tokens=64))
    plain, _ = make_factors(opened, 8.0, Recipe(**kw))
    healed, details = make_factors(opened, 8.0, Recipe(**kw, heal=HealConfig(steps=3, seq_len=16, eval_every=1)))
    assert details["heal"]["best_step"] > 0
    assert {n: t.dtype for n, t in healed.tensors().items()} == {n: t.dtype for n, t in plain.tensors().items()}
    assert healed.stored_bytes() == plain.stored_bytes()


def test_an_encoder_heals_on_sentences_and_refuses_a_text_without_two(tiny):
    from embzip.errors import DataError

    opened = open_model(tiny("bert-encoder"))
    start = svd_factors(opened.embedding.detach(), 3)
    with pytest.raises(DataError, match="fewer than two sentences of 5\\+ words for an encoder"):
        heal(opened, start, ["too short to heal on ."], HealConfig(steps=2))


def test_encoder_batches_are_length_neighbours_and_every_sentence_is_equally_likely():
    from embzip.heal import _by_length, _pick

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 120, (50,), generator=gen)
    mask = (torch.arange(128) < lengths[:, None]).long()
    order = _by_length(mask)
    assert torch.equal(lengths[order], lengths.sort().values)
    counts = torch.zeros(50)
    padded = {True: 0, False: 0}
    for _ in range(2000):
        for neighbours in (True, False):
            pick = _pick(50, 8, gen, neighbours)
            sorted_lengths = lengths[order][pick]
            padded[neighbours] += int(sorted_lengths.max()) * len(pick) - int(sorted_lengths.sum())
            if neighbours:
                counts[pick] += 1
                assert ((pick.diff() == 1) | (pick.diff() == -49)).all()  # a run, wrapping around
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    assert padded[True] < 0.5 * padded[False]  # 0.33 here: 50 sentences, 8 a batch


def test_healing_takes_low_rank_and_codebook_methods_only():
    assert recipe("codebook+heal").heal.lr == CODEBOOK_LR and recipe("aware+heal").heal.lr == LOWRANK_LR
    assert Recipe(method="codebook", heal=HealConfig(lr=0.2)).heal.lr == 0.2
    with pytest.raises(ValueError, match="method int8 makes neither"):
        recipe("int8+heal")


def test_fit_cli_default_is_aware(tiny, text_file, tmp_path):
    result = CliRunner().invoke(app, ["fit", tiny("llama"), "-k", "4", "-o", str(tmp_path / "f.safetensors"),
                                      "--weights-text", text_file, "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    f = load_factors(tmp_path / "f.safetensors")
    assert summary["method"] == f.meta["method"] == "aware" and f.meta["settings"]["weights_text"] == text_file


def test_bench_method_names():
    assert recipe("fit").method == "codebook" and fit_method(True) == "aware"  # as `embzip fit`
    assert recipe("paper+heal").heal is not None
    with pytest.raises(ValueError, match="known"):
        recipe("magic")


def test_spread_sample_covers_the_whole_text():
    from embzip.aware import spread_sample

    lines = [f"line {i:03d} " + "x" * 20 for i in range(100)]
    assert spread_sample(lines, 10**6) == lines
    picked = spread_sample(lines, 300)
    assert 8 <= len(picked) <= 12 and picked[0] == lines[0] and picked[-1] in lines[85:]



def test_codebook_on_a_tied_head_gets_stages_of_up_to_d_over_2_pieces(tiny, text_file):
    """A tied head multiplies with every stage of pieces, so there a stage may hold d / 2 pieces, elsewhere d / 4;
    a min_piece_dim the recipe gives is used as is. The details record what was used, the settings what was given
    (the budget is the size, not a setting)."""
    from embzip.codebook import CodebookConfig
    from embzip.selfsample import SampleConfig

    for kind, given, used in (("llama", None, 2.0), ("bert-encoder", None, 4.0), ("llama", 3.0, 3.0)):
        r = Recipe(method="codebook", weights_text=text_file, sample=SampleConfig(tokens=0),
                   codebook=CodebookConfig(min_piece_dim=given))
        factors, details = make_factors(open_model(tiny(kind)), 4.0, r)
        assert details["min_piece_dim"] == used and details["settings"]["codebook"]["min_piece_dim"] == given
        assert details["size"] == 4.0 and "bits" not in details["settings"]["codebook"]
        assert factors.bits_per_weight() <= 4.0


def test_codebook_on_a_tied_head_at_low_bits_weights_rows_by_the_square_root_of_counts(tiny, text_file):
    """A tied head scores every row at every position, so a codebook there flattens the weights (power 0.5 below 3
    bits per weight, 0.75 from there); without one, and for the low-rank methods, power 1; a power the recipe gives is
    used as is."""
    from embzip.codebook import CodebookConfig
    from embzip.methods.base import Inputs
    from embzip.selfsample import SampleConfig
    from embzip.texts import load_text

    assert CodebookConfig(bits=2).weight_power(tied=True) == CodebookConfig(bits=1).weight_power(tied=True) == 0.5
    assert CodebookConfig(bits=4).weight_power(tied=True) == CodebookConfig(bits=8).weight_power(tied=True) == 0.75
    assert CodebookConfig(bits=2).weight_power(tied=False) == CodebookConfig(bits=4).weight_power(tied=False) == 1.0
    tied = open_model(tiny("llama"))
    counts = token_counts(tied.tokenizer, load_text(text_file), tied.vocab_size)
    for given, default, used in ((None, 0.5, 0.5), (None, 1.0, 1.0), (0.75, 0.5, 0.75)):
        inputs = Inputs(tied, Recipe(method="codebook", weights_text=text_file, sample=SampleConfig(tokens=0),
                                     weights=WeightConfig(power=given)))
        w = inputs.weights(default)
        assert inputs.details["weight_power"] == used
        assert torch.allclose(w, row_weights(counts, WeightConfig(power=used)))
    for method, size, power in (("codebook", 8.0, 0.75), ("aware", 4, 1.0)):  # a tied head at 8 bits; low rank
        _, details = make_factors(tied, size, Recipe(method=method, weights_text=text_file,
                                                     sample=SampleConfig(tokens=0)))
        assert details["weight_power"] == power
