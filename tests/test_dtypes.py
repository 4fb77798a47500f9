"""float32, bfloat16 and float16 models through every command: files and sizes keep the model's dtype, and a
directory written by `apply` rebuilds exactly the computation of the model it was written from."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from embzip.cli import app
from embzip.factors import load_factors
from embzip.modeldir import apply_factors, load_model
from embzip.models import open_model
from embzip.svd import svd_factors

runner = CliRunner()
DTYPES = ["float32", "bfloat16", "float16"]
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
STORED = {"float32": "float16", "bfloat16": "bfloat16", "float16": "float16"}
SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# (kind, head): tied heads (BERT MLM, GPT-2, Llama) and untied ones (Llama input only, a BERT encoder)
CASES = [("bert-mlm", "tied"), ("gpt2", "tied"), ("llama", "tied"), ("llama", "input"), ("bert-encoder", "input")]
FAST_FIT = ["--method", "paper", "--epochs", "2", "--anneal-epochs", "1", "--batch-size", "16"]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result


def long_ids(model):
    """60 positions: rotary frequencies rounded to bf16 change logits only some way into a sequence."""
    vocab = model.get_input_embeddings().num_embeddings
    return (torch.arange(60) * 37 % (vocab - 5) + 5).unsqueeze(0)


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def file_dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,head", CASES)
def test_svd_and_apply_keep_the_dtype_and_reload_exactly(tiny, tmp_path, kind, head, dtype):
    model = tiny(kind, dtype)
    info = run("info", model, "--json", "-q")
    assert info["dtype"] == dtype
    summary = run("svd", model, "--rank", 3, "-o", tmp_path / "f.safetensors", "--json", "-q")
    factors = load_factors(tmp_path / "f.safetensors")
    stored = STORED[dtype]  # factors are stored at 16 bits: the model's dtype when it is 16-bit, else float16
    assert summary["stored_dtype"] == factors.meta["dtype"] == stored and summary["embedding_dtype"] == dtype and factors.codes.dtype == getattr(torch, stored)
    assert file_dtypes(tmp_path / "f.safetensors") == {SAFETENSORS[stored]}
    assert summary["bytes_after"] == summary["params_after"] * ITEMSIZE[stored]
    assert summary["bytes_before"] == summary["params_before"] * ITEMSIZE[dtype]

    opened = open_model(model)
    original = logits(opened.model, long_ids(opened.model))
    applied = apply_factors(opened, factors, tmp_path / "out", head=head)
    ids = long_ids(opened.model)
    expected = logits(opened.model, ids)  # opened.model is spliced in place now
    assert not torch.equal(expected, original)  # the factors really changed the model
    reloaded = load_model(tmp_path / "out")
    assert torch.equal(logits(reloaded, ids), expected)
    assert applied["reload_max_abs_diff"] == 0.0
    assert file_dtypes(tmp_path / "out" / "embzip.safetensors") == {SAFETENSORS[dtype], SAFETENSORS[stored]}
    factor_bytes = factors.stored_bytes()
    rest = applied["params_after"] - factors.num_params()
    assert applied["bytes_after"] == rest * ITEMSIZE[dtype] + factor_bytes
    # the factors are buffers in their stored dtype; the model's dtype is its layers' own, as transformers reports it
    assert {p.dtype for p in reloaded.parameters()} == {getattr(torch, dtype)} == {reloaded.dtype}
    assert {t.dtype for t in reloaded.get_input_embeddings().stored().values()} == {getattr(torch, stored)}
    reloaded.float()  # a cast keeps the stored format (the saved directory does not grow) and the logits
    assert {t.dtype for t in reloaded.get_input_embeddings().stored().values()} == {getattr(torch, stored)}
    assert torch.allclose(logits(reloaded, ids).float(), expected.float(), atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["llama", "bert-mlm"])
def test_reload_rebuilds_buffers_as_from_pretrained_does(tiny, tmp_path, kind, dtype):
    """Buffers are not in the weights file: the reload must compute them as from_pretrained does in that dtype
    (Llama's rotary inv_freq stays float32 in a bfloat16 model; casting the built model would round it)."""
    opened = open_model(tiny(kind, dtype))
    factors = svd_factors(opened.embedding.detach(), 3)
    reference = dict(open_model(tiny(kind, dtype)).model.named_buffers())
    apply_factors(opened, factors, tmp_path / "out")
    reloaded = load_model(tmp_path / "out")
    factors = reloaded.get_input_embeddings().stored().values()
    stored = {n for n, b in reloaded.named_buffers() if any(b is t for t in factors)}
    buffers = {n: b for n, b in reloaded.named_buffers() if n not in stored}  # the factors are buffers too
    assert buffers.keys() == reference.keys() and len(stored) == 2  # codes, decoder
    for name, buffer in buffers.items():
        assert buffer.dtype == reference[name].dtype, name
        assert torch.equal(buffer, reference[name]), name
    if kind == "llama":
        assert buffers["model.rotary_emb.inv_freq"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["llama", "bert-mlm"])
def test_a_config_whose_dtype_is_not_the_files_gives_a_directory_that_runs(tiny, tmp_path, kind):
    """A stranger's bfloat16 checkpoint whose config says float32: the directory records what its files hold, so
    the whole model is built in that dtype (it was built in float32 around bfloat16 layers, and failed to run)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny(kind, "bfloat16"), model)
    config = json.loads((model / "config.json").read_text())
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps(config))
    run("svd", model, "--rank", 3, "-o", tmp_path / "f.safetensors", "-q")
    run("apply", model, tmp_path / "f.safetensors", "--out", tmp_path / "out", "--json", "-q")
    reloaded = load_model(tmp_path / "out")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["base_config"]["dtype"] == "bfloat16"
    with torch.no_grad():
        out = reloaded(input_ids=torch.tensor([[1, 2, 3, 4]]))
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_layer_stored_in_another_16_bit_dtype_is_cast_to_the_models_as_from_pretrained_does(tiny, tmp_path, dtype):
    """A directory whose file holds one layer in float16 (a hand edit; embzip never writes one) loads with that
    layer in the model's dtype and runs; kept in float16, the first forward pass failed on mixed dtypes."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    opened = open_model(tiny("llama", dtype))
    apply_factors(opened, svd_factors(opened.embedding.detach(), 3), out)
    expected = logits(load_model(out), long_ids(opened.model))
    path, key = out / "embzip.safetensors", "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    tensors[key] = tensors[key].half()
    save_file(tensors, path, metadata=header)
    reloaded = load_model(out)
    assert reloaded.get_parameter(key).dtype == getattr(torch, dtype)
    got = logits(reloaded, long_ids(opened.model))
    assert got.dtype == expected.dtype  # the layer's values rounded to float16: the logits move by about that
    assert torch.allclose(got.float(), expected.float(), rtol=0, atol=0.05 * expected.float().abs().max().item())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dense_apply_keeps_the_dtype(tiny, tmp_path, dtype):
    model = tiny("llama", dtype)
    run("svd", model, "--rank", 3, "-o", tmp_path / "f.safetensors", "-q")
    summary = run("apply", model, tmp_path / "f.safetensors", "--out", tmp_path / "dense", "--dense", "--json", "-q")
    assert summary["reload_max_abs_diff"] == 0.0
    assert file_dtypes(tmp_path / "dense" / "model.safetensors") == {SAFETENSORS[dtype]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fit_perplexity_and_bench_run_in_the_models_dtype(tiny, tmp_path, text_file, dtype):
    model = tiny("llama", dtype)
    for method, extra in (("aware", ["--method", "aware", "--weights-text", text_file, "--metric-tokens", 256]),
                          ("paper", FAST_FIT)):
        summary = run("fit", model, "--rank", 3, "-o", tmp_path / f"{method}.safetensors", "--json", "-q", *extra)
        assert summary["stored_dtype"] == summary["embedding_dtype"] == dtype and file_dtypes(tmp_path / f"{method}.safetensors") == {SAFETENSORS[dtype]}
    scored = run("perplexity", model, "--factors", tmp_path / "aware.safetensors", "--text", text_file, "--json", "-q")
    assert 1 < scored["perplexity_original"] < float("inf") and 1 < scored["perplexity"] < float("inf")
    run("apply", model, tmp_path / "aware.safetensors", "--out", tmp_path / "out", "-q")
    reopened = run("perplexity", tmp_path / "out", "--text", text_file, "--json", "-q")
    assert reopened["perplexity"] == pytest.approx(scored["perplexity"], rel=1e-6)
    bench = run("bench", model, "--ranks", "2,3", "--methods", "svd", "--text", text_file, "--max-tokens", 128,
                "--out", tmp_path / "bench", "--json", "-q")
    assert bench["dtype"] == dtype
    for row in bench["rows"]:
        assert row["embedding_bytes"] == row["embedding_params"] * ITEMSIZE[dtype]
        assert 1 < row["perplexity_input"] < float("inf")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_masked_lm_perplexity_in_the_models_dtype(tiny, tmp_path, text_file, dtype):
    model = tiny("bert-mlm", dtype)
    run("svd", model, "--rank", 3, "-o", tmp_path / "f.safetensors", "-q")
    scored = run("perplexity", model, "--factors", tmp_path / "f.safetensors", "--text", text_file, "--json", "-q")
    assert 1 < scored["perplexity_original"] < float("inf") and 1 < scored["perplexity"] < float("inf")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head", ["tied", "input"])
def test_a_codebook_focus_stage_goes_through_fit_and_apply_and_reloads_exactly(tiny, tmp_path, text_file, head,
                                                                                dtype):
    model = tiny("llama", dtype)
    path = tmp_path / "f.safetensors"
    # a fifth of the budget to the focus stage: on a 112-row vocabulary (8 centroids, with stages of up to d / 4
    # pieces: with d / 2, 256 fit and leave no room for it) that pays for its codebook and every row
    # (tests/test_codebook.py decodes focus stages over some rows only)
    summary = run("fit", model, "--bits", 15, "--focus", 0.2, "--min-piece-dim", 4, "--weights-text", text_file,
                  "--metric-tokens", 256, "--self-tokens", 64, "-o", path, "--json", "-q")
    factors = load_factors(path)
    rows = [t for name, t in factors.tensors().items() if name.endswith(".rows")]
    assert len(rows) == 1 and 0 < len(rows[0]) <= factors.vocab and summary["bits_per_weight"] <= 15
    assert factors.meta["settings"]["codebook"]["focus"] == 0.2 and factors.meta["min_piece_dim"] == 4
    opened = open_model(model)
    ids = long_ids(opened.model)
    applied = apply_factors(opened, factors, tmp_path / "out", head=head)
    expected = logits(opened.model, ids)  # spliced in place: the focus stage's rows included
    assert torch.equal(logits(load_model(tmp_path / "out"), ids), expected)
    assert applied["reload_max_abs_diff"] == 0.0
    assert run("info", tmp_path / "out", "--json", "-q")["dtype"] == dtype  # a compressed embedding's own dtype


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_healed_codebook_goes_through_fit_and_apply_and_reloads_exactly(tiny, tmp_path, text_file, dtype):
    model = tiny("llama", dtype)  # tied head
    path = tmp_path / "f.safetensors"
    summary = run("fit", model, "--bits", 8, "--heal-steps", 4, "--weights-text", text_file, "--metric-tokens", 256,
                  "--self-tokens", 64, "-o", path, "--json", "-q")
    factors = load_factors(path)
    assert summary["method"] == "codebook+heal" and summary["bits_per_weight"] <= 8
    assert factors.meta["settings"]["heal"]["steps"] == 4 and factors.meta["heal"]["best_step"] in (0, 4)
    opened = open_model(model)
    ids = long_ids(opened.model)
    applied = apply_factors(opened, factors, tmp_path / "out")
    assert torch.equal(logits(load_model(tmp_path / "out"), ids), logits(opened.model, ids))
    assert applied["reload_max_abs_diff"] == 0.0
