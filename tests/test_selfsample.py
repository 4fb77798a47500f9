"""The model's own samples: statistics, determinism, mixing with the text, where they are used, bad options."""

import pytest
import torch

import embzip
from typer.testing import CliRunner

from embzip.cli import app
from embzip.errors import OptionError
from embzip.methods import Recipe, make_factors
from embzip.methods.base import Inputs
from embzip.selfsample import SampleConfig, combine_counts, combine_moments, sample_statistics


@pytest.mark.parametrize("kind, dtype", [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "float32")])
def test_statistics_are_distributions_and_a_second_moment(tiny, kind, dtype):
    opened = embzip.open_model(tiny(kind, dtype))
    before = {k: v.clone() for k, v in opened.model.state_dict().items()}
    counts, moment = sample_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=40, length=8))
    after = opened.model.state_dict()  # a 16-bit model samples through a float32 copy; the model is untouched
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert counts.shape == (opened.vocab_size,) and counts.dtype == torch.float64
    # each of the 5 x 8 positions adds one probability distribution over the vocabulary
    assert counts.sum().item() == pytest.approx(40, rel=1e-4)
    assert (counts > 0).all()  # every token the model can predict gets some weight, drawn or not
    hidden = opened.model.get_output_embeddings().in_features
    assert moment.shape == (hidden, hidden)
    assert torch.allclose(moment, moment.T)
    assert torch.linalg.eigvalsh(moment).min() > -1e-9 * moment.trace()


def test_same_seed_same_statistics_other_seed_other_sample(tiny):
    # the tiny models put about 98% of their mass on one token: 120 draws, so that two seeds differ somewhere
    opened = embzip.open_model(tiny("gpt2"))
    a = sample_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=120, length=12, seed=3))
    b = sample_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=120, length=12, seed=3))
    c = sample_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=120, length=12, seed=4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_a_draw_picks_each_token_as_often_as_its_probability():
    from embzip.selfsample import draw

    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).expand(40000, 5).contiguous()
    ids = draw(p, torch.Generator().manual_seed(0))
    assert ids.shape == (40000, 1)
    shares = torch.bincount(ids[:, 0], minlength=5) / 40000
    assert torch.allclose(shares, p[0], atol=0.01)  # four standard errors of the largest share
    assert shares[4] == 0  # a token of probability zero is never drawn
    again = draw(p, torch.Generator().manual_seed(0))
    assert torch.equal(again, ids) and not torch.equal(draw(p, torch.Generator().manual_seed(1)), ids)
    one_hot = torch.zeros(3, 262144)
    one_hot[torch.arange(3), torch.tensor([7, 100000, 262143])] = 1
    assert draw(one_hot, torch.Generator()).flatten().tolist() == [7, 100000, 262143]


def test_a_draw_across_blocks_and_a_partial_last_block_keeps_every_share():
    """1300 ids: two whole blocks of 512 and a last one of 276. Each block is drawn by its mass and each id
    inside by its share of that mass, so a block's share and the ids' shares inside the last block (the
    one whose missing ids must never be drawn) come out as the probabilities say."""
    from embzip.selfsample import draw

    gen = torch.Generator().manual_seed(0)
    p = torch.rand(1300, generator=gen) ** 4
    p[1299] = 40 * p.max()  # the last id alone holds a large share
    p /= p.sum()
    n = 100000
    ids = draw(p.expand(n, 1300).contiguous(), torch.Generator().manual_seed(1))[:, 0]
    assert 0 <= ids.min() and ids.max() <= 1299
    shares = torch.bincount(ids, minlength=1300).double() / n
    blocks = torch.stack([p[:512].sum(), p[512:1024].sum(), p[1024:].sum()]).double()
    drawn = torch.stack([shares[:512].sum(), shares[512:1024].sum(), shares[1024:].sum()])
    assert torch.allclose(drawn, blocks, atol=0.006)  # four standard errors at n = 100000
    assert shares[1299] == pytest.approx(p[1299].item(), abs=0.006)
    chi2 = ((shares - p.double()).pow(2) / p.double()).sum().item() * n
    assert chi2 < 1299 + 5 * (2 * 1299) ** 0.5  # a chi-square with 1299 degrees of freedom, five deviations


def test_the_floor_keeps_tokens_the_model_all_but_rules_out_from_the_draw_only():
    from embzip.selfsample import _floored, draw

    p = torch.tensor([[0.6, 0.4 - 3e-8, 1e-8, 2e-8], [0.25, 0.25, 0.25, 0.25]])
    floored = _floored(p.clone())
    assert torch.equal(floored[0, :2], p[0, :2]) and floored[0, 2:].tolist() == [0.0, 0.0]
    assert torch.equal(floored[1], p[1])
    ids = draw(floored[:1].expand(20000, 4).contiguous(), torch.Generator().manual_seed(0))
    assert set(ids.flatten().tolist()) == {0, 1}
    huge = torch.full((1, 2**25), 2.0**-25)  # more tokens than 2^24: each above half of 1 / V stays drawable
    assert torch.equal(_floored(huge.clone()), huge)


def test_probabilities_are_a_softmax_written_in_place():
    from embzip.selfsample import _probabilities

    logits = (torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    buffer = torch.empty(3, 1000)
    p = _probabilities(logits, buffer)
    assert p.data_ptr() == buffer.data_ptr() and p.dtype == torch.float32
    exact = torch.softmax(logits.double(), dim=-1)
    assert torch.allclose(p.double(), exact, rtol=1e-5, atol=1e-12)


def test_combine_gives_each_source_the_same_total():
    text = torch.tensor([10.0, 0.0, 0.0, 30.0], dtype=torch.float64)
    sampled = torch.tensor([0.5, 0.5, 1.0, 0.0], dtype=torch.float64)
    mixed = combine_counts(text, sampled)
    assert torch.allclose(mixed, torch.tensor([20.0, 10.0, 20.0, 30.0], dtype=torch.float64))
    assert combine_counts(torch.zeros(4, dtype=torch.float64), sampled).sum().item() == pytest.approx(4)
    a, b = torch.eye(3, dtype=torch.float64) * 5, torch.diag(torch.tensor([3.0, 0, 0], dtype=torch.float64))
    m = combine_moments(a, b)
    assert m.trace().item() == pytest.approx(1.0)
    assert torch.allclose(m, (a / 15 + b / 3) / 2)
    assert torch.allclose(combine_moments(None, b), b / 3)


def test_sampled_tokens_raise_the_weight_of_tokens_the_text_lacks(tiny, text_file):
    from embzip.texts import load_text
    from embzip.weights import token_counts

    opened = embzip.open_model(tiny("gpt2"))
    plain = Inputs(opened, Recipe(method="codebook", weights_text=text_file,
                                  sample=SampleConfig(tokens=0))).weights()
    inputs = Inputs(opened, Recipe(method="codebook", weights_text=text_file, sample=SampleConfig(tokens=32, length=8)))
    mixed = inputs.weights()
    in_text = token_counts(opened.tokenizer, load_text(text_file), opened.vocab_size) > 0
    predicted = inputs.sampled()[0]
    absent = torch.where(~in_text, predicted, torch.zeros_like(predicted)).argmax()  # most predicted, never in the text
    assert not in_text[absent] and predicted[absent] > 0.01
    assert mixed[absent] > plain[absent]
    assert inputs.details["self_sample"] == {"tokens": 32, "length": 8, "seed": 0, "languages": 0.0}
    assert not torch.equal(inputs.metric(4.0, 64), Inputs(opened, Recipe(
        method="codebook", weights_text=text_file, sample=SampleConfig(tokens=0))).metric(4.0, 64))


def test_only_causal_models_a_method_runs_are_sampled(tiny, text_file):
    causal = embzip.open_model(tiny("gpt2"))
    masked = embzip.open_model(tiny("bert-mlm"))
    assert Inputs(causal, Recipe(method="codebook")).samples_model()
    assert Inputs(causal, Recipe(method="aware")).samples_model()
    assert not Inputs(causal, Recipe(method="wsvd")).samples_model()  # reads the matrix alone
    assert not Inputs(causal, Recipe(method="codebook", sample=SampleConfig(tokens=0))).samples_model()
    assert not Inputs(masked, Recipe(method="codebook")).samples_model()
    _, details = make_factors(causal, 8.0, Recipe(method="codebook", weights_text=text_file,
                                                  sample=SampleConfig(tokens=16, length=8)))
    assert details["self_sample"]["tokens"] == 16
    # the tiny gpt2 has 64 positions: a sample never runs past them
    _, details = make_factors(causal, 8.0, Recipe(method="codebook", weights_text=text_file,
                                                  sample=SampleConfig(tokens=130, length=128)))
    assert details["self_sample"] == {"tokens": 130, "length": 64, "seed": 0, "languages": 0.0}
    _, details = make_factors(masked, 8.0, Recipe(method="codebook", weights_text=text_file))
    assert "self_sample" not in details


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["codebook", "aware"])
def test_an_untied_causal_lm_is_fitted_from_its_embedding_alone_and_a_tied_one_samples(tiny, text_file, method,
                                                                                      dtype, monkeypatch):
    # compress() from a path reads the embedding alone where the matrix suffices (docs/scale.md). An untied model's
    # fit never runs the model (it once sampled it through a head left on the meta device: a traceback); a tied
    # one samples, also when the hidden-state metric is off
    import embzip.checkpoint as checkpoint
    from embzip.aware import AwareConfig

    opened = []
    original = checkpoint.open_embedding
    monkeypatch.setattr(checkpoint, "open_embedding", lambda *a, **k: opened.append(original(*a, **k)) or opened[-1])
    size = {"bits": 8.0} if method == "codebook" else {"rank": 4}
    sample = SampleConfig(tokens=16, length=8)
    untied = embzip.compress(tiny("llama-untied", dtype), Recipe(method=method, weights_text=text_file, sample=sample),
                             **size, write=False)[0]
    assert "self_sample" not in untied.meta and len(opened) == 1  # the embedding alone: nothing reopened
    no_metric = Recipe(method=method, weights_text=text_file, sample=sample, aware=AwareConfig(output_metric=0))
    tied = embzip.compress(tiny("llama", dtype), no_metric, **size, write=False)[0]
    assert tied.meta["self_sample"]["tokens"] == 16


@pytest.mark.parametrize("field, value", [("tokens", -1), ("length", 0), ("tokens", 1.5), ("languages", -0.1),
                                          ("languages", 1.5), ("languages", float("nan"))])
def test_bad_sample_settings_are_refused(field, value):
    with pytest.raises(OptionError):
        SampleConfig(**{field: value})


def test_cli_refuses_bad_and_foreign_self_tokens(tiny, tmp_path):
    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    bad = run("fit", tiny("gpt2"), "--self-tokens", "-3", "-o", tmp_path / "a.safetensors")
    assert bad.exit_code == 2 and "self-sample tokens" in bad.stderr and not (tmp_path / "a.safetensors").exists()
    foreign = run("fit", tiny("gpt2"), "--method", "int8", "--self-tokens", "8", "-o", tmp_path / "b.safetensors")
    assert foreign.exit_code == 2
    assert "--self-tokens is an option of --method aware / codebook" in " ".join(foreign.stderr.split())
    assert not (tmp_path / "b.safetensors").exists()


def test_a_head_called_by_keyword_is_read_too(tiny, monkeypatch):
    opened = embzip.open_model(tiny("gpt2"))
    head = opened.model.get_output_embeddings()
    positional = sample_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=16, length=8))
    call = type(head).__call__

    def by_keyword(self, *args, **kwargs):  # as if the model called its head as head(input=h)
        return call(self, input=args[0]) if self is head and args else call(self, *args, **kwargs)

    monkeypatch.setattr(type(head), "__call__", by_keyword)
    keyword = sample_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=16, length=8))
    assert torch.equal(keyword[0], positional[0]) and torch.equal(keyword[1], positional[1])


def test_the_bundled_openings_are_32_languages():
    from embzip.selfsample import openings

    rows = openings()
    assert len(rows) == 32 and len({code for code, _ in rows}) == 32
    assert all(text.strip() == text and len(text) >= 5 for _, text in rows)
    assert "en" not in {code for code, _ in rows}  # the model's free samples are English already


@pytest.mark.parametrize("kind, dtype", [("gpt2", "float32"), ("llama", "bfloat16")])
def test_a_share_of_sequences_is_fed_an_opening_after_the_start_token(tiny, kind, dtype):
    from embzip.selfsample import _forced, start_token

    opened = embzip.open_model(tiny(kind, dtype))
    config = SampleConfig(tokens=48, length=8, languages=0.5, seed=2)
    sequences = 6
    forced = _forced(opened.tokenizer, config, sequences, opened.vocab_size, torch.Generator().manual_seed(2))
    assert sum(1 for f in forced if f) == 3
    fed: list[torch.Tensor] = []
    emb = opened.model.get_input_embeddings()
    handle = emb.register_forward_pre_hook(lambda module, args: fed.append(args[0][:, -1].clone()))
    try:
        counts, _ = sample_statistics(opened.model, opened.tokenizer, config)
    finally:
        handle.remove()
    # sequences x steps: the token fed at each step (a copy the statistics run on checks itself with one token first)
    ids = torch.stack([f for f in fed if len(f) == sequences], dim=1)
    assert ids.shape == (sequences, 8)
    assert (ids[:, 0] == start_token(opened.model, opened.tokenizer)).all()
    for row, prompt in zip(ids, forced):
        assert prompt == [] or row[1:1 + len(prompt)].tolist() == prompt[:7]
    # every position still adds one distribution, forced ones included
    assert counts.sum().item() == pytest.approx(48, rel=1e-4)
    free = sample_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=48, length=8, seed=2))
    assert not torch.equal(counts, free[0])


def test_cli_refuses_a_bad_or_foreign_languages_share(tiny, tmp_path):
    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    bad = run("fit", tiny("gpt2"), "--sample-languages", "1.5", "-o", tmp_path / "a.safetensors")
    assert bad.exit_code == 2 and "languages share (--sample-languages) must be between 0 and 1" in " ".join(bad.stderr.split())
    foreign = run("fit", tiny("gpt2"), "--method", "int4", "--sample-languages", "0.5", "-o", tmp_path / "b.safetensors")
    assert foreign.exit_code == 2
    assert "--sample-languages is an option of --method aware / codebook" in " ".join(foreign.stderr.split())
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
    bench = run("bench", tiny("gpt2"), "--sample-languages", "-1", "--out", tmp_path / "bench")
    assert bench.exit_code == 2 and not (tmp_path / "bench").exists()


@pytest.mark.parametrize("kind, dtype", [("gpt2", "float32"), ("llama", "bfloat16")])
def test_samples_are_cached_on_disk_by_everything_they_depend_on(tiny, kind, dtype, tmp_path, monkeypatch):
    import embzip.selfsample as selfsample

    opened = embzip.open_model(tiny(kind, dtype))
    config = SampleConfig(tokens=24, length=6, seed=1)
    first = selfsample.cached_statistics(opened.model, opened.tokenizer, config, directory=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    calls = []
    real = selfsample.sample_statistics
    monkeypatch.setattr(selfsample, "sample_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = selfsample.cached_statistics(opened.model, opened.tokenizer, config, directory=tmp_path)
    assert calls == [] and torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    # other settings, or a model whose weights differ, sample again under another key
    selfsample.cached_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=24, length=6, seed=2),
                                 directory=tmp_path)
    selfsample.cached_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=24, length=6, seed=1,
                                                                              languages=0.5), directory=tmp_path)
    assert len(calls) == 2
    key = selfsample.fingerprint(opened.model, opened.tokenizer, config)
    with torch.no_grad():
        opened.model.get_input_embeddings().weight[3, 0] += 1
    try:
        assert selfsample.fingerprint(opened.model, opened.tokenizer, config) != key
    finally:
        with torch.no_grad():
            opened.model.get_input_embeddings().weight[3, 0] -= 1
    import embzip.models as models  # statistics in another dtype (a CPU with or without bf16 units) are another key

    native = models.native_bf16()
    monkeypatch.setattr(models, "native_bf16", lambda: not native)
    assert selfsample.fingerprint(opened.model, opened.tokenizer, config) != key
    monkeypatch.setattr(models, "native_bf16", lambda: native)
    # an unreadable file is sampled again and replaced
    files[0].write_bytes(b"not a safetensors file")
    healed = selfsample.cached_statistics(opened.model, opened.tokenizer, config, directory=tmp_path)
    assert len(calls) == 3 and torch.equal(healed[0], first[0])
    assert selfsample.cached_statistics(opened.model, opened.tokenizer, config, directory=tmp_path)[0].equal(first[0])
    assert len(calls) == 3


def test_a_fit_reads_the_samples_a_previous_fit_cached(tiny, text_file, monkeypatch):
    import embzip.selfsample as selfsample

    opened = embzip.open_model(tiny("gpt2"))
    recipe = Recipe(method="codebook", weights_text=text_file, sample=SampleConfig(tokens=16, length=8))
    first, _ = make_factors(opened, 8.0, recipe)
    monkeypatch.setattr(selfsample, "sample_statistics", lambda *a, **k: pytest.fail("sampled again"))
    second, _ = make_factors(embzip.open_model(tiny("gpt2")), 8.0, recipe)  # a new process would open it anew
    assert all(torch.equal(second.tensors()[k], v) for k, v in first.tensors().items())


def test_a_cache_that_cannot_be_written_is_reported_and_the_sample_returned(tiny, tmp_path, caplog):
    from embzip.selfsample import cached_statistics

    opened = embzip.open_model(tiny("gpt2"))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    config = SampleConfig(tokens=16, length=8)
    with caplog.at_level("WARNING", logger="embzip"):
        counts, _ = cached_statistics(opened.model, opened.tokenizer, config, directory=blocked)
    assert counts.sum().item() == pytest.approx(16, rel=1e-4)
    assert "were not cached" in caplog.text and blocked.read_text() == "not a folder"


@pytest.mark.parametrize("bad", ["shape", "nan", "zeros"])
def test_a_cached_sample_that_does_not_fit_the_model_is_sampled_again(tiny, tmp_path, caplog, bad):
    from safetensors.torch import load_file, save_file

    from embzip.selfsample import cached_statistics

    opened = embzip.open_model(tiny("gpt2"))
    config = SampleConfig(tokens=16, length=8)
    first = cached_statistics(opened.model, opened.tokenizer, config, directory=tmp_path)
    [path] = tmp_path.glob("*.safetensors")
    stored = load_file(path)
    if bad == "zeros":  # no sample gives zero counts: a file zeroed in place
        stored = {name: torch.zeros_like(t) for name, t in stored.items()}
    else:
        stored["counts"] = stored["counts"][:7] if bad == "shape" else torch.full_like(stored["counts"], float("nan"))
    (tmp_path / f".{path.name}.999999-00ff00ff.tmp").write_bytes(b"half")  # what a run killed while writing it left
    save_file(stored, path)  # a valid file holding the wrong data
    with caplog.at_level("WARNING", logger="embzip"):
        again = cached_statistics(opened.model, opened.tokenizer, config, directory=tmp_path)
    assert "sampling again" in caplog.text and torch.equal(again[0], first[0])
    assert torch.equal(load_file(path)["counts"], first[0])  # and replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the dead run's temporary file removed


def test_a_signal_while_the_sample_is_cached_leaves_no_temporary_file(tiny, tmp_path, monkeypatch):
    import embzip.selfsample as selfsample

    opened = embzip.open_model(tiny("gpt2"))
    real = selfsample.os.replace

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfsample.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        selfsample.cached_statistics(opened.model, opened.tokenizer, SampleConfig(tokens=16, length=8),
                                     directory=tmp_path)
    monkeypatch.setattr(selfsample.os, "replace", real)
    assert list(tmp_path.iterdir()) == []


def test_one_token_attention_of_a_bfloat16_model_runs_in_float32_within_the_block_only(tiny, monkeypatch):
    import transformers
    from transformers.integrations import sdpa_attention

    from embzip.models import DECODE_ATTENTION, float32_decode_attention

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama", "bfloat16")).eval()
    assert model.config._attn_implementation == "sdpa"
    seen = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda module, q, *args, **kwargs: seen.append((q.shape[2], q.dtype)) or real(module, q, *args,
                                                                                                         **kwargs))

    import inspect

    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5

    def step_logits():  # a prompt, then one step with the KV cache: the query of one token
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[2, 10, 11, 12]]), use_cache=True)
            return model(input_ids=torch.tensor([[13]]), **{cache: getattr(out, cache)}).logits[0, -1].float()

    plain = step_logits()
    with float32_decode_attention(model):
        assert model.config._attn_implementation == DECODE_ATTENTION
        seen.clear()
        fast = step_logits()
    assert model.config._attn_implementation == "sdpa"  # put back
    layers = model.config.num_hidden_layers
    assert seen == [(4, torch.bfloat16)] * layers + [(1, torch.float32)] * layers  # the prompt as it was
    assert torch.allclose(fast, plain, atol=0.02 * plain.abs().max().item())  # bfloat16 rounding apart

    model.set_attn_implementation("eager")  # another implementation is left alone
    with float32_decode_attention(model):
        assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")

    def refuse(name):
        raise ValueError(f"{name} is not supported")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)  # a model that cannot take it runs as it is
    with float32_decode_attention(model):
        assert model.config._attn_implementation == "sdpa" and torch.equal(step_logits(), plain)
