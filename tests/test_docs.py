"""docs/commands/*.md are generated from --help; this fails when they are stale."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_pages_are_current():
    pages = _generator().pages()
    assert {"svd.md", "fit.md", "apply.md"} <= set(pages)
    for name, text in pages.items():
        path = ROOT / "docs" / "commands" / name
        assert path.is_file() and path.read_text() == text, f"{path} is stale: run python docs/generate.py"


def test_no_help_cell_is_cut_at_the_pages_width():
    """rich cuts a word longer than its cell with an ellipsis: the pages (100 columns) must show every word whole."""
    pages = _generator().pages()
    assert not [name for name, text in pages.items() if "\u2026" in text]


def test_help_is_fast_and_torch_free():
    import subprocess
    import sys

    code = "import sys, embzip.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_public_names_are_functions_not_submodules():
    import importlib
    import types

    import embzip

    for module in ("pipeline", "benchmark", "scoring", "splice", "modeldir", "methods", "heal", "cli"):
        importlib.import_module(f"embzip.{module}")  # importing submodules must not shadow the API
    for name in embzip.__all__:
        assert not isinstance(getattr(embzip, name), types.ModuleType), name


def test_dir_and_help_list_the_lazy_api():
    import pydoc

    import embzip

    assert set(embzip.__all__) <= set(dir(embzip))
    text = pydoc.render_doc(embzip, renderer=pydoc.plaintext)
    for name in ("compress", "load_model", "apply_factors", "spliced", "perplexity"):
        assert f"\n    {name}(" in text, name


def test_no_help_text_is_eaten_as_rich_markup():
    """`--help` renders through rich, which drops anything like `[default: x]` as a style tag."""
    import re

    import typer.main

    from embzip.cli import app

    group = typer.main.get_command(app)
    texts = [group.help or ""]
    for command in group.commands.values():
        texts.append(command.help or "")
        texts += [getattr(param, "help", None) or "" for param in command.params]
    assert len(texts) > 40
    assert not [t for t in texts if re.search(r"\[[A-Za-z#/@]", t)]
