"""Build outsider test texts for embzip, from sources NOT used by scripts/make_texts.py.

    python scripts/make_outsider_texts.py OUTDIR [--tokenizer DIR/tokenizer.json] [--tokens 1700]

Writes UTF-8 files, one paragraph or message per line (code: the source file as is):
- en_license.txt: /usr/share/common-licenses/Apache-2.0, then MPL-2.0, then LGPL-2.1, Artistic (paragraphs)
- en_man.txt: man pages find(1), grep(1), sed(1), gzip(1), xz(1), wget(1) rendered with
  `groff -Tutf8 -man -P-cbou`, paragraphs joined into one line each
- code_py.txt: CPython stdlib source, as is: email/message.py, then http/client.py, then ast.py
- ml_LANG.txt for LANG in de fr es ru ja zh_CN ko ar hi pt_BR it pl tr vi uk he: translated gettext messages
  of every catalog in /usr/share/locale/LANG/LC_MESSAGES EXCEPT coreutils, bash, apt, dpkg, tar (and their
  relatives dpkg-dev, libapt-pkg6.0, python-apt) and the iso_* / xkeyboard-config name lists.
  Messages: 40+ characters, no '%', msgstr != msgid, whitespace collapsed. Per catalog (domain) the
  qualifying messages are sorted by msgid and thinned to every n-th (n = count // 40, at least 1);
  the domains (sorted by name) are then interleaved round-robin, so no single catalog dominates.

Every file is cut at about --tokens Gemma tokens (whole lines) when a tokenizer is given, else at
--chars characters.
"""

from __future__ import annotations

import argparse
import gettext
import re
import subprocess
import sysconfig
from pathlib import Path

LOCALE = Path("/usr/share/locale")
LANGS = ("de", "fr", "es", "ru", "ja", "zh_CN", "ko", "ar", "hi", "pt_BR", "it", "pl", "tr", "vi", "uk", "he")
EXCLUDED = {"coreutils", "bash", "apt", "dpkg", "tar", "dpkg-dev", "libapt-pkg6.0", "python-apt", "xkeyboard-config"}
LICENSES = ("Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic")
MANPAGES = ("find", "grep", "sed", "gzip", "xz", "wget")
CODE = ("email/message.py", "http/client.py", "ast.py")


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def licenses() -> list[str]:
    out = []
    for name in LICENSES:
        out += paragraphs(Path("/usr/share/common-licenses", name).read_text(encoding="utf-8"))
    return out


def manpages() -> list[str]:
    out = []
    for name in MANPAGES:
        found = sorted(Path("/usr/share/man/man1").glob(f"{name}.1*"))
        if not found:
            continue
        src = subprocess.run(["zcat", "-f", str(found[0])], capture_output=True, check=True).stdout
        rendered = subprocess.run(["groff", "-Tutf8", "-man", "-P-cbou"], input=src, capture_output=True,
                                  env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80"}).stdout.decode("utf-8", "replace")
        rendered = re.sub(r"\x1b\[[0-9;]*m", "", rendered)
        out += [p for p in paragraphs(rendered) if len(p) >= 20]
    return out


def code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in CODE:
        out += (stdlib / name).read_text(encoding="utf-8").splitlines()
    return out


def messages(lang: str) -> tuple[list[str], list[str]]:
    per_domain = []
    used = []
    for mo in sorted((LOCALE / lang / "LC_MESSAGES").glob("*.mo")):
        domain = mo.stem
        if domain in EXCLUDED or domain.startswith("iso_"):
            continue
        try:
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except Exception:
            continue
        found = []
        for key in sorted(k for k in catalog if isinstance(k, str) and k):
            text = " ".join(str(catalog[key]).split())
            if len(text) >= 40 and "%" not in text and text != " ".join(key.split()):
                found.append(text)
        if found:
            per_domain.append(found[::max(1, len(found) // 40)])
            used.append(domain)
    out, seen = [], set()
    for i in range(max(map(len, per_domain), default=0)):
        for lst in per_domain:
            if i < len(lst) and lst[i] not in seen:
                seen.add(lst[i])
                out.append(lst[i])
    return out, used


def cut(lines: list[str], tok, tokens: int, chars: int) -> tuple[list[str], int]:
    out, n = [], 0
    for line in lines:
        out.append(line)
        if tok is not None:
            n = len(tok.encode("\n".join(out), add_special_tokens=False).ids)
            if n >= tokens:
                break
        elif sum(map(len, out)) >= chars:
            break
    return out, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=1700)
    parser.add_argument("--chars", type=int, default=7000)
    args = parser.parse_args()
    tok = None
    if args.tokenizer:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(args.tokenizer))
    args.out.mkdir(parents=True, exist_ok=True)
    texts = {"en_license": licenses(), "en_man": manpages(), "code_py": code()}
    sources = {}
    for lang in LANGS:
        texts[f"ml_{lang}"], sources[lang] = messages(lang)
    for name, lines in texts.items():
        lines, n = cut(lines, tok, args.tokens, args.chars)
        (args.out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        lang = name[3:] if name.startswith("ml_") else None
        print(f"{name}: {len(lines)} lines, {sum(map(len, lines))} chars, {n} tokens"
              + (f"; domains: {' '.join(sources[lang])}" if lang else ""))


if __name__ == "__main__":
    main()
