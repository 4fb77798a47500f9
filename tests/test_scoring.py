"""Perplexity protocols on tiny models: known answers, token counting, seeds, chunking, errors."""

import json
import math
import random

import pytest
import torch

import embzip.scoring as ppl_mod
from conftest import TEXT, WORDS
from embzip.errors import DataError, ModelError, OptionError
from embzip.models import open_model
from embzip.scoring import perplexity
from embzip.svd import svd_factors
from embzip.texts import Text, load_text


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot when another process holds the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _long_text(n_lines=12, seed=0) -> Text:
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in ".,"]
    return Text([" ".join(rng.choice(words) for _ in range(rng.randint(20, 70))) for _ in range(n_lines)], "long")


def _stream(opened, text: Text) -> list[int]:
    tok = opened.tokenizer
    return [tok.bos_token_id] + tok(text.joined(), add_special_tokens=False)["input_ids"]


def _zero_head(opened) -> int:
    """Zero the output head so every logit is 0 (uniform); returns the number of logits."""
    head = opened.model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return head.weight.shape[0]


# --- known answers ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert-mlm"])
def test_uniform_logits_give_the_vocabulary_size(tiny, text_file, kind):
    opened = open_model(tiny(kind))
    v = _zero_head(opened)  # llama: includes the 7 padded rows beyond the tokenizer
    text = load_text(text_file) if kind != "bert-mlm" else _long_text()
    out = perplexity(opened, text)
    assert abs(out["perplexity"] - v) / v < 1e-4
    if kind != "bert-mlm":
        assert abs(out["protocol"]["bits_per_byte"] * out["protocol"]["bytes"] - out["tokens"] * math.log2(v)) < 1e-2


def test_causal_equals_the_models_own_loss_when_the_stream_fits_one_window(tiny):
    opened = open_model(tiny("gpt2"))
    text = Text(TEXT.splitlines()[:3], "three lines")
    ids = torch.tensor([_stream(opened, text)])
    assert ids.shape[1] <= 64
    with torch.no_grad():
        expected = math.exp(opened.model(input_ids=ids, labels=ids).loss.item())
    out = perplexity(opened, text, window=64)
    assert out["tokens"] == ids.shape[1] - 1
    assert abs(out["perplexity"] - expected) / expected < 1e-4


def test_sliding_windows_match_a_token_by_token_reference(tiny, text_file):
    opened = open_model(tiny("llama"))
    text = load_text(text_file)
    ids = _stream(opened, text)[:60]
    window, stride = 16, 5
    # Reference: token t (t >= 1) is predicted from the window that first scores it.
    nll, prev = 0.0, 0
    with torch.no_grad():
        while prev < len(ids) - 1:
            end = min(prev + (window if prev == 0 else stride), len(ids) - 1)
            begin = max(0, end - window)
            logits = opened.model(input_ids=torch.tensor([ids[begin:end]])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            nll -= sum(logp[p - begin, ids[p + 1]].item() for p in range(prev, end))
            prev = end
    out = perplexity(opened, text, window=window, stride=stride, max_tokens=59)
    assert out["tokens"] == 59
    assert abs(math.log(out["perplexity"]) - nll / 59) < 1e-5


def test_masked_equals_a_plain_forward_on_the_same_masks(tiny):
    opened = open_model(tiny("bert-mlm"))
    text = _long_text()
    jobs, _, _, _ = ppl_mod._masked_jobs(opened, text, pseudo=False, min_tokens=20, seed=3, max_tokens=None)
    nll = n = 0
    with torch.no_grad():
        for job in jobs:
            logits = opened.model(input_ids=torch.tensor([job.ids])).logits[0]
            nll += torch.nn.functional.cross_entropy(logits[job.positions], torch.tensor(job.labels),
                                                     reduction="sum").item()
            n += len(job.labels)
    out = perplexity(opened, text, seed=3, batch_size=5)
    assert out["tokens"] == n
    assert abs(math.log(out["perplexity"]) - nll / n) < 1e-5


def test_gemma_style_softcapping_is_applied(tmp_path):
    import transformers as tf
    from conftest import _tokenizer

    tok = _tokenizer("causal")
    config = tf.Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 max_position_embeddings=64, final_logit_softcapping=0.5, sliding_window=8,
                                 bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    tf.Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    opened = open_model(str(tmp_path))
    text = Text(TEXT.splitlines()[:3], "three lines")
    ids = torch.tensor([_stream(opened, text)])
    with torch.no_grad():
        expected = math.exp(opened.model(input_ids=ids, labels=ids).loss.item())
    assert abs(perplexity(opened, text)["perplexity"] - expected) / expected < 1e-4


# --- protocol properties -------------------------------------------------------------------------

@pytest.mark.parametrize("window,stride", [(16, 8), (16, 16), (16, 1), (64, 32), (64, 64), (7, 3)])
def test_causal_counts_each_token_once(tiny, window, stride):
    opened = open_model(tiny("gpt2"))
    text = Text(TEXT.splitlines()[:8], "eight lines")
    out = perplexity(opened, text, window=window, stride=stride)
    assert out["tokens"] == len(_stream(opened, text)) - 1
    assert out["protocol"] | {"bits_per_byte": 0} == {"name": "causal-window", "window": window, "stride": stride,
                                                       "bos": True, "bytes": len(text.joined().encode()),
                                                       "bits_per_byte": 0}
    assert out["lines"] == len(text.lines)


def test_causal_stream_shorter_than_the_window(tiny):
    opened = open_model(tiny("gpt2"))
    text = Text(["the people who write about water"], "short")
    out = perplexity(opened, text, window=64, stride=8)
    assert out["tokens"] == len(_stream(opened, text)) - 1 == 6


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bits_per_byte_agree_with_perplexity(tiny, text_file, kind):
    out = perplexity(open_model(tiny(kind)), load_text(text_file), window=32)
    bpb, n_bytes = out["protocol"]["bits_per_byte"], out["protocol"]["bytes"]
    assert abs(bpb * n_bytes * math.log(2) - math.log(out["perplexity"]) * out["tokens"]) < 1e-6 * out["tokens"]


def test_causal_max_tokens_truncates_the_stream(tiny, text_file):
    text = load_text(text_file)
    out = perplexity(open_model(tiny("gpt2")), text, max_tokens=25)
    assert out["tokens"] == 25
    assert 0 < out["protocol"]["bytes"] < len(text.joined().encode()) and out["lines"] == 2


def test_masked_is_deterministic_under_a_seed(tiny):
    opened, text = open_model(tiny("bert-mlm")), _long_text()
    a, b, c = (perplexity(opened, text, seed=s) for s in (0, 0, 1))
    assert a["perplexity"] == b["perplexity"] and a["tokens"] == b["tokens"]
    assert c["perplexity"] != a["perplexity"]
    assert a["protocol"]["name"] == "masked-wwm" and a["protocol"]["mask_prob"] == 0.15 and a["lines"] == 12


def test_masked_lines_are_filtered_and_max_tokens_stops_after_a_line(tiny):
    opened = open_model(tiny("bert-mlm"))
    long = _long_text(4)
    text = Text(["= heading with many words " * 5, "", "the people who write"] + long.lines, "mixed")
    assert perplexity(opened, text)["lines"] == 4
    out = perplexity(opened, text, max_tokens=1)
    assert out["lines"] == 1 and out["tokens"] >= 1


def test_pseudo_perplexity_masks_every_token_once(tiny):
    opened, text = open_model(tiny("bert-mlm")), _long_text(3)
    out = perplexity(opened, text, pseudo=True, batch_size=16)
    n_tokens = sum(len(opened.tokenizer(line, add_special_tokens=False)["input_ids"]) for line in text.lines)
    assert out["tokens"] == n_tokens and out["protocol"]["name"] == "pseudo"
    assert math.isfinite(out["perplexity"]) and out["perplexity"] > 1


@pytest.mark.parametrize("kind", ["bert-mlm", "llama"])
def test_chunked_loss_equals_unchunked(tiny, text_file, kind, monkeypatch):
    opened = open_model(tiny(kind))
    text = _long_text() if kind == "bert-mlm" else load_text(text_file)
    window = {} if kind == "bert-mlm" else {"window": 32}  # a masked LM is scored line by line: no window
    whole = perplexity(opened, text, **window)["perplexity"]
    monkeypatch.setattr(ppl_mod, "_CHUNK", 3)
    assert abs(perplexity(opened, text, **window)["perplexity"] - whole) / whole < 1e-6


def test_batch_size_does_not_change_the_result(tiny):
    opened, text = open_model(tiny("bert-mlm")), _long_text()
    one, many = (perplexity(opened, text, batch_size=b)["perplexity"] for b in (1, 7))
    assert abs(one - many) / one < 1e-5


# --- with factors --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert-mlm", "llama"])
def test_full_rank_factors_keep_perplexity_on_the_same_masks(tiny, text_file, kind):
    opened = open_model(tiny(kind))
    text = _long_text() if kind == "bert-mlm" else load_text(text_file)
    plain = perplexity(opened, text, seed=5)
    factors = svd_factors(opened.embedding.detach(), opened.hidden_size)
    out = perplexity(opened, text, seed=5, factors=factors)
    assert out["perplexity_original"] == plain["perplexity"]
    assert abs(out["ratio"] - 1) < 1e-3 and out["head"] == "tied"
    assert abs(out["perplexity"] / out["perplexity_original"] - out["ratio"]) < 1e-9 * out["ratio"]
    if kind == "llama":
        assert out["bits_per_byte_original"] == plain["protocol"]["bits_per_byte"]
    low = perplexity(opened, text, seed=5, factors=svd_factors(opened.embedding.detach(), 2))
    assert abs(low["ratio"] - 1) > 1e-3
    assert torch.equal(opened.embedding, open_model(tiny(kind)).embedding)  # restored after splicing
    if kind == "llama":  # tied: compressing the input side only is a different, labelled result
        inp = perplexity(opened, text, factors=svd_factors(opened.embedding.detach(), 2), head="input")
        assert inp["head"] == "input" and inp["perplexity_original"] == plain["perplexity"]
        assert inp["perplexity"] != low["perplexity"]


# --- errors --------------------------------------------------------------------------------------

def test_encoder_has_no_perplexity_and_asks_for_factors(tiny, text_file):
    with pytest.raises(ModelError, match="no LM head.*--factors FILE.*embzip bench") as caught:
        perplexity(open_model(tiny("bert-encoder")), load_text(text_file))
    assert caught.value.exit_code == 2  # the command line lacks --factors: exit 2, as a missing option's


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_encoders_factors_get_their_sentence_vector_fidelity(tiny, text_file, dtype):
    """perplexity --factors on an encoder: sentence-vector fidelity, the measure bench reports for encoders.
    Factors that rebuild the matrix (full rank) keep every vector; rank 1 does not; the model is restored."""
    opened = open_model(tiny("bert-encoder", dtype))
    before = opened.embedding.detach().clone()
    text = load_text(text_file)
    d = opened.embedding.shape[1]
    exact = perplexity(opened, text, factors=svd_factors(opened.embedding.detach().float(), d))
    crude = perplexity(opened, text, factors=svd_factors(opened.embedding.detach().float(), 1))
    assert exact["protocol"] == {"name": "sentence-fidelity", "sentences": exact["protocol"]["sentences"],
                                 "pooling": "mean"} and exact["protocol"]["sentences"] >= 2
    assert exact["fidelity"] > 0.999 and exact["similarity_spearman"] > 0.99
    assert crude["fidelity"] < exact["fidelity"] - 0.01
    assert "perplexity" not in exact and exact["model"] == opened.source and exact["head"] == "input"
    assert torch.equal(opened.embedding, before)  # the spliced factors are taken out again


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=8), "--window is for an LM's perplexity"), (dict(pseudo=True), "--pseudo is for"),
    (dict(max_tokens=10, stride=4), "--stride, --max-tokens are for"), (dict(head="tied"), "no output head"),
])
def test_an_encoder_refuses_what_only_perplexity_takes(tiny, text_file, kwargs, message):
    opened = open_model(tiny("bert-encoder"))
    with pytest.raises(OptionError, match=message):
        perplexity(opened, load_text(text_file), factors=svd_factors(opened.embedding.detach(), 2), **kwargs)


def test_masked_needs_a_line_of_20_tokens(tiny, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("= a heading that is long enough but is a heading , so it is skipped . " * 2 + "\n"
                    + "the people who write about water said that it was hot .\n" * 30)
    with pytest.raises(DataError, match="no line of at least 20 tokens in file:"):
        perplexity(open_model(tiny("bert-mlm")), load_text(str(path)))


def test_masked_needs_a_mask_token(tiny):
    opened = open_model(tiny("bert-mlm"))
    opened.tokenizer.mask_token = None
    with pytest.raises(DataError, match="no mask token"):
        perplexity(opened, _long_text())


def test_causal_needs_two_tokens(tiny):
    with pytest.raises(DataError, match="at least 2"):
        perplexity(open_model(tiny("gpt2")), Text(["   "], "blank"))


@pytest.mark.parametrize("window,stride,fragment", [(65, None, "longer than the 64 positions"),
                                                    (16, 17, "stride 17 must be between 1 and")])
def test_bad_windows_are_refused(tiny, text_file, window, stride, fragment):
    with pytest.raises(OptionError, match=fragment):  # option values: exit code 2 in the CLI
        perplexity(open_model(tiny("gpt2")), load_text(text_file), window=window, stride=stride)


def test_unknown_logit_post_processing_is_refused(tiny, text_file):
    opened = open_model(tiny("gpt2"))
    opened.model.config.final_logit_softcapping = 0.5  # we would cap, the model does not
    with pytest.raises(ModelError, match="post-processes its logits"):
        perplexity(opened, load_text(text_file))


@pytest.mark.parametrize("content,fragment", [("", "is empty"), ("\n  \n\t\n", "is empty")])
def test_empty_text_files_are_refused(tmp_path, content, fragment):
    path = tmp_path / "t.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        load_text(str(path))


def test_load_text_sources_and_errors(tmp_path, text_file):
    text = load_text(text_file)
    assert text.source == f"file:{text_file}" and text.lines == TEXT.splitlines()
    with pytest.raises(DataError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(OptionError, match="not both"):  # an option error: exit code 2 in the CLI
        load_text(text_file, dataset="wikitext")
    with pytest.raises(DataError, match="no bundled text sample 'nope'"):
        load_text(sample="nope")
    with pytest.raises(DataError, match="could not load dataset 'no-such-dataset-embzip:x'.*name\\[:config"):
        load_text(dataset="no-such-dataset-embzip:x")


def test_dataset_spec_reads_a_local_dataset(tmp_path):
    from embzip.texts import load_text as load

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.txt").write_text("first line of the test split\nsecond line\n")
    (tmp_path / "ds" / "train.txt").write_text("a training line\n")
    assert load(dataset=str(tmp_path / "ds")).lines == ["first line of the test split", "second line"]
    assert load(dataset=f"{tmp_path / 'ds'}::train").lines == ["a training line"]


def test_a_dataset_is_read_from_its_text_column_named_in_the_source(tmp_path):
    from embzip.texts import load_text as load

    # no 'text' column: the string column holding the text, not the first one (a one-word label per row)
    (tmp_path / "ds").mkdir()
    rows = [{"label": tag, "sentence": line} for tag, line in zip(["positive", "negative"] * 3, TEXT.splitlines())]
    (tmp_path / "ds" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = load(dataset=str(tmp_path / "ds"))
    assert text.lines == TEXT.splitlines()[:6] and text.source.endswith("(column sentence)")


def test_a_dataset_that_is_a_missing_folder_or_a_file_is_refused_as_the_command_lines_mistake(tmp_path, text_file,
                                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    for spec, fragment in [(str(tmp_path / "nope"), "does not exist"), ("./nope", "does not exist"),
                           ("org/nope", "does not exist"), (text_file, "is a file, not a dataset; give a text file "
                                                                       "as the text \\(--text\\)")]:
        with pytest.raises(DataError, match=fragment) as caught:
            load_text(dataset=spec)
        assert caught.value.exit_code == 2  # no hub lookup, no "could not reach the Hub"


def test_fidelity_needs_three_sentences_for_its_rank_correlation():
    from embzip.fidelity import sentences

    two = Text(["one two three four five. six seven eight nine ten."], "two sentences")  # one pair: no ranks
    with pytest.raises(DataError, match="need at least 3 sentences of 5\\+ words in two sentences for fidelity"):
        sentences(two)


def test_a_byte_order_mark_is_not_text(tmp_path, text_file):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + open(text_file, "rb").read())
    assert load_text(str(path)).lines == load_text(text_file).lines


def test_a_loss_that_is_not_a_number_is_reported_as_nan_not_as_an_overflow():
    assert math.isnan(ppl_mod._exp(math.nan)) and ppl_mod._exp(800.0) == math.inf


def test_masked_lines_cut_at_the_models_length_are_counted_and_said(tiny, tmp_path, caplog):
    import logging

    opened = open_model(tiny("bert-mlm"))
    long = " ".join(WORDS * 20)  # longer than the tiny model's 64 positions
    with caplog.at_level(logging.WARNING, logger="embzip"):
        result = perplexity(opened, Text([long, " ".join(WORDS[:30])], "two lines"))
    assert result["protocol"]["lines_at_max_length"] == 1
    assert "1 of the 2 lines scored fill the model's length" in caplog.text


def test_a_tied_head_asked_of_an_untied_model_is_refused_before_any_scoring(tiny, text_file, monkeypatch):
    import embzip.scoring as scoring
    from embzip.errors import OptionError

    opened = open_model(tiny("llama-untied"))
    factors = svd_factors(opened.embedding.detach(), 3)
    monkeypatch.setattr(scoring, "_causal_jobs", lambda *a, **k: pytest.fail("scored before the head was checked"))
    with pytest.raises(OptionError, match=r"\(--head tied\) needs an output head tied to the embedding"):
        perplexity(opened, load_text(text_file), factors=factors, head="tied")


@pytest.mark.parametrize("kind, options, fragment", [
    ("bert-mlm", dict(window=8), r"window and stride \(--window, --stride\) are for causal LMs"),
    ("bert-mlm", dict(stride=4), r"window and stride \(--window, --stride\) are for causal LMs"),
    ("gpt2", dict(head="input"), r"head \(--head\) says how factors \(--factors\) are spliced in"),
])
def test_options_that_would_change_nothing_are_refused(tiny, text_file, kind, options, fragment):
    with pytest.raises(OptionError, match=fragment):
        perplexity(open_model(tiny(kind)), load_text(text_file), **options)


def test_perplexity_names_arguments_of_the_wrong_type(tiny):
    from embzip.texts import load_text

    opened = open_model(tiny("llama"))
    with pytest.raises(TypeError, match="text must be a Text from embzip.load_text"):
        perplexity(opened, 123)
    with pytest.raises(TypeError, match="opened must be a model opened by embzip.open_model"):
        perplexity(tiny("llama"), load_text(None))


@pytest.mark.parametrize("method", ["int4", "int8", "codebook"])
def test_a_measurement_does_not_depend_on_how_many_positions_a_pass_scores(tiny, text_file, method, monkeypatch):
    """A compressed tied head takes a generation step's rounding shortcut (torch's fused int8 / int4 kernels in
    bfloat16; a codebook's tables in bfloat16 where the CPU has bfloat16 units) for few hidden states, but not
    while perplexity measures: a batch of one window scoring 4 positions gives what a batch of all of them gives,
    and what the decoded matrix written into the model gives."""
    from embzip import models
    from embzip.codebook import Codebook, CodebookConfig, fit_codebook
    from embzip.compressed import exact_heads, step_shortcuts
    from embzip.quant import Quantized, quantize_int4, quantize_int8
    from embzip.splice import densify
    from embzip.texts import load_text

    monkeypatch.setattr(models, "native_bf16", lambda: True)
    opened, text = open_model(tiny("gpt2")), load_text(text_file)
    weight = opened.embedding.detach()
    factors = {"int4": lambda: Quantized(quantize_int4(weight)), "int8": lambda: Quantized(quantize_int8(weight)),
               "codebook": lambda: Codebook(fit_codebook(weight, config=CodebookConfig(
                   bits=6, centroids=16, sample=1024, iterations=3, min_piece_dim=2)))}[method]()
    scored = {bs: perplexity(opened, text, factors=factors, window=16, stride=4, batch_size=bs)
              for bs in (1, 64)}
    assert scored[1]["tokens"] == scored[64]["tokens"] > 64  # many passes of 4 scored positions, and one of all
    densify(opened.model, factors, "tied")
    dense = perplexity(opened, text, window=16, stride=4, batch_size=64)["mean_nll"]
    for bs in (1, 64):
        assert scored[bs]["mean_nll"] == pytest.approx(dense, rel=1e-5, abs=1e-5), bs
    assert step_shortcuts()
    with exact_heads():
        assert not step_shortcuts()
    assert step_shortcuts()


def test_a_model_whose_embedding_holds_nan_is_refused_rather_than_scored_as_null(tiny, text_file, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from embzip.texts import load_text

    source = tmp_path / "model"
    shutil.copytree(tiny("llama"), source)
    weights = load_file(str(source / "model.safetensors"))
    weights["model.embed_tokens.weight"][10, 3] = float("nan")
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"has NaN or Inf in 1 row\(s\), first row 10; fix the checkpoint before "
                                        "scoring it"):
        perplexity(open_model(str(source)), load_text(text_file))
