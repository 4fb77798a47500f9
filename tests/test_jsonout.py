"""--json output is strict JSON: a non-finite number is written as null, never as Infinity or NaN."""

import json

import pytest
import torch
from typer.testing import CliRunner

from embzip.cli import app
from embzip.jsonout import dumps, finite


def strict(text):
    """json.loads that refuses Infinity and NaN, as JavaScript's JSON.parse and jq do."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"a": float("inf"), "b": [1.5, float("nan"), {"c": -float("inf")}], "d": (2, 3.0), "e": "inf"}
    assert finite(value) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, 3.0], "e": "inf"}
    assert strict(dumps(value)) == finite(value)
    assert strict(dumps({"path": torch.float32})) == {"path": "torch.float32"}  # what json cannot write: str()


def test_a_perplexity_that_overflows_is_null_in_the_json(tiny, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama"))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e4)  # tied: logits of order 1e8, a log likelihood past exp's range
    model.save_pretrained(tmp_path / "huge")
    transformers.AutoTokenizer.from_pretrained(tiny("llama")).save_pretrained(tmp_path / "huge")
    result = CliRunner().invoke(app, ["perplexity", str(tmp_path / "huge"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    scored = strict(result.stdout)
    assert scored["perplexity"] is None and scored["tokens"] > 0
