"""Row weights: the tokenizer's vocabulary prior, and how it joins the counts."""

import pytest
import torch
from typer.testing import CliRunner

import embzip
from embzip.cli import app
from embzip.methods import Recipe
from embzip.methods.base import Inputs
from embzip.codebook import CodebookConfig
from embzip.selfsample import SampleConfig, combine_counts
from embzip.weights import vocabulary_prior


def _bpe_tokenizer():
    """A byte-fallback BPE vocabulary in merge order: 3 specials, 2 byte pieces, letters, then merged pieces."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "<s>", "</s>", "<0x41>", "<0x42>", "a", "b", "c", "ab", "abc", "ca"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("a", "b"), ("ab", "c"), ("c", "a")]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token=None))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_a_bpe_vocabulary_gives_a_zipf_prior_by_id_without_added_or_byte_pieces():
    tok = _bpe_tokenizer()
    prior = vocabulary_prior(tok, 14)  # three padded rows beyond the tokenizer
    assert prior.dtype == torch.float64 and prior.sum().item() == pytest.approx(1.0)
    assert prior[[0, 1, 2]].tolist() == [0, 0, 0]  # added (special) tokens
    assert prior[[3, 4]].tolist() == [0, 0]  # byte-fallback pieces
    assert prior[11:].tolist() == [0, 0, 0]  # rows no token has
    ranked = prior[5:11]
    assert (ranked > 0).all() and (ranked[1:] < ranked[:-1]).all()  # later merges, rarer tokens
    assert (prior[5] / prior[10]).item() == pytest.approx((10 + 100) / (5 + 100))  # 1 / (rank + 100)


def test_vocabularies_not_in_merge_order_give_no_prior(tiny):
    opened = embzip.open_model(tiny("gpt2"))  # a word-level vocabulary: its order says nothing of frequency
    assert vocabulary_prior(opened.tokenizer, opened.vocab_size) is None
    assert vocabulary_prior(None, 10) is None


def _zipf_counts(vocab: int) -> torch.Tensor:
    """Counts of a text in which each token is rarer than the one before it (ids in frequency order)."""
    return (1000.0 / torch.arange(1, vocab + 1, dtype=torch.float64)).floor()


def test_a_wordpiece_vocabulary_in_frequency_order_gives_a_prior_without_unreachable_or_added_rows():
    """BERT's vocabulary lists its words by frequency; so do these counts."""
    from conftest import NEVER, wordpiece_tokenizer

    from embzip.reach import unreachable_rows

    tok = wordpiece_tokenizer()
    vocab = len(tok)
    unreachable = unreachable_rows(tok, vocab)
    assert sorted(tok.convert_ids_to_tokens(unreachable.tolist())) == sorted(NEVER)
    prior = vocabulary_prior(tok, vocab, counts=_zipf_counts(vocab), exclude=unreachable)
    assert prior is not None and prior.sum().item() == pytest.approx(1.0)
    assert prior[unreachable].tolist() == [0.0] * len(NEVER)
    assert prior[tok.all_special_ids].tolist() == [0.0] * len(tok.all_special_ids)
    ranked = prior[prior > 0]
    assert len(ranked) == vocab - len(NEVER) - len(tok.all_special_ids)
    assert (ranked[1:] < ranked[:-1]).all()  # later ids, rarer tokens


def test_a_vocabulary_whose_order_disagrees_with_the_texts_counts_gives_no_prior():
    """Nothing promises that a WordPiece file is sorted by frequency: where later ids are not rarer in the text,
    the order is not taken for a rank."""
    from conftest import wordpiece_tokenizer

    tok = wordpiece_tokenizer()
    vocab = len(tok)
    counts = _zipf_counts(vocab)
    assert vocabulary_prior(tok, vocab, counts=counts) is not None
    assert vocabulary_prior(tok, vocab, counts=counts.flip(0)) is None  # the frequent tokens last
    shuffled = counts[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]
    assert vocabulary_prior(tok, vocab, counts=shuffled) is None  # no order at all
    assert vocabulary_prior(tok, vocab, counts=torch.zeros(vocab)) is None  # a text that shows no token
    assert vocabulary_prior(tok, vocab, counts=torch.ones(vocab)) is None  # nor tells them apart


def test_the_prior_joins_the_counts_at_its_share_of_the_text_total():
    text = torch.tensor([10.0, 0.0, 0.0, 30.0], dtype=torch.float64)
    sampled = torch.tensor([0.5, 0.5, 1.0, 0.0], dtype=torch.float64)
    prior = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    plain = combine_counts(text, sampled)
    assert torch.equal(combine_counts(text, sampled, prior, 0.0), plain)
    assert torch.allclose(combine_counts(text, sampled, prior, 1.0), plain + torch.tensor([0.0, 0.0, 20.0, 20.0],
                                                                                          dtype=torch.float64))
    assert torch.allclose(combine_counts(text, sampled, prior, 0.5), plain + torch.tensor([0.0, 0.0, 10.0, 10.0],
                                                                                          dtype=torch.float64))


@pytest.mark.parametrize("kind, dtype", [("gpt2", "float32"), ("llama", "bfloat16"), ("bert-mlm", "float32"),
                                         ("bert-wordpiece", "bfloat16")])
def test_the_prior_gives_its_rows_more_weight_with_or_without_samples(tiny, text_file, monkeypatch, kind, dtype):
    """The prior joins the counts at the codebook's share, whether the model's samples join them (a causal LM) or
    not (a masked LM, an encoder); the row it favours gains weight, and what was used is recorded."""
    import embzip.weights as weights

    opened = embzip.open_model(tiny(kind, dtype))
    favoured = opened.vocab_size - 1
    prior = torch.zeros(opened.vocab_size, dtype=torch.float64)
    prior[favoured] = 1.0
    monkeypatch.setattr(weights, "vocabulary_prior", lambda tokenizer, vocab, **kw: prior)
    sample = SampleConfig(tokens=32, length=8)

    def weights_at(share):
        inputs = Inputs(opened, Recipe(method="codebook", weights_text=text_file, sample=sample,
                                       codebook=CodebookConfig(vocab_prior=share)))
        return inputs.weights(prior_share=share), inputs.details

    (plain, plain_details), (mixed, details) = weights_at(0.0), weights_at(0.5)
    assert "vocab_prior" not in plain_details and details["vocab_prior"] == 0.5
    assert mixed[favoured] > 2 * plain[favoured]
    assert mixed.mean().item() == pytest.approx(1.0)


def test_the_default_share_is_one_with_the_models_samples_and_a_half_without():
    config = CodebookConfig()
    assert config.prior_share(sampled=True) == 1.0 and config.prior_share(sampled=False) == 0.5
    assert CodebookConfig(vocab_prior=0.0).prior_share(sampled=True) == 0.0
    assert CodebookConfig(vocab_prior=2.0).prior_share(sampled=False) == 2.0


def test_a_share_of_zero_reads_no_prior(tiny, text_file, monkeypatch):
    import embzip.weights as weights

    monkeypatch.setattr(weights, "vocabulary_prior", lambda *a, **kw: pytest.fail("prior read"))
    opened = embzip.open_model(tiny("bert-wordpiece"))
    inputs = Inputs(opened, Recipe(method="codebook", weights_text=text_file))
    inputs.weights(prior_share=0.0)
    assert "vocab_prior" not in inputs.details


@pytest.mark.parametrize("kind, args, used", [
    ("gpt2", ["--self-tokens", "32"], 0.0),  # a word-level vocabulary has no prior to join
    ("bert-wordpiece", [], 0.5),  # an encoder's WordPiece vocabulary in frequency order: the text-only share
])
def test_fit_records_the_prior_it_used(tiny, tmp_path, kind, args, used):
    from embzip.factors import load_factors

    out = tmp_path / "f.safetensors"
    result = CliRunner().invoke(app, ["fit", tiny(kind), "--bits", "4", *args, "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    meta = load_factors(out).meta
    assert meta["settings"]["codebook"]["vocab_prior"] is None  # not given: the default
    assert meta["vocab_prior"] == used
    assert meta["size"] == 4.0 and "bits" not in meta["settings"]["codebook"]  # the budget is the size
    assert meta["weight_power"] == (0.75 if meta["source"]["tied"] else 1.0)  # what the defaults resolved to (4 bits)


def test_a_codebook_file_records_the_tied_heads_metric_settings(tiny, tmp_path):
    from embzip.factors import load_factors

    # they change the fit (the metric the rows are coded in), so the file says which were used, defaults included
    settings = []
    for i, args in enumerate([[], ["--output-metric", "0"], ["--metric-tokens", "512"]]):
        out = tmp_path / f"f{i}.safetensors"
        result = CliRunner().invoke(app, ["fit", tiny("gpt2"), "--bits", "4", "--self-tokens", "32", *args,
                                          "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        codebook = load_factors(out).meta["settings"]["codebook"]
        settings.append((codebook["output_metric"], codebook["metric_tokens"]))
    assert settings == [(4.0, 8192), (0.0, 8192), (4.0, 512)]


def test_fit_refuses_bad_or_foreign_shares(tiny, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["fit", tiny("gpt2"), "--bits", "2", "--vocab-prior", "-1", "-o", str(tmp_path / "a")])
    assert bad.exit_code == 2
    foreign = runner.invoke(app, ["fit", tiny("gpt2"), "--method", "int4", "--vocab-prior", "0.5",
                                  "-o", str(tmp_path / "b.safetensors")])
    assert foreign.exit_code == 2 and "--vocab-prior is an option of --method codebook" in " ".join(
        foreign.stderr.split())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b.safetensors").exists()
