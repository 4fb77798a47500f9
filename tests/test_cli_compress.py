"""`embzip svd` / `embzip fit` end to end on tiny models, and every bad input as a table."""

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from embzip.cli import app
from embzip.factors import load_factors

runner = CliRunner()
FAST_FIT = ["--method", "paper", "--epochs", "2", "--anneal-epochs", "1", "--batch-size", "16"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("kind", ["bert-mlm", "gpt2", "llama", "bert-encoder"])
@pytest.mark.parametrize("method", ["svd", "fit"])
def test_json_summary_and_file(tiny, tmp_path, kind, method):
    out = tmp_path / "f.safetensors"
    extra = FAST_FIT if method == "fit" else []
    result = run(method, tiny(kind), "--rank", 4, "--out", out, "--json", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("method", "rank", "compression_ratio", "params_before", "params_after", "cosine_distance", "rmse",
                "seconds", "out"):
        assert key in summary
    factors = load_factors(out)
    assert summary["rank"] == factors.rank == 4
    assert summary["params_after"] == factors.num_params() < summary["params_before"]
    assert factors.meta["method"] == {"svd": "svd", "fit": "paper"}[method]
    assert factors.meta["source"]["model"] == tiny(kind)
    assert factors.meta["metrics"]["rmse"] == pytest.approx(summary["rmse"])
    if kind == "llama":  # embedding rows padded beyond the tokenizer
        assert factors.vocab == factors.meta["source"]["tokenizer_size"] + 7
    if method == "fit":
        assert factors.bias is not None and factors.meta["settings"]["fit"]["epochs"] == 2


def test_ratio_picks_the_rank(tiny, tmp_path):
    result = run("svd", tiny("gpt2"), "--ratio", 3, "--out", tmp_path / "f.safetensors", "--json", "-q")
    summary = json.loads(result.stdout)
    assert summary["compression_ratio"] >= 3 and result.exit_code == 0


@pytest.mark.parametrize("args, suffix", [
    (["svd", "--rank", 3], ".svd-r3.safetensors"),
    (["fit", "--method", "int4"], ".int4.safetensors"),
    (["fit", "--method", "int4", "--group-size", 16], ".int4g16.safetensors"),  # not the name of group 32's file
    (["fit", "--method", "wsvd", "--rank", 3, "--keep-norms"], ".wsvd-norms-r3.safetensors"),  # not the plain file's
    (["fit", "--method", "wsvd", "--rank", 3], ".wsvd-r3.safetensors"),
    (["fit", "--bits", "4.0000000001", "--self-tokens", 0], ".codebook-4.0000000001b.safetensors"),  # not 4b's file
])
def test_default_out_name(tiny, tmp_path, monkeypatch, args, suffix):
    monkeypatch.chdir(tmp_path)
    result = run(args[0], tiny("gpt2"), *args[1:], "--json", "-q")
    assert result.exit_code == 0, result.output
    name = json.loads(result.stdout)["out"]
    assert name.endswith(suffix) and (tmp_path / name).is_file()


@pytest.mark.parametrize("folder, name", [("模型", "模型.int8.safetensors"), ("Modèle v2", "Modèle-v2.int8.safetensors"),
                                          ("-x", "x.int8.safetensors"), ("…", "model.int8.safetensors")])
def test_default_out_name_keeps_letters_of_any_script_and_never_reads_as_an_option(tiny, tmp_path, monkeypatch,
                                                                                     folder, name):
    shutil.copytree(tiny("gpt2"), tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    result = run("fit", f"./{folder}", "--method", "int8", "--json", "-q")
    assert result.exit_code == 0 and json.loads(result.stdout)["out"] == name and (tmp_path / name).is_file()
    applied = run("apply", f"./{folder}", name, "--out", "applied", "-q")  # the name works as an argument
    assert applied.exit_code == 0, applied.output


@pytest.fixture
def nan_model(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "nan-model"
    shutil.copytree(tiny("gpt2"), path)
    weights = load_file(path / "model.safetensors")
    key = next(k for k in weights if "wte" in k)
    weights[key][5, 3] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


BAD = [
    # (arguments, exit code, message fragment); {model} is a tiny GPT-2, {out} a fresh file path
    (["svd", "./no-such-model", "--rank", "2"], 2, "not found"),
    (["svd", "{empty}", "--rank", "2"], 1, "not a transformers model directory"),
    (["svd", "{model}", "--rank", "0", "--out", "{out}"], 2, "positive"),
    (["svd", "{model}", "--rank", "-3", "--out", "{out}"], 2, "positive"),
    (["svd", "{model}", "--rank", "500", "--out", "{out}"], 2, "largest useful rank"),
    (["svd", "{model}", "--ratio", "1", "--out", "{out}"], 2, "greater than 1"),
    (["svd", "{model}", "--ratio", "0.5", "--out", "{out}"], 2, "greater than 1"),
    (["svd", "{model}", "--rank", "2", "--ratio", "2", "--out", "{out}"], 2, "exactly one"),
    (["svd", "{model}", "--out", "{out}"], 2, "exactly one"),
    (["fit", "{model}", "--rank", "2", "--method", "paper", "--epochs", "0", "--out", "{out}"], 2,
     "epochs (--epochs) must be positive"),
    (["fit", "{model}", "--rank", "2", "--init", "pca", "--out", "{out}"], 2, "pca"),
    (["svd", "{model}", "--rank", "2", "--out", "{existing}"], 2, "already exists"),
    (["svd", "{model}", "--rank", "2", "--out", "{tmp}/missing-dir/f.safetensors"], 2, "does not exist"),
    (["svd", "{model}", "--rank", "2", "--out", "{tmp}"], 2, "is a directory"),
    (["svd", "{model}", "--rank", "2", "--out", "{tmp}/new-folder/"], 2, "names a folder"),  # not a file "new-folder"
    (["svd", "{nan}", "--rank", "2", "--out", "{out}"], 1, "NaN or Inf in 1 row"),
    (["fit", "{nan}", "--rank", "2", "--out", "{out}"], 1, "NaN or Inf"),
    (["fit", "{model}", "--rank", "2", "--method", "magic", "--out", "{out}"], 2, "magic"),
    (["fit", "{model}", "--rank", "2", "--weight-floor", "0", "--out", "{out}"], 2, "floor (--weight-floor) must be > 0"),
    (["fit", "{model}", "--rank", "2", "--weights-text", "{tmp}/none.txt", "--out", "{out}"], 2, "none.txt"),
]


@pytest.mark.parametrize("args,code,fragment", BAD)
def test_bad_input(tiny, tmp_path, nan_model, args, code, fragment):
    (tmp_path / "empty").mkdir()
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    fill = dict(model=tiny("gpt2"), out=tmp_path / "out.safetensors", tmp=tmp_path, empty=tmp_path / "empty",
                existing=existing, nan=nan_model)
    before = sorted(os.listdir(tmp_path))
    result = run(*[a.format(**fill) for a in args])
    assert result.exit_code == code, result.output
    assert fragment in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no half file
    assert existing.read_bytes() == b"keep me"


def test_unwritable_directory_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    result = run("svd", tiny("gpt2"), "--rank", 2, "--out", tmp_path / "f.safetensors")
    assert result.exit_code == 1 and "not writable" in result.stderr


def test_ctrl_c_during_fit_writes_nothing(tiny, tmp_path, monkeypatch):
    import embzip.autoencoder as ae

    calls = {"n": 0}
    real = ae.paper_loss

    def interrupt_after_some_steps(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ae, "paper_loss", interrupt_after_some_steps)
    result = run("fit", tiny("gpt2"), "--rank", 2, "--out", tmp_path / "f.safetensors", *FAST_FIT)
    assert result.exit_code == 130 and "nothing was written" in result.stderr
    assert calls["n"] == 5 and os.listdir(tmp_path) == []


def test_a_signal_after_the_output_is_in_place_says_what_was_written(tiny, tmp_path, monkeypatch):
    import embzip.cli as cli

    def interrupt(*args, **kwargs):  # the signal arrives while the summary is printed, after the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_emit", interrupt)
    out = tmp_path / "f.safetensors"
    result = run("svd", tiny("gpt2"), "--rank", 2, "--out", out)
    assert result.exit_code == 130 and load_factors(out).rank == 2
    assert f"interrupted: after writing {out}" in " ".join(result.stderr.split())
    assert "nothing was written" not in result.stderr


def test_the_summary_table_shows_none_as_a_dash_and_mappings_as_pairs(tiny):
    result = run("info", tiny("gpt2"))  # a local directory: no revision
    assert result.exit_code == 0
    import re

    assert "None" not in result.stdout and re.search(r"revision\W+-\W", result.stdout), result.stdout
    from embzip.cli import _summary_cell

    assert _summary_cell({"name": "sentence-fidelity", "sentences": 256, "ratio": 0.5, "x": None}) == (
        "name=sentence-fidelity, sentences=256, ratio=0.5, x=-")


@pytest.mark.parametrize("where, error, message", [
    ("factorize", RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 1050673152 bytes."), "not enough memory"),
    ("factorize", MemoryError(), "not enough memory"),
    ("save_factors", OSError(28, "No space left on device"), "no space left on the device being written"),
])
def test_memory_or_disk_running_out_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch, where, error,
                                                                      message):
    import embzip.pipeline as pipeline

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, where, fail)
    out = tmp_path / "f.safetensors"
    result = run("svd", tiny("gpt2"), "--rank", 2, "--out", out, "-q")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert message in " ".join(result.stderr.split()) and "nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_any_other_failure_stays_a_traceback(tiny, tmp_path, monkeypatch):
    """Only the machine's resources get a one-line message: a bug must not be dressed up as a user's error."""
    import embzip.pipeline as pipeline

    def fail(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(pipeline, "factorize", fail)
    result = run("svd", tiny("gpt2"), "--rank", 2, "--out", tmp_path / "f.safetensors", "-q")
    assert isinstance(result.exception, ValueError)


def test_a_codebook_fit_warns_when_its_working_copies_exceed_the_free_memory(tiny, tmp_path, monkeypatch):
    import embzip.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "available_memory", lambda device: {"cpu": 1000})
    result = run("fit", tiny("bert-wordpiece"), "--bits", 4, "--out", tmp_path / "f.safetensors")
    message = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "working copies" in message and "0.0 GB of memory is free" in message


def test_loading_without_memory_says_so_not_that_the_model_is_broken():
    from embzip.models import _load_error

    error = _load_error("m", RuntimeError("unable to mmap 525336712 bytes from file <x>: Cannot allocate memory (12)"))
    assert "could not load model 'm': not enough memory" in str(error)


def test_force_overwrites(tiny, tmp_path):
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"old")
    result = run("svd", tiny("gpt2"), "--rank", 2, "--out", out, "--force", "-q")
    assert result.exit_code == 0 and load_factors(out).rank == 2


@pytest.mark.parametrize("node", ["symlink", "fifo", "dash"])
def test_force_never_replaces_what_is_not_a_regular_file(tiny, tmp_path, monkeypatch, node):
    """`-o /dev/null --force` must not replace the system's /dev/null with a file (nor a pipe, nor a link: the
    link's target would be left as it was while the link became a file); `-o -` is not stdout."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"old")
    out = {"symlink": tmp_path / "link.safetensors", "fifo": tmp_path / "pipe", "dash": "-"}[node]
    if node == "symlink":
        out.symlink_to(target)
    elif node == "fifo":
        os.mkfifo(out)
    result = run("svd", tiny("gpt2"), "--rank", 2, "--out", out, "--force", "-q")
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1
    message = " ".join(result.stderr.split())
    assert {"symlink": "is a symbolic link", "fifo": "not a regular file", "dash": "not to stdout"}[node] in message
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"symlink": ["link.safetensors", "target.safetensors"], "fifo": ["pipe", "target.safetensors"]}.get(
            node, ["target.safetensors"]))
    if node == "symlink":
        assert (tmp_path / "link.safetensors").is_symlink()
    if node == "fifo":
        assert not (tmp_path / "pipe").is_file()


def test_an_empty_output_name_is_refused_by_name():
    from embzip.errors import OutputError
    from embzip.outputs import check_output_dir, check_output_file

    for check in (lambda: check_output_file("", force=True), lambda: check_output_dir("", True, marker="m")):
        with pytest.raises(OutputError, match="the output path is empty"):
            check()


@pytest.mark.parametrize("method, args", [("codebook", ["--bits", 8, "--self-tokens", 64, "--metric-tokens", 256]),
                                          ("paper", ["-k", 3, *FAST_FIT[2:]])])
def test_fit_without_seed_uses_each_methods_own_default_as_bench_does(tiny, tmp_path, method, args):
    from dataclasses import replace

    from embzip.methods import recipe

    out = tmp_path / "f.safetensors"
    assert run("fit", tiny("llama"), "--method", method, *args, "-o", out, "-q").exit_code == 0
    settings = load_factors(out).meta["settings"]
    if method == "codebook":  # the seeds bench's recipe has: its cached factors are these
        expected = recipe("codebook")
        expected = replace(expected, sample=replace(expected.sample, tokens=64),
                           aware=replace(expected.aware, metric_tokens=256))
        assert settings == expected.settings()
        assert settings["codebook"]["seed"] == settings["self_sample"]["seed"] == 0
        assert settings["weights"]["power"] is None and load_factors(out).meta["weight_power"] == 0.75  # tied, 8 bits
    else:
        assert settings["fit"]["seed"] == 1  # the paper's recipe
    assert run("fit", tiny("llama"), "--method", method, *args, "-o", out, "-q", "--force", "--seed", 5).exit_code == 0
    settings = load_factors(out).meta["settings"]
    assert settings["codebook" if method == "codebook" else "fit"]["seed"] == 5


def test_seeded_fit_from_cli_repeats(tiny, tmp_path):
    for name in ("a", "b"):
        assert run("fit", tiny("bert-mlm"), "-k", 3, "-o", tmp_path / f"{name}.safetensors", "-q", "--seed", 7,
                   *FAST_FIT).exit_code == 0
    a, b = load_factors(tmp_path / "a.safetensors"), load_factors(tmp_path / "b.safetensors")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.decoder, b.decoder)


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"embzip {version('embzip')}"


def test_quiet_quiets_the_hubs_own_log_lines():
    import subprocess
    import sys

    # a fresh process, as the command runs: huggingface_hub is imported after the logging is set up, and sets
    # its own level then (its retry lines while the hub cannot be reached came through --quiet that way)
    code = ("import logging; from embzip.cli import _setup_logging; _setup_logging(quiet=True); "
            "import huggingface_hub.utils._http; "
            "print(logging.getLogger('huggingface_hub.utils._http').getEffectiveLevel())")
    level = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(level) >= 40  # logging.ERROR



def _stdout_closed():
    os.close(1)


def _stdout_a_pipe_nobody_reads():
    read, write = os.pipe()
    os.dup2(write, 1)
    os.close(read)
    os.close(write)


@pytest.mark.parametrize("args", [["--version"], ["svd", "./no-such-model", "-k", "2"]])
def test_a_closed_stdout_is_refused_before_any_work_not_a_silent_success(tmp_path, args):
    import subprocess
    import sys

    # `embzip ... >&-`: Python starts with sys.stdout None and every print would vanish with exit 0
    done = subprocess.run([sys.executable, "-m", "embzip", *args], cwd=tmp_path, capture_output=False,
                          stderr=subprocess.PIPE, text=True, preexec_fn=_stdout_closed, timeout=120)
    assert done.returncode == 2 and "standard output is closed" in done.stderr
    assert done.stderr.count("\n") == 1 and os.listdir(tmp_path) == []


def test_a_reader_that_goes_away_ends_the_command_quietly_with_exit_1():
    import subprocess
    import sys

    # `embzip --help | head -1`: what is left to print has no reader; no traceback, as with other tools in a pipeline
    done = subprocess.run([sys.executable, "-m", "embzip", "--help"], stderr=subprocess.PIPE, text=True,
                          preexec_fn=_stdout_a_pipe_nobody_reads, timeout=120)
    assert done.returncode == 1 and done.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["fit", "--help"]])
def test_help_or_version_on_a_full_device_is_one_line(args):
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "embzip", *args], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    assert done.returncode == 1
    assert " ".join(done.stderr.split()).startswith("error: could not print to standard output: no space left")
    assert done.stderr.count("\n") == 1  # no traceback


@pytest.mark.parametrize("output", [["--json"], []])
def test_a_reader_that_goes_away_after_the_output_is_written_is_told_what_was_written(tmp_path, tiny, output):
    import subprocess
    import sys

    # `embzip fit ... | true`: exit 1 as above, but a script must learn that the factors file is in place (the
    # summary printed as JSON, or as rich's table, whose own handling of a broken pipe exits at once)
    out = tmp_path / "f.safetensors"
    done = subprocess.run([sys.executable, "-m", "embzip", "fit", tiny("gpt2"), "--method", "int8", "-o", str(out),
                           *output, "-q"], stderr=subprocess.PIPE, text=True,
                          preexec_fn=_stdout_a_pipe_nobody_reads, timeout=120)
    assert done.returncode == 1 and out.is_file()
    assert " ".join(done.stderr.split()) == f"error: standard output's reader went away (after writing {out})"


def test_a_broken_pipe_that_is_not_stdouts_is_not_reported_as_stdouts(tmp_path, tiny, monkeypatch):
    import embzip.models

    def broken(*args, **kwargs):  # a worker's or a socket's pipe, after an output was put in place
        embzip.outputs._written.append(str(tmp_path / "done.safetensors"))
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(embzip.models, "open_model", broken)
    result = runner.invoke(app, ["perplexity", tiny("gpt2"), "--json"])
    assert result.exit_code == 1 and "reader went away" not in result.stderr
    assert isinstance(result.exception, SystemExit)  # click's own handling of a broken pipe, as before


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_command_has_finished_leaves_its_exit_code(tmp_path, sig):
    import subprocess
    import sys

    # the signal lands once the command is done, while Python tears down (most of a second with torch loaded)
    code = ("import os, signal, sys, time\n"
            "import embzip.cli as cli\n"
            "leave = sys.exit\n"
            "def exit(code=0):\n"
            f"    os.kill(os.getpid(), signal.{sig}); time.sleep(0.2); leave(code)\n"
            "sys.exit = exit\n"
            "sys.argv = ['embzip', '--version']\n"
            "cli.main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("embzip ") and result.stderr == ""
