"""Hostile and broken inputs: one line on stderr, the right exit code, nothing written, nothing removed.

Every row runs the real CLI in a fresh working directory `work` (so default outputs would land
there) beside shared inputs built once: broken model directories, broken factored directories,
hostile directories whose code would write a marker file, a factors file. Before and after each
row the whole tree (inputs and work directory, names, sizes and contents) is compared.
"""

import hashlib
import json
import os
import pickle
import shutil

import pytest
from typer.testing import CliRunner

from embzip.cli import app

runner = CliRunner()
LONG = "x" * 250
MARKER = "MARKER-code-ran"


class _Pickled:
    """Unpickling this runs a shell command that writes the marker (torch must refuse it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


EVIL_CODE = '''import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast, PretrainedConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass


class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def _edit_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def _plant_tokenizer_code(directory, marker):
    (directory / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))

    def change(c):
        c["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        c["tokenizer_class"] = "EvilTokenizer"

    _edit_json(directory / "tokenizer_config.json", change)


@pytest.fixture(scope="session")
def world(tiny, tmp_path_factory):
    """Inputs shared by every row, built once."""
    import torch
    from safetensors.torch import load_file, save_file

    from embzip.modeldir import apply_factors
    from embzip.models import open_model
    from embzip.svd import svd_factors

    root = tmp_path_factory.mktemp("world")
    marker = root / MARKER
    model = root / "model"
    shutil.copytree(tiny("gpt2"), model)
    opened = open_model(str(model))
    factors = svd_factors(opened.embedding.detach(), 3)
    from embzip.factors import save_factors

    save_factors(factors, root / "f.safetensors")
    apply_factors(opened, factors, root / "factored")
    shutil.copytree(tiny("bert-encoder"), root / "encoder")
    encoder = open_model(str(root / "encoder"))
    apply_factors(encoder, svd_factors(encoder.embedding.detach(), 3), root / "factored-encoder")

    def copy(src, name):
        shutil.copytree(src, root / name)
        return root / name

    _edit_json(copy(model, "hidden") / "config.json", lambda c: c.update(n_embd=48))
    (copy(model, "listcfg") / "config.json").write_text("[1, 2]")
    (copy(model, "badjson") / "config.json").write_text("{not json")
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if "wte" in k)
    weights[key] = torch.zeros(10, 32)
    save_file(weights, copy(model, "shape") / "model.safetensors", metadata={"format": "pt"})
    trunc = copy(model, "trunc") / "model.safetensors"
    trunc.write_bytes(trunc.read_bytes()[:5000])
    _edit_json(copy(model, "unknowntype") / "config.json", lambda c: c.update(model_type="nosuchmodel"))
    pickled = copy(model, "pickle")
    (pickled / "model.safetensors").unlink()
    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Pickled(marker), f)
    (root / "garbage.gguf").write_bytes(b"NOTGGUF" + bytes(range(256)) * 4)
    (root / "empty.gguf").write_bytes(b"")
    (root / "damaged.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)  # the magic, then a header cut short
    import transformers

    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(
        root / "vit")  # an input embedding that is no token table

    factored = root / "factored"
    _edit_json(copy(factored, "nobase") / "config.json", lambda c: c.pop("base_config"))
    _edit_json(copy(factored, "baddtype") / "config.json", lambda c: c.update(dtype="float99"))
    _edit_json(copy(factored, "basedtype") / "config.json", lambda c: c["base_config"].update(dtype="float99"))
    _edit_json(copy(factored, "badarch") / "config.json", lambda c: c.update(base_architecture="NoSuchModel"))
    _edit_json(copy(factored, "otherarch") / "config.json", lambda c: c.update(base_architecture="LlamaForCausalLM"))
    _edit_json(copy(factored, "strversion") / "config.json", lambda c: c.update(embzip_format_version="x"))
    _edit_json(copy(factored, "othermodule") / "config.json", lambda c: c.update(embedding_module="transformer.h"))
    _edit_json(copy(factored, "nomodule") / "config.json", lambda c: c.update(embedding_module="transformer.nope"))
    nan = load_file(factored / "embzip.safetensors")
    nan["transformer.wte.codes"][0, 0] = float("nan")
    save_file(nan, copy(factored, "nanemb") / "embzip.safetensors", metadata={"format": "pt"})
    ftrunc = copy(factored, "facttrunc") / "embzip.safetensors"
    ftrunc.write_bytes(ftrunc.read_bytes()[:3000])
    _plant_tokenizer_code(copy(factored, "hostile-factored"), marker)
    hostile = copy(model, "hostile-config")
    (hostile / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    _edit_json(hostile / "config.json",
               lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"}))
    for kind, name in (("gpt2", "smallvocab"), ("bert-encoder", "smallbert")):  # a tokenizer larger than the model
        import transformers

        small = transformers.AutoModel.from_pretrained(tiny(kind)) if kind != "gpt2" else \
            transformers.AutoModelForCausalLM.from_pretrained(tiny(kind))
        small.resize_token_embeddings(40)
        small.save_pretrained(root / name)
        transformers.AutoTokenizer.from_pretrained(tiny(kind)).save_pretrained(root / name)
        save_factors(svd_factors(small.get_input_embeddings().weight.detach(), 3), root / f"{name}.safetensors")
    (root / "short.txt").write_text("the people said it was hot .\n")
    (root / "trainonly").mkdir()
    (root / "trainonly" / "train.txt").write_text("the people said it was hot .\nand then it rained .\n")
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("a user's file")
    (root / "file.txt").write_text("a user's file")
    return root


def snapshot(*roots):
    """Every file and directory under the roots, with a hash of each file's content."""
    seen = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = str(path)
            seen[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return seen


ROWS = [
    # (arguments, exit code, message fragment). {w} is the shared input directory, {t} a fresh directory
    # holding the working directory {t}/work (the current directory while the row runs).
    # -- MODEL arguments that are empty, broken or hostile
    (["info", ""], 2, "MODEL is empty"),
    (["perplexity", "{w}/model", "--text", "no:b:such[bold]x[/bold].txt"], 2,
     "text file no:b:such[bold]x[/bold].txt does not exist"),  # as typed: no emoji, no markup
    (["info", "{w}/f.safetensors"], 2, "is an embzip factors file, not a model: give the model it was made from"),
    (["info", "{w}/model/config.json"], 2, "is a file; MODEL is a model directory (with config.json)"),
    (["apply", "{w}/model", "{w}/model", "-o", "out"], 2, "is a directory; give the .safetensors file"),
    (["svd", "", "-k", "2"], 2, "MODEL is empty"),
    (["info", "{w}/badjson"], 1, "config.json is not valid JSON"),
    (["perplexity", "{w}/smallvocab"], 1, "gives token id"),  # ids the embedding has no row for
    (["perplexity", "{w}/smallvocab", "--factors", "{w}/smallvocab.safetensors"], 1, "but the embedding has 40 rows"),
    (["bench", "{w}/smallvocab", "--methods", "int8", "--out", "{t}/b"], 1, "the tokenizer does not belong"),
    (["perplexity", "{w}/smallbert", "--factors", "{w}/smallbert.safetensors"], 1, "but the embedding has 40 rows"),
    (["info", "{w}/listcfg"], 1, "config.json is not a JSON object"),
    (["svd", "{w}/listcfg", "-k", "2"], 1, "config.json is not a JSON object"),
    (["svd", "{w}/hidden", "-k", "2"], 1, "transformer.wte.weight is [105, 32] but the config says [105, 48]"),
    (["info", "{w}/shape"], 1, "transformer.wte.weight is [10, 32] but the config says [105, 32]"),
    (["info", "{w}/trunc"], 1, "Error while deserializing header"),
    (["svd", "{w}/trunc", "-k", "2"], 1, "could not load model"),
    (["info", "{w}/unknowntype"], 1, "does not recognize this architecture"),
    (["info", "{w}/pickle"], 1, "holds a pickle that torch refuses to load safely"),
    (["svd", "{w}/pickle", "-k", "2"], 1, "refuses to load safely"),
    (["info", "{w}/garbage.gguf"], 1, "is not a GGUF file (no GGUF magic bytes)"),
    (["info", "{w}/vit"], 1, "vit has no token embedding to compress: its input embedding is a ViTPatchEmbeddings"),
    (["fit", "{w}/vit", "--method", "int4"], 1, "has no token embedding to compress"),  # not "already compressed"
    (["perplexity", "{w}/vit"], 1, "has no token embedding to compress"),
    (["fit", "{w}/model", "--method", "int4", "--bits", "4.9999999"], 2,
     "stores 5 bits per weight for this embedding and cannot reach 4.9999999"),  # not "cannot reach 5"
    (["svd", "{w}/empty.gguf", "-k", "2"], 1, "is not a GGUF file (it is empty)"),
    (["info", "{w}/nobase"], 1, "no base_config"),
    (["perplexity", "{w}/nobase"], 1, "no base_config"),
    (["info", "{w}/baddtype"], 1, "dtype is 'float99'"),
    (["perplexity", "{w}/baddtype"], 1, "dtype is 'float99'"),
    (["info", "{w}/basedtype"], 1, "base_config dtype is 'float99'"),
    (["info", "{w}/badarch"], 1, "no model class NoSuchModel"),
    (["info", "{w}/otherarch"], 1, "names a model transformers cannot build: base_architecture LlamaForCausalLM "
                                   "from a GPT2Config (AttributeError"),  # one line, not a traceback from transformers
    (["info", "{w}/strversion"], 1, "embzip_format_version is 'x', not a whole number"),
    (["info", "{w}/othermodule"], 1, "names 'transformer.h' as the embedding module, but the GPT2LMHeadModel it "
                                     "describes has its token embedding at 'transformer.wte'"),
    (["info", "{w}/nomodule"], 1, "names 'transformer.nope' as the embedding module"),
    (["perplexity", "{w}/nanemb"], 1, "compressed embedding has 1 NaN or Inf value(s) in tensor 'codes'"),
    (["info", "{w}/facttrunc"], 1, "cannot read embzip.safetensors"),
    (["perplexity", "{w}/facttrunc"], 1, "cannot read embzip.safetensors"),
    (["apply", "{w}/factored", "{w}/f.safetensors", "-o", "out"], 1, "already compressed"),
    (["perplexity", "{w}/factored", "--factors", "{w}/f.safetensors"], 1, "already compressed"),
    (["bench", "{w}/factored", "--ranks", "2", "--out", "b"], 1, "already compressed"),
    (["info", "{w}/hostile-factored"], 1, "--trust-remote-code"),
    (["perplexity", "{w}/hostile-factored"], 1, "--trust-remote-code"),
    (["svd", "{w}/hostile-config", "-k", "2"], 1, "--trust-remote-code"),
    (["info", "{w}/hostile-config"], 1, "--trust-remote-code"),
    # -- option values: finite, in range; zero or negative never means "default"
    (["fit", "{w}/model", "-k", "2", "--method", "paper", "--cos-weight", "nan"], 2, "cos_weight (--cos-weight) must be a finite"),
    (["fit", "{w}/model", "-k", "2", "--method", "paper", "--lr", "inf"], 2, "lr (--lr) must be a finite number"),
    (["fit", "{w}/model", "-k", "2", "--method", "paper", "--lr-gamma", "nan"], 2, "lr_gamma (--lr-gamma) must be a finite"),
    (["fit", "{w}/model", "-k", "2", "--method", "paper", "--alpha-end", "-inf"], 2, "alpha_end (--alpha-end) must be a finite"),
    (["fit", "{w}/model", "-k", "2", "--method", "wsvd", "--weight-floor", "inf"], 2, "weight floor (--weight-floor) must be a finite"),
    (["fit", "{w}/model", "-k", "2", "--weight-power", "nan"], 2, "weight power (--weight-power) must be a finite"),
    (["fit", "{w}/model", "-k", "2", "--output-metric", "inf"], 2, "output_metric (--output-metric) must be a finite"),
    (["fit", "{w}/model", "-k", "2", "--output-metric", "-1"], 2, "output_metric (--output-metric) must be >= 0"),
    (["fit", "{w}/model", "-k", "2", "--metric-tokens", "0"], 2, "metric_tokens (--metric-tokens) must be positive"),
    (["fit", "{w}/model", "-k", "2", "--heal-steps", "1", "--heal-lr", "nan"], 2, "heal lr (--heal-lr) must be a finite"),
    (["fit", "{w}/model", "-k", "2", "--method", "paper", "--seed", str(2**64)], 2, "Invalid value for '--seed'"),
    (["fit", "{w}/model", "-k", "2", "--seed", "-1"], 2, "Invalid value for '--seed'"),
    (["fit", "{w}/model", "-k", "2", "--heal-steps", "2", "--weights-text", "{w}/short.txt"], 1,
     "fewer than two sequences"),
    (["svd", "{w}/model", "--ratio", "nan"], 2, "greater than 1"),
    (["svd", "{w}/model", "--ratio", "inf"], 2, "ratio (--ratio) must be a finite number greater than 1, got inf"),
    (["fit", "{w}/model", "--method", "svd", "-k", "2", "--seed", "3"], 2, "svd draws none (the same model always"),
    (["fit", "{w}/model", "--method", "int4", "--seed", "3"], 2, "int4 draws none"),
    (["fit", "{w}/model", "--method", "wsvd", "-k", "2", "--weights-text", "{w}/short.txt", "-o", "{w}/short.txt",
      "--force"], 2, "is the input"),  # never written over the text the fit reads
    (["bench", "{w}/model", "--methods", "int8", "--out", "{w}/model/results"], 2,
     "or lies in it; bench files would be added to the model"),
    (["bench", "{w}/model", "--methods", "codebook", "--ratios", "1.5", "--out", "b"], 2,
     "ratio (--ratio) 1.5 is 21.33 bits per weight for this float32 embedding"),
    (["fit", "{w}/encoder", "--method", "aware", "-k", "2", "--seed", "3"], 2, "aware draws none here"),  # no samples
    (["perplexity", "{w}/model", "--window", "0"], 2, "window (--window) must be positive"),
    (["perplexity", "{w}/model", "--pseudo"], 2, "pseudo-perplexity is for masked LMs"),
    (["perplexity", "{w}/model", "--dataset", "a:b:c:d"], 2, "dataset spec 'a:b:c:d' is not name[:config[:split]]"),
    (["perplexity", "{w}/model", "--text", "{w}/short.txt", "--dataset", "x"], 2, "give a text file or a dataset"),
    (["perplexity", "{w}/model", "--dataset", "{w}/trainonly::validation"], 1,
     "has no split 'validation'; it has train: name it, e.g. --dataset"),  # named, not "the default"
    (["fit", "{w}/model", "-k", "2", "--weights-dataset", "{w}/trainonly"], 1,
     "has no split 'test' (the default); it has train: name it, e.g. --weights-dataset"),  # fit has no --dataset
    (["perplexity", "{w}/factored-encoder"], 1, "its embedding is already compressed; for the sentence-vector "
     "fidelity, give the original model and the factors"),
    (["perplexity", "{w}/model", "--dataset", "{w}/trainonly"], 1,
     "has no split 'test' (the default); it has train: name it, e.g. --dataset"),
    (["perplexity", "{w}/model", "--dataset", "{w}/model"], 2, "is a model directory (it has a config.json), not a dataset"),
    (["fit", "{w}/model", "-k", "2", "--method", "paper", "--epochs", "2"], 2,
     "give --anneal-epochs 2 or fewer with --epochs 2"),
    (["perplexity", "{w}/model", "--window", "100000"], 2, "window 100000 is longer than the 64 positions"),
    (["perplexity", "{w}/model", "--window", "16", "--stride", "17"], 2, "stride 17 must be between 1 and the window"),
    (["fit", "{w}/model", "--method", "int4", "--group-size", "7"], 2,
     "int4 group size 7 does not split the embedding's width 32 (its rows' length) into groups of an even size; use one "
     "of 2, 4, 8, 16, 32"),
    (["fit", "{w}/model", "--method", "codebook", "-k", "8", "-o", "{w}/f.safetensors"], 2,
     "takes no --rank"),  # the option's error first, not that the output exists
    (["fit", "{w}/model", "--bits", "17", "--self-tokens", "0"], 2, "codebook bits (--bits) must be a finite number in (0, 16]"),
    (["perplexity", "{w}/model", "--stride", "0"], 2, "stride (--stride) must be positive"),
    (["perplexity", "{w}/model", "--max-tokens", "-5"], 2, "max_tokens (--max-tokens) must be positive, got -5"),
    (["perplexity", "{w}/model", "--max-tokens", "0"], 2, "max_tokens (--max-tokens) must be positive, got 0"),
    (["perplexity", "{w}/model", "--batch-size", "0"], 2, "batch_size (--batch-size) must be positive"),
    (["perplexity", "{w}/model", "--seed", "99999999999999999999999"], 2, "Invalid value for '--seed'"),
    (["bench", "{w}/model", "--ranks", "", "--out", "b"], 2, "ranks (--ranks) must be a non-empty list"),
    (["bench", "{w}/model", "--ranks", "4,4", "--out", "b"], 2, "ranks (--ranks) must be a non-empty list without repeats"),
    (["bench", "{w}/model", "--ranks", "0", "--out", "b"], 2, "ranks (--ranks) must be positive"),
    (["bench", "{w}/model", "--ranks", "500", "--out", "b"], 2, "largest useful rank"),
    (["bench", "{w}/model", "--batch-size", "0", "--out", "b"], 2, "batch_size (--batch-size) must be positive"),
    (["bench", "{w}/model", "--max-tokens", "0", "--out", "b"], 2, "max_tokens (--max-tokens) must be positive"),
    (["bench", "{w}/model", "--methods", "svd,svd", "--out", "b"], 2, "methods (--methods) lists svd more than once"),
    (["bench", "{w}/model", "--ratios", "nan", "--out", "b"], 2, "ratios (--ratios) must be a finite number"),
    (["bench", "{w}/model", "--seed", str(2**64), "--out", "b"], 2, "Invalid value for '--seed'"),
    # -- usage errors: one line, exit 2, no boxed panel
    (["svd", "{w}/model", "--rank", "2.5"], 2, "Invalid value for '--rank'"),
    (["bench", "{w}/model", "--ranks", "abc"], 2, "--ranks takes comma-separated numbers, got 'abc'"),
    (["bench", "{w}/model", "--methods", ","], 2, "give at least one method"),
    (["svd", "{w}/model", "--rnak", "2"], 2, "No such option: --rnak"),
    (["apply", "{w}/model"], 2, "Missing argument"),
    (["nosuchcommand"], 2, "No such command"),
    # -- outputs: never destroy what is not embzip's output
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "."], 2, "is the current directory or contains it"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", ".", "--force"], 2, "current directory or contains it"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "..", "--force"], 2, "current directory or contains it"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "{w}/model", "--force"], 2, "is the input"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "{w}", "--force"], 2, "contains it"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "{w}/user", "--force"], 2, "was not written by embzip"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "{w}/user"], 2, "already exists and is not empty"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "{w}/file.txt", "--force"], 2, "is not a directory"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", LONG], 2, "is too long"),
    (["svd", "{w}/model", "-k", "2", "-o", LONG + ".safetensors"], 2, "is too long"),
    (["bench", "{w}/model", "--ranks", "2", "--out", LONG], 2, "is too long"),
    (["svd", "{w}/model", "-k", "2", "-o", "{w}/model/model.safetensors", "--force"], 2, "is the input"),
    (["svd", "{w}/empty.gguf", "-k", "2", "-o", "{w}/empty.gguf", "--force"], 2, "is the input"),
    (["bench", "{w}/model", "--ranks", "2", "--out", "{w}/file.txt"], 2, "exists and is not a directory"),
    (["bench", "{w}/model", "--self-tokens", "-1"], 2, "self-sample tokens (--self-tokens) must be"),
    (["bench", "{w}/model", "--methods", "svd,int8", "--ranks", "2", "--weights-text", "{w}/short.txt", "--out",
      "{t}/b"], 2, "--weights-text is read by the methods that read a text, and none of svd, int8 does"),
    (["fit", "{w}/model", "--bits", "2", "--self-tokens", "nan"], 2, "Invalid value for '--self-tokens'"),
    (["bench", "{w}/model", "--ranks", "2", "--out", "{w}/file.txt/b"], 2, "is not a directory"),
    # -- "-" is stdout's name, never an output of embzip's
    (["svd", "{w}/model", "-k", "2", "-o", "-"], 2, "output - would be a file named '-'"),
    (["apply", "{w}/model", "{w}/f.safetensors", "-o", "-"], 2, "output - would be a directory named '-'"),
    (["bench", "{w}/model", "--ranks", "2", "--out", "-"], 2, "output - would be a directory named '-'"),
]


@pytest.mark.parametrize("args,code,fragment", ROWS, ids=[" ".join(r[0])[:60] for r in ROWS])
def test_bad_input(world, tmp_path, monkeypatch, args, code, fragment):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(world, tmp_path)
    result = runner.invoke(app, [a.format(w=world, t=tmp_path) for a in args] + ["-q"])  # -q: no loading bars
    assert result.exit_code == code, result.output
    message = " ".join(result.stderr.split())
    assert fragment in message, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line: no traceback, no panel
    assert "converting" not in result.stderr
    assert snapshot(world, tmp_path) == before  # nothing written, nothing removed, no code ran
    assert not (world / MARKER).exists()


def test_a_gguf_file_damaged_after_its_magic_bytes_is_one_line(world):
    import importlib.util

    result = runner.invoke(app, ["info", str(world / "damaged.gguf"), "-q"])
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no traceback
    converts = importlib.util.find_spec("gguf") is not None  # the dev extra has it; without it, that is said first
    expected = "damaged.gguf could not be converted: the file is damaged or truncated" if converts else \
        "needs the 'gguf' package"
    assert expected in " ".join(result.stderr.split())


def test_a_pipe_given_as_an_input_file_is_named_as_one_and_never_opened(world, tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    for args, what in ((["perplexity", str(world / "model"), "--text", str(fifo)], "text file"),
                       (["perplexity", str(world / "model"), "--factors", str(fifo)], "factors file"),
                       (["fit", str(world / "model"), "--bits", "4", "--weights-text", str(fifo)], "text file")):
        result = runner.invoke(app, args + ["-q"])
        assert result.exit_code == 2, result.output
        assert f"{what} {fifo} is a pipe or a device, not a regular file" in " ".join(result.stderr.split())


def test_bench_on_a_read_only_directory_creates_nothing(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    result = runner.invoke(app, ["bench", str(world / "model"), "--ranks", "2", "--out", "b"])
    assert result.exit_code == 1 and "is not writable" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_trust_remote_code_runs_the_code_only_when_asked(world, tmp_path):
    """The hostile directories really run code with --trust-remote-code (so the rows above prove something)."""
    hostile = tmp_path / "hostile"
    shutil.copytree(world / "model", hostile)
    marker = tmp_path / "ran"
    _plant_tokenizer_code(hostile, marker)
    plain = runner.invoke(app, ["info", str(hostile), "--json", "-q"])
    assert plain.exit_code == 0, plain.output  # its tokenizer falls back to the built-in class
    assert not marker.exists()
    trusted = runner.invoke(app, ["info", str(hostile), "--json", "-q", "--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    assert marker.read_text() == "ran"


def test_help_still_works():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Usage" in result.output and "apply" in result.output
    bare = runner.invoke(app, [])
    assert "Usage" in bare.output and "Traceback" not in bare.output


def test_config_values_are_checked_in_the_library():
    from embzip import OptionError
    from embzip.autoencoder import FitConfig
    from embzip.aware import AwareConfig
    from embzip.benchmark import BenchConfig
    from embzip.heal import HealConfig
    from embzip.weights import WeightConfig

    bad = [lambda: FitConfig(lr=float("inf")), lambda: FitConfig(cos_weight=float("nan")),
           lambda: FitConfig(epochs=2.5), lambda: FitConfig(seed=2**64), lambda: WeightConfig(floor=float("inf")),
           lambda: WeightConfig(power=float("nan")), lambda: AwareConfig(output_metric=float("inf")),
           lambda: AwareConfig(metric_tokens=0), lambda: HealConfig(lr=float("nan")), lambda: HealConfig(steps=0),
           lambda: BenchConfig(ranks=[]), lambda: BenchConfig(ranks=[4, 4]), lambda: BenchConfig(ranks=[0]),
           lambda: BenchConfig(ranks=[2], max_tokens=0), lambda: BenchConfig(ratios=[float("inf")]),
           lambda: BenchConfig(methods=["svd", "svd"], ranks=[2])]
    for make in bad:
        with pytest.raises(OptionError):
            make()
    assert issubclass(OptionError, ValueError)
    assert BenchConfig().ranks is None  # neither ranks nor ratios: bench picks default ranks from the vocabulary


def test_a_model_with_its_own_code_opens_with_trust_remote_code_without_a_prompt(world, tmp_path):
    """The embedding-only and streaming paths build the model's skeleton from its own classes: the flag must reach
    them, or transformers asks on the terminal (and, with no terminal, refuses as if it was never given)."""
    custom = tmp_path / "custom"
    shutil.copytree(world / "model", custom)
    marker = tmp_path / "ran"
    (custom / "conf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "from transformers import GPT2Config\n\n\nclass MyConfig(GPT2Config):\n"
                                    "    model_type = 'mygpt'\n")
    (custom / "modl.py").write_text("from transformers import GPT2LMHeadModel\nfrom .conf import MyConfig\n\n\n"
                                    "class MyModel(GPT2LMHeadModel):\n    config_class = MyConfig\n")
    _edit_json(custom / "config.json", lambda c: c.update(
        model_type="mygpt", auto_map={"AutoConfig": "conf.MyConfig", "AutoModelForCausalLM": "modl.MyModel"}))
    refused = runner.invoke(app, ["info", str(custom), "--json", "-q"], input="")
    assert refused.exit_code == 1 and "--trust-remote-code" in refused.stderr and not marker.exists()
    for args in (["info", str(custom)], ["svd", str(custom), "-k", "2", "-o", str(tmp_path / "f.safetensors")]):
        trusted = runner.invoke(app, [*args, "--json", "-q", "--trust-remote-code"], input="")
        assert trusted.exit_code == 0, trusted.output
    assert marker.read_text() == "ran"
