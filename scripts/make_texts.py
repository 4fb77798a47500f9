"""Build the validation and held-out texts of docs/method.md from files on a Debian machine.

    python scripts/make_texts.py OUTDIR

writes four UTF-8 files, one paragraph or message per line:
- en_val.txt: docstrings of 13 modules of this Python's standard library (English, for choosing settings)
- ml_val.txt: translated messages of coreutils and bash in de, fr, es, ru, ja, zh_CN (for choosing settings)
- en_test.txt: the GNU GPL version 3 (/usr/share/common-licenses/GPL-3), paragraphs (never used to choose)
- ml_test.txt: translated messages of apt, dpkg and tar in the same six languages (never used to choose)

The catalogs are read with the standard library's gettext parser; messages of 40+ characters without format
codes are taken in the order of their English source strings (sorted), every n-th so that they spread over the
catalog, until a language has about `--chars` characters, so every language weighs about the same. On
Gemma-3-270M's tokenizer ml_val is 2578 tokens and ml_test 1808, in language order: score them with
`--max-tokens 2600` / `2048` to include every language (1024 tokens of ml_val cover de, fr and part of es).
"""

from __future__ import annotations

import argparse
import ast
import gettext
import re
import sysconfig
from pathlib import Path

MODULES = ("argparse", "json/__init__", "collections/__init__", "functools", "pathlib", "subprocess", "textwrap",
           "shutil", "logging/__init__", "csv", "heapq", "fractions", "zipfile")
LANGUAGES = ("de", "fr", "es", "ru", "ja", "zh_CN")
LOCALE = Path("/usr/share/locale")


def docstrings(module: str) -> list[str]:
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                for para in re.split(r"\n\s*\n", doc):
                    line = " ".join(para.split())
                    if len(line.split()) >= 8:
                        out.append(line)
    return out


def messages(domains: tuple[str, ...], language: str, chars: int) -> list[str]:
    found = []
    for domain in domains:
        mo = LOCALE / language / "LC_MESSAGES" / f"{domain}.mo"
        with open(mo, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        for key in sorted(k for k in catalog if isinstance(k, str) and k):
            text = " ".join(str(catalog[key]).split())
            if len(text) >= 40 and "%" not in text:
                found.append(text)
    out, total = [], 0
    for text in found[::max(1, len(found) // 200)]:  # spread over the catalog, not its first letters only
        out.append(text)
        total += len(text)
        if total >= chars:
            break
    return out


def gpl3() -> list[str]:
    text = Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--chars", type=int, default=900, help="characters per language (about 250 tokens)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = {
        "en_val": [p for m in MODULES for p in docstrings(m)],
        "ml_val": [m for lang in LANGUAGES for m in messages(("coreutils", "bash"), lang, args.chars)],
        "en_test": gpl3(),
        "ml_test": [m for lang in LANGUAGES for m in messages(("apt", "dpkg", "tar"), lang, args.chars)],
    }
    for name, lines in texts.items():
        (args.out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{name}: {len(lines)} lines, {sum(map(len, lines))} characters")


if __name__ == "__main__":
    main()
