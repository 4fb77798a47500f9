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


@pytest.mark.parametrize("kind, dtype", [("gpt2", "float32"), ("llama", "bfloat16")])
def test_a_sampled_codebook_gives_the_priors_rows_more_weight(tiny, text_file, monkeypatch, kind, dtype):
    """Where the model's samples join the counts, the prior does too, at the codebook's share; the row it favours
    gains weight, and what was used is recorded."""
    import embzip.weights as weights

    opened = embzip.open_model(tiny(kind, dtype))
    favoured = opened.vocab_size - 1
    prior = torch.zeros(opened.vocab_size, dtype=torch.float64)
    prior[favoured] = 1.0
    monkeypatch.setattr(weights, "vocabulary_prior", lambda tokenizer, vocab: prior)
    sample = SampleConfig(tokens=32, length=8)

    def weights_at(share):
        inputs = Inputs(opened, Recipe(method="codebook", weights_text=text_file, sample=sample,
                                       codebook=CodebookConfig(vocab_prior=share)))
        return inputs.weights(prior_share=share), inputs.details

    (plain, plain_details), (mixed, details) = weights_at(0.0), weights_at(1.0)
    assert plain_details["vocab_prior"] == 0.0 and details["vocab_prior"] == 1.0
    assert mixed[favoured] > 2 * plain[favoured]
    assert mixed.mean().item() == pytest.approx(1.0)


def test_without_samples_there_is_no_prior(tiny, text_file, monkeypatch):
    import embzip.weights as weights

    monkeypatch.setattr(weights, "vocabulary_prior", lambda tokenizer, vocab: pytest.fail("prior read"))
    opened = embzip.open_model(tiny("bert-mlm"))  # a masked LM does not sample itself
    inputs = Inputs(opened, Recipe(method="codebook", weights_text=text_file))
    inputs.weights(prior_share=1.0)
    assert "vocab_prior" not in inputs.details


def test_fit_records_the_prior_it_used_and_refuses_bad_or_foreign_shares(tiny, tmp_path):
    from embzip.factors import load_factors

    runner = CliRunner()
    out = tmp_path / "f.safetensors"
    result = runner.invoke(app, ["fit", tiny("gpt2"), "--bits", "4", "--self-tokens", "32", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    meta = load_factors(out).meta
    assert meta["settings"]["codebook"]["vocab_prior"] == 1.0  # as given (the default)
    assert meta["vocab_prior"] == 0.0  # as used: a word-level vocabulary has no prior to join
    assert meta["size"] == 4.0 and "bits" not in meta["settings"]["codebook"]  # the budget is the size
    assert meta["coarse_stages"] == 0 and meta["weight_power"] == 1.0  # what the defaults resolved to
    bad = runner.invoke(app, ["fit", tiny("gpt2"), "--bits", "2", "--vocab-prior", "-1", "-o", str(tmp_path / "a")])
    assert bad.exit_code == 2
    foreign = runner.invoke(app, ["fit", tiny("gpt2"), "--method", "int4", "--vocab-prior", "0.5",
                                  "-o", str(tmp_path / "b.safetensors")])
    assert foreign.exit_code == 2 and "--vocab-prior is an option of --method codebook" in " ".join(
        foreign.stderr.split())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b.safetensors").exists()
