"""`embzip bench` on tiny models: complete rows, JSON = CSV, a real PNG, cached factors re-used."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from embzip.cli import app

runner = CliRunner()


def bench(model, out, text, *extra):
    result = runner.invoke(app, ["bench", model, "--ranks", "2,4", "--methods", "svd,fit", "--out", str(out),
                                 "--text", text, "--max-tokens", "200", "--json", "-q", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gpt2_run(tiny, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, bench(tiny("gpt2"), out, text_file)


def test_rows_are_complete(gpt2_run):
    out, report = gpt2_run
    rows = report["rows"]
    assert [(r["method"], r["rank"]) for r in rows] == [("original", None), ("svd", 2), ("svd", 4), ("aware", 2),
                                                        ("aware", 4)]
    for r in rows[1:]:
        for key in ("compression_ratio", "embedding_params", "model_params", "model_bytes", "cosine_distance", "rmse",
                    "perplexity_input", "perplexity_tied", "perplexity_ratio_tied", "fit_seconds", "latency_ratio"):
            assert r[key] is not None, key
        assert r["embedding_params"] < rows[0]["embedding_params"] and r["model_params"] < rows[0]["model_params"]
        assert r["perplexity_tied"] != rows[0]["perplexity_tied"]  # the compression changed the model
    assert report["protocol"]["name"] == "causal-window" and not report["interrupted"]


def test_json_matches_csv(gpt2_run):
    out, report = gpt2_run
    assert json.loads((out / "bench.json").read_text())["rows"] == report["rows"]
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(report["rows"])
    # every row has the same keys (the original's too), and the CSV has a column for each, rank and mae included
    assert all(row.keys() == report["rows"][0].keys() for row in report["rows"])
    assert {"rank", "mae"} <= table[0].keys() and set(table[0]) <= set(report["rows"][0])
    for row, line in zip(report["rows"], table):
        for key, value in line.items():
            expected = row.get(key)
            if isinstance(expected, bool):  # as JSON writes them
                assert value == ("true" if expected else "false")
            elif isinstance(expected, float):
                assert float(value) == pytest.approx(expected)
            else:
                assert value == ("" if expected is None else str(expected))


def test_plot_is_a_png(gpt2_run):
    out, _ = gpt2_run
    data = (out / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_second_run_reuses_cached_factors(gpt2_run, tiny, text_file):
    out, first = gpt2_run
    second = bench(tiny("gpt2"), out, text_file)
    assert all(r["cached"] for r in second["rows"][1:])
    for a, b in zip(first["rows"][1:], second["rows"][1:]):
        assert a["rmse"] == b["rmse"] and a["perplexity_tied"] == pytest.approx(b["perplexity_tied"])


def test_encoder_gets_fidelity_not_perplexity(tiny, text_file, tmp_path):
    report = bench(tiny("bert-encoder"), tmp_path, text_file)
    assert report["protocol"]["name"] == "sentence-fidelity"
    for r in report["rows"][1:]:
        assert -1 <= r["fidelity"] < 1 and -1 <= r["similarity_spearman"] <= 1
        assert "perplexity_input" not in r
    assert report["rows"][0]["fidelity"] == 1.0
    assert all(r["latency_ratio_step"] is None for r in report["rows"])  # an encoder does not generate


@pytest.mark.parametrize("args,fragment", [
    (["--ranks", "2", "--ratios", "3"], "not both"), (["--ranks", "two"], "comma-separated"),
    (["--methods", "svd,magic"], "unknown method"), (["--ranks", "999"], "largest useful rank"),
    # sizes no chosen method reads are refused rather than ignored
    (["--methods", "svd,int8", "--ranks", "2", "--bits", "2"], "none of svd,int8 takes them"),
    (["--methods", "int8", "--ranks", "2"], "size low-rank methods (svd, aware, wsvd, paper), and none of int8"),
    (["--methods", "int8,int4", "--ratios", "4"], "int8,int4 have one size each"),
    (["--methods", "codebook", "--ratios", "4", "--bits", "2"], "or bits (--bits), not both"),
])
def test_bad_bench_arguments(tiny, text_file, tmp_path, args, fragment):
    result = runner.invoke(app, ["bench", tiny("gpt2"), "--text", text_file, "--out", tmp_path / "b", *args])
    assert result.exit_code == 2 and fragment in " ".join(result.output.split())
    assert not (tmp_path / "b").exists()


def test_ctrl_c_keeps_finished_rows(tiny, text_file, tmp_path, monkeypatch):
    import embzip.benchmark as benchmark

    calls = {"n": 0}
    real = benchmark.latency_ratios

    def interrupt_on_second_row(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "latency_ratios", interrupt_on_second_row)
    result = runner.invoke(app, ["bench", tiny("gpt2"), "--ranks", "2,4", "--methods", "svd", "--out", str(tmp_path),
                                 "--text", text_file, "--max-tokens", "100", "--json", "-q"])
    assert result.exit_code == 130
    report = json.loads(result.stdout)
    assert report["interrupted"] and [r["rank"] for r in report["rows"]] == [None, 2]
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == report["rows"]


def test_a_signal_while_bench_writes_its_results_leaves_the_previous_run_whole(tiny, text_file, tmp_path,
                                                                               monkeypatch):
    import os

    import embzip.benchmark as benchmark

    args = ["bench", tiny("gpt2"), "--methods", "svd", "--out", str(tmp_path), "--text", text_file,
            "--max-tokens", "100", "--json", "-q"]
    assert runner.invoke(app, [*args, "--ranks", "2"]).exit_code == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("bench.json", "bench.csv", "bench.png")}

    def interrupted_plot(report, path):  # the slowest of the three files: where a Ctrl-C lands
        path.write_bytes(b"half a plot")
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "plot", interrupted_plot)
    result = runner.invoke(app, [*args, "--ranks", "2,4"])
    assert result.exit_code == 130 and "keeps the complete bench" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["interrupted"] and len(json.loads(result.stdout)["rows"]) == 3  # printed
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # not the new json beside the old plot
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    monkeypatch.undo()
    assert runner.invoke(app, [*args, "--ranks", "2,4"]).exit_code == 0  # all three replaced together
    assert len(json.loads((tmp_path / "bench.json").read_text())["rows"]) == 3
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "bench.png").read_bytes() != before["bench.png"]


def test_an_interrupted_bench_keeps_an_earlier_complete_one_and_otherwise_writes_its_rows(tiny, text_file, tmp_path,
                                                                                        monkeypatch):
    import embzip.benchmark as benchmark

    args = ["bench", tiny("gpt2"), "--methods", "svd", "--text", text_file, "--max-tokens", "100", "--json", "-q"]
    complete = tmp_path / "complete"
    assert runner.invoke(app, [*args, "--ranks", "2,4", "--out", str(complete)]).exit_code == 0
    before = (complete / "bench.json").read_bytes()
    real = benchmark.latency_ratios

    def interrupt_on_second_row(*a, **kw):
        if interrupt_on_second_row.calls == 1:
            raise KeyboardInterrupt
        interrupt_on_second_row.calls += 1
        return real(*a, **kw)

    interrupt_on_second_row.calls = 0
    monkeypatch.setattr(benchmark, "latency_ratios", interrupt_on_second_row)
    result = runner.invoke(app, [*args, "--ranks", "2,4", "--out", str(complete)])
    assert result.exit_code == 130 and len(json.loads(result.stdout)["rows"]) == 2  # the original and rank 2
    assert (complete / "bench.json").read_bytes() == before  # the complete run is not traded for part of one
    monkeypatch.undo()

    def interrupted_plot(report, path):  # a Ctrl-C while the results are written, every row finished
        monkeypatch.undo()
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(benchmark, "plot", interrupted_plot)
    result = runner.invoke(app, [*args, "--ranks", "2", "--out", str(fresh)])
    assert result.exit_code == 130 and "interrupted while writing the results" in result.stderr
    written = json.loads((fresh / "bench.json").read_text())
    assert written["interrupted"] and written["rows"] == json.loads(result.stdout)["rows"] and len(written["rows"]) == 2
    assert (fresh / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_signal_during_the_renames_waits_until_all_three_results_are_in_place(tiny, text_file, tmp_path,
                                                                                 monkeypatch):
    import os
    import signal
    import threading
    import time

    import embzip.outputs as outputs

    args = ["bench", tiny("gpt2"), "--methods", "svd", "--out", str(tmp_path), "--text", text_file,
            "--max-tokens", "100", "--json", "-q"]
    assert runner.invoke(app, [*args, "--ranks", "2"]).exit_code == 0
    real = os.replace

    worker = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)  # as torch's threads
    worker.start()

    def replace_then_ctrl_c(source, target):
        real(source, target)
        if str(target).endswith("bench.json"):  # the first of the three renames
            # a Ctrl-C the OS hands to another thread: a signal mask of the main thread would not hold it back
            signal.pthread_kill(worker.ident, signal.SIGINT)
            time.sleep(0.2)  # the main thread runs the handler here

    monkeypatch.setattr(outputs.os, "replace", replace_then_ctrl_c)
    # a finished command ignores SIGINT from then on (cli._finished): the first run did, in this process
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = runner.invoke(app, [*args, "--ranks", "2,4"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130 and "once the results were in place" in " ".join(result.stderr.split())
    rows = len(json.loads((tmp_path / "bench.json").read_text())["rows"])
    with open(tmp_path / "bench.csv") as f:
        assert rows == 3 and len(f.readlines()) == 1 + rows  # this run's json and csv side by side, not a mix


def test_every_kind_side_by_side_with_bits_per_weight(tiny, text_file, tmp_path):
    result = runner.invoke(app, ["bench", tiny("llama"), "--ranks", "4", "--bits", "12",
                                 "--methods", "svd,int8,int4,codebook", "--weights-text", text_file,
                                 "--out", str(tmp_path), "--text", text_file, "--max-tokens", "100", "--json", "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["method"] for r in rows] == ["original", "svd", "int8", "int4", "codebook"]
    assert rows[0]["bits_per_weight"] == 32.0
    by = {r["method"]: r for r in rows}
    assert by["int4"]["bits_per_weight"] == pytest.approx(5.0) and by["int4"]["size"] == "int4g32"
    assert by["int8"]["bits_per_weight"] == pytest.approx(8 + 16 / 32)
    for r in rows[1:]:
        assert r["embedding_bytes"] * 8 == pytest.approx(r["bits_per_weight"] * 112 * 32), r
        assert r["perplexity_ratio_tied"] > 0 and r["latency_ratio"] > 0
        # a compact tied head can also keep its decoded matrix; low-rank heads have nothing to cache
        assert (r["latency_ratio_cached"] is None) == (r["method"] == "svd"), r
        assert r["latency_ratio_cached"] is None or r["latency_ratio_cached"] > 0
        assert r["latency_ratio_step"] > 0  # a causal LM: one token, as in a generation step
    assert rows[0]["latency_ratio_step"] == 1.0
    # int8 is close to lossless; int4 loses more
    assert abs(by["int8"]["perplexity_ratio_tied"] - 1) < abs(by["int4"]["perplexity_ratio_tied"] - 1) + 1e-3
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_self_tokens_are_recorded_and_a_change_refits(tiny, text_file, tmp_path):
    from embzip.factors import load_factors

    def run(tokens):
        result = runner.invoke(app, ["bench", tiny("llama"), "--bits", "12", "--methods", "codebook",
                                     "--weights-text", text_file, "--self-tokens", str(tokens), "--out", str(tmp_path),
                                     "--text", text_file, "--max-tokens", "100", "--json", "-q"])
        assert result.exit_code == 0, result.output
        row = json.loads(result.stdout)["rows"][1]
        (path,) = (tmp_path / "factors").glob("codebook-*.safetensors")
        return row, load_factors(path).meta["settings"]["self_sample"]

    row, recorded = run(0)
    assert recorded["tokens"] == 0 and not row["cached"]
    row, recorded = run(16)
    assert recorded["tokens"] == 16 and not row["cached"]  # other settings: fitted again, not re-used
    row, _ = run(16)
    assert row["cached"]


def test_the_table_leaves_out_columns_no_row_fills(gpt2_run):
    from embzip.report import rows

    out, report = gpt2_run
    header, body = rows(report)
    assert "latency x" in header and "cached x" not in header  # low-rank heads have no decoded matrix to cache
    assert all(len(line) == len(header) for line in body)
    with open(out / "bench.csv") as f:
        assert "latency_ratio_cached" in f.readline()  # the CSV keeps every column


def test_an_out_folder_with_another_models_bench_is_refused(tiny, text_file, tmp_path):
    out = tmp_path / "b"
    first = runner.invoke(app, ["bench", tiny("gpt2"), "--ranks", "2", "--methods", "svd,int8", "--text", text_file,
                                "--out", str(out), "--json", "-q"])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in (out / "factors").iterdir()}
    other = runner.invoke(app, ["bench", tiny("llama"), "--methods", "int8", "--text", text_file,
                                "--out", str(out), "-q"])
    assert other.exit_code == 2 and "holds the bench of another model" in other.stderr
    assert {p.name: p.read_bytes() for p in (out / "factors").iterdir()} == before  # nothing of it replaced
    assert json.loads((out / "bench.json").read_text())["path"] == tiny("gpt2")
    model = Path(tiny("gpt2"))  # the same model spelled another way: relative to here, and through a link
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    for spelling in (os.path.relpath(model), str(tmp_path / "link")):
        again = runner.invoke(app, ["bench", spelling, "--methods", "int8", "--text", text_file, "--out", str(out),
                                    "-q"])
        assert again.exit_code == 0, again.output


@pytest.mark.parametrize("files", [{"bench.csv": "my own table\n"}, {"bench.json": '{"rows": []}'},
                                   {"bench.json": "not json", "bench.png": "mine"}])
def test_an_out_folder_with_result_files_no_bench_wrote_is_refused(tiny, text_file, tmp_path, files):
    out = tmp_path / "mine"
    out.mkdir()
    for name, content in files.items():
        (out / name).write_text(content)
    result = runner.invoke(app, ["bench", tiny("gpt2"), "--methods", "int8", "--text", text_file, "--out", str(out),
                                 "-q"])
    assert result.exit_code == 2 and "which embzip bench did not write" in result.stderr, result.output
    assert sorted(os.listdir(out)) == sorted(files) and all((out / n).read_text() == c for n, c in files.items())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_perplexity_that_overflows_still_gets_the_ratio_perplexity_reports(tiny, text_file, tmp_path, dtype):
    import math
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "loud"  # an embedding 3000 times too large: logits so large that exp(mean NLL) overflows
    shutil.copytree(tiny("gpt2", dtype), model)
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if "wte" in k)
    weights[key] = (weights[key].float() * 3000).to(weights[key].dtype)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    result = runner.invoke(app, ["bench", str(model), "--methods", "int8", "--text", text_file, "--out",
                                 str(tmp_path / "b"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(result.stdout)["rows"] if r["method"] == "int8")
    assert row["perplexity_tied"] is None  # inf, written as null
    alone = runner.invoke(app, ["perplexity", str(model), "--factors", str(tmp_path / "b" / "factors" /
                                                                          "int8.safetensors"),
                                "--text", text_file, "--max-tokens", "1024", "--json", "-q"])
    scored = json.loads(alone.stdout)
    assert scored["perplexity"] is None and scored["mean_nll"] > 700 and math.isfinite(scored["ratio"])
    assert row["perplexity_ratio_tied"] == pytest.approx(scored["ratio"], rel=1e-9) and scored["ratio"] != 1.0
    assert scored["ratio"] == pytest.approx(math.exp(scored["mean_nll"] - scored["mean_nll_original"]), rel=1e-9)
    assert json.loads(result.stdout)["protocol"]["tokens"] == scored["tokens"]  # what the bench scored, recorded
    assert torch.finfo(torch.float64).max > row["perplexity_ratio_tied"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_factors_are_not_reused_for_a_model_or_text_changed_in_place(tiny, text_file, tmp_path, dtype):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model, text = tmp_path / "model", tmp_path / "weights.txt"
    shutil.copytree(tiny("gpt2", dtype), model)
    text.write_text(open(text_file).read())

    def run_bench():
        result = runner.invoke(app, ["bench", str(model), "--methods", "svd,aware", "--ranks", "4", "--text",
                                     text_file, "--weights-text", str(text), "--out", str(tmp_path / "b"), "--json",
                                     "-q"])
        assert result.exit_code == 0, result.output
        return {r["method"]: r for r in json.loads(result.stdout)["rows"]}

    first = run_bench()
    assert all(r["cached"] for m, r in run_bench().items() if m != "original")  # the same inputs: re-used
    text.write_text(open(text_file).read() + "a new line for the token counts .\n")  # the same path, new content
    rows = run_bench()
    assert rows["aware"]["cached"] is False and rows["svd"]["cached"] is True  # svd reads no text
    weights = load_file(model / "model.safetensors")  # the same path and shape, another embedding
    key = next(k for k in weights if "wte" in k)
    weights[key] = (weights[key].float() * 3).to(weights[key].dtype)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    rows = run_bench()
    assert not rows["svd"]["cached"] and not rows["aware"]["cached"]
    assert rows["svd"]["rmse"] == pytest.approx(3 * first["svd"]["rmse"], rel=1e-2)  # fitted to the new matrix


def test_the_model_key_sees_an_edit_that_kept_size_and_modification_time(tiny, tmp_path):
    """A model file rewritten in place with its old size and modification time put back (cp -p, touch -d) is another
    model: its layers make the samples and the metric a cached fit was made with."""
    import os
    import shutil

    from embzip.benchmark import model_key
    from embzip.models import open_model

    model = tmp_path / "model"
    shutil.copytree(tiny("gpt2"), model)
    opened = open_model(str(model))
    before = model_key(opened)
    assert model_key(opened) == before  # the same files: the same key
    config = model / "config.json"
    info, text = config.stat(), config.read_text()
    edited = text.replace('"n_layer": 2', '"n_layer": 1')
    assert edited != text and len(edited) == len(text)
    config.write_text(edited)
    os.utime(config, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert config.stat().st_size == info.st_size and config.stat().st_mtime_ns == info.st_mtime_ns
    assert model_key(opened) != before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_ranks_a_small_hidden_size_cannot_take_are_left_out(dtype):
    from embzip.benchmark import BenchConfig, sizes
    from embzip.errors import RankError
    from embzip.methods import recipe

    # a 100000 x 64 matrix (BERT-tiny-like widths) in bfloat16 takes ranks up to 63: of the defaults 32 / 64 / 128,
    # only 32; in float32 its 16-bit factors save bytes up to the full rank 64
    wide = torch.finfo(dtype).bits == 32
    assert sizes(BenchConfig(), recipe("svd"), 100_000, 64, dtype) == ([32, 64] if wide else [32])
    assert sizes(BenchConfig(), recipe("aware"), 30_522, 384, dtype) == [32, 64, 128]  # all-MiniLM-L6-v2: all
    if not wide:
        with pytest.raises(RankError, match="largest useful rank is 24"):  # none fits: the reason, not an empty bench
            sizes(BenchConfig(), recipe("svd"), 105, 32, dtype)
    with pytest.raises(RankError, match="rank 64 (saves nothing|is more than)"):  # ranks given are used as given
        sizes(BenchConfig(ranks=[8, 64]), recipe("svd"), 105, 32, dtype)


def test_bench_config_and_recipes_name_what_they_cannot_take(tiny, text_file):
    from embzip.benchmark import BenchConfig, bench
    from embzip.errors import OptionError
    from embzip.methods import Recipe
    from embzip.models import open_model
    from embzip.texts import load_text

    with pytest.raises(OptionError, match="methods must be a list of method names, e.g. \\['svd', 'int8'\\], got the "
                                          "string 'svd,int8'"):
        BenchConfig(methods="svd,int8")
    with pytest.raises(OptionError, match="nosuchdevice"):
        BenchConfig(device="nosuchdevice")
    assert BenchConfig(device="auto").device in ("cpu", "cuda")  # picked once, recorded as what ran
    opened, text = open_model(tiny("gpt2")), load_text(text_file)
    config = BenchConfig(methods=["int8"], max_tokens=32)
    with pytest.raises(OptionError, match="recipes\\['int8'\\] must be a Recipe of int8, got svd"):
        bench(opened, text, config, recipes={"int8": Recipe("svd")})
    with pytest.raises(OptionError, match="recipes names 'svd', which is not among the methods benched \\(int8\\)"):
        bench(opened, text, config, recipes={"svd": Recipe("svd")})
    with pytest.raises(TypeError, match="opened must be a model opened by embzip.open_model"):
        bench(tiny("gpt2"), text, config)
    with pytest.raises(OptionError, match="opened with its embedding alone"):
        bench(open_model(tiny("gpt2"), load="embedding"), text, config)


def test_fit_in_a_bench_is_what_embzip_fit_runs_at_those_sizes():
    from embzip.benchmark import BenchConfig
    from embzip.errors import OptionError

    assert BenchConfig(methods=["fit", "int8"], bits=[2.0]).methods == ["codebook", "int8"]
    assert BenchConfig(methods=["fit+heal"]).methods == ["codebook+heal"]
    assert BenchConfig(methods=["fit", "int8"], ranks=[4]).methods == ["aware", "int8"]
    assert BenchConfig(methods=["fit"], ratios=[4.0]).methods == ["aware"]
    with pytest.raises(OptionError, match="lists codebook twice: fit is codebook at these sizes"):
        BenchConfig(methods=["fit", "codebook"])
    assert BenchConfig(methods=["fit"], bits=[2.0]).runs("fit+heal") == "codebook+heal"


def test_a_bench_folder_of_a_hub_model_is_the_same_models_whatever_snapshot_it_was_read_from(tmp_path):
    """A hub model's path is now its cache snapshot (a new one per commit); benches written by the previous
    version recorded the hub id as the path. Either is the same model; another hub id is not."""
    from types import SimpleNamespace

    from embzip.benchmark import _check_same_model
    from embzip.errors import OutputError

    (tmp_path / "bench.json").write_text(json.dumps({"model": "org/llama", "path": "org/llama", "rows": [],
                                                     "protocol": {}}))
    snapshot = str(tmp_path / "hub" / "models--org--llama" / "snapshots" / ("c" * 40))
    _check_same_model(tmp_path, SimpleNamespace(source="org/llama", path=snapshot))
    with pytest.raises(OutputError, match=r"holds the bench of another model \(org/llama\)"):
        _check_same_model(tmp_path, SimpleNamespace(source="org/other", path=snapshot))


def test_the_report_and_each_factors_file_record_the_versions_and_cpu_they_were_made_with(gpt2_run):
    """A sampled fit moves with the CPU's kernels and the libraries' versions: the results say where they were made."""
    import transformers

    from embzip import load_factors
    from embzip.models import native_bf16

    out, report = gpt2_run
    written = json.loads((out / "bench.json").read_text())
    for environment in [written["environment"]] + [load_factors(p).meta["environment"]
                                                   for p in sorted((out / "factors").glob("*.safetensors"))]:
        assert environment["torch"] == torch.__version__ and environment["transformers"] == transformers.__version__
        assert environment["native_bf16"] is native_bf16() and environment["python"].count(".") == 2
        assert environment["machine"] and "embzip" in environment
