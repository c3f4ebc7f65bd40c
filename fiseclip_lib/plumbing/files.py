"""Atomic file output: a reader never sees a half-written file, even after Ctrl-C or kill."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from fiseclip_lib.errors import FiseclipError

# Names of atomic_path's temporary files (mkstemp: prefix ".<stem>.", 8 random characters, suffix ".tmp<ext>").
DEBRIS = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def _proc_umask() -> int | None:
    """The umask from /proc/self/status (Linux 4.7+), read without changing it; None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    mask = _proc_umask()
    if mask is None:
        # The only portable read sets and restores it: done once here, while importing (normally before any
        # worker thread runs), never per write, where another thread could create a file under the wrong mask.
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process umask, never changed here (thread-safe): read from /proc/self/status where the kernel
    offers it (so a later os.umask is seen), else the value read once when this module was imported."""
    mask = _proc_umask()
    return _UMASK_AT_IMPORT if mask is None else mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file ends with the permissions a plain `open()` would give it (0666 minus the umask, so 0644 under
    022), not the 0600 of `mkstemp`: outputs are meant to be read by others.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder must be: name it, not a traceback
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise FiseclipError(f"cannot write {path}: {blocker} is a file, not a folder; choose another path") from None
    # the temp name keeps the real suffix (tools such as papermill check it) and starts with a dot
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_debris(*folders) -> list[Path]:
    """Remove the temporary files of `atomic_path` that a killed writer left directly in `folders`.

    Call it only while holding the folder's `output_lock`: then no other writer can be mid-write there.

    Args:
        folders: folders to clean (missing ones are skipped; subfolders are not searched).
    Returns:
        the removed paths.
    """
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if DEBRIS.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically; characters that UTF-8 cannot hold (undecodable bytes of a file name,
    kept by Python as lone surrogates) are written as backslash escapes instead of failing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


LOCK_NAME = ".fiseclip.lock"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str = "fiseclip"):
    """Hold the one-writer lock of an output folder for the duration of the block.

    The lock is a `filelock.FileLock` on `<folder>/.fiseclip.lock` (flock on POSIX, LockFileEx on Windows),
    which the OS releases when its holder exits in any way (a lock left by a killed run is therefore taken
    over, with a note). The file records the holder's pid, command and start time so that a second writer can
    name it. A second writer stops at once.
    """
    import socket
    import time

    from filelock import FileLock, Timeout

    folder = Path(folder)
    path = folder / LOCK_NAME
    if not folder.is_dir():  # filelock would create it; a missing --out folder is the caller's error, as before
        raise FiseclipError(f"output folder {folder} is not writable (no such folder); choose another --out")
    if path.is_dir() and not path.is_symlink() or path.is_symlink() and path.resolve().is_dir():
        raise FiseclipError(f"lock file {path} is a folder, not a file: remove it (fiseclip creates it) or "
                            f"choose another --out")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    held = {}

    def on_acquired(fd: int) -> None:
        # filelock hands over the locked descriptor: only it may write on Windows, where byte 0 is locked.
        held["fd"] = fd
        held["previous"] = _parse_lock(_read_fd(fd))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        # A leading newline keeps the record off byte 0, so other processes can read it on Windows too.
        os.write(fd, b"\n" + json.dumps(record).encode())

    # preserve_lock_file: the file (and its holder record) stays where a second writer looks for it;
    # on_acquired also keeps filelock from turning the file into its own soft-lock marker.
    try:
        lock = FileLock(path, timeout=0, on_acquired=on_acquired, preserve_lock_file=True, thread_local=False)
    except TypeError:  # filelock < 4 has no on_acquired / preserve_lock_file
        import filelock

        raise FiseclipError(f"filelock {filelock.__version__} is too old for the output folder lock; "
                            f"run: pip install 'filelock>=4.2.1'") from None
    try:
        lock.acquire()
    except Timeout:
        holder = _read_lock(path)
        who = (f"{holder.get('command', 'fiseclip')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
               f"started {holder.get('started', '?')})") if holder else "another fiseclip process"
        raise FiseclipError(f"output folder {folder} is in use by {who}; wait for it to finish or choose "
                            f"another --out") from None
    except OSError as e:
        raise FiseclipError(f"output folder {folder} is not writable ({e.strerror}); choose another --out") from None
    try:
        previous = held.get("previous") or {}
        if previous.get("pid") and previous.get("pid") != os.getpid():
            import warnings

            warnings.warn(f"output folder {folder}: took over the lock left by {previous.get('command', 'a run')} "
                          f"(pid {previous['pid']}, started {previous.get('started', '?')}), which did not finish")
        yield record
    finally:
        try:
            with contextlib.suppress(OSError, KeyError):
                os.ftruncate(held["fd"], 0)  # a clean exit leaves an empty (free) lock file
        finally:
            lock.release()


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096)


def _parse_lock(data: bytes) -> dict:
    try:
        info = json.loads(data.decode("utf-8")) if data.strip() else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _read_lock(path: Path) -> dict:
    """The holder record of a lock file held by someone else ({} if unreadable)."""
    try:
        with open(path, "rb") as f:
            try:
                return _parse_lock(f.read(4096))
            except OSError:  # Windows: byte 0 is locked by the holder; the record starts after it
                f.seek(1)
                return _parse_lock(f.read(4096))
    except OSError:
        return {}


def read_yaml_mapping(path: str | os.PathLike, kind: str = "params file", empty: str | None = None) -> dict:
    """Read a YAML file that must hold a mapping; any problem is a one-line error naming `kind` and the file.

    Args:
        path: the file.
        kind: what the file is, for messages ("params file", "grid file").
        empty: the error for an empty file; None returns {} for it.
    Returns:
        The mapping as read.
    """
    import yaml

    from fiseclip_lib.errors import FiseclipError

    p = Path(path)
    if p.is_dir():
        raise FiseclipError(f"{kind} {p} is a folder; pass a .yaml file")
    if not p.is_file():
        raise FiseclipError(f"{kind} {p} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FiseclipError(f"{kind} {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise FiseclipError(f"{kind} {p} cannot be read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FiseclipError(f"{kind} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        if empty is not None:
            raise FiseclipError(f"{kind} {p} is empty; {empty}")
        return {}
    if not isinstance(data, dict):
        raise FiseclipError(f"{kind} {p} must hold a mapping of name: value, not a {type(data).__name__}")
    return data


def ensure_writable(out) -> Path:
    """Create the output folder if needed and check that files can be written there (a one-line error if not)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FiseclipError(f"output folder {out} is not writable: it is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FiseclipError(f"output folder {out} is not writable ({e.strerror}); choose another --out") from None
    return out


def display_path(path, base=None) -> str:
    """A path as shown in result tables: relative to `base` (None: as given), with forward slashes."""
    if base is None:
        return Path(path).as_posix()
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def write_csv_atomic(path: str | os.PathLike, table, float_format: str = "%.6f") -> None:
    """A DataFrame as CSV without its index, atomically; floats with 6 decimals, NaN as `nan` (the format of
    every result table: byte-identical on reruns)."""
    write_text_atomic(path, table.to_csv(index=False, float_format=float_format, na_rep="nan"))


# ------------------------------------------------------------------------------------------ staged outputs

STAGING_PREFIX = ".fiseclip-staging-"  # + command key: the folder a run writes into
_TRASH_PREFIX = ".fiseclip-trash-"  # + key: the previous outputs while they are being swapped out
_JOURNAL_PREFIX = ".fiseclip-swap-"  # + key + ".json": a swap in progress (rolled forward by the next run)
_MANIFEST_PREFIX = ".fiseclip-outputs-"  # + key + ".json": the top-level names the last complete run wrote


def _staging_names(key: str) -> tuple[str, str, str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"staged_output key {key!r}: use letters, digits, '-' or '_'")
    return (STAGING_PREFIX + key, _TRASH_PREFIX + key, f"{_JOURNAL_PREFIX}{key}.json",
            f"{_MANIFEST_PREFIX}{key}.json")


def _remove_tree(path: Path) -> None:
    """Remove a file, a link or a folder; read-only entries are made writable first (a copied read-only input)."""
    import shutil
    import stat

    def retry(func, p, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            func(p)

    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.is_dir():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=retry)
        else:
            shutil.rmtree(path, onerror=retry)


def _read_names(path: Path) -> list[str]:
    """The `names` list of a manifest / journal ([] when missing or unreadable: nothing is then removed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = data.get("names", []) if isinstance(data, dict) else []
    # only plain top-level names: an edited manifest can never point outside the folder
    return [n for n in names if isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n]


def _finish_swap(out: Path, key: str) -> None:
    """Carry out (or, after a kill, complete) the swap recorded in the journal: idempotent."""
    staging_name, trash_name, journal_name, manifest_name = _staging_names(key)
    staging, trash, journal = out / staging_name, out / trash_name, out / journal_name
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a journal is written atomically: unreadable means never written
        data = {}
    new = [n for n in data.get("names", []) if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]
    drop = [n for n in data.get("drop", []) if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]
    trash.mkdir(exist_ok=True)
    for name in new:
        src = staging / name
        if not os.path.lexists(src):  # already swapped in before a kill
            continue
        dst = out / name
        if os.path.lexists(dst):
            _remove_tree(trash / name)
            os.replace(dst, trash / name)
        os.replace(src, dst)
    for name in drop:
        if os.path.lexists(out / name):
            _remove_tree(trash / name)
            os.replace(out / name, trash / name)
    undeclared = sorted(set(new) - set(data.get("owned", [])))
    if undeclared:  # names `owns` does not cover: remembered, so that the next run can remove them if stale
        write_json_atomic(out / manifest_name, {"names": undeclared})
    else:  # everything is declared: no hidden file to leave behind
        (out / manifest_name).unlink(missing_ok=True)
    journal.unlink(missing_ok=True)
    _remove_tree(trash)
    _remove_tree(staging)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, key: str = "fiseclip", owns=(), seed: bool = False):
    """Write a run's outputs into a hidden staging folder and swap them into `out` only if the block succeeds.

    After any run, `out` holds exactly one run's outputs of this command: all of the last complete run's, none
    of an earlier run's (a rerun that writes fewer files removes the stale ones), and a run that fails, is
    interrupted or killed leaves the previous run's outputs untouched. Call it inside `output_lock(out)`: the
    lock makes this run the only writer, so leftovers of a killed run are cleaned here on entry.

    Layout inside `out` (hidden names, so folder walks and `remove_debris` ignore them):
      .fiseclip-staging-<key>/       the folder yielded to the block; outputs go here, with the same
                                     relative paths they will have in `out` (same filesystem: renames).
      .fiseclip-outputs-<key>.json   the top-level names the last complete run wrote that `owns` does not
                                     cover (the manifest; absent when `owns` covers every output).
      .fiseclip-swap-<key>.json      a swap in progress; .fiseclip-trash-<key>/ the outputs being replaced.

    The swap: a journal naming the new entries is written atomically; then, one rename each, every previous
    entry of the same name (or named in the previous manifest, or matching `owns`) is moved to the trash and
    the staged entry renamed into its place; then the manifest is written and the trash removed. Each entry
    is replaced atomically (a reader of predictions.csv sees the old file or the new one, never a half-written
    one); the set of entries is not (a reader that opens two files during the few milliseconds of the swap
    may see one old, one new). A run killed during the swap is completed by the next run from the journal:
    the staged outputs were complete before the journal was written.

    Files in `out` that this command did not write are kept (a user's notes, the lock, other commands'
    outputs): an --out pointed at a shared folder never loses anything but this command's own outputs.

    Args:
        out: the output folder (created if missing); the caller holds `output_lock(out)`.
        key: the command's name in the hidden file names ("predict", "sweep", "report"): letters, digits,
            '-' and '_'. Two commands sharing a folder each replace only their own outputs (give each its key).
        owns: top-level names (fnmatch patterns, e.g. "overlays", "*.csv") that belong to this command: every
            existing entry matching them is replaced by each run (also outputs of runs made before staging
            existed). Declare every output here and no manifest file is left in `out`.
        seed: start the staging folder as a copy of the current outputs of this command (manifest and `owns`
            entries), for commands that update their outputs in part (resume, reuse); a copy, never a link,
            so writing into the staging folder never alters the previous run's files.
    Yields:
        the staging folder (a Path): write every output under it.
    """
    import fnmatch
    import shutil

    out = Path(out)
    staging_name, trash_name, journal_name, manifest_name = _staging_names(key)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / staging_name
    if (out / journal_name).exists():  # a swap killed half-way: its staged outputs were complete
        _finish_swap(out, key)
    _remove_tree(out / trash_name)
    _remove_tree(staging)  # a run killed before its swap: discard what it staged

    def current() -> set[str]:
        names = set(_read_names(out / manifest_name))
        if owns:
            for p in out.iterdir():
                if not p.name.startswith(".") and any(fnmatch.fnmatch(p.name, pat) for pat in owns):
                    names.add(p.name)
        return {n for n in names if os.path.lexists(out / n)}

    staging.mkdir()
    try:
        if seed:
            for name in sorted(current()):
                src = out / name
                if src.is_dir() and not src.is_symlink():
                    shutil.copytree(src, staging / name, symlinks=True)
                else:
                    shutil.copy2(src, staging / name, follow_symlinks=False)
        yield staging
    except BaseException:
        _remove_tree(staging)
        raise
    new = sorted(p.name for p in staging.iterdir())
    drop = sorted(current() - set(new))
    owned = [n for n in new if any(fnmatch.fnmatch(n, pat) for pat in owns)]
    write_json_atomic(out / journal_name, {"names": new, "drop": drop, "owned": owned})
    _finish_swap(out, key)
