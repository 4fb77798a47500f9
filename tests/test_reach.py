"""Rows a tokenizer never produces (reach.py), and a codebook fit that leaves them out."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from conftest import NEVER, TEXT, wordpiece_tokenizer
from embzip.reach import unreachable_rows


def test_wordpiece_entries_that_cannot_come_out_are_found_and_no_others():
    tok = wordpiece_tokenizer()
    rows = unreachable_rows(tok, len(tok))
    assert tok.convert_ids_to_tokens(rows.tolist()) == NEVER  # in vocabulary order
    assert rows.dtype == torch.long and torch.equal(rows, rows.sort().values)
    # every id the tokenizer gives for text full of the pieces' characters is reachable
    text = "Hot water!!! ... he [unused0] looked, Looked. things said:, [CLS] wording! hots.\n" + TEXT
    ids = {i for line in text.splitlines() for i in tok(line)["input_ids"]}
    assert not ids & set(rows.tolist())
    assert {"hot", ".", "##s", "[CLS]"} <= set(tok.convert_ids_to_tokens(list(ids)))


def test_rows_beyond_the_asked_vocabulary_and_special_tokens_are_never_reported():
    tok = wordpiece_tokenizer()
    first = tok.convert_tokens_to_ids(NEVER[2])
    assert unreachable_rows(tok, first).tolist() == tok.convert_tokens_to_ids(NEVER[:2])
    assert not set(tok.all_special_ids) & set(unreachable_rows(tok, len(tok)).tolist())


def test_other_tokenizers_report_nothing(tiny):
    from transformers import AutoTokenizer

    for kind in ("bert-encoder", "gpt2"):  # word-level and a causal model's: this test does not decide them
        tok = AutoTokenizer.from_pretrained(tiny(kind))
        assert len(unreachable_rows(tok, len(tok))) == 0
    assert len(unreachable_rows(object(), 10)) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fit_leaves_unreachable_rows_out_unless_asked_to_code_them(tiny, tmp_path, dtype):
    from embzip import cli, load_factors, open_model

    model = tiny("bert-wordpiece", dtype)
    runner = CliRunner()
    paths = {}
    for name, extra in (("left", []), ("all", ["--code-unreachable"])):
        paths[name] = tmp_path / f"{name}.safetensors"
        result = runner.invoke(cli.app, ["fit", model, "--bits", "6", "--self-tokens", "0", "-o", str(paths[name]),
                                         "--json", "-q", *extra])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["bits_per_weight"] <= 6 and summary["unreachable_rows"] == (0 if extra else len(NEVER))
    left, every = load_factors(paths["left"]), load_factors(paths["all"])
    opened = open_model(model)
    never = torch.tensor(opened.tokenizer.convert_tokens_to_ids(NEVER))
    assert torch.equal(left.tensors()["absent"].long(), never) and "absent" not in every.tensors()
    assert left.meta["unreachable_rows"] == len(NEVER) and every.meta["unreachable_rows"] == 0
    assert left.shape == every.shape == tuple(opened.embedding.shape)
    assert left.tensors()["absent.fill"].dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    # the absent rows decode to one fill row (their mean), the others from codes of their own
    rows = left.rows(never)
    assert torch.equal(rows, rows[:1].expand_as(rows))
    mean = opened.embedding.float()[never].mean(0).to(left.tensors()["absent.fill"].dtype).float()
    assert torch.equal(rows[0], mean)
    assert left.tensors()["stage0.codes"].shape[0] == len(opened.tokenizer) - len(NEVER)
    assert every.tensors()["stage0.codes"].shape[0] == len(opened.tokenizer)


def test_a_tied_head_keeps_every_row(tiny, monkeypatch):
    from embzip import compress
    from embzip.methods import Inputs, recipe
    from embzip.methods.codebook import left_out
    from embzip.models import open_model

    opened = open_model(tiny("bert-wordpiece"))
    r = recipe("codebook")
    assert len(left_out(Inputs(opened, r), r.codebook)) == len(NEVER)
    opened.tied = True  # a tied head scores every row, reachable or not
    assert len(left_out(Inputs(opened, r), r.codebook)) == 0
    opened.tied = False
    monkeypatch.setattr("embzip.reach.unreachable_rows", lambda tok, vocab: torch.arange(vocab // 2 + 1))
    assert len(left_out(Inputs(opened, r), r.codebook)) == 0  # more than half: a tokenizer not understood
    assert compress(tiny("bert-mlm"), "codebook", bits=6, write=False)[0].meta["unreachable_rows"] == 0


def test_unreachable_rows_are_found_once_per_model_and_cache(tiny, monkeypatch):
    """`embzip bench` fits the codebook at several sizes from one cache: the tokenizer's vocabulary is read once."""
    import embzip.reach
    from embzip.methods import make_factors, recipe
    from embzip.models import open_model
    from embzip.selfsample import SampleConfig

    calls, found = [], embzip.reach.unreachable_rows
    monkeypatch.setattr(embzip.reach, "unreachable_rows", lambda *a: calls.append(a) or found(*a))
    opened, cache = open_model(tiny("bert-wordpiece")), {}
    r = replace(recipe("codebook"), sample=SampleConfig(tokens=0))
    for bits in (4.0, 6.0):
        _, details = make_factors(opened, bits, r, cache=cache)
        assert details["unreachable_rows"] == len(NEVER)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_applied_directory_with_absent_rows_reloads_and_looks_up_the_same_vectors(tiny, tmp_path, dtype):
    from embzip import apply_factors, compress, load_model, open_model

    model = tiny("bert-wordpiece", dtype)
    factors = compress(model, "codebook", bits=6, write=False)[0]
    assert len(factors.tensors()["absent"]) == len(NEVER)
    opened = open_model(model)
    summary = apply_factors(opened, factors, tmp_path / "out")
    assert summary["reload_max_abs_diff"] == 0 and summary["weights_file_bytes_after"] < summary["weights_file_bytes_before"]
    reloaded = load_model(tmp_path / "out")
    ids = torch.arange(len(opened.tokenizer)).unsqueeze(0)
    got = reloaded.get_input_embeddings()(ids)[0]
    assert got.dtype == getattr(torch, dtype)
    assert torch.equal(got, factors.rows(ids[0]).to(got.dtype))
    with torch.no_grad():
        batch = opened.tokenizer(TEXT.splitlines()[:2], return_tensors="pt", padding=True)
        assert torch.isfinite(reloaded(**batch).last_hidden_state).all()


def test_info_counts_the_unreachable_rows(tiny):
    from embzip import cli

    for kind, expected in (("bert-wordpiece", len(NEVER)), ("gpt2", 0)):
        result = CliRunner().invoke(cli.app, ["info", tiny(kind), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["unreachable_rows"] == expected


def test_healing_trains_the_codebooks_and_keeps_the_absent_rows(tiny, text_file):
    from dataclasses import replace

    from embzip import compress
    from embzip.methods import recipe

    model = tiny("bert-wordpiece")
    plain = compress(model, "codebook", bits=6, write=False)[0]
    r = recipe("codebook+heal")
    r = replace(r, heal=replace(r.heal, steps=3), weights_text=str(text_file))
    healed = compress(model, r, bits=6, write=False)[0]
    assert healed.meta["heal"]["best_step"] > 0  # it trained, and kept a step after the start
    assert not torch.equal(healed.tensors()["stage0.codebook"], plain.tensors()["stage0.codebook"])
    for name in ("absent", "absent.fill"):
        assert torch.equal(healed.tensors()[name], plain.tensors()[name])
    rows = healed.rows(healed.tensors()["absent"].long())
    assert torch.equal(rows, plain.rows(plain.tensors()["absent"].long()))
