"""embzip called from someone else's program: the caller's grad mode, model mode, random stream and argv."""

import json
import subprocess
import sys

import pytest
import torch

import embzip
from embzip.heal import HealConfig
from embzip.methods import Recipe


def _same(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_methods_that_train_do_so_inside_the_callers_no_grad_or_inference_mode(tiny, mode, dtype):
    """A service or notebook wraps its work in no_grad / inference_mode; the paper's autoencoder and healing train
    anyway, to the same factors (they failed in backward() with 'does not require grad')."""
    opened = embzip.open_model(tiny("llama", dtype))
    healing = Recipe(method="aware", heal=HealConfig(steps=2, batch_size=2, seq_len=16, val_sequences=1, eval_every=1))
    for recipe, size in [("paper", 4), (healing, 4)]:
        plain, _ = embzip.compress(opened, recipe, rank=size, write=False)
        with mode():
            inside, _ = embzip.compress(opened, recipe, rank=size, write=False)
        assert _same(plain, inside)
        assert torch.is_grad_enabled() is True  # the caller's mode is back once the call returns


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_apply_factors_on_a_model_in_train_mode_checks_it_in_eval_mode_and_gives_its_mode_back(tiny, tmp_path, dtype):
    """Right after fine-tuning, a model is in train mode: the reload check compared logits with dropout on and
    refused every directory ('does not reproduce the model')."""
    opened = embzip.open_model(tiny("bert-mlm", dtype))
    factors, _ = embzip.compress(opened, "int8", write=False)
    opened.model.train()
    summary = embzip.apply_factors(opened, factors, tmp_path / "out")
    assert summary["reload_max_abs_diff"] == 0.0 and opened.model.training
    manifest = json.loads((tmp_path / "out" / "embzip.json").read_text())
    assert manifest["command"] is None  # not the host program's own command line (pytest's here)


def test_a_library_call_without_bars_leaves_the_callers_random_stream_alone(tiny):
    """Importing rich draws from Python's random; embzip imports it only to draw a bar or print a table."""
    script = ("import random, sys, embzip\n"
              f"opened = embzip.open_model({tiny('llama')!r})\n"
              "random.seed(0); expected = [random.random() for _ in range(3)]\n"
              "random.seed(0); embzip.compress(opened, 'int8', write=False)\n"
              "print([random.random() for _ in range(3)] == expected, 'rich' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_compressed_embeddings_say_what_they_are(tiny):
    opened = embzip.open_model(tiny("llama"))
    low, _ = embzip.compress(opened, "svd", rank=8, write=False)
    quant, _ = embzip.compress(opened, "int4", write=False)
    assert repr(low) == f"Factors({opened.vocab_size} x 32, kind=lowrank, rank=8, " \
                        f"{low.bits_per_weight():.4g} bits per weight, method=svd)"
    assert repr(quant) == f"Quantized({opened.vocab_size} x 32, kind=quant, 5 bits per weight, method=int4)"


def test_the_meta_device_takes_the_kinds_whose_layout_is_not_read_from_values(tiny):
    opened = embzip.open_model(tiny("llama"))
    for method, size in [("int8", {}), ("int4", {}), ("svd", {"rank": 4})]:
        factors, _ = embzip.compress(opened, method, write=False, **size)
        moved = factors.to(device="meta")
        assert moved.shape == factors.shape and {t.device.type for t in moved.tensors().values()} == {"meta"}
    codebook, _ = embzip.compress(opened, "codebook", bits=4, write=False)
    with pytest.raises(ValueError, match="a codebook's layout is read from its stored tensors"):
        codebook.to(device="meta")
