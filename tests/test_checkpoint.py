"""Reading the embedding alone: the same matrix, description and factors as a full load, sharded or not."""

import pytest
import torch

from embzip.checkpoint import EmbeddingOnly, find_checkpoint
from embzip.models import open_model
from embzip.pipeline import compress


@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory):
    """The tiny Llama re-saved in shards of a few kB, with an index."""
    import transformers

    path = tmp_path_factory.mktemp("sharded")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama"))
    model.save_pretrained(path, max_shard_size="20KB")
    transformers.AutoTokenizer.from_pretrained(tiny("llama")).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["bert-mlm", "bert-encoder", "gpt2", "llama", "sharded"])
def test_embedding_only_matches_the_full_load(tiny, sharded, kind):
    path = sharded if kind == "sharded" else tiny(kind)
    light, full = open_model(path, load="embedding"), open_model(path)
    assert isinstance(light, EmbeddingOnly) and not isinstance(full, EmbeddingOnly)
    assert torch.equal(light.embedding, full.embedding)
    assert light.describe() == full.describe()
    assert light.tied == full.tied and light.kind == full.kind
    # Nothing but the embedding (and the head tied to it) is in memory.
    real = {n for n, p in light.model.named_parameters() if p.device.type != "meta"}
    assert real == {light.embedding_name}


def test_sharded_index_is_read(sharded):
    checkpoint = find_checkpoint(sharded)
    assert len(checkpoint.files) > 2  # really sharded
    assert checkpoint.weight_map["model.embed_tokens.weight"] in checkpoint.files


def test_a_single_file_beside_stale_shards_is_what_is_read_and_copied_as_transformers_loads_it(tiny, sharded,
                                                                                                  tmp_path):
    import shutil

    import transformers

    from embzip.modeldir import apply_factors, load_model
    from embzip.svd import svd_factors

    # model.safetensors from the tiny Llama, plus another model's shards and index left over from an older save
    folder = tmp_path / "both"
    shutil.copytree(tiny("llama"), folder)
    stale = transformers.AutoModelForCausalLM.from_pretrained(sharded)
    with torch.no_grad():
        for p in stale.parameters():
            p.mul_(3)
    stale.save_pretrained(tmp_path / "stale", max_shard_size="20KB")
    for f in (tmp_path / "stale").glob("model*.safetensors*"):
        shutil.copy(f, folder)
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    light = open_model(str(folder), load="embedding")
    assert torch.equal(light.embedding, loaded.get_input_embeddings().weight)
    assert set(find_checkpoint(folder).files) == {"model.safetensors"}
    factors = svd_factors(light.embedding.detach(), 8)
    apply_factors(open_model(str(folder), load="stream"), factors, tmp_path / "out")  # the other tensors copied
    with torch.no_grad():  # the directory stores a float32 model's factors in float16
        loaded.get_input_embeddings().weight.copy_(factors.to(dtype=torch.float16).reconstruct())
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        got, expected = load_model(tmp_path / "out")(ids).logits, loaded(ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_svd_from_the_embedding_alone_is_the_same(tiny, sharded, tmp_path):
    a, _ = compress(sharded, "svd", rank=3, out=tmp_path / "a.safetensors")
    b, _ = compress(open_model(sharded), "svd", rank=3, out=tmp_path / "b.safetensors")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.decoder, b.decoder)
    assert a.meta["source"] == b.meta["source"]


def test_a_directory_without_safetensors_falls_back_to_the_full_load(tiny, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny("gpt2"))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    transformers.AutoTokenizer.from_pretrained(tiny("gpt2")).save_pretrained(tmp_path)
    opened = open_model(str(tmp_path), load="embedding")
    assert not isinstance(opened, EmbeddingOnly) and opened.vocab_size == model.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("kind,head", [("bert-mlm", "tied"), ("bert-mlm", "input"), ("gpt2", "tied"),
                                       ("llama", "input"), ("bert-encoder", "input"), ("sharded", "tied"),
                                       ("sharded", "input")])
@pytest.mark.parametrize("dense", [False, True])
def test_streamed_apply_writes_what_the_full_load_writes(tiny, sharded, tmp_path, kind, head, dense):
    """apply from the embedding alone: the directory loads as the same model as apply from a full load."""
    from test_apply import logits

    from embzip.modeldir import _load_dense, apply_factors, load_model
    from embzip.svd import svd_factors

    path = sharded if kind == "sharded" else tiny(kind)
    full, light = open_model(path), open_model(path, load="embedding")
    factors = svd_factors(full.embedding.detach(), 3)
    a = apply_factors(full, factors, tmp_path / "full", head=head, dense=dense)
    b = apply_factors(light, factors, tmp_path / "light", head=head, dense=dense)
    load = _load_dense if dense else load_model
    expected = logits(load(tmp_path / "full"))
    assert torch.equal(logits(load(tmp_path / "light")), expected)
    assert torch.equal(logits(full.model), expected)  # the full path's in-memory model, spliced
    assert b["reload_max_abs_diff"] == 0.0
    assert (a["reload_check"], b["reload_check"]) == ("logits", "files and the embedding module")
    skip = {"weights_file_bytes_after", "out", "reload_max_abs_diff", "reload_check"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    if kind == "sharded":
        assert len(list((tmp_path / "light").glob("*.safetensors"))) > 2  # the source's sharding is kept
    for summary, out in ((a, tmp_path / "full"), (b, tmp_path / "light")):  # shards counted too
        weights = [f for f in out.glob("*.safetensors") if dense or f.name.startswith("embzip")]
        assert summary["weights_file_bytes_after"] == sum(f.stat().st_size for f in weights)


def test_checkpoint_with_other_names_falls_back_to_the_full_load(tiny, tmp_path):
    """A GPT2Model checkpoint (no 'transformer.' prefix) under an LM-head config: streaming cannot map the
    names, so apply loads the whole model and writes what the full path writes."""
    import transformers
    from safetensors.torch import save_file

    from embzip.modeldir import apply_factors, load_model
    from embzip.svd import svd_factors

    lm = transformers.AutoModelForCausalLM.from_pretrained(tiny("gpt2"))
    save_file({k: v.contiguous() for k, v in lm.transformer.state_dict().items()}, tmp_path / "model.safetensors")
    lm.config.save_pretrained(tmp_path)
    light = open_model(str(tmp_path), load="stream")
    assert isinstance(light, EmbeddingOnly)  # the embedding is found under its unprefixed name
    factors = svd_factors(light.embedding.detach(), 3)
    summary = apply_factors(light, factors, tmp_path / "out")
    assert summary["reload_max_abs_diff"] == 0.0 and summary["model"] == str(tmp_path)
    assert load_model(tmp_path / "out").lm_head.__class__.__name__ == "FactoredHead"


def test_a_corrupted_copy_is_caught_and_nothing_is_kept(tiny, tmp_path, monkeypatch):
    from embzip import stream
    from embzip.errors import ModelError
    from embzip.modeldir import apply_factors
    from embzip.svd import svd_factors

    light = open_model(tiny("llama"), load="stream")
    factors = svd_factors(light.embedding.detach(), 3)
    real = stream._write_file

    def corrupt(path, entries, metadata):
        size = real(path, entries, metadata)
        with open(path, "r+b") as f:  # flip the last byte of the data
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 0xFF]))
        return size

    monkeypatch.setattr(stream, "_write_file", corrupt)
    with pytest.raises(ModelError, match="differs"):
        apply_factors(light, factors, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("same", [False, True])
def test_a_tied_config_over_a_head_stored_apart_is_untied_as_transformers_does(tiny, tmp_path, same):
    """A checkpoint whose config ties the head but which stores its own lm_head.weight: transformers keeps the
    stored head when its values differ (it warns), so embzip must not put the compressed embedding in its place."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    from embzip.factors import load_factors
    from embzip.modeldir import apply_factors, load_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny("llama"), model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding.clone() if same else torch.randn(embedding.shape,
                                                                             generator=torch.Generator().manual_seed(0))
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    opened = open_model(str(model_dir), load="embedding")
    assert isinstance(opened, EmbeddingOnly) and opened.tied == same
    assert opened.tied == open_model(str(model_dir)).tied  # as the full load sees it
    compress(opened, "svd", rank=3, out=tmp_path / "f.safetensors")
    factors = load_factors(tmp_path / "f.safetensors")
    summary = apply_factors(opened, factors, tmp_path / "out")
    assert summary["head"] == ("tied" if same else "input")
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # what transformers runs
    reference.get_input_embeddings().weight.data = factors.reconstruct().to(embedding.dtype)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, load_model(tmp_path / "out")(input_ids=ids).logits
    if not same:
        assert torch.allclose(got, expected, atol=1e-5)
