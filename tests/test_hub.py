"""An unreachable hub: offline from the first request, so a cached hub model opens at once and another fails at once."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import constants

from embzip import hub

NOWHERE = "https://embzip-test.invalid"  # .invalid never resolves (RFC 6761)
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub as a user without HF_HUB_OFFLINE and without a proxy has it; restored afterwards."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_decided", {})
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)


def test_a_name_that_does_not_resolve_turns_offline_mode_on(online, monkeypatch):
    assert hub.resolves("embzip-test.invalid") is False and hub.resolves("localhost") is True
    monkeypatch.setattr(constants, "ENDPOINT", "http://localhost")
    assert hub.offline_if_unreachable() is False and constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(constants, "ENDPOINT", NOWHERE)
    assert hub.offline_if_unreachable() is True and constants.HF_HUB_OFFLINE is True


def test_a_proxy_or_a_slow_resolver_leaves_the_requests_alone(online, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", NOWHERE)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the proxy resolves names, not this machine
    assert hub.offline_if_unreachable() is False and constants.HF_HUB_OFFLINE is False
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(hub.socket, "getaddrinfo", lambda *a, **k: __import__("time").sleep(5))
    assert hub.resolves("embzip-test.invalid", seconds=0.2) is None
    assert hub.offline_if_unreachable() is False and constants.HF_HUB_OFFLINE is False


def test_the_host_is_looked_up_once_per_process(online, monkeypatch):
    asked = []
    monkeypatch.setattr(constants, "ENDPOINT", "http://localhost")
    monkeypatch.setattr(hub, "resolves", lambda host, seconds=hub.RESOLVE_SECONDS: asked.append(host) or True)
    assert hub.offline_if_unreachable() is False and hub.offline_if_unreachable() is False
    assert asked == ["localhost"]


def _cache_with(model_dir, cache, repo="tiny-org/tiny-llama"):
    """A Hugging Face cache holding `model_dir` as the snapshot of `repo` at main, as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return repo


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cached_hub_model_opens_without_the_hub_and_an_uncached_one_fails_at_once(tiny, tmp_path, dtype):
    repo = _cache_with(tiny("llama", dtype), tmp_path / "hub")
    unset = (*PROXIES, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=NOWHERE)

    def embzip(*args):
        return subprocess.run([sys.executable, "-m", "embzip", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    done = embzip("svd", repo, "--rank", "4", "-o", str(tmp_path / "f.safetensors"), "--json")
    assert done.returncode == 0, done.stderr
    assert "does not resolve and no proxy is set: working offline" in " ".join(done.stderr.split())
    assert json.loads(done.stdout)["rank"] == 4 and (tmp_path / "f.safetensors").is_file()
    assert "Retrying" not in done.stderr  # no request was tried
    missing = embzip("info", "tiny-org/not-cached")
    assert missing.returncode == 1 and "could not open model 'tiny-org/not-cached'" in missing.stderr
    assert "Retrying" not in missing.stderr


def test_a_hub_dataset_fails_at_once_when_the_hub_cannot_be_reached(online, monkeypatch):
    """load_text(dataset=NAME) goes offline as a hub model does: a dataset not in the cache fails in a moment,
    not after huggingface_hub's retries."""
    import datasets

    from embzip.errors import DataError
    from embzip.texts import load_text

    monkeypatch.setattr(constants, "ENDPOINT", NOWHERE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    with pytest.raises(DataError, match="could not load dataset 'embzip-test-org/no-such-dataset'"):
        load_text(dataset="embzip-test-org/no-such-dataset")
    assert datasets.config.HF_HUB_OFFLINE is True and constants.HF_HUB_OFFLINE is True  # no request was tried


def _hub_env(tmp_path):
    unset = (*PROXIES, "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=NOWHERE, HF_HUB_OFFLINE="1")
    return env


def _as_bin(model_dir, target):
    """`model_dir` saved again with a pytorch_model.bin instead of safetensors (a checkpoint embzip loads whole)."""
    import torch

    shutil.copytree(model_dir, target)
    from safetensors.torch import load_file

    torch.save(load_file(str(target / "model.safetensors")), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_a_hub_model_records_the_commit_it_came_from_and_keeps_its_snapshots_files(tiny, tmp_path, weights):
    """By hub id, read alone (safetensors) or loaded whole (a .bin): the snapshot's commit is the recorded revision,
    and apply copies the files beside the weights from the snapshot folder (a sentence-transformers model's
    pooling, which a hub id looked up as a folder of the current directory never found)."""
    source = tmp_path / "model"
    if weights == "bin":
        _as_bin(tiny("bert-encoder"), source)
    else:
        shutil.copytree(tiny("bert-encoder"), source)
    (source / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 32, "pooling_mode_mean": true}')
    repo = _cache_with(source, tmp_path / "hub")
    env = _hub_env(tmp_path)

    def embzip(*args):
        done = subprocess.run([sys.executable, "-m", "embzip", *args, "--json"], capture_output=True, text=True,
                              env=env, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    commit = (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").read_text()
    assert embzip("info", repo)["revision"] == commit
    embzip("fit", repo, "--method", "int8", "-o", "f.safetensors")
    summary = embzip("apply", repo, "f.safetensors", "--out", "out")
    assert summary["sentence_transformers_files"] == ["modules.json", "1_Pooling/"]
    assert (tmp_path / "out" / "1_Pooling" / "config.json").is_file()
    assert json.loads((tmp_path / "out" / "embzip.json").read_text())["source"]["revision"] == commit


def test_outputs_inside_a_repository_of_the_hub_cache_are_refused(tiny, tmp_path, monkeypatch):
    from embzip.errors import OutputError
    from embzip.outputs import check_output_dir, check_output_file, check_output_folder

    repo = _cache_with(tiny("llama"), tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = next((root / "snapshots").iterdir())
    for check, path in [(check_output_file, snapshot / "f.safetensors"), (check_output_file, root / "blobs" / "x"),
                        (check_output_dir, snapshot / "compressed"), (check_output_folder, snapshot / "bench")]:
        kwargs = {"marker": "embzip.json"} if check is check_output_dir else {}
        with pytest.raises(OutputError, match=r"lies in the Hugging Face cache \(.*models--tiny-org--tiny-llama\), "
                                              "whose folders are huggingface_hub's: write it elsewhere"):
            check(path, False, **kwargs) if check is not check_output_folder else check(path)
    assert not (snapshot / "compressed").exists() and not (root / "blobs").exists()
    check_output_file(tmp_path / "beside-the-cache.safetensors", False)  # elsewhere, as before
    check_output_folder(tmp_path / "hub" / "bench")  # the cache's own top folder holds no repository's files


def test_a_cached_repository_without_a_config_is_named_as_such_not_as_a_network_failure(tiny, tmp_path):
    """An old sentence-transformers layout (its transformer in 0_Transformer/) in the cache: offline, huggingface_hub
    blamed the network; a local folder of it was already refused for its missing config.json."""
    old = tmp_path / "old"
    shutil.copytree(tiny("bert-encoder"), old / "0_Transformer")
    (old / "modules.json").write_text("[]")
    repo = _cache_with(old, tmp_path / "hub", "tiny-org/old-layout")
    for model in (repo, str(old)):
        done = subprocess.run([sys.executable, "-m", "embzip", "info", model], capture_output=True, text=True,
                              env=_hub_env(tmp_path), timeout=300)
        message = " ".join(done.stderr.split())
        assert done.returncode == 1 and "couldn't connect" not in message
        assert "no config.json" in message and message.endswith(
            "; its transformer is in 0_Transformer/ (an older sentence-transformers layout): give that folder"), message


@pytest.mark.parametrize("load", ["embedding", "full"])
def test_a_branch_or_tag_asked_for_is_recorded_as_the_commit_it_names(tiny, tmp_path, load):
    repo = _cache_with(tiny("llama"), tmp_path / "hub")
    refs = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs"
    commit = (refs / "main").read_text()
    (refs / "v1").write_text(commit)
    script = f"import embzip; print(embzip.open_model({repo!r}, revision='v1', load={load!r}).revision)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_hub_env(tmp_path),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == commit
