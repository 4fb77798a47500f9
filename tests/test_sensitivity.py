"""An encoder's sentence-vector metric (sensitivity.py) and the codebook fits that use it."""

import pytest
import torch
from typer.testing import CliRunner

import embzip
from embzip.cli import app
from embzip.codebook import CodebookConfig
from embzip.methods import Recipe
from embzip.methods.base import Inputs
from embzip.sensitivity import Sensitivity, row_scale, sentence_sensitivity
from embzip.texts import load_text

SENTENCE = "the people who write about water said that it was hot ."


def sentence_metric(*args, **kwargs):
    return sentence_sensitivity(*args, **kwargs).moment


def _unit_vector(model, ids, shift=None):
    """The unit mean-pooled sentence vector, with `shift` = (position, vector) added to the row read there."""
    def add(module, args, out):
        out = out.clone()
        out[0, shift[0]] += shift[1]
        return out

    hook = model.get_input_embeddings().register_forward_hook(add) if shift is not None else None
    try:
        with torch.no_grad():
            v = model(input_ids=ids).last_hidden_state.mean(1)[0]
    finally:
        if hook is not None:
            hook.remove()
    return v / v.norm()


@pytest.fixture(scope="module")
def encoder64(tiny):
    """The tiny BERT encoder in float64, so finite differences are exact enough to check the metric against."""
    from transformers import AutoModel, AutoTokenizer

    path = tiny("bert-encoder")
    return AutoModel.from_pretrained(path, dtype=torch.float64).eval(), AutoTokenizer.from_pretrained(path)


def test_the_metric_is_what_moving_a_row_costs_the_sentence_vector(encoder64, tmp_path):
    """e^T G e is the mean over the sentence's positions of |u(row + e) - u|^2 / |e|^2 scale, u the unit sentence
    vector: measured by finite differences, one position at a time."""
    model, tokenizer = encoder64
    text = tmp_path / "one.txt"
    text.write_text(SENTENCE + "\n")
    G = sentence_metric(model, tokenizer, load_text(str(text)), probes=800)
    ids = tokenizer([SENTENCE], return_tensors="pt")["input_ids"]
    u = _unit_vector(model, ids)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        e = torch.randn(G.shape[0], generator=gen, dtype=torch.float64)
        e = 1e-5 * e / e.norm()
        moved = [(_unit_vector(model, ids, (t, e)) - u).pow(2).sum() for t in range(ids.shape[1])]
        assert (e @ G @ e).item() == pytest.approx(torch.stack(moved).mean().item(), rel=0.2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_metric_is_symmetric_and_blind_to_what_layernorm_removes(tiny, text_file, dtype):
    """G is symmetric positive semi-definite, and adding the same number to every coordinate of a row (which
    BERT's embedding LayerNorm subtracts again) costs nothing."""
    opened = embzip.open_model(tiny("bert-encoder", dtype))
    G = sentence_metric(opened.model, opened.tokenizer, load_text(text_file))
    d = G.shape[0]
    assert G.dtype == torch.float64 and G.shape == (d, d) and torch.isfinite(G).all()
    assert torch.allclose(G, G.T, atol=1e-12 * G.trace().item())
    assert torch.linalg.eigvalsh(G).min() > -1e-9 * G.trace()
    ones = torch.ones(d, dtype=torch.float64)
    assert (ones @ G @ ones) / d < 1e-3 * G.trace() / d  # mean eigenvalue as the scale; bfloat16 rounding allowed


def test_the_metric_changes_only_what_the_probes_estimate(tiny, text_file):
    """Seeded: the same G twice; more probes converge (a different seed lands closer with 64 probes than with 1)."""
    opened = embzip.open_model(tiny("bert-encoder"))
    text = load_text(text_file)
    G = sentence_metric(opened.model, opened.tokenizer, text, probes=2)
    assert torch.equal(G, sentence_metric(opened.model, opened.tokenizer, text, probes=2))
    reference = sentence_metric(opened.model, opened.tokenizer, text, probes=256, seed=1)
    error = {p: (sentence_metric(opened.model, opened.tokenizer, text, probes=p) - reference).norm().item()
             for p in (1, 64)}
    assert error[64] < 0.5 * error[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_codebook_fit_of_an_encoder_codes_in_its_metric(tiny, text_file, dtype, monkeypatch):
    """The fit hands the codebook the metric I + 4 G / mean eig(G), G measured on the weights text, and the token
    weights scaled by what a reading of each row costs, and records the weight it used; with weight 0 it codes in
    plain squared error with the token weights alone. (That a metric and weights handed to fit_codebook are the
    error it lowers: test_codebook.)"""
    import embzip.methods.codebook as method
    from embzip.aware import normalised_metric
    from embzip.pipeline import compress

    path = tiny("bert-encoder", dtype)
    handed = []

    def spy(*args, metric=None, weights=None, **kw):
        handed.append((metric, weights))
        return fit_codebook(*args, metric=metric, weights=weights, **kw)

    fit_codebook = method.fit_codebook
    monkeypatch.setattr(method, "fit_codebook", spy)

    def fit(gamma):
        recipe = Recipe(method="codebook", weights_text=text_file, codebook=CodebookConfig(input_metric=gamma))
        return compress(path, recipe, bits=8, write=False)[0]

    with_metric, plain = fit(4.0), fit(0.0)
    assert with_metric.meta["input_metric"] == 4.0 and "input_metric" not in plain.meta
    assert with_metric.meta["settings"]["codebook"]["input_metric"] == 4.0
    opened = embzip.open_model(path)
    measured = sentence_sensitivity(opened.model, opened.tokenizer, load_text(text_file))
    (metric, weights), (no_metric, plain_weights) = handed
    assert torch.allclose(metric, normalised_metric(measured.moment, 4.0, measured.moment.shape[0]))
    assert no_metric is None
    assert torch.allclose(weights, plain_weights * row_scale(measured).to(plain_weights.dtype))
    assert not torch.equal(with_metric.reconstruct(), plain.reconstruct())


def test_models_with_a_head_and_a_weight_of_zero_measure_no_encoder_metric(tiny, text_file, monkeypatch):
    """A masked LM (its tied head has its own metric), a causal LM, and --input-metric 0 never run the backward
    passes, and a fit that needs no forward pass reads the embedding alone."""
    import embzip.sensitivity as sensitivity
    from embzip.pipeline import needs_model

    monkeypatch.setattr(sensitivity, "sentence_sensitivity", lambda *a, **kw: pytest.fail("encoder metric measured"))
    for kind, gamma in (("bert-mlm", 4.0), ("llama-untied", 4.0), ("bert-encoder", 0.0)):
        opened = embzip.open_model(tiny(kind))
        recipe = Recipe(method="codebook", weights_text=text_file, codebook=CodebookConfig(input_metric=gamma))
        assert Inputs(opened, recipe).encoder_sensitivity() is None
        if kind != "bert-mlm":
            assert not needs_model(recipe, embzip.open_model(tiny(kind), load="embedding"))
    encoder = embzip.open_model(tiny("bert-encoder"), load="embedding")
    assert needs_model(Recipe(method="codebook"), encoder) and not needs_model(Recipe(method="int4"), encoder)


def test_fit_refuses_bad_or_foreign_input_metrics(tiny, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["fit", tiny("bert-encoder"), "--input-metric", "-1", "-o", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "--input-metric" in bad.stderr
    foreign = runner.invoke(app, ["fit", tiny("bert-encoder"), "--method", "aware", "--rank", "4",
                                  "--input-metric", "2", "-o", str(tmp_path / "b.safetensors")])
    assert foreign.exit_code == 2 and "--input-metric is an option of --method codebook" in " ".join(
        foreign.stderr.split())
    with pytest.raises(ValueError, match="input_metric"):
        CodebookConfig(input_metric=float("nan"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b.safetensors").exists()


def test_sentences_longer_than_the_model_reads_are_cut_to_its_positions(tiny, tmp_path):
    """The tiny encoder has 64 positions: a text of 133-token sentences still gives a metric, a fit, and the
    fidelity of that fit."""
    from embzip.fidelity import score
    from embzip.pipeline import compress

    text = tmp_path / "long.txt"
    text.write_text((" ".join(["the people who write about water said that it was hot"] * 12) + " .\n") * 3)
    recipe = Recipe(method="codebook", weights_text=str(text))
    factors, _ = compress(tiny("bert-encoder"), recipe, bits=8, write=False)
    assert factors.meta["input_metric"] == 4.0
    fidelity = score(embzip.open_model(tiny("bert-encoder")), load_text(str(text)), factors)["fidelity"]
    assert 0.5 < fidelity <= 1.0 + 1e-6


def test_a_rows_scale_is_what_a_reading_costs_against_a_rare_tokens():
    """Never read: 1. Read often: its cost per reading over the median cost of the rows read once or twice. Read
    once: halfway (shrink 1) between its own and the rare tokens' cost."""
    counts = torch.tensor([0.0, 1.0, 2.0, 100.0, 1.0], dtype=torch.float64)
    per = torch.tensor([0.0, 1.0, 3.0, 0.1, 8.0], dtype=torch.float64)  # cost of one reading
    scale = row_scale(Sensitivity(torch.eye(2, dtype=torch.float64), per * counts, counts))
    c0 = 3.0  # the median of 1, 3 and 8: the rows read once or twice
    assert scale[0] == 1.0
    assert scale[3].item() == pytest.approx((0.1 * 100 + c0) / 101 / c0)
    assert scale[4].item() == pytest.approx((8 + c0) / 2 / c0)
    assert scale[3] < scale[1] < scale[2] < scale[4]
    nothing = Sensitivity(torch.eye(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                          torch.zeros(3, dtype=torch.float64))
    assert torch.equal(row_scale(nothing), torch.ones(3, dtype=torch.float64))


def test_the_rows_costs_add_up_to_the_metric(tiny, text_file):
    """The measured costs are per row and add up: every row read has a positive cost, the rows' costs sum to
    trace(G) times the positions, and rows never read have none."""
    opened = embzip.open_model(tiny("bert-encoder"))
    measured = sentence_sensitivity(opened.model, opened.tokenizer, load_text(text_file))
    read = measured.counts > 0
    assert bool((measured.rows[read] > 0).all()) and bool((measured.rows[~read] == 0).all())
    assert measured.rows.sum().item() == pytest.approx(measured.moment.trace().item() * measured.counts.sum().item())
