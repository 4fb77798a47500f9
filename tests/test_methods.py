"""The methods package: one interface, sizes by rank or bits, and every kind spliced, applied and reloaded."""

import json

import pytest
import torch
from typer.testing import CliRunner

from embzip.cli import Method, app
from embzip.errors import RankError
from embzip.factors import load_factors
from embzip.heal import HealConfig
from embzip.methods import REGISTRY, Recipe, recipe, resolve_size

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_cli_offers_exactly_the_registered_methods():
    assert {m.value for m in Method} == set(REGISTRY)


@pytest.mark.parametrize("dtype,stored", [(torch.float32, 16), (torch.bfloat16, 16)])
def test_bits_pick_the_largest_rank_that_fits(dtype, stored):
    vocab, hidden = 1000, 64
    rank = resolve_size(recipe("svd"), bits=4.0, vocab=vocab, hidden=hidden, dtype=dtype)
    bpw = lambda k: stored * (vocab * k + k * hidden) / (vocab * hidden)  # noqa: E731
    assert bpw(rank) <= 4.0 < bpw(rank + 1)


@pytest.mark.parametrize("method,kwargs,fragment", [
    ("int4", dict(bits=2.0), "stores 5 bits per weight for this embedding and cannot reach 2"),
    ("int8", dict(bits=4.0), "cannot reach 4"),
    ("codebook", dict(rank=8), "takes no --rank"),
    ("int8", dict(rank=8), "takes no --rank"),
    ("svd", dict(bits=0.001), "no rank of svd fits in 0.001 bits per weight"),
    ("svd", dict(), "needs a size"),
    ("svd", dict(rank=4, bits=2.0), r"not rank \(--rank\) and bits \(--bits\)"),
    ("codebook", dict(bits=40.0), r"bits \(--bits\) must be more than 0 and less than 32"),
])
def test_sizes_a_method_cannot_reach_are_refused(method, kwargs, fragment):
    with pytest.raises(RankError, match=fragment):
        resolve_size(recipe(method), vocab=1000, hidden=64, dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("method,kwargs,dtype,fragment", [
    ("svd", dict(ratio=float("inf")), torch.float32, r"ratio \(--ratio\) must be a finite number greater than 1, got inf"),
    ("codebook", dict(ratio=float("inf")), torch.float32, r"ratio \(--ratio\) must be a finite number greater than 1, got inf"),
    ("svd", dict(ratio=1000.0), torch.float32, r"no rank reaches a compression ratio of 1000.0"),
    ("codebook", dict(ratio=1000.0), torch.float32, r"ratio \(--ratio\) 1000 is 0.032 bits per weight for this float32 "
                                                    r"embedding: .*give more bits"),
    ("int4", dict(ratio=100.0), torch.bfloat16, r"ratio \(--ratio\) 100 is 0.16 bits per weight for this bfloat16 embedding: "
                                                r"method int4 stores"),
    ("svd", dict(bits=16.0), torch.bfloat16, r"bits \(--bits\) must be more than 0 and less than 16, the embedding's own bits "
                                             r"per weight \(bfloat16\), got 16.0"),
    ("svd", dict(rank=33), torch.float32, r"rank 33 is more than a 105 x 32 embedding has"),
    ("svd", dict(rank=25), torch.bfloat16, r"rank 25 saves nothing for a 105 x 32 embedding"),
])
def test_sizes_are_refused_in_the_terms_they_were_given(method, kwargs, dtype, fragment):
    with pytest.raises(RankError, match=fragment):
        resolve_size(recipe(method), vocab=105, hidden=32, dtype=dtype, **kwargs)


def test_low_rank_sizes_of_a_float32_model_count_the_16_bit_bytes_stored():
    """A float32 model's factors are stored in float16: rank 25 of a 105 x 32 matrix takes 6,850 bytes of its 13,440,
    so it is taken, and --ratio 1.5 / --bits 30 get the full rank 32 (21 bits per weight), not rank 24's 2x."""
    size = dict(vocab=105, hidden=32, dtype=torch.float32)
    assert resolve_size(recipe("svd"), rank=25, **size) == 25
    assert resolve_size(recipe("svd"), ratio=1.5, **size) == 32
    assert resolve_size(recipe("svd"), bits=30.0, **size) == 32
    assert resolve_size(recipe("svd"), ratio=2.0, **size) == 24  # 6,576 bytes: 2.04x; rank 25 gives 1.96x


@pytest.mark.parametrize("vocab,hidden", [(1000, 64), (30522, 384), (262144, 640)])
def test_a_codebook_budget_too_small_is_refused_with_the_least_one_that_fits(vocab, hidden):
    with pytest.raises(RankError, match="give more bits: the least it holds here is ") as refused:
        resolve_size(recipe("codebook"), bits=0.01, vocab=vocab, hidden=hidden, dtype=torch.float32)
    least = float(str(refused.value).split("the least it holds here is ")[1].split(",")[0])
    assert resolve_size(recipe("codebook"), bits=least, vocab=vocab, hidden=hidden, dtype=torch.float32) == least
    with pytest.raises(RankError):  # three significant digits, rounded up: a little less does not fit
        resolve_size(recipe("codebook"), bits=least * 0.99, vocab=vocab, hidden=hidden, dtype=torch.float32)


@pytest.mark.parametrize("vocab,hidden", [(5, 32), (105, 1)])
def test_a_matrix_too_small_for_any_codebook_is_refused_without_asking_for_more_bits(vocab, hidden):
    for bits in (4.0, 16.0):
        with pytest.raises(RankError, match=rf"^codebook: a {vocab} x {hidden} matrix is too small for codebooks at any "
                                            r"budget up to 16 bits per weight .*; use int8, int4 or svd$"):
            resolve_size(recipe("codebook"), bits=bits, vocab=vocab, hidden=hidden, dtype=torch.float32)


def test_compress_refuses_a_file_it_would_not_write(tiny, tmp_path):
    from embzip import compress
    from embzip.errors import OptionError

    with pytest.raises(OptionError, match="write=False writes none"):
        compress(tiny("gpt2"), "svd", rank=2, out=tmp_path / "f.safetensors", write=False)
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert-mlm"])
@pytest.mark.parametrize("method", ["int8", "int4", "codebook"])
def test_fit_then_apply_reloads_the_same_logits_and_shrinks(tiny, tmp_path, kind, method, text_file):
    f = tmp_path / "f.safetensors"
    extra = ["--bits", 12, "--weights-text", text_file] if method == "codebook" else []  # tiny: the d x d transform alone is 5 bpw
    result = run("fit", tiny(kind), "--method", method, "-o", f, "--json", "-q", *extra)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    factors = load_factors(f)
    assert summary["bits_per_weight"] == pytest.approx(factors.bits_per_weight())
    assert summary["bytes_after"] == factors.stored_bytes() < summary["bytes_before"]
    out = tmp_path / "dir"
    result = run("apply", tiny(kind), f, "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    applied = json.loads(result.stdout)
    assert applied["reload_max_abs_diff"] == 0.0
    assert applied["weights_file_bytes_after"] < applied["weights_file_bytes_before"]
    if kind == "llama":  # tied: the file shrinks by exactly the embedding's bytes less what is stored (+ header)
        expected = applied["weights_file_bytes_before"] - summary["bytes_before"] + factors.stored_bytes()
        assert abs(applied["weights_file_bytes_after"] - expected) < 4096
    from safetensors import safe_open

    with safe_open(str(out / "embzip.safetensors"), "pt") as st:
        dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
    assert ("I8" if method == "int8" else "U8") in dtypes  # the compact form is what is stored
    # the directory holds buffers only for its embedding: `info` describes it, a second `apply` is refused
    result = run("info", out, "--json")
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["factored"] and described["dtype"] == "float32" and described["vocab_size"] == summary["vocab_size"]
    # its share is what the embedding stores now, against the model's stored numbers (both as param_stats counts)
    assert described["model_params"] == applied["params_after"]
    assert described["embedding_share"] == pytest.approx(factors.num_params() / applied["params_after"])
    assert described["bits_per_weight"] == pytest.approx(factors.bits_per_weight())  # as stored in the directory
    result = run("apply", out, f, "--out", tmp_path / "again")
    assert result.exit_code == 1 and "already compressed" in result.stderr and not (tmp_path / "again").exists()


@pytest.mark.parametrize("method, lookup", [("int4", None), ("int4", True), ("codebook", True), ("codebook", False)])
def test_the_compressed_head_equals_a_dense_head_of_the_rebuilt_matrix(tiny, method, lookup, text_file, monkeypatch):
    import embzip
    import embzip.codebook
    import embzip.quant
    import embzip.splice
    from embzip.splice import spliced

    if lookup is False:  # the codebook head multiplies stage by stage instead of summing per-piece tables
        monkeypatch.setattr(embzip.codebook, "_LOOKUP_LIMIT", 0)
    if method == "int4" and not lookup:  # int4 decodes blocks of rows instead of handing few states to its kernel
        monkeypatch.setattr(embzip.quant, "_FUSED_STATES", {"int8": 0, "int4": 0})
    monkeypatch.setattr(embzip.splice, "_HEAD_CHUNK_CPU", 10 * 32)  # decoding: blocks of 10 rows, several per head
    # the tables' way keeps float32 tables (a CPU with bfloat16 units rounds them: test_codebook checks that)
    monkeypatch.setattr(embzip.models, "native_bf16", lambda: False)
    monkeypatch.setattr(embzip.codebook, "_STAGE_BLOCK", 16 * 32)  # stage by stage: blocks of 16 rows
    looked, staged = [], []
    original_lookup, original_stages = embzip.codebook.lookup_logits, embzip.codebook.stage_logits
    monkeypatch.setattr(embzip.codebook, "lookup_logits",
                        lambda *a: looked.append(original_lookup(*a)) or looked[-1])
    monkeypatch.setattr(embzip.codebook, "stage_logits",
                        lambda *a: staged.append(original_stages(*a)) or staged[-1])

    opened = embzip.open_model(tiny("llama"))
    from embzip.codebook import CodebookConfig

    # a fifth of 9 bits per weight to the focus stage: on a 112-row vocabulary with 4 centroids that pays for its
    # codebook and ~80 rows
    r = recipe(method, weights_text=text_file,
               **({"codebook": CodebookConfig(focus=0.2, centroids=4)} if method == "codebook" else {}))
    size = resolve_size(r, bits=9.0 if method == "codebook" else None, vocab=opened.vocab_size,
                        hidden=opened.hidden_size, dtype=torch.float32)
    factors, _ = embzip.compress(opened, r, bits=9.0 if method == "codebook" else None, write=False)
    # a codebook's last stage codes some rows only (the focus stage): the head must add it to those rows alone
    rows = [t for name, t in factors.tensors().items() if name.endswith(".rows")]
    assert [0 < len(t) < opened.vocab_size for t in rows] == ([True] if method == "codebook" else [])
    ids = torch.tensor([[2, 5, 9, 11, 40]])
    with torch.no_grad(), spliced(opened.model, factors, "tied"):
        compressed = opened.model(input_ids=ids).logits
    weight = opened.model.get_input_embeddings().weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(factors.reconstruct())
        dense = opened.model(input_ids=ids).logits
        weight.copy_(original)
        plain = opened.model(input_ids=ids).logits
    assert size is None or size == 9.0
    assert bool(looked) == (method == "codebook") and all((t is not None) == lookup for t in looked)
    assert bool(staged) == (lookup is False)
    # int4's kernel takes and returns bfloat16: the logits agree to about one bf16 step of the largest
    tol = 2**-7 * dense.abs().max().item() if method == "int4" and lookup else 1e-5
    assert torch.allclose(compressed, dense, atol=tol)
    assert not torch.allclose(compressed, plain, atol=1e-3)  # it really is compressed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["int4", "codebook"])
def test_a_cached_head_gives_the_compact_heads_logits_and_follows_its_tensors(tiny, method, dtype, text_file, tmp_path,
                                                                             monkeypatch):
    import embzip

    monkeypatch.setattr(embzip.models, "native_bf16", lambda: False)  # float32 tables for a float32 step
    from embzip.modeldir import apply_factors, load_model
    from embzip.splice import cache_decoded_head

    opened = embzip.open_model(tiny("llama"), dtype=str(dtype).removeprefix("torch."))
    bits = 12.0 if method == "codebook" else None
    factors, _ = embzip.compress(opened, recipe(method, weights_text=text_file), bits=bits, write=False)
    apply_factors(opened, factors, tmp_path / "dir")
    model = load_model(tmp_path / "dir")
    ids = torch.tensor([[2, 5, 9, 11, 40]])
    with torch.no_grad():
        compact = model(input_ids=ids).logits
        assert cache_decoded_head(model)
        cached = model(input_ids=ids).logits
        head = model.get_output_embeddings()
        matrix = head.cached_matrix
        assert matrix.shape == (opened.vocab_size, opened.hidden_size) and matrix.dtype == dtype
        assert not any(t is matrix for t in model.state_dict().values())  # never saved
        # a float32 codebook: the same numbers summed in another order; bf16: the compact codebook head works in
        # float32 and rounds the logits, the cached one multiplies rows rounded to bf16; int4, five states: the
        # compact head's fused kernel works in bf16. So they agree to a few bf16 steps of the largest logit
        exact = dtype == torch.float32 and method == "codebook"
        tol = 1e-5 if exact else 2**-6 * compact.abs().max().item()
        assert torch.allclose(cached, compact, atol=tol, rtol=tol)
        # the stored tensors change: the cache decodes again instead of serving stale rows
        stored = next(t for t in model.get_input_embeddings().stored().values() if t.is_floating_point())
        stored.mul_(2)
        changed_compact = (cache_decoded_head(model, False), model(input_ids=ids).logits)[1]
        assert head.cached_matrix is None  # turned off: the matrix is let go
        cache_decoded_head(model)
        assert not torch.allclose(changed_compact, compact, atol=1e-3)
        assert torch.allclose(model(input_ids=ids).logits, changed_compact, atol=tol, rtol=tol)
    again = load_model(tmp_path / "dir", cache_head=True)
    assert again.get_output_embeddings().cache_decoded
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, compact, atol=tol, rtol=tol)
    assert not cache_decoded_head(embzip.open_model(tiny("llama")).model)  # a dense head: nothing to cache


@pytest.mark.parametrize("method", ["int4", "codebook"])
def test_a_cached_head_works_on_a_model_loaded_and_run_under_inference_mode(tiny, method, text_file, tmp_path,
                                                                            monkeypatch):
    import embzip
    from embzip.modeldir import apply_factors, load_model

    monkeypatch.setattr(embzip.models, "native_bf16", lambda: False)  # float32 tables for a float32 step
    opened = embzip.open_model(tiny("llama"))
    factors, _ = embzip.compress(opened, recipe(method, weights_text=text_file),
                                 bits=12.0 if method == "codebook" else None, write=False)
    apply_factors(opened, factors, tmp_path / "dir")
    ids = torch.tensor([[2, 5, 9, 11, 40]])
    with torch.no_grad():
        expected = load_model(tmp_path / "dir")(input_ids=ids).logits
    with torch.inference_mode():  # its tensors are inference tensors, which keep no version counter
        model = load_model(tmp_path / "dir", cache_head=True)
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    # the compact int4 head hands five states to its bf16 kernel: a bf16 step of the largest logit apart
    tol = 1e-5 if method == "codebook" else 2**-7 * expected.abs().max().item()
    assert torch.allclose(first, expected, atol=tol) and torch.equal(first, second)


@pytest.mark.parametrize("args,fragment", [
    (["--method", "int4", "--bits", "3"], "stores 5 bits per weight"),
    (["--method", "codebook", "--rank", "3"], "takes no --rank"),
    (["--method", "aware", "--epochs", "3"], "--epochs is an option of --method paper, not of aware"),
    (["--method", "int8", "--weights-text", "x.txt"], "--weights-text is an option of the methods that read a text"),
    (["--method", "svd", "--weights-text", "x.txt"], "(wsvd, aware, codebook; paper with --weighted), not of svd"),
    (["--method", "paper", "--rank", "3", "--weights-text", "x.txt"], "not of paper; give --weighted with it"),
    (["--method", "paper", "--rank", "3", "--weight-power", "0.5"], "not of paper; give --weighted with it"),
    (["--method", "codebook", "--group-size", "16"], "--group-size is an option of --method int4"),
    (["--method", "int8", "--heal-steps", "3"], "--heal-steps is an option of the low-rank and codebook methods, not of int8"),
    (["--method", "codebook", "--bits", "2", "--heal-lr", "0.1"], "--heal-lr sets how healing learns: give --heal-steps"),
    (["--method", "svd", "--keep-norms"], "--keep-norms is an option of --method wsvd / aware"),
    (["--method", "aware", "--focus", "0.2"], "--focus is an option of --method codebook, not of aware"),
    (["--method", "int4", "--code-unreachable"], "--code-unreachable is an option of --method codebook, not of int4"),
    (["--method", "svd", "--min-piece-dim", "2"], "--min-piece-dim is an option of --method codebook, not of svd"),
    (["--method", "codebook", "--min-piece-dim", "0.5"], "min_piece_dim (--min-piece-dim) must be a number >= 1, got 0.5"),
    (["--method", "codebook", "--bits", "2", "--focus", "1"], "focus (--focus) must be a share of the budget in [0, 1), got 1"),
    (["--method", "codebook", "--bits", "2", "--focus", "-0.5"], "focus (--focus) must be a share of the budget"),
])
def test_options_of_another_method_are_refused(tiny, tmp_path, args, fragment):
    size = [] if "--bits" in args or "--rank" in args else ["--rank", 2]
    result = run("fit", tiny("gpt2"), *size, "-o", tmp_path / "f.safetensors", *args)
    assert result.exit_code == 2
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "f.safetensors").exists()


def test_a_whole_number_of_bits_is_a_budget_not_a_rank(tiny, text_file, tmp_path, monkeypatch):
    import embzip

    monkeypatch.chdir(tmp_path)
    opened = embzip.open_model(tiny("llama"))
    size = resolve_size(recipe("codebook"), bits=12, vocab=opened.vocab_size, hidden=opened.hidden_size,
                        dtype=torch.float32)
    assert isinstance(size, float) and size == 12.0
    factors, summary = embzip.compress(opened, recipe("codebook", weights_text=text_file), bits=12)
    assert summary["out"].endswith(".codebook-12b.safetensors") and factors.meta["size"] == 12.0


@pytest.mark.parametrize("build", [lambda: Recipe(method="bogus"), lambda: recipe("svd+magic"),
                                   lambda: Recipe(method="int8", heal=HealConfig())])
def test_a_bad_recipe_is_an_option_error(build):
    from embzip.errors import EmbzipError, OptionError

    with pytest.raises(OptionError) as caught:  # an EmbzipError (exit 2 from the CLI), still a ValueError
        build()
    assert isinstance(caught.value, EmbzipError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("method", ["int8", "int4", "codebook"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_padded_batch_generates_with_a_compact_head(tiny, tmp_path, method, dtype, text_file):
    import torch
    import transformers

    from embzip.modeldir import load_model

    f, out = tmp_path / "f.safetensors", tmp_path / "dir"
    extra = ["--bits", 12, "--weights-text", text_file] if method == "codebook" else []
    assert run("fit", tiny("llama", dtype), "--method", method, "-o", f, "-q", *extra).exit_code == 0
    assert run("apply", tiny("llama", dtype), f, "--out", out, "-q").exit_code == 0
    model = load_model(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(["the water", "a long day in the sun"], return_tensors="pt", padding=True)
    # each step's head sees hidden[:, -1:], a view that is not contiguous (the int4 kernel refused it in bfloat16)
    made = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert made.shape == (2, batch.input_ids.shape[1] + 3)
    alone = model.generate(**tokenizer(["a long day in the sun"], return_tensors="pt"), max_new_tokens=3,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert made[1, -3:].tolist() == alone[0, -3:].tolist()  # the unpadded row generates as it does alone


@pytest.mark.parametrize("method", ["svd", "int8", "int4", "codebook"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_ids_outside_the_vocabulary_are_refused_as_nn_embedding_does(tiny, tmp_path, method, dtype, text_file):
    import torch

    from embzip.modeldir import load_model

    f, out = tmp_path / "f.safetensors", tmp_path / "dir"
    size = {"svd": ["--rank", 3], "codebook": ["--bits", 12, "--weights-text", text_file]}.get(method, [])
    command = ["svd"] if method == "svd" else ["fit", "--method", method]
    assert run(*command[:1], tiny("llama", dtype), *command[1:], *size, "-o", f, "-q").exit_code == 0
    assert run("apply", tiny("llama", dtype), f, "--out", out, "-q").exit_code == 0
    emb = load_model(out).get_input_embeddings()
    vocab = emb.num_embeddings
    assert emb(torch.tensor([[0, vocab - 1]])).shape == (1, 2, emb.embedding_dim)
    for bad in (-1, -100, vocab):  # a label's ignore index, or an id of a larger tokenizer: no row read silently
        with pytest.raises(IndexError):
            emb(torch.tensor([[5, bad]]))
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, emb.embedding_dim)


@pytest.mark.parametrize("kind,dtype,args,fragment", [
    ("bert-mlm", "float32", ["--rank", 3, "--self-tokens", 64], "only a causal LM with a tied head gives"),
    ("bert-encoder", "bfloat16", ["--bits", 12, "--sample-languages", 0.3], "is an encoder without a tied head"),
    ("gpt2", "float32", ["--rank", 3, "--self-tokens", 0, "--sample-languages", 0.5], "samples none"),
    ("gpt2", "bfloat16", ["--bits", 12, "--input-metric", 2], "is a causal-lm with a tied head: leave it out"),
    ("bert-mlm", "float32", ["--bits", 12, "--input-metric", 2], "weights an encoder's rows by its sentence vectors"),
])
def test_options_for_another_kind_of_model_are_refused_before_any_work(tiny, tmp_path, kind, dtype, args, fragment,
                                                                       text_file):
    out = tmp_path / "f.safetensors"
    result = run("fit", tiny(kind, dtype), *args, "--weights-text", text_file, "-o", out, "-q")
    assert result.exit_code == 2 and fragment in result.stderr, result.output
    assert not out.exists()


@pytest.mark.parametrize("kind,args", [("gpt2", ["--rank", 3, "--self-tokens", 64, "--sample-languages", 0.5]),
                                       ("bert-encoder", ["--bits", 12, "--input-metric", 2]),
                                       ("bert-encoder", ["--bits", 12, "--self-tokens", 0])])  # off, as it is there
def test_options_for_the_models_own_kind_are_taken(tiny, tmp_path, kind, args, text_file):
    out = tmp_path / "f.safetensors"
    result = run("fit", tiny(kind), *args, "--weights-text", text_file, "-o", out, "-q")
    assert result.exit_code == 0 and out.exists(), result.output


@pytest.mark.parametrize("args", [["--method", "aware", "-k", 2], ["--method", "svd", "-k", 2, "--heal-steps", 2],
                                  ["--method", "paper", "-k", 2, "--epochs", 1, "--anneal-epochs", 1]])
def test_seed_is_taken_where_it_picks_draws(tiny, tmp_path, args):
    """A tied causal LM's aware fit samples the model, healing draws batches, paper draws its start: --seed acts."""
    result = run("fit", tiny("gpt2"), *args, "--seed", 5, "--out", tmp_path / "f.safetensors", "-q")
    assert result.exit_code == 0, result.output
    assert "seed" in json.dumps(load_factors(tmp_path / "f.safetensors").meta["settings"])


def test_a_codebook_recipe_brings_its_own_budget(tiny):
    """Recipe("codebook", codebook=CodebookConfig(bits=B)) is sized B where no bits are given; bits given win."""
    from embzip import compress
    from embzip.codebook import CodebookConfig

    r = Recipe("codebook", codebook=CodebookConfig(bits=5.0, centroids=16))
    assert resolve_size(r, vocab=1000, hidden=64, dtype=torch.float32) == 5.0
    assert resolve_size(r, bits=3.0, vocab=1000, hidden=64, dtype=torch.float32) == 3.0
    factors, summary = compress(tiny("gpt2"), r, write=False)
    assert factors.meta["size"] == 5.0 and 4.0 < summary["bits_per_weight"] <= 5.0


def test_the_library_names_what_it_cannot_take(tiny):
    from embzip import compress, open_model, perplexity
    from embzip.errors import OptionError
    from embzip.texts import load_text

    with pytest.raises(TypeError, match="recipe must be a method name such as 'codebook' or an embzip.Recipe, got "
                                        "NoneType"):
        compress(tiny("gpt2"), None, rank=4, write=False)
    for size in (dict(ratio="2"), dict(bits="4"), dict(ratio=True)):
        with pytest.raises(RankError, match="must be a number"):
            compress(tiny("gpt2"), "svd", write=False, **size)
    embedding_only = open_model(tiny("gpt2"), load="embedding")
    assert compress(embedding_only, "svd", rank=4, write=False)[0].rank == 4  # reads the matrix alone: fine
    with pytest.raises(OptionError, match="opened with its embedding alone .* and method aware runs the model here"):
        compress(embedding_only, "aware", rank=4, write=False)
    with pytest.raises(OptionError, match="opened with its embedding alone .* and perplexity runs the model"):
        perplexity(embedding_only, load_text(None))


def test_numpy_sizes_are_sizes_as_given(tiny):
    import numpy as np

    from embzip.methods import bits_name

    assert resolve_size(recipe("svd"), rank=np.int64(8), vocab=1000, hidden=64, dtype=torch.float32) == 8
    assert type(resolve_size(recipe("svd"), rank=np.int64(8), vocab=1000, hidden=64, dtype=torch.float32)) is int
    assert bits_name(np.float32(4.1)) == "4.1" and bits_name(4.0000000001) == "4.0000000001" and bits_name(2.0) == "2"
