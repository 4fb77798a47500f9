"""Plain transformers loading: after `import embzip`, `AutoModel*.from_pretrained(DIR)` gives load_model's model,
without remote code; without embzip, transformers refuses the directory; no code in a directory is ever run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import embzip
from embzip.hf import EmbzipConfig
from embzip.modeldir import apply_factors, load_model
from embzip.models import open_model
from embzip.svd import svd_factors

AUTO = {"bert-mlm": transformers.AutoModelForMaskedLM, "gpt2": transformers.AutoModelForCausalLM,
        "llama": transformers.AutoModelForCausalLM, "bert-encoder": transformers.AutoModel}
IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
REPO = Path(__file__).resolve().parents[1]
# What an embzip 0.1 directory carried: a shim that transformers ran with trust_remote_code. This one also
# writes a marker file, so a test sees whether anything imported it.
HOSTILE_SHIM = '''from pathlib import Path
Path({marker!r}).write_text("the directory's code ran")
from transformers import PretrainedConfig, PreTrainedModel


class EmbzipConfig(PretrainedConfig):
    model_type = "embzip"


class EmbzipModel(PreTrainedModel):
    config_class = EmbzipConfig
'''


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def write(tiny, path, kind, dtype="float32", head=None):
    opened = open_model(tiny(kind, dtype))
    apply_factors(opened, svd_factors(opened.embedding.detach(), 3), path, head=head)
    return str(path)


def old_style(directory, target, marker):
    """A copy of `directory` as embzip 0.1 wrote it: an auto_map to embzip_remote.py, here a hostile one."""
    shutil.copytree(directory, target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {name: "embzip_remote.EmbzipModel" for name in
                          ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM")}
    config["auto_map"]["AutoConfig"] = "embzip_remote.EmbzipConfig"
    (target / "config.json").write_text(json.dumps(config))
    (target / "embzip_remote.py").write_text(HOSTILE_SHIM.format(marker=str(marker)))
    return str(target)


def python(code, *args, tmp_path):
    """Run `code` in a fresh interpreter (its own imports), with the repository first on sys.path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("kind,head", [("bert-mlm", "tied"), ("gpt2", "tied"), ("llama", "tied"), ("llama", "input"),
                                       ("bert-encoder", "input")])
def test_auto_classes_give_load_models_model(tiny, tmp_path, kind, head):
    directory = write(tiny, tmp_path / "out", kind, head=head)
    expected = load_model(directory)
    model = AUTO[kind].from_pretrained(directory)
    assert type(model) is type(expected) and not model.training
    assert torch.equal(logits(model), logits(expected))
    # AutoModel gives what it gives for the original: a language model's base, without its head
    base = transformers.AutoModel.from_pretrained(directory)
    assert type(base) is type(transformers.AutoModel.from_pretrained(tiny(kind))) and not base.training
    assert torch.equal(logits(base), logits(expected.base_model))
    assert (base is base.base_model) and (kind == "bert-encoder") == (type(base) is type(expected))
    assert isinstance(transformers.AutoConfig.from_pretrained(directory), EmbzipConfig)
    assert transformers.AutoTokenizer.from_pretrained(directory)("the water").input_ids


def test_directory_holds_no_code(tiny, tmp_path):
    directory = Path(write(tiny, tmp_path / "out", "llama"))
    assert not list(directory.rglob("*.py"))
    config = json.loads((directory / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "embzip"


def test_from_pretrained_options(tiny, tmp_path):
    directory = write(tiny, tmp_path / "out", "llama", "bfloat16")
    as_written = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype="auto", device_map="cpu")
    assert as_written.dtype == torch.bfloat16 and torch.equal(logits(as_written), logits(load_model(directory)))
    wider = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert wider.dtype == torch.float32 and wider.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(logits(wider), logits(load_model(directory, dtype="float32")))
    eager = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="not a masked-lm"):
        transformers.AutoModelForMaskedLM.from_pretrained(directory)
    with pytest.raises(ValueError, match="output_hidden_states are not supported"):
        transformers.AutoModelForCausalLM.from_pretrained(directory, output_hidden_states=True)
    with pytest.raises(ValueError, match="one device"):
        transformers.AutoModelForCausalLM.from_pretrained(directory, device_map={"model": "cpu", "lm_head": "meta"})


def test_from_pretrained_can_cache_a_compressed_head(tiny, tmp_path):
    import embzip
    from embzip.methods import recipe

    opened = open_model(tiny("llama"))
    factors, _ = embzip.compress(opened, recipe("int8"), write=False)
    apply_factors(opened, factors, tmp_path / "out")
    compact = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    cached = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", cache_head=True)
    assert not compact.get_output_embeddings().cache_decoded and cached.get_output_embeddings().cache_decoded
    # the compact head hands these few states to int8's fused bf16 kernel: a bf16 step of the largest logit apart
    expected = logits(cached)
    assert torch.allclose(logits(compact), expected, atol=2**-7 * expected.abs().max().item())


def test_old_directories_load_without_running_their_code(tiny, tmp_path):
    marker = tmp_path / "marker"
    old = old_style(Path(write(tiny, tmp_path / "new", "llama")), tmp_path / "old", marker)
    expected = logits(load_model(tmp_path / "new"))
    assert torch.equal(logits(load_model(old)), expected)
    assert torch.equal(logits(embzip.open_model(old).model), expected)
    for trust in (None, True):  # even asked to trust it, transformers takes embzip's registered classes
        assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(old, trust_remote_code=trust)),
                           expected)
        assert transformers.AutoTokenizer.from_pretrained(old, trust_remote_code=trust)("the water").input_ids
    assert not marker.exists()


def test_register_is_idempotent(tiny, tmp_path):
    directory = write(tiny, tmp_path / "out", "gpt2")
    embzip.register()
    embzip.register()
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(directory)),
                       logits(load_model(directory)))


REFUSED_WITHOUT_EMBZIP = """
import json, sys, torch, transformers
dirs = json.loads(sys.argv[1])
autos = {"causal": transformers.AutoModelForCausalLM, "masked": transformers.AutoModelForMaskedLM,
         "encoder": transformers.AutoModel}
for kind, directory in dirs.items():
    for auto in {autos[kind], transformers.AutoModel}:
        try:
            auto.from_pretrained(directory)
        except ValueError as exc:
            assert "model type `embzip`" in str(exc), exc
        else:
            raise SystemExit(f"{auto.__name__} loaded {directory} without embzip")
assert "embzip" not in sys.modules
import embzip  # after transformers and its auto classes: registers at once
for kind, directory in dirs.items():
    model = autos[kind].from_pretrained(directory)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
    got, want = model(input_ids=ids), embzip.load_model(directory)(input_ids=ids)
    key = "logits" if kind != "encoder" else "last_hidden_state"
    assert torch.equal(getattr(got, key), getattr(want, key)), kind
print("ok")
"""


def test_plain_transformers_refuses_until_embzip_is_imported(tiny, tmp_path):
    dirs = {"causal": write(tiny, tmp_path / "causal", "llama"), "masked": write(tiny, tmp_path / "masked", "bert-mlm"),
            "encoder": write(tiny, tmp_path / "encoder", "bert-encoder")}
    assert python(REFUSED_WITHOUT_EMBZIP, json.dumps(dirs), tmp_path=tmp_path).strip() == "ok"


EMBZIP_FIRST = """
import sys, time
start = time.perf_counter()
import embzip
assert "transformers" not in sys.modules and "torch" not in sys.modules, "import embzip must stay light"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
new, old, marker, modules = sys.argv[1:5]
ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
want = embzip.load_model(new)(input_ids=ids).logits
for directory in (new, old):
    for trust in (None, True):
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust)
        assert torch.equal(model(input_ids=ids).logits, want)
        AutoTokenizer.from_pretrained(directory, trust_remote_code=trust)
embzip.open_model(old)
from pathlib import Path
assert not Path(marker).exists(), "a directory's code ran"
assert not list(Path(modules).rglob("embzip_remote*")), "a directory's code was copied into the modules cache"
print("ok")
"""


def test_embzip_first_then_transformers_and_no_code_copied(tiny, tmp_path):
    marker = tmp_path / "marker"
    new = write(tiny, tmp_path / "new", "llama")
    old = old_style(Path(new), tmp_path / "old", marker)
    assert python(EMBZIP_FIRST, new, old, marker, tmp_path / "modules", tmp_path=tmp_path).strip() == "ok"


def compressed(tiny, path, kind, dtype, method):
    """A directory `embzip apply` wrote for the tiny `kind` model with `method` (a size each tiny model takes)."""
    from embzip.methods import recipe

    opened = open_model(tiny(kind, dtype))
    size = {"codebook": {"bits": 6}, "svd": {"rank": 3}}.get(method, {})
    factors, _ = embzip.compress(opened, recipe(method), write=False, **size)
    apply_factors(opened, factors, path)
    return str(path)


@pytest.mark.parametrize("kind,dtype,method", [("llama", "float32", "codebook"), ("llama", "bfloat16", "int4"),
                                               ("llama-untied", "float32", "int8"), ("bert-encoder", "bfloat16", "svd")])
def test_save_pretrained_writes_a_compressed_directory(tiny, tmp_path, kind, dtype, method):
    # transformers' own save would put the compressed tensors under the base config: a directory that it loads
    # with a fresh random embedding and no error
    auto = AUTO[kind.removesuffix("-untied")]
    model = auto.from_pretrained(compressed(tiny, tmp_path / "out", kind, dtype, method))
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "embzip.safetensors").is_file() and not (tmp_path / "saved" / "model.safetensors").exists()
    again = auto.from_pretrained(tmp_path / "saved")
    assert type(again.get_input_embeddings()) is type(model.get_input_embeddings()) and again.dtype == model.dtype
    assert type(again.get_output_embeddings()) is type(model.get_output_embeddings())
    assert torch.equal(logits(again), logits(model))


def test_save_pretrained_refuses_what_it_cannot_honour(tiny, tmp_path):
    model = load_model(compressed(tiny, tmp_path / "out", "llama", "float32", "int8"))
    other = {k: t + 1 if t.is_floating_point() else t for k, t in model.state_dict().items()}
    for options in ({"push_to_hub": True}, {"safe_serialization": False}):
        with pytest.raises(embzip.ModelError, match="takes a directory only"):
            model.save_pretrained(tmp_path / "saved", **options)
    with pytest.raises(embzip.ModelError, match="only the model's own state_dict"):
        model.save_pretrained(tmp_path / "saved", state_dict=other)
    assert not (tmp_path / "saved").exists()


def test_save_pretrained_takes_the_models_own_state_dict_as_the_trainer_passes_it(tiny, tmp_path):
    model = load_model(compressed(tiny, tmp_path / "out", "llama", "float32", "int8"))
    copied = {k: t.clone() for k, t in model.state_dict().items()}  # equal values, other tensors
    for name, state in (("own", model.state_dict()), ("copied", copied)):
        model.save_pretrained(tmp_path / name, state_dict=state, is_main_process=True)
        assert torch.equal(logits(load_model(tmp_path / name)), logits(model))


def test_the_trainer_checkpoints_a_compressed_model(tiny, tmp_path):
    model = load_model(compressed(tiny, tmp_path / "out", "llama", "float32", "int4"))
    rows = [{"input_ids": IDS[0], "labels": IDS[0]} for _ in range(4)]
    args = transformers.TrainingArguments(tmp_path / "run", max_steps=2, save_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    for step in ("checkpoint-1", "checkpoint-2"):
        saved = tmp_path / "run" / step
        assert (saved / "embzip.safetensors").is_file() and not (saved / "model.safetensors").exists()
    assert torch.equal(logits(load_model(tmp_path / "run" / "checkpoint-2")), logits(model))


@pytest.mark.parametrize("kind,inner", [("llama", "model"), ("bert-mlm", "bert")])
def test_a_base_model_inside_saves_compressed_and_loads_back(tiny, tmp_path, kind, inner):
    # transformers' save of `model.model` would write the compressed tensors under LlamaConfig: loaded back with a
    # random embedding and no error
    model = load_model(compressed(tiny, tmp_path / "out", kind, "float32", "int4"))
    base = getattr(model, inner)
    base.save_pretrained(tmp_path / "base")
    again = transformers.AutoModel.from_pretrained(tmp_path / "base")
    assert type(again) is type(base) and type(again.get_input_embeddings()) is type(base.get_input_embeddings())
    assert torch.equal(logits(again), logits(base))
    with pytest.raises(ValueError, match="base model without a head"):
        (transformers.AutoModelForCausalLM if kind == "llama" else transformers.AutoModelForMaskedLM).from_pretrained(
            tmp_path / "base")


@pytest.mark.parametrize("method", ["codebook", "int4", "svd"])
@pytest.mark.parametrize("kind", ["llama", "bert-mlm"])
def test_a_compressed_model_runs_under_autocast(tiny, tmp_path, kind, method):
    model = load_model(compressed(tiny, tmp_path / "out", kind, "float32", method))
    expected = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model)
        model(input_ids=IDS, labels=IDS).loss.backward()  # training through it under autocast too
    assert got.dtype == torch.bfloat16  # as a Linear head (with its bias: BERT's) gives under autocast
    assert ((got.float() - expected).norm() / expected.norm()).item() < 0.05  # bfloat16's rounding only
    rows = model.get_input_embeddings()(IDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as nn.Embedding: the rows as without autocast
        assert torch.equal(model.get_input_embeddings()(IDS), rows)


def test_a_model_whose_compressed_embedding_was_replaced_by_a_dense_one_saves_dense(tiny, tmp_path):
    untied = load_model(compressed(tiny, tmp_path / "untied", "llama-untied", "float32", "int8"))
    untied.set_input_embeddings(torch.nn.Embedding.from_pretrained(untied.get_input_embeddings().matrix().clone()))
    untied.save_pretrained(tmp_path / "dense")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense")  # a plain transformers directory
    assert torch.equal(logits(plain), logits(untied))
    vocab = untied.get_input_embeddings().num_embeddings
    untied.resize_token_embeddings(vocab + 8)  # dense again: transformers' own resize
    assert untied.get_input_embeddings().num_embeddings == untied.config.vocab_size == vocab + 8
    tied = load_model(compressed(tiny, tmp_path / "tied", "llama", "float32", "svd"))
    tied.set_input_embeddings(torch.nn.Embedding.from_pretrained(tied.get_input_embeddings().matrix().clone()))
    with pytest.raises(embzip.ModelError, match="output head still reads the compressed embedding"):
        tied.save_pretrained(tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def test_a_model_made_dense_again_ties_its_weights_as_transformers_does(tiny, tmp_path):
    model = load_model(compressed(tiny, tmp_path / "out", "llama", "float32", "int8"))
    dense = torch.nn.Embedding.from_pretrained(model.get_input_embeddings().matrix().clone(), freeze=False)
    model.set_input_embeddings(dense)
    model.set_output_embeddings(torch.nn.Linear(dense.embedding_dim, dense.num_embeddings, bias=False))
    model.tie_weights()  # embzip's guard steps aside once no compact module is left
    assert model.get_output_embeddings().weight is dense.weight


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_export_traces_packed_integers_and_names_what_it_cannot(tiny, tmp_path, dtype):
    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids).logits

    model = load_model(compressed(tiny, tmp_path / "int4", "llama", dtype, "int4"))
    exported = torch.export.export(Logits(model), (IDS,), strict=False)
    with torch.no_grad():
        got, expected = exported.module()(IDS).float(), logits(model).float()
    # the eager head hands few states to torch's bfloat16 weight-only kernel on a CPU; the traced graph decodes
    assert ((got - expected).norm() / expected.norm()).item() < 0.02
    codebook = load_model(compressed(tiny, tmp_path / "codebook", "llama", dtype, "codebook"))
    with pytest.raises(embzip.ModelError, match="torch.export cannot trace a codebook embedding"):
        torch.export.export(Logits(codebook), (IDS,), strict=False)


def test_a_resize_that_changes_nothing_is_let_through(tiny, tmp_path):
    model = load_model(compressed(tiny, tmp_path / "out", "llama", "float32", "codebook"))
    emb, expected = model.get_input_embeddings(), logits(model)
    assert model.resize_token_embeddings() is emb and model.resize_token_embeddings(emb.num_embeddings) is emb
    assert model.resize_token_embeddings(emb.num_embeddings, pad_to_multiple_of=emb.num_embeddings) is emb
    for options in ({"new_num_tokens": emb.num_embeddings + 8}, {"pad_to_multiple_of": emb.num_embeddings + 1}):
        with pytest.raises(AttributeError, match="needs the original model"):
            model.resize_token_embeddings(**options)
    assert torch.equal(logits(model), expected)


def test_save_pretrained_refuses_a_model_that_holds_only_its_embedding(tiny, tmp_path):
    from embzip.methods import recipe

    opened = open_model(tiny("llama"), load="embedding")  # as `embzip apply` streams a large model
    factors, _ = embzip.compress(opened, recipe("int8"), write=False)
    apply_factors(opened, factors, tmp_path / "out")
    with pytest.raises(embzip.ModelError, match="holds only its embedding"):
        opened.model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_a_spliced_model_saves_compressed_until_restored(tiny, tmp_path):
    opened = open_model(tiny("llama"))
    with embzip.spliced(opened.model, svd_factors(opened.embedding.detach(), 3), "tied") as model:
        expected = logits(model)
        model.save_pretrained(tmp_path / "compact")
    assert "save_pretrained" not in vars(opened.model) and "tie_weights" not in vars(opened.model)  # transformers'
    assert torch.equal(logits(load_model(tmp_path / "compact")), expected)


@pytest.mark.parametrize("method", ["codebook", "int4", "int8", "svd"])
def test_a_compressed_model_follows_dtype_casts(tiny, tmp_path, method):
    import copy
    import io

    directory = compressed(tiny, tmp_path / "out", "llama", "float32", method)
    model = load_model(directory)
    expected, emb = logits(model), model.get_input_embeddings()
    formats = {name: t.dtype for name, t in getattr(emb, "stored", dict)().items()}  # a compressed kind's
    for dtype in (torch.bfloat16, torch.float16):
        cast = copy.deepcopy(model).to(dtype)  # deep copies and pickles like any model
        rows = cast.get_input_embeddings()(IDS)
        got = logits(cast)
        assert rows.dtype == got.dtype == dtype
        # the stored format is kept (float16 scales are not rounded to bfloat16), as when loaded in that dtype
        assert {name: t.dtype for name, t in getattr(cast.get_input_embeddings(), "stored", dict)().items()} == formats
        assert torch.equal(rows, load_model(directory, dtype=dtype).get_input_embeddings()(IDS))
        assert ((got.float() - expected).norm() / expected.norm()).item() < 0.02  # the 16-bit model's rounding only
        cast.save_pretrained(tmp_path / str(dtype))
        back = load_model(tmp_path / str(dtype))
        assert back.dtype == dtype and torch.equal(back.get_input_embeddings()(IDS), rows)
        buffer = io.BytesIO()
        torch.save(cast, buffer)
        assert torch.equal(logits(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)), got)
    widened = load_model(compressed(tiny, tmp_path / "bf16", "llama", "bfloat16", method)).float()
    assert widened.get_input_embeddings()(IDS).dtype == logits(widened).dtype == torch.float32


def test_code_that_reads_a_dense_weight_is_told_what_to_use(tiny, tmp_path):
    model = load_model(compressed(tiny, tmp_path / "out", "llama", "float32", "codebook"))
    emb, expected = model.get_input_embeddings(), logits(model)
    assert not hasattr(emb, "weight")
    with pytest.raises(AttributeError, match=r"no dense `weight`.*\.matrix\(\)"):
        emb.weight
    with pytest.raises(AttributeError, match="needs the original model"):
        model.resize_token_embeddings(emb.num_embeddings + 8)
    assert emb.num_embeddings == model.config.vocab_size and torch.equal(logits(model), expected)  # unchanged
    assert torch.allclose(emb.matrix()[IDS[0]], emb(IDS)[0], atol=1e-6)  # what to use instead of .weight


@pytest.mark.parametrize("kind,head", [("llama", "tied"), ("llama", "input"), ("bert-mlm", "tied")])
def test_tie_weights_of_a_loaded_compressed_model_changes_nothing(tiny, tmp_path, kind, head):
    # transformers' tie_weights (accelerate calls it before dispatching) would look for the embedding's `.weight`
    model = load_model(write(tiny, tmp_path / "out", kind, head=head))
    expected = logits(model)
    model.tie_weights()
    assert torch.equal(logits(model), expected)
    reads_it = getattr(model.get_output_embeddings(), "embedding", None) is model.get_input_embeddings()
    assert reads_it == (head == "tied")  # a kept head keeps its own matrix


@pytest.mark.parametrize("kind", ["gpt2", "bert-mlm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_automodels_base_saves_and_loads_back_as_itself(tiny, tmp_path, kind, dtype):
    directory = write(tiny, tmp_path / "out", kind, dtype)
    base = transformers.AutoModel.from_pretrained(directory)
    base.save_pretrained(tmp_path / "base")  # a compressed directory of the base (a BERT base: no pooler)
    again = transformers.AutoModel.from_pretrained(tmp_path / "base")
    assert type(again) is type(base) and logits(again).dtype == getattr(torch, dtype)
    assert torch.equal(logits(again), logits(base))
    assert json.loads((tmp_path / "base" / "config.json").read_text())["base_architecture"] == type(base).__name__


def test_a_model_type_built_with_another_familys_class_applies_and_reloads(tmp_path):
    """transformers builds some model types with another family's class and config (internlm3: LlamaForCausalLM
    over an InternLM3Config): the directory names that class, and loads, with the same logits."""
    from conftest import _tokenizer

    tok = _tokenizer("causal")
    config = transformers.AutoConfig.for_model("internlm3", vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                               head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    opened = open_model(str(tmp_path / "m"))
    apply_factors(opened, svd_factors(opened.embedding.detach(), 4), tmp_path / "out")
    reloaded = load_model(tmp_path / "out")
    assert type(reloaded).__name__ == type(opened.model).__name__
    assert torch.equal(logits(reloaded), logits(opened.model))


def test_save_pretrained_into_a_sharded_directory_leaves_no_stale_shards(tiny, tmp_path):
    from embzip import stream

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(tiny("llama")).save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(Path(tiny("llama")) / "tokenizer.json", sharded)
    opened = open_model(str(sharded), load="stream")
    out, factors = tmp_path / "out", svd_factors(opened.embedding.detach(), 3)
    apply_factors(opened, factors, out)  # streamed: shards like the source's
    assert (out / "embzip.safetensors.index.json").is_file()
    model = load_model(out)
    with torch.no_grad():
        model.model.norm.weight.fill_(7.0)
    model.save_pretrained(out)  # one file, where the shards were: they are gone, and the change is what loads
    assert sorted(f.name for f in out.glob("embzip*.safetensors*")) == ["embzip.safetensors"]
    assert torch.equal(load_model(out).model.norm.weight, torch.full_like(model.model.norm.weight, 7.0))
    # a folder holding both (an older embzip's save) reads the single file, as transformers would
    shutil.copy(out / "embzip.safetensors", tmp_path / "single.safetensors")
    apply_factors(open_model(str(sharded), load="stream"), factors, out, force=True)
    shutil.copy(tmp_path / "single.safetensors", out / "embzip.safetensors")
    assert stream.weight_files(out, "embzip") == [out / "embzip.safetensors"]
