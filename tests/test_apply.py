"""`embzip apply`: directories that reload exactly, refuse to load wrongly, and really shrink."""

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from embzip.cli import app
from embzip.modeldir import apply_factors, load_model
from embzip.models import open_model
from embzip.splice import FactoredEmbedding, FactoredHead, _runs_of_rows, spliced
from embzip.svd import svd_factors

runner = CliRunner()
AUTO = {"bert-mlm": transformers.AutoModelForMaskedLM, "gpt2": transformers.AutoModelForCausalLM,
        "llama": transformers.AutoModelForCausalLM, "bert-encoder": transformers.AutoModel}
IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])


def logits(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def make(tiny, kind, rank=3):
    """A tiny model and its rank-`rank` SVD factors at the dtype they are stored in (16-bit)."""
    opened = open_model(tiny(kind))
    return opened, svd_factors(opened.embedding.detach(), rank).to(dtype=torch.float16)


@pytest.mark.parametrize("kind,head", [("bert-mlm", "tied"), ("bert-mlm", "input"), ("gpt2", "tied"),
                                       ("llama", "tied"), ("llama", "input"), ("bert-encoder", "input")])
def test_reload_gives_identical_logits(tiny, tmp_path, kind, head):
    opened, factors = make(tiny, kind)
    original = logits(opened.model)
    summary = apply_factors(opened, factors, tmp_path / "out", head=head)
    expected = logits(opened.model)  # opened.model is now spliced in place
    assert not torch.allclose(expected, original, atol=1e-3)  # the compression really changed the model
    reloaded = load_model(tmp_path / "out")
    assert torch.equal(logits(reloaded), expected)
    assert summary["reload_max_abs_diff"] == 0.0 and summary["head"] == head and summary["reload_check"] == "logits"
    via_auto = AUTO[kind].from_pretrained(tmp_path / "out")  # embzip is imported: no remote code needed
    assert torch.equal(logits(via_auto), expected)


@pytest.mark.parametrize("kind", ["bert-mlm", "llama", "bert-encoder"])
def test_concrete_class_refuses(tiny, tmp_path, kind):
    """A concrete class never loads the directory with a random embedding (plain Auto classes: tests/test_hf.py)."""
    opened, factors = make(tiny, kind)
    apply_factors(opened, factors, tmp_path / "out")
    concrete = getattr(transformers, type(opened.model).__name__)
    with pytest.raises(OSError, match="no file named"):
        concrete.from_pretrained(tmp_path / "out")


def test_tied_head_shrinks_and_input_head_does_not(tiny, tmp_path):
    opened, factors = make(tiny, "llama")
    tied = apply_factors(opened, factors, tmp_path / "tied", head="tied")
    opened2, _ = make(tiny, "llama")
    inp = apply_factors(opened2, factors, tmp_path / "input", head="input")
    v, d, k = factors.vocab, factors.hidden, factors.rank
    assert tied["params_before"] - tied["params_after"] == v * d - (v * k + k * d)
    assert inp["params_after"] == inp["params_before"] + v * k + k * d  # head keeps the full matrix
    assert tied["weights_file_bytes_after"] < tied["weights_file_bytes_before"]
    assert isinstance(opened.model.lm_head, FactoredHead) and not isinstance(opened2.model.lm_head, FactoredHead)
    assert not torch.allclose(logits(opened.model), logits(opened2.model))


def test_input_head_keeps_the_original_output_matrix(tiny, tmp_path):
    opened, factors = make(tiny, "gpt2")
    original = opened.embedding.detach().clone()
    apply_factors(opened, factors, tmp_path / "out", head="input")
    assert torch.equal(load_model(tmp_path / "out").lm_head.weight, original)


def test_the_weights_size_before_counts_only_the_files_the_model_loads(tiny, tmp_path):
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny("llama"), source)
    weights = (source / "model.safetensors").stat().st_size
    (source / "pytorch_model.bin").write_bytes(bytes(1000))  # a hub snapshot often holds both formats
    (source / "factors.safetensors").write_bytes(bytes(500))  # a factors file written beside the model
    opened = open_model(str(source))
    factors = svd_factors(opened.embedding.detach(), 3).to(dtype=torch.float16)
    summary = apply_factors(opened, factors, tmp_path / "out")
    assert summary["weights_file_bytes_before"] == weights
    assert summary["weights_file_bytes_after"] == (tmp_path / "out" / "embzip.safetensors").stat().st_size


def test_the_weights_size_of_a_pytorch_checkpoint_counts_what_transformers_loads(tmp_path):
    import json

    from embzip.modeldir import _weights_bytes

    (tmp_path / "pytorch_model.bin").write_bytes(bytes(1000))
    (tmp_path / "training_args.bin").write_bytes(bytes(300))  # saved beside the weights by the Trainer
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(bytes(700))  # shards left from another save
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert _weights_bytes(tmp_path) == 1000  # the single file comes before an index, as in transformers
    (tmp_path / "pytorch_model.bin").unlink()
    assert _weights_bytes(tmp_path) == 700
    (tmp_path / "pytorch_model.bin.index.json").unlink()
    assert _weights_bytes(tmp_path) is None  # no file transformers would load


def test_dense_export_loads_with_plain_transformers(tiny, tmp_path):
    opened, factors = make(tiny, "bert-mlm")
    with spliced(opened.model, factors, "tied"):
        factored = logits(opened.model)
    apply_factors(opened, factors, tmp_path / "dense", dense=True)
    plain = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "dense")
    assert torch.allclose(logits(plain), factored, atol=1e-4)
    assert torch.allclose(plain.get_input_embeddings().weight, factors.reconstruct(), atol=1e-6)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_model_whose_matrix_apply_rebuilt_is_not_taken_for_the_original(tiny, tmp_path, streamed):
    # dense apply writes the rebuilt matrix into the model in memory: scoring or compressing it again as the
    # original gave a ratio of exactly 1 and factors of factors
    from embzip.errors import FactorsError, ModelError
    from embzip.pipeline import compress
    from embzip.scoring import perplexity
    from embzip.texts import load_text

    opened, factors = make(tiny, "llama")
    if streamed:
        opened = open_model(tiny("llama"), load="embedding")  # as the CLI reads it: the embedding alone
    apply_factors(opened, factors, tmp_path / "dense", dense=True)
    with pytest.raises(ModelError, match="already compressed"):
        compress(opened, "svd", rank=2, write=False)
    if not streamed:
        with pytest.raises(FactorsError, match="already compressed"):
            perplexity(opened, load_text(None), factors=factors, max_tokens=16)


def test_fine_tuning_leaves_the_factors_frozen_unless_asked(tiny, tmp_path):
    opened, factors = make(tiny, "gpt2")
    apply_factors(opened, factors, tmp_path / "out")
    model = load_model(tmp_path / "out").train()
    emb = model.get_input_embeddings()
    assert isinstance(emb, FactoredEmbedding)
    # fine-tuning the model leaves the stored factors frozen (buffers, like every compressed kind's tensors) ...
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert emb.codes.grad is None and emb.decoder.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # ... and they train where asked to
    emb.codes.requires_grad_(), emb.decoder.requires_grad_()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert emb.codes.grad is not None and emb.codes.grad.abs().sum() > 0
    assert emb.decoder.grad is not None and emb.decoder.grad.abs().sum() > 0


def test_cli_apply_records_provenance(tiny, tmp_path):
    model = tiny("gpt2")
    assert runner.invoke(app, ["svd", model, "-k", "3", "-o", str(tmp_path / "f.safetensors"), "-q"]).exit_code == 0
    result = runner.invoke(app, ["apply", model, str(tmp_path / "f.safetensors"), "--out", str(tmp_path / "m"),
                                 "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = json.loads((tmp_path / "m" / "embzip.json").read_text())
    assert manifest["command"].startswith("embzip apply") and manifest["factors"]["method"] == "svd"
    assert manifest["params_after"] == summary["params_after"] < summary["params_before"]
    assert manifest["reload_max_abs_diff"] == summary["reload_max_abs_diff"] == 0.0  # docs/format.md: recorded
    # apply read the embedding alone, so what was checked is the files and the embedding module, and it says so
    assert manifest["reload_check"] == summary["reload_check"] == "files and the embedding module"
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "m")("the water").input_ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["int4", "svd"])
def test_factors_of_another_model_of_the_same_shape_are_refused(tiny, tmp_path, dtype, method):
    model = tiny("llama", dtype)
    factors = tmp_path / "f.safetensors"
    made = (["fit", model, "--method", "int4"] if method == "int4" else ["svd", model, "-k", "4"])
    assert runner.invoke(app, [str(a) for a in made] + ["-o", str(factors), "-q"]).exit_code == 0

    def copy(name, change):  # the same architecture and shape, another embedding
        loaded = transformers.AutoModelForCausalLM.from_pretrained(model)
        with torch.no_grad():
            weight = loaded.get_input_embeddings().weight
            weight.copy_(change(weight))
        loaded.save_pretrained(tmp_path / name)
        transformers.AutoTokenizer.from_pretrained(model).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    other = copy("other", lambda w: torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(w.dtype))
    for args in (["apply", other, str(factors), "--out", str(tmp_path / "out")],
                 ["perplexity", other, "--factors", str(factors)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "made for another model of the same shape" in result.stderr, result.output
        assert "mean cosine distance 1.0" in result.stderr  # unrelated rows: directions at random
    assert not (tmp_path / "out").exists()
    # a lightly changed copy (as fine-tuning leaves an embedding) takes them, as does the model itself
    tuned = copy("tuned", lambda w: w + 0.02 * w.float().std() * torch.randn(w.shape).to(w.dtype))
    for target in (tuned, model):
        result = runner.invoke(app, ["apply", target, str(factors), "--out", str(tmp_path / "out"), "-q", "--force"])
        assert result.exit_code == 0, result.output


def test_the_source_check_reads_runs_of_neighbouring_rows_spread_over_the_vocabulary():
    # a memory-mapped embedding pages in what is near each row read: runs of neighbours keep that to a few MB
    rows = _runs_of_rows(128256, 4096)
    assert len(rows) == 4096 and int(rows[0]) == 0 and int(rows[-1]) == 128255
    steps = rows[1:] - rows[:-1]
    assert bool((steps > 0).all()) and int((steps > 1).sum()) == 15  # 16 runs
    assert torch.equal(_runs_of_rows(100, 4096), torch.arange(100))


BAD_APPLY = [
    (["apply", "{llama}", "{gpt2_factors}", "--out", "{out}"], 1, "the factors rebuild a 105 x 32 embedding but the model's is 112 x 32"),
    (["apply", "{gpt2}", "{gpt2_factors}", "--out", "{out}", "--head", "tied"], 0, ""),
    (["apply", "{encoder}", "{enc_factors}", "--out", "{out}", "--head", "tied"], 2, "use --head input"),
    (["apply", "{gpt2}", "{missing}", "--out", "{out}"], 2, "does not exist"),
    (["apply", "{gpt2}", "{gpt2_factors}", "--out", "{existing}"], 2, "--force"),
    (["apply", "{gpt2}", "{gpt2_factors}", "--out", "{tmp}/no/such/dir"], 2, "does not exist"),
]


@pytest.mark.parametrize("args,code,fragment", BAD_APPLY)
def test_bad_apply(tiny, tmp_path, args, code, fragment):
    gpt2_factors, enc_factors = tmp_path / "g.safetensors", tmp_path / "e.safetensors"
    runner.invoke(app, ["svd", tiny("gpt2"), "-k", "3", "-o", str(gpt2_factors), "-q"])
    runner.invoke(app, ["svd", tiny("bert-encoder"), "-k", "3", "-o", str(enc_factors), "-q"])
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep").write_text("x")
    fill = dict(llama=tiny("llama"), gpt2=tiny("gpt2"), encoder=tiny("bert-encoder"), gpt2_factors=gpt2_factors,
                enc_factors=enc_factors, missing=tmp_path / "missing.safetensors", out=tmp_path / "out",
                existing=tmp_path / "existing", tmp=tmp_path)
    before = sorted(os.listdir(tmp_path))
    result = runner.invoke(app, [a.format(**fill) for a in args])
    assert result.exit_code == code, result.output
    assert fragment in " ".join(result.stderr.split())
    if code:
        assert sorted(os.listdir(tmp_path)) == before  # nothing written
        assert (tmp_path / "existing" / "keep").read_text() == "x"


def test_compressed_directory_opens_and_scores_like_the_spliced_model(tiny, tmp_path, text_file):
    from embzip.pipeline import compress
    from embzip.errors import ModelError
    from embzip.scoring import perplexity
    from embzip.texts import load_text

    opened, factors = make(tiny, "llama")
    text = load_text(text_file)
    expected = perplexity(opened, text, factors=factors, head="tied")["perplexity"]
    apply_factors(opened, factors, tmp_path / "out")
    reopened = open_model(str(tmp_path / "out"))
    assert reopened.kind == "causal-lm" and reopened.tied and reopened.describe()["factored"]
    assert perplexity(reopened, text)["perplexity"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ModelError, match="already compressed"):
        compress(reopened, "svd", rank=2, write=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_low_rank_head_converts_its_codes_in_blocks_to_the_same_logits(tiny, monkeypatch, dtype):
    import embzip.splice as splice

    opened = open_model(tiny("llama", "bfloat16" if dtype == torch.bfloat16 else "float32"))
    factors = svd_factors(opened.embedding.detach().float(), 3).to(dtype=torch.float16)  # codes in another dtype
    hidden = torch.randn(2, 5, factors.hidden).to(dtype)
    with spliced(opened.model, factors, "tied"):
        head = opened.model.get_output_embeddings()
        with torch.no_grad():
            whole = head(hidden)
            monkeypatch.setattr(splice, "_HEAD_CHUNK_CPU", 3 * 10)  # blocks of 10 rows: several per head
            blocked = head(hidden)
        with_grad = head(hidden)  # training keeps the one product autograd sees whole
    tol = 1e-5 * whole.abs().max().item()  # the same products, blocked differently by the matmul
    assert blocked.dtype == dtype and torch.allclose(blocked.float(), whole.float(), rtol=0, atol=tol)
    assert torch.allclose(with_grad.detach().float(), whole.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["svd", "int8", "codebook"])
def test_a_head_that_reads_its_weight_runs_after_apply(tiny, tmp_path, dtype, method):
    """MobileBERT's masked-LM head multiplies by `decoder.weight` instead of calling the decoder: the compact tied
    head gives it the decoded matrix, so the written directory runs, with the spliced model's logits."""
    model = tiny("mobilebert", dtype)
    size = ["-k", "3"] if method == "svd" else ["--method", method] + (["--bits", "4"] if method == "codebook" else [])
    factors = str(tmp_path / "f.safetensors")
    command = "svd" if method == "svd" else "fit"
    if method == "codebook":  # the tied head's metric needs the head called: refused with the way round it
        refused = runner.invoke(app, [command, model, *size, "-o", factors, "-q"])
        assert refused.exit_code == 1 and "give --output-metric 0 to fit without it" in refused.stderr
        assert not os.path.exists(factors)
        size += ["--output-metric", "0"]
    assert runner.invoke(app, [command, model, *size, "-o", factors, "-q"]).exit_code == 0
    result = runner.invoke(app, ["apply", model, factors, "--out", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    from embzip.factors import load_factors

    opened = open_model(model)
    original = logits(opened.model)
    with spliced(opened.model, load_factors(factors)):
        expected = logits(opened.model)
    reloaded = load_model(tmp_path / "m")
    head = reloaded.get_output_embeddings()
    assert type(head).__name__ in ("FactoredHead", "CompressedHead")  # compact: the matrix is not stored
    assert torch.equal(logits(reloaded), expected)
    assert not torch.equal(expected, original) and expected.dtype == getattr(torch, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["svd", "int4", "codebook"])
def test_a_compact_heads_weight_is_the_decoded_matrix(tiny, dtype, method):
    """`head.weight` (for model code that reads it) is the matrix the head multiplies by: its product with hidden
    states gives the head's own logits, and it is never stored."""
    from embzip.pipeline import compress

    opened = open_model(tiny("llama", dtype))
    size = {"rank": 3} if method == "svd" else {"bits": 4} if method == "codebook" else {}
    factors, _ = compress(opened, method, write=False, **size)
    model = opened.model
    with spliced(model, factors):
        head = model.get_output_embeddings()
        weight = head.weight
        assert weight.shape == (head.out_features, head.in_features) and weight.dtype == getattr(torch, dtype)
        assert "weight" not in dict(head.named_parameters()) and "weight" not in head.state_dict()
        hidden = torch.randn(100, head.in_features, dtype=getattr(torch, dtype))  # over 64: no bfloat16 kernel
        with torch.no_grad():
            own = head(hidden).float()
        torch.testing.assert_close(hidden.float() @ weight.float().T, own, atol=0.05 if dtype == "bfloat16" else 1e-4,
                                   rtol=0.02 if dtype == "bfloat16" else 1e-4)
        torch.testing.assert_close(weight.float(), factors.reconstruct().float(), atol=0.02, rtol=0.02)


def _sentence_transformers_copy(source, target):
    """`source` laid out as a sentence-transformers model: modules.json, settings, and module folders (one of
    them listed with a path outside the model, one a second transformer in a folder: neither is copied)."""
    import shutil

    shutil.copytree(source, target)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
               {"idx": 3, "name": "3", "path": "../outside", "type": "sentence_transformers.models.Normalize"},
               {"idx": 4, "name": "4", "path": "4_Other", "type": "sentence_transformers.models.Transformer"}]
    (target / "modules.json").write_text(json.dumps(modules))
    (target / "sentence_bert_config.json").write_text('{"max_seq_length": 256, "do_lower_case": false}')
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 32, "pooling_mode_mean": true}')
    (target / "2_Dense" / "deep").mkdir(parents=True)
    (target / "2_Dense" / "deep" / "model.safetensors").write_bytes(b"dense layer bytes")
    (target / "4_Other").mkdir()
    (target / "4_Other" / "config.json").write_text("{}")
    (target.parent / "outside").mkdir()
    (target.parent / "outside" / "secret").write_text("not the model's")
    return target


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("load", ["embedding", "full"])
def test_a_sentence_transformers_models_own_files_come_along(tiny, tmp_path, dtype, load):
    source = _sentence_transformers_copy(tiny("bert-encoder", dtype), tmp_path / "st" / "model")
    opened = open_model(str(source), load=load)
    summary = apply_factors(opened, svd_factors(opened.embedding.detach().float(), 3), tmp_path / "out")
    out = tmp_path / "out"
    assert summary["sentence_transformers_files"] == ["modules.json", "sentence_bert_config.json", "1_Pooling/",
                                                      "2_Dense/"]
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                 "2_Dense/deep/model.safetensors"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not (out / "4_Other").exists() and not (tmp_path / "outside").exists()  # out/../outside
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["1_Pooling", "2_Dense"]
    assert json.loads((out / "embzip.json").read_text())["sentence_transformers_files"][0] == "modules.json"


def test_a_plain_model_gets_no_sentence_transformers_files(tiny, tmp_path):
    opened, factors = make(tiny, "bert-encoder")
    assert apply_factors(opened, factors, tmp_path / "out")["sentence_transformers_files"] == []
    assert not (tmp_path / "out" / "modules.json").exists()


def test_apply_factors_and_compress_take_paths_as_the_command_line_does(tiny, tmp_path):
    import embzip
    from embzip.errors import FactorsError

    model = Path(tiny("llama"))
    factors, _ = embzip.compress(model, "int8", out=tmp_path / "f.safetensors")
    summary = apply_factors(str(model), tmp_path / "f.safetensors", tmp_path / "out")
    assert summary["kind"] == "quant" and summary["reload_max_abs_diff"] == 0.0
    reloaded = load_model(tmp_path / "out")
    ids = torch.tensor([[2, 5, 9, 11]])
    with torch.no_grad(), spliced(open_model(model).model, factors) as in_memory:
        assert torch.equal(reloaded(ids).logits, in_memory(ids).logits)
    with pytest.raises(FactorsError, match="does not exist"):
        apply_factors(model, tmp_path / "missing.safetensors", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(TypeError, match="by its path"):
        embzip.load_factors(None)


def test_a_module_without_a_weight_matrix_is_not_taken_for_a_compressed_embedding(tiny):
    """A model whose input embedding is no vocab x hidden table (a patch embedding, a user's own module) has nothing
    to splice into: it is refused as such, not as 'already compressed'."""
    from embzip.errors import ModelError
    from embzip.splice import check_fits, is_compressed

    opened = open_model(tiny("gpt2"))
    factors = svd_factors(opened.embedding.detach(), 3)
    opened.model.set_input_embeddings(torch.nn.Identity())
    assert not is_compressed(opened.model.get_input_embeddings())
    with pytest.raises(ModelError, match="this GPT2LMHeadModel has no token embedding to compress: its input "
                                         "embedding is a Identity"):
        check_fits(opened.model, factors)
    with pytest.raises(ModelError, match="has no token embedding to compress"):
        opened.embedding


def test_factors_made_in_memory_record_their_fit_so_an_unrelated_model_is_refused(tiny, tmp_path):
    """svd_factors records how well its factors rebuild their matrix; on a model whose rows they do not resemble
    (same shape, another embedding) they are refused, and on their own model taken, at any rank."""
    from embzip.errors import FactorsError
    from embzip.splice import check_source

    opened = open_model(tiny("gpt2"))
    factors = svd_factors(opened.embedding.detach(), 8)
    assert factors.meta["metrics"]["cosine_distance"] < 0.5
    check_source(opened.model, svd_factors(opened.embedding.detach(), 1))  # a poor fit of its own model: taken
    assert "metrics" not in svd_factors(opened.embedding.detach(), 8, measure=False).meta
    other = tmp_path / "other"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny("gpt2"))
    with torch.no_grad():
        torch.manual_seed(3)
        model.get_input_embeddings().weight.normal_()
    model.save_pretrained(other)
    with pytest.raises(FactorsError, match="they were made for another model of the same shape"):
        apply_factors(str(other), factors, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    apply_factors(opened, factors, tmp_path / "mine")  # their own model: taken


def test_an_apply_that_writes_nothing_leaves_the_callers_model_as_it_was(tiny, tmp_path, monkeypatch):
    """Ctrl-C (or an error) before the directory is in place undoes the splice: the OpenedModel can be compressed
    and applied again, instead of reading as 'already compressed' with no directory written."""
    from embzip import outputs
    from embzip.splice import is_compressed

    opened = open_model(tiny("llama"))
    factors = svd_factors(opened.embedding.detach(), 4)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "swap_into_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply_factors(opened, factors, tmp_path / "out")
    assert not is_compressed(opened.model.get_input_embeddings()) and not (tmp_path / "out").exists()
    monkeypatch.undo()
    apply_factors(opened, factors, tmp_path / "out")  # and it goes through once nothing stops it
    assert is_compressed(opened.model.get_input_embeddings())


def test_splicing_a_spliced_model_says_it_is_already_compressed(tiny):
    from embzip.errors import FactorsError
    from embzip.splice import spliced

    opened = open_model(tiny("llama"))
    factors = svd_factors(opened.embedding.detach(), 4)
    with spliced(opened.model, factors):
        with pytest.raises(FactorsError, match="already compressed"):
            with spliced(opened.model, factors):
                pass


@pytest.mark.parametrize("load", ["embedding", "full"])
def test_a_tokenizers_named_chat_templates_come_along(tiny, tmp_path, load):
    """transformers saves a tokenizer's extra chat templates in additional_chat_templates/: copied whether apply
    reads the embedding alone (files copied) or the whole model (the tokenizer saved)."""
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny("llama"), source)
    (source / "additional_chat_templates").mkdir()
    (source / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }} with tools")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    assert "tool_use" in tokenizer.chat_template  # how the saved tokenizer reads them
    opened = open_model(str(source), load=load)
    apply_factors(opened, svd_factors(opened.embedding.detach().float(), 3), tmp_path / "out")
    assert (tmp_path / "out" / "additional_chat_templates" / "tool_use.jinja").read_text().endswith("with tools")
    assert "tool_use" in transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template


def test_factors_compared_with_an_embedding_holding_nan_are_refused(tiny):
    """NaN rows made the mean distance NaN, and NaN > limit is false: the check passed whatever the factors."""
    from embzip.errors import ModelError
    from embzip.splice import check_source

    opened, factors = make(tiny, "llama")
    factors.meta["metrics"] = {"cosine_distance": 0.01}
    with torch.no_grad():
        opened.model.get_input_embeddings().weight[7] = float("nan")
    with pytest.raises(ModelError, match="this model's embedding holds NaN or Inf values"):
        check_source(opened.model, factors)
