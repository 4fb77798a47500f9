"""Writing outputs safely: check first, write beside, swap into place, clean up after signals.

- `check_output_file` / `check_output_dir` / `check_output_folder` refuse a bad output before any
  slow work: one that exists (unless --force), a directory --force may not replace (the current
  directory or one containing it, the input model or one containing it, a non-empty directory
  without embzip's manifest), a name too long for the file system, a missing or read-only parent.
- `atomic_write` writes a file under a temporary name beside its target and renames it into place;
  `partial_dir` + `swap_into_place` do the same for a directory, replacing an old output only if it
  is still the one seen at the start, so concurrent runs to one output never remove each other's or
  a user's data: exactly one of them succeeds.
- Temporary names carry the writer's process id; `remove_stale` deletes those of dead processes.
- Files get the modes a plain open() would give under the umask (safetensors writes 0600).
- `write_files` writes several files into one folder and renames them into place together, so a
  folder never holds some files of one run beside others of another.
- `sigterm_as_interrupt` turns SIGTERM into `Terminated`, a KeyboardInterrupt, so the cleanup that
  runs on Ctrl-C runs on SIGTERM too. `written` lists what was put in place since `forget_written`,
  so a signal that arrives after that can be reported truthfully.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import OutputError, Terminated, usage

# Room kept in a file name for the temporary names built from it (".NAME.partial-PID-HEX").
_NAME_SLACK = 32
_received_sigterm = _received_sigint = False
_written: list[str] = []  # outputs put in place since forget_written()


def written() -> list[str]:
    """The outputs put in place (renamed to their final names) since `forget_written`."""
    return list(_written)


def forget_written() -> None:
    _written.clear()


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def temporary_beside(path: str | os.PathLike) -> Path:
    """A name to write `path`'s content under before renaming it into place: .NAME.PID-HEX.tmp, which
    remove_stale recognises once its process is dead."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_token()}.tmp")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _refused(message: str) -> OutputError:
    """An output path the command line cannot mean (missing folder, already there, wrong kind): exit 2."""
    return usage(OutputError(message))


def _check_name(path: Path, given) -> None:
    limit = _name_max(_nearest_existing(path.parent)) - _NAME_SLACK
    size = len(os.fsencode(path.name))
    if size > limit:
        raise _refused(f"output name {str(given)[:40]}... is too long ({size} bytes; at most {limit} here, "
                       "leaving room for its temporary name); choose a shorter name")


def _check_parent(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise _refused(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable")


def _within(path: Path, other: Path) -> bool:
    """Whether `other` is `path` or lies inside it (both resolved)."""
    return path == other or path in other.parents


def _check_outside_hub_cache(given, real: Path) -> None:
    """Refuse an output inside a repository's folder of the Hugging Face hub cache (models--ORG--NAME and the
    like): those folders are huggingface_hub's, read by every program that loads the model."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE).expanduser()
    if not cache.is_dir():
        return
    cache = cache.resolve()
    for folder in (real, *real.parents):
        if folder.parent == cache and folder.name.startswith(("models--", "datasets--", "spaces--")):
            raise _refused(f"output {given} lies in the Hugging Face cache ({folder}), whose folders are "
                           "huggingface_hub's: write it elsewhere")


def _check_inputs(given, real: Path, inputs: Sequence[str | os.PathLike | None], *, inside: bool = False) -> None:
    """Refuse an output that is an input or contains one (or, with `inside`, lies within one)."""
    for source in inputs:
        if source is None or not Path(source).exists():
            continue
        source_real = Path(source).resolve()
        if _within(real, source_real) or (inside and _within(source_real, real)):
            raise _refused(f"output {given} is the input {source}, contains it or lies in it; write to a new name")


def names_a_folder(path: str | os.PathLike) -> bool:
    """Whether an output path as given ends with a separator ("new/"): a folder, even one not made yet."""
    return str(path).endswith(("/", os.sep))


def _check_not_empty(given, example: str) -> None:
    if not str(given).strip():  # Path("") is the current directory
        raise _refused(f"the output path is empty; give a {example}")
    if str(given) == "-":  # the usual name of stdout, which no output of embzip's can go to
        what = "file" if example.startswith("file") else "directory"
        raise _refused(f"output - would be a {what} named '-': embzip writes a {what} here, not to stdout (use --json "
                       f"for a summary on stdout); give a {example}")


def check_output_file(path: str | os.PathLike, force: bool, *,
                      inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output file that exists (unless force), is a directory or an input, has a name too
    long for the file system, or whose directory is missing or read-only."""
    given = path
    _check_not_empty(given, "file name such as factors.safetensors")
    path = Path(path)
    _check_name(Path(os.path.abspath(path)), given)  # first: stat() fails on a name too long
    remove_stale(path)
    if path.is_dir() or names_a_folder(given):
        raise _refused(f"output {given} is a directory; give a file name such as {path / 'factors.safetensors'}")
    if path.is_symlink() or (path.exists() and not path.is_file()):  # --force would replace the link or the node
        what = "a symbolic link" if path.is_symlink() else "not a regular file (a device, pipe or socket)"
        raise _refused(f"output {given} is {what}; embzip replaces only regular files, even with --force: "
                       "give the path of a file")
    exists = path.exists()
    _check_inputs(given, path.resolve(), inputs, inside=exists)  # a new file beside the model's own is fine
    _check_outside_hub_cache(given, path.resolve())
    if exists and not force:
        raise _refused(f"output {given} already exists; pass --force to overwrite it")
    _check_parent(Path(os.path.abspath(path)))
    return path


def check_output_dir(path: str | os.PathLike, force: bool, *, marker: str,
                     inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output directory that --force may not replace, or that exists without --force.

    --force replaces only a directory holding `marker` (the manifest embzip writes), never the
    current directory or one containing it, nor an input or a directory containing one."""
    given = path
    _check_not_empty(given, "directory name")
    path = Path(os.path.normpath(path))
    _check_name(Path(os.path.abspath(path)), given)
    remove_stale(path)  # a dead run's old output comes back before it is checked
    real = path.resolve()
    if _within(real, Path.cwd().resolve()):
        raise _refused(f"output {given} is the current directory or contains it; give a new directory name")
    _check_inputs(given, real, inputs)
    _check_outside_hub_cache(given, real)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise _refused(f"output {given} exists and is not a directory")
        if any(path.iterdir()):
            if not force:
                raise _refused(f"output directory {given} already exists and is not empty; pass --force to "
                               "replace it")
            if not (path / marker).is_file():
                raise _refused(f"output directory {given} was not written by embzip (no {marker} in it); "
                               "--force replaces only embzip's own output: choose another name")
    _check_parent(Path(os.path.abspath(path)))
    return path


def check_output_folder(path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """A directory that several files are written into and that is created if missing (bench --out); never an
    input directory (the model's) or one inside it."""
    given = path
    _check_not_empty(given, "directory name")
    path = Path(path)
    _check_name(Path(os.path.abspath(path)), given)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise _refused(f"output {given} exists and is not a directory")
    real = Path(os.path.abspath(path)).resolve()
    for source in inputs:  # files are added to OUT, none removed: a folder holding the model is fine, the model's not
        if source is not None and Path(source).is_dir() and _within(Path(source).resolve(), real):
            raise _refused(f"output {given} is the model directory {source} or lies in it; bench files would be "
                           "added to the model: write to a new name")
    _check_outside_hub_cache(given, real)
    existing = _nearest_existing(Path(os.path.abspath(path)))
    if not existing.is_dir():
        raise _refused(f"output {given} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output {given} cannot be written: {existing} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_modes(path: str | os.PathLike) -> None:
    """Give a file (or every file and directory under a directory) the modes open()/mkdir() give."""
    mask = _umask()
    path = Path(path)
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(path: str | os.PathLike) -> None:
    """Delete temporary files and partial directories left beside `path` by processes that died.

    A directory moved aside by a dead run is put back when `path` is missing (the old output),
    else deleted."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return
    path = Path(path)
    name = re.escape(path.name)  # .NAME.partial-PID[-HEX], .NAME.old-PID-HEX, .NAME.PID-HEX.tmp
    pattern = re.compile(rf"\.{name}\.(?:(partial|old)-(\d+)(?:-[0-9a-f]+)?|(\d+)-[0-9a-f]+\.tmp)")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(2) or match.group(3))):
            continue
        if match.group(1) == "old" and not (path.exists() or path.is_symlink()):
            os.rename(entry, path)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, replace: bool = True) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    With replace=False an output that appeared meanwhile is kept and this fails instead."""
    path = Path(path)
    remove_stale(path)
    tmp = temporary_beside(path)
    try:
        write(str(tmp))
        set_modes(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _rename_new(tmp, path)
        _written.append(str(path))
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # safetensors reports the OS's refusal as its own error, the reason in the text
        reason = _io_reason(exc)
        if reason is None:
            raise
        raise OutputError(f"could not write {path}: {reason}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _io_reason(exc: Exception) -> str | None:
    """The operating system's reason in a writer's error that wraps one ("Permission denied (os error 13)"), or
    None when the error is not about writing."""
    text = str(exc)
    if "os error" not in text.lower() and "ioerror" not in text.lower():
        return None
    found = re.search(r'message: "([^"]+)"', text) or re.search(r"([A-Z][^(:]*\(os error \d+\))", text)
    return found.group(1) if found else " ".join(text.split())[:160]


def _rename_new(tmp: Path, path: Path) -> None:
    """Rename a file to a name that must not exist (a hard link fails if it does)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path} appeared while embzip was writing it; it was left as it is and nothing was "
                          "written") from None
    except OSError:  # no hard links on this file system
        if path.exists():
            raise OutputError(f"{path} appeared while embzip was writing it; it was left as it is") from None
        os.replace(tmp, path)


def identity(path: str | os.PathLike) -> tuple | None:
    """What is at `path` now, or None if nothing; for swap_into_place.

    The inode number alone is not enough (a directory removed and created again often gets the same
    one): its modification time and, for a directory, the names in it are compared too."""
    try:
        st = os.lstat(path)
        names = tuple(sorted(os.listdir(path))) if stat.S_ISDIR(st.st_mode) else ()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, names)


def partial_dir(out: Path) -> Path:
    """A new empty directory beside `out` to write into (after removing dead runs' leftovers)."""
    remove_stale(out)
    tmp = out.with_name(f".{out.name}.partial-{_token()}")
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"could not create {tmp}: {exc.strerror or exc}") from None
    return tmp


def remove_partial(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(tmp: Path, out: Path, seen: tuple | None) -> None:
    """Move the finished directory `tmp` to `out`.

    `seen` is identity(out) when it was checked: None (nothing there) means `out` must still be
    absent (or an empty directory); otherwise it must still be that same directory, which is then
    replaced. Anything else there is left alone and this raises OutputError."""
    set_modes(tmp)
    if seen is None:
        try:
            os.rename(tmp, out)  # fails if a file or a non-empty directory appeared at out
        except OSError:
            raise OutputError(f"{out} appeared while embzip was writing it; it was left as it is and nothing was "
                              "written") from None
        _written.append(str(out))
        return
    aside = out.with_name(f".{out.name}.old-{_token()}")
    with _signals_held():  # no Ctrl-C or SIGTERM between the two renames
        try:
            os.rename(out, aside)
        except FileNotFoundError:
            raise OutputError(f"{out} was removed while embzip was writing it; nothing was written") from None
        if identity(aside) != seen:
            _put_back(aside, out)
            raise OutputError(f"{out} was replaced while embzip was writing it (another run?); it was left as it "
                              "is and nothing was written")
        try:
            os.rename(tmp, out)
        except OSError:
            _put_back(aside, out)
            raise OutputError(f"{out} appeared while embzip was writing it; it was left as it is") from None
        _written.append(str(out))
    if aside.is_symlink():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def write_files(folder: Path, writers: dict[str, Callable[[Path], object] | None]) -> None:
    """Write each file of `writers` ({name: write(tmp_path), or None for a file this run has none of}) into
    `folder` under a temporary name, then, with signals held, rename them all into place and remove the old
    files named None: the folder then holds one run's files, or (after an error or a signal before the
    renames) the previous run's, never a mix. A temporary file is removed on any failure."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in writers:  # what killed runs left
        remove_stale(folder / name)
    token = _token()
    temporary = {name: folder / f".{name}.{token}.tmp" for name, write in writers.items() if write is not None}
    try:
        for name, tmp in temporary.items():
            writers[name](tmp)
            set_modes(tmp)
        with _signals_held():
            for name in writers:
                if name in temporary:
                    os.replace(temporary[name], folder / name)
                else:
                    (folder / name).unlink(missing_ok=True)
            _written.extend(str(folder / name) for name in temporary)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back, delivered once the block is done (SIGTERM where both came). Python handlers that
    note them, not a signal mask: a mask holds a signal back from the main thread only, and a Ctrl-C sent to the
    process can reach another thread (torch's workers) and have its KeyboardInterrupt raised in the block all the
    same. Outside the main thread, where handlers cannot be set, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, lambda number, frame: arrived.append(number))
            except (ValueError, OSError):  # a signal this platform or embedding cannot handle
                pass
        yield
    finally:
        try:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        finally:
            if arrived:  # the stronger one, delivered now: SIGTERM ends the run (143) whatever a Ctrl-C beside it
                signal.raise_signal(signal.SIGTERM if signal.SIGTERM in arrived else signal.SIGINT)


def _put_back(aside: Path, out: Path) -> None:
    try:
        os.rename(aside, out)
    except OSError:
        raise OutputError(f"{out} changed while embzip was writing it; what was there is now {aside}") from None


def received_sigterm() -> bool:
    """Whether SIGTERM arrived while `sigterm_as_interrupt` was active."""
    return _received_sigterm


def received_signal() -> bool:
    """Whether SIGINT (Ctrl-C) or SIGTERM arrived while `sigterm_as_interrupt` was active: an error that follows
    (a KeyboardInterrupt swallowed inside a library's import leaves a half-imported module behind, whose next use
    fails) is the signal's doing, not a bug."""
    return _received_sigterm or _received_sigint


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread, and both it and SIGINT
    (which raises KeyboardInterrupt as Python's own handler does) are recorded (received_signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    global _received_sigterm, _received_sigint
    _received_sigterm = _received_sigint = False

    def on_term(signum, frame):
        global _received_sigterm
        _received_sigterm = True
        raise Terminated()

    def on_int(signum, frame):
        global _received_sigint
        _received_sigint = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    own_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # else ignored or handled: left so
    previous_int = signal.signal(signal.SIGINT, on_int) if own_int else None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
