"""Models that do not fit: accelerate spreads them (here: CPU and disk), and forward passes still agree."""

import torch

from embzip import checkpoint
from embzip.aware import hidden_second_moment
from embzip.models import open_model


def test_a_model_too_big_for_memory_is_offloaded_and_runs_the_same(tiny, monkeypatch, tmp_path, text_file):
    import embzip.models as models

    monkeypatch.setenv("EMBZIP_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "native_bf16", lambda: False)  # both in float32 (a placed model is never copied)
    plain = open_model(tiny("llama"))
    sizes = {"cpu": 60_000}  # bytes: room for the embedding and little else, so layers go to disk
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: dict(sizes))
    big = open_model(tiny("llama"))
    placement = big.model.hf_device_map
    assert "disk" in placement.values()  # really offloaded
    assert placement["model.embed_tokens"] == placement["lm_head"] == "cpu"
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
    with torch.no_grad():
        assert torch.allclose(big.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, atol=1e-5)
    lines = open(text_file).read().splitlines()
    a = hidden_second_moment(big.model, big.tokenizer, lines, 64, seq_len=16)
    b = hidden_second_moment(plain.model, plain.tokenizer, lines, 64, seq_len=16)
    assert torch.allclose(a, b, atol=1e-5)
