"""A checkpoint whose other weights are 10x its embedding: `svd` and `apply` stay near the embedding's bytes.

Peak memory is each command's own ru_maxrss, in a child process, over a baseline measured the same way:
the same command on a tiny checkpoint of the same architecture (1024 x 64 embedding), so the baseline
holds what the command imports and sets up whatever the sizes (torch, transformers, the Llama modelling
code, embzip) and the difference is what the data costs. A full load would add the whole checkpoint
(~370 MB); the bound allows 1.5x the embedding (32 MB) plus 150 MB. (A baseline of a child that only
imports those modules missed some of what the commands import: 30-45 MB, which left svd within 28 KB
of the bound in a fresh virtualenv.)
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from scale_bench import build_checkpoint, measure  # noqa: E402

from embzip.checkpoint import find_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
ALLOWANCE = 150 << 20


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("scale") / "checkpoint", "small", shard_bytes=100 << 20)
    checkpoint = find_checkpoint(path)
    info = checkpoint.entry("model.embed_tokens.weight")
    emb_bytes = torch.Size(info["shape"]).numel() * 2
    assert len(checkpoint.files) >= 3  # sharded
    assert checkpoint.nbytes() - emb_bytes >= 10 * emb_bytes  # the rest is at least 10x the embedding
    tiny = build_checkpoint(tmp_path_factory.mktemp("scale") / "tiny", "tiny")
    work = tmp_path_factory.mktemp("baseline")
    factors = work / "f.safetensors"
    baseline = {"svd": _run(["svd", str(tiny), "--rank", "16", "-o", str(factors), "-q"])["peak_rss"]}
    baseline["apply"] = _run(["apply", str(tiny), str(factors), "-o", str(work / "out"), "-q"])["peak_rss"]
    baseline["dense"] = _run(["apply", str(tiny), str(factors), "-o", str(work / "dense"), "--dense", "-q"])["peak_rss"]
    return path, checkpoint, emb_bytes, baseline


def _run(argv):
    return measure([sys.executable, "-m", "embzip", *argv])


def test_svd_and_apply_stay_near_the_embedding(big, tmp_path):
    path, checkpoint, emb_bytes, baseline = big

    def bound(command):
        return baseline[command] + 1.5 * emb_bytes + ALLOWANCE

    assert all(bound(c) < baseline[c] + checkpoint.nbytes() for c in baseline)  # the bound would catch a full load
    factors = tmp_path / "f.safetensors"
    svd = _run(["svd", str(path), "--rank", "64", "-o", str(factors), "-q"])
    assert svd["peak_rss"] <= bound("svd"), (svd, baseline, emb_bytes)

    from embzip.factors import load_factors

    loaded = load_factors(factors)
    assert loaded.shape == tuple(checkpoint.entry("model.embed_tokens.weight")["shape"]) and loaded.rank == 64

    out = tmp_path / "out"
    apply = _run(["apply", str(path), str(factors), "-o", str(out), "-q"])
    assert apply["peak_rss"] <= bound("apply"), (apply, baseline, emb_bytes)
    manifest = json.loads((out / "embzip.json").read_text())
    assert manifest["format"] == "factored" and manifest["rank"] == 64
    written = find_checkpoint_like(out)
    expected = set(checkpoint.weight_map) - {"model.embed_tokens.weight"}
    assert set(written) == expected | {"model.embed_tokens.codes", "model.embed_tokens.decoder"}

    dense = _run(["apply", str(path), str(factors), "-o", str(tmp_path / "dense"), "--dense", "-q"])
    assert dense["peak_rss"] <= bound("dense"), (dense, baseline, emb_bytes)
    from safetensors import safe_open

    rebuilt = find_checkpoint(tmp_path / "dense")
    assert set(rebuilt.weight_map) == set(checkpoint.weight_map)
    with safe_open(str(tmp_path / "dense" / rebuilt.weight_map["model.norm.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor("model.norm.weight"), checkpoint.tensor("model.norm.weight"))
    row = rebuilt.tensor("model.embed_tokens.weight")[5].float()
    assert torch.allclose(row, loaded.rows(torch.tensor([5]))[0], atol=1e-2)


def find_checkpoint_like(directory: Path) -> dict[str, str]:
    """{tensor: file} of a factored directory (embzip.safetensors or its shards)."""
    index = directory / "embzip.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(directory / "embzip.safetensors"), "pt") as f:
        return {k: "embzip.safetensors" for k in f.keys()}
