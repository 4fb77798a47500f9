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
