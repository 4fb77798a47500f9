"""Outputs are written safely: --force replaces only embzip's own output and only once the new one is
complete, concurrent runs never remove each other's or a user's data, SIGTERM leaves no debris, dead
runs' leftovers are removed, and files get the modes the umask asks for."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import embzip
from embzip import OutputError
from embzip.cli import app
from embzip.modeldir import apply_factors, load_model
from embzip.models import open_model
from embzip.svd import svd_factors

runner = CliRunner()
REPO = Path(embzip.__file__).resolve().parents[1]
FAST_FIT = ["--method", "paper", "--epochs", "2", "--anneal-epochs", "1", "--batch-size", "16"]


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def make(tiny, rank=3):
    opened = open_model(tiny("gpt2"))
    return opened, svd_factors(opened.embedding.detach(), rank)


@pytest.fixture
def factors_file(tiny, tmp_path_factory):
    from embzip.factors import save_factors

    path = tmp_path_factory.mktemp("factors") / "f.safetensors"
    save_factors(make(tiny)[1], path)
    return path


def test_force_keeps_the_old_output_whole_when_the_new_one_fails(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    apply_factors(*make(tiny), out)
    before = tree(tmp_path)
    monkeypatch.setattr("embzip.modeldir.load_model", lambda directory: open_model(tiny("gpt2")).model)
    with pytest.raises(embzip.ModelError, match="does not reproduce the model"):  # the reload check fails
        apply_factors(*make(tiny, rank=2), out, force=True)
    assert tree(tmp_path) == before  # the old output is whole and nothing else is left beside it
    monkeypatch.undo()
    summary = apply_factors(*make(tiny, rank=2), out, force=True)
    assert summary["rank"] == 2 and load_model(out) is not None
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _meanwhile(monkeypatch, action):
    """Run `action` while apply is writing (after its checks, before the swap)."""
    import embzip.modeldir as modeldir

    real = modeldir._copy_side_files

    def copy_then_act(opened, tmp):
        real(opened, tmp)
        action()

    monkeypatch.setattr(modeldir, "_copy_side_files", copy_then_act)


def test_a_directory_created_meanwhile_survives(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def user_creates_it():
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _meanwhile(monkeypatch, user_creates_it)
    with pytest.raises(OutputError, match="appeared while embzip was writing it"):
        apply_factors(*make(tiny), out)
    assert tree(tmp_path) == {"out": None, "out/notes.txt": b"mine"}


def test_a_replaced_output_is_not_removed_by_force(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    apply_factors(*make(tiny), out)

    def someone_replaces_it():
        shutil.rmtree(out)
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _meanwhile(monkeypatch, someone_replaces_it)
    with pytest.raises(OutputError, match="was replaced while embzip was writing it"):
        apply_factors(*make(tiny, rank=2), out, force=True)
    assert tree(tmp_path) == {"out": None, "out/notes.txt": b"mine"}


def _embzip(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "embzip", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_concurrent_applies_to_one_output_exactly_one_succeeds(tiny, factors_file, tmp_path):
    out = tmp_path / "out"
    runs = [_embzip("apply", tiny("gpt2"), factors_file, "--out", out, "-q") for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser_code, loser = next((code, err) for code, err in results if code != 0)
    if "already exists" in loser:  # the check before any work saw the other's output: the command line's, exit 2
        assert loser_code == 2, results
    else:  # the other's output appeared at the rename: a race while working, exit 1
        assert loser_code == 1 and "appeared while embzip was writing it" in loser, results
    assert os.listdir(tmp_path) == ["out"] and load_model(out) is not None  # one whole output, no debris


DRIVER = '''
import pathlib, sys, time
import embzip.outputs as outputs

ready = pathlib.Path(sys.argv[1])
real = outputs.set_modes


def stall(path):  # called once everything is written, before the rename into place
    ready.write_text(str(path))
    time.sleep(300)
    real(path)


outputs.set_modes = stall
sys.argv = ["embzip", *sys.argv[2:]]
from embzip.cli import main

main()
'''


def test_sigterm_while_writing_leaves_no_debris(tiny, factors_file, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    fit_dir, apply_dir = tmp_path / "fit", tmp_path / "apply"
    fit_dir.mkdir(), apply_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    commands = {
        "fit": ["fit", tiny("gpt2"), "-k", "2", "--out", fit_dir / "f.safetensors", "-q", *FAST_FIT],
        "apply": ["apply", tiny("gpt2"), factors_file, "--out", apply_dir / "out", "-q"],
    }
    runs = {name: subprocess.Popen([sys.executable, str(driver), str(tmp_path / f"{name}.ready"), *map(str, args)],
                                   cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, args in commands.items()}
    deadline = time.monotonic() + 300
    for name, run in runs.items():
        while not (tmp_path / f"{name}.ready").exists():
            assert run.poll() is None, run.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        written = Path((tmp_path / f"{name}.ready").read_text())
        assert written.exists() and written.name.startswith(".")  # the temporary output, complete
        run.send_signal(signal.SIGTERM)
    for name, run in runs.items():
        assert run.wait(timeout=120) == 143, run.stderr.read()
        assert "terminated: nothing was written" in run.stderr.read()
    assert os.listdir(fit_dir) == [] and os.listdir(apply_dir) == []


def test_later_runs_remove_what_dead_runs_left(tiny, factors_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f".f.safetensors.{dead.pid}-0a1b2c.tmp", tmp_path / f".out.partial-{dead.pid}-0a1b2c"]
    stale[0].write_bytes(b"half a file")
    stale[1].mkdir()
    (stale[1] / "embzip.safetensors").write_bytes(b"half a file")
    alive = tmp_path / ".out.partial-1-0a1b2c"  # pid 1 is running: its partial output is kept
    alive.mkdir()
    assert runner.invoke(app, ["svd", tiny("gpt2"), "-k", "2", "-o", "f.safetensors", "-q"]).exit_code == 0
    assert runner.invoke(app, ["apply", tiny("gpt2"), str(factors_file), "-o", "out", "-q"]).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, "f.safetensors", "out"])


def test_a_dead_runs_old_output_is_put_back(tiny, tmp_path):
    out = tmp_path / "out"
    apply_factors(*make(tiny), out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".out.old-{dead.pid}-0a1b2c"
    os.rename(out, aside)  # as if killed between the two renames of a --force replace
    with pytest.raises(OutputError, match="already exists"):
        apply_factors(*make(tiny), out)
    assert os.listdir(tmp_path) == ["out"] and load_model(out) is not None


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_created_files_follow_the_umask(tiny, factors_file, tmp_path, monkeypatch, mask, file_mode, dir_mode):
    monkeypatch.chdir(tmp_path)
    old = os.umask(mask)
    try:
        assert runner.invoke(app, ["svd", tiny("gpt2"), "-k", "2", "-o", "f.safetensors", "-q"]).exit_code == 0
        assert runner.invoke(app, ["apply", tiny("gpt2"), str(factors_file), "-o", "out", "-q"]).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.safetensors").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert "embzip.safetensors" in modes and set(modes.values()) == {file_mode}, modes


def test_sigterm_in_bench_keeps_finished_rows_and_exits_143(tiny, text_file, tmp_path, monkeypatch):
    import json

    import embzip.benchmark as benchmark

    calls = {"n": 0}
    real = benchmark.latency_ratios

    def terminate_on_second_row(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the handler raises at the next bytecode
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "latency_ratios", terminate_on_second_row)
    before = signal.getsignal(signal.SIGTERM)
    result = runner.invoke(app, ["bench", tiny("gpt2"), "--ranks", "2,4", "--methods", "svd", "--out", str(tmp_path),
                                 "--text", text_file, "--max-tokens", "100", "--json", "-q"])
    assert result.exit_code == 143, result.output
    report = json.loads(result.stdout)
    assert report["interrupted"] and [r["rank"] for r in report["rows"]] == [None, 2]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed when the command ends


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_swallowed_inside_a_library_still_ends_as_that_signal(tiny, tmp_path, monkeypatch, sig, code, word):
    """Ctrl-C or SIGTERM that lands inside a lazy import which swallows it leaves a half-imported module, whose next
    use fails with some other error (numpy: RecursionError): the command still ends as interrupted, in one line."""
    import embzip.pipeline as pipeline

    def swallowed(*args, **kwargs):
        try:
            os.kill(os.getpid(), getattr(signal, sig))  # a real signal; the handler raises at the next bytecode
            for _ in range(1000):
                pass
        except KeyboardInterrupt:  # what the import machinery did with it
            pass
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(pipeline, "compress", swallowed)
    # as a fresh process has it (a command run before in this process ignores signals once it has finished)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = runner.invoke(app, ["svd", tiny("gpt2"), "--rank", "2", "--out", str(tmp_path / "f.safetensors"),
                                     "-q"])
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.exit_code == code and f"{word}: nothing was written" in result.stderr
    assert "Traceback" not in result.output and "RecursionError" not in result.output


def test_a_writer_refused_by_the_operating_system_is_one_line_naming_the_file(tmp_path):
    """safetensors reports the OS's refusal (a read-only or special file system) as its own error: it becomes an
    OutputError saying which file and why, and nothing is left behind."""
    from safetensors import SafetensorError

    from embzip.errors import OutputError
    from embzip.outputs import atomic_write

    def refused(tmp):
        raise SafetensorError('Error while serializing: IoError(Os { code: 13, kind: PermissionDenied, message: '
                              '"Permission denied" })')

    with pytest.raises(OutputError, match=r"could not write .*f.safetensors: Permission denied$"):
        atomic_write(tmp_path / "f.safetensors", refused)
    assert list(tmp_path.iterdir()) == []

    def a_bug(tmp):
        raise SafetensorError("tensor is not contiguous")

    with pytest.raises(SafetensorError, match="not contiguous"):  # not about writing: left as it is
        atomic_write(tmp_path / "f.safetensors", a_bug)


def test_signals_held_while_files_go_in_place_are_delivered_after_the_stronger_first():
    import signal
    import subprocess
    import sys

    # a Ctrl-C and a SIGTERM while held: SIGTERM's default action still ends the process once the block is done
    code = ("import os, signal\n"
            "from embzip.outputs import _signals_held\n"
            "with _signals_held():\n"
            "    os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('block done', flush=True)\n"
            "print('alive after the block')\n")

    def default_dispositions():  # not the ones this process has (a finished command here ignores both: cli._finished)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=default_dispositions)
    assert done.returncode == -signal.SIGTERM and done.stdout == "block done\n"
