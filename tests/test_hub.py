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
