"""Where evaluation text comes from: a file, a `datasets` dataset, or a sample bundled with embzip.

A text is a list of lines plus a human label of where it came from; perplexity decides what to
do with the lines (masked LMs score them one by one, causal LMs join them with "\\n").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, OptionError, not_a_file, usage

DATASET_EXAMPLE = "wikitext:wikitext-2-raw-v1:test"


@dataclass
class Text:
    """Lines of text and where they came from."""

    lines: list[str]  # one entry per line, without line endings
    source: str  # "file:/x.txt", "dataset:wikitext:wikitext-2-raw-v1:test" or "embzip sample eval.txt"

    def joined(self) -> str:
        return "\n".join(self.lines)


def _check_not_empty(lines: list[str], source: str) -> Text:
    if not any(line.strip() for line in lines):
        raise DataError(f"the text ({source}) is empty (no non-blank line); give a text with some lines in it")
    return Text(lines, source)


def _from_file(path: str) -> Text:
    file = Path(path).expanduser()
    if not file.is_file():
        raise usage(DataError(f"text file {path} {not_a_file(file)}; give a UTF-8 text file"))
    try:
        content = file.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                        "convert it to UTF-8") from None
    return _check_not_empty(content.splitlines(), f"file:{path}")


def _string_column(ds, spec: str) -> str:
    """The column read: 'text' where there is one, else the string column holding the most characters (a
    'sentence' beside a 'label' of one word per row); the text's source names it."""
    strings = [name for name, feat in ds.features.items()
               if getattr(feat, "dtype", None) in ("string", "large_string")]
    if "text" in strings:
        return "text"
    if not strings:
        raise DataError(f"dataset {spec} has no string column (columns: {', '.join(ds.features)}); "
                        "give a dataset with a 'text' column")
    return max(strings, key=lambda name: sum(len(row) for row in ds[name] if row is not None))


def _from_dataset(spec: str, option: str = "--dataset") -> Text:
    from .models import meant_as_path, names_folder_here

    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise OptionError(f"dataset spec {spec!r} is not name[:config[:split]], e.g. {DATASET_EXAMPLE}")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "test")
    folder = Path(name).expanduser()
    if folder.is_file() or (folder.exists() and not folder.is_dir()):
        raise usage(DataError(f"dataset {name} is a file, not a dataset; give a text file as the text (--text), or a "
                              "dataset name or folder of .txt/.json/.csv files"))
    if not folder.exists() and (meant_as_path(name) or names_folder_here(name)):
        raise usage(DataError(f"dataset folder {name} does not exist"))
    if folder.is_dir() and (folder / "config.json").is_file():
        raise usage(DataError(f"dataset {name} is a model directory (it has a config.json), not a dataset; give a text "
                              "file with --text, or a dataset name or folder of .txt/.json/.csv files"))
    try:
        import datasets

        if not folder.is_dir():  # a hub name: offline at once where the hub cannot be reached (hub.py)
            from .hub import offline_if_unreachable

            if offline_if_unreachable():
                datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one line says what and how to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        splits = _split_names(datasets, name, config) if folder.is_dir() else []  # a hub name: no second request
        if splits and split not in splits:
            given = "" if len(parts) > 2 and parts[2] else " (the default)"
            raise DataError(f"dataset {name} has no split {split!r}{given}; it has {', '.join(splits)}: "
                            f"name it, e.g. {option} {name}:{config or ''}:{splits[0]}") from None
        raise DataError(
            f"could not load dataset {spec!r} (name={name}, config={config}, split={split}): {first}; "
            f"check the spec name[:config[:split]] (e.g. {DATASET_EXAMPLE}) and that it is cached or "
            "reachable, or pass a text file instead"
        ) from None
    column = _string_column(ds, spec)
    lines = [line for row in ds[column] if row is not None for line in row.splitlines()]
    where = f"dataset:{name}:{config or ''}:{split}" + ("" if column == "text" else f" (column {column})")
    return _check_not_empty(lines, where)


def _split_names(datasets, name: str, config: str | None) -> list[str]:
    """The splits a dataset has, or [] where even that cannot be read."""
    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception:  # noqa: BLE001 - only a better hint is lost; the caller reports the load's own error
        return []


def _from_sample(sample: str) -> Text:
    from importlib.resources import files

    data = files("embzip").joinpath("data")
    resource = data.joinpath(f"{sample}.txt")
    if not resource.is_file():
        known = sorted(p.name.removesuffix(".txt") for p in data.iterdir() if p.name.endswith(".txt"))
        raise DataError(f"no bundled text sample {sample!r}; known: {', '.join(known) or 'none'}")
    return _check_not_empty(resource.read_text(encoding="utf-8").splitlines(), f"embzip sample {sample}.txt")


def load_text(text_file: str | None = None, dataset: str | None = None, sample: str = "eval") -> Text:
    """A text file, or a dataset `name[:config[:split]]` (split default test), or else the bundled sample."""
    if text_file is not None and dataset is not None:
        raise OptionError("give a text file or a dataset, not both")
    if text_file is not None:
        return _from_file(str(text_file))
    if dataset is not None:
        return _from_dataset(dataset, "--weights-dataset" if sample == "weights" else "--dataset")
    return _from_sample(sample)
