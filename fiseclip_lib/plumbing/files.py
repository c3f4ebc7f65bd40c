"""Atomic file output: a reader never sees a half-written file, even after Ctrl-C or kill."""
from __future__ import annotations

import contextlib
import json
import os
import re
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
    path.parent.mkdir(parents=True, exist_ok=True)
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
