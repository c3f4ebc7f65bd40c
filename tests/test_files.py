"""plumbing/files.py: atomic writes (permissions, thread safety) and the output folder lock."""
import json
import os
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.plumbing import files
from fiseclip_lib.plumbing.files import LOCK_NAME, output_lock, write_bytes_atomic, write_text_atomic



def proc_umask():
    """The umask as the kernel reports it (Linux), read without setting it; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


HAS_PROC_UMASK = proc_umask() is not None
_REAL_UMASK = os.umask  # tests below replace os.umask with a spy; fixtures restore through the real one


@pytest.fixture
def umask_027():
    """A umask unlike the 022 that a set-and-restore read would briefly install, where the process umask can be
    read without setting it (elsewhere the umask in effect, which the module read at import)."""
    if not HAS_PROC_UMASK:
        yield files.current_umask()
        return
    old = _REAL_UMASK(0o027)
    try:
        yield 0o027
    finally:
        _REAL_UMASK(old)


def test_atomic_writes_from_many_threads_never_change_the_umask(tmp_path, monkeypatch, umask_027):
    """Writers in threads (Dask, notebooks) must not set the process umask, not even for a moment: another
    thread creating a file meanwhile would get the wrong permissions. Every file gets 0666 minus the umask."""
    calls = []
    real_umask = os.umask

    def spy(mask):
        calls.append(mask)
        return real_umask(mask)

    monkeypatch.setattr(os, "umask", spy)
    errors, seen_masks = [], set()
    stop = threading.Event()

    def watch():  # what the kernel says the umask is, while the writers run
        while not stop.is_set():
            mask = proc_umask()
            if mask is not None:
                seen_masks.add(mask)

    def write(i):
        try:
            for j in range(25):
                if j % 2:
                    write_text_atomic(tmp_path / f"t{i}_{j}.txt", f"{i} {j}")
                else:
                    write_bytes_atomic(tmp_path / f"b{i}_{j}.bin", bytes([i, j]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    watcher = threading.Thread(target=watch)
    watcher.start()
    writers = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watcher.join()
    assert not errors
    assert calls == []  # no set-and-restore read of the umask per write
    assert seen_masks <= {umask_027}
    written = sorted(tmp_path.iterdir())
    assert len(written) == 12 * 25
    want = 0o666 & ~umask_027
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {want}
    assert (tmp_path / "t3_5.txt").read_text() == "3 5"


def test_current_umask_is_the_process_umask_and_leaves_it_alone(monkeypatch, umask_027):
    monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("current_umask set the umask"))
    assert files.current_umask() == umask_027


def test_a_second_writer_stops_at_once_naming_the_first(tmp_path):
    with output_lock(tmp_path, command="fiseclip run (first)") as record:
        assert record["pid"] == os.getpid()
        t0 = time.perf_counter()
        with pytest.raises(FiseclipError) as e:
            with output_lock(tmp_path, command="fiseclip run (second)"):
                pass
        assert time.perf_counter() - t0 < 2
        msg = str(e.value)
        assert "\n" not in msg
        assert f"is in use by fiseclip run (first) (pid {os.getpid()}" in msg and "choose another --out" in msg
        # the failed attempt leaves the holder's record in place for the next one to read
        with pytest.raises(FiseclipError, match=r"in use by fiseclip run \(first\)"):
            with output_lock(tmp_path, command="third"):
                pass
        # a writer in another thread of this process is refused too
        seen = []

        def other():
            try:
                with output_lock(tmp_path, command="thread"):
                    seen.append("acquired")
            except FiseclipError as err:
                seen.append(str(err))
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(seen) == 1 and "in use by fiseclip run (first)" in seen[0]
    # a clean exit frees the folder and leaves an empty lock file
    assert (tmp_path / LOCK_NAME).read_bytes() == b""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "took over" note after a clean exit
        with output_lock(tmp_path, command="again"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


@pytest.mark.slow
def test_lock_of_another_process_is_named_and_taken_over_once_it_is_killed(tmp_path):
    """Across processes: the holder is named while it runs; after a kill the OS frees the lock and the next run
    takes it over with a note naming the run that did not finish."""
    code = ("import sys, time\n"
            "from fiseclip_lib.plumbing.files import output_lock\n"
            "with output_lock(sys.argv[1], command='fiseclip sweep (holder)'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FiseclipError, match=rf"in use by fiseclip sweep \(holder\) \(pid {proc.pid} on "):
            with output_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with pytest.warns(UserWarning, match=rf"took over the lock left by fiseclip sweep \(holder\) \(pid {proc.pid},"):
        with output_lock(tmp_path, command="next"):
            held = json.loads((tmp_path / LOCK_NAME).read_text())
            assert held["command"] == "next" and held["pid"] == os.getpid()


def test_lock_in_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FiseclipError, match="output folder .* is not writable .*choose another --out"):
        with output_lock(tmp_path / "missing"):
            pass
    assert not (tmp_path / "missing").exists()


def test_output_lock_uses_filelock(tmp_path, monkeypatch):
    """The lock is filelock's (portable), not a POSIX-only fcntl call of our own."""
    import filelock

    made = []
    real = filelock.FileLock

    def spy(*a, **kw):
        made.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(filelock, "FileLock", spy)
    with output_lock(tmp_path):
        pass
    assert made == [tmp_path / LOCK_NAME]
    assert "fcntl" not in Path(files.__file__).read_text()


# ------------------------------------------------------------------------------------------ staged_output

def _tree(folder: Path) -> dict:
    """Every visible file under `folder` -> its text (hidden names: the lock, staging, manifest, are left out)."""
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _run(out, outputs: dict, fail: bool = False, **kw):
    with files.staged_output(out, "t", **kw) as stage:
        for rel, text in outputs.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
        if fail:
            raise RuntimeError("boom")


def test_staged_output_holds_exactly_the_last_complete_run(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out").mkdir()
    (out / "notes.txt").write_text("mine")  # not an output of the command: kept
    first = {"a.csv": "1", "overlays/x.png": "x1", "overlays/y.png": "y1", "maps.npz": "m1"}
    _run(out, first)
    assert _tree(out) == {**first, "notes.txt": "mine"}
    second = {"a.csv": "2", "overlays/x.png": "x2"}  # fewer files: y.png and maps.npz are stale
    _run(out, second)
    assert _tree(out) == {**second, "notes.txt": "mine"}
    with pytest.raises(RuntimeError):
        _run(out, {"a.csv": "3", "overlays/z.png": "z3"}, fail=True)
    assert _tree(out) == {**second, "notes.txt": "mine"}  # a failed run leaves the previous one intact
    assert [p.name for p in out.iterdir() if p.name.startswith(".fiseclip-staging")] == []


def test_staged_output_owns_replaces_outputs_of_runs_before_staging(tmp_path):
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "old.png").write_text("old")
    (out / "maps.npz").write_text("old")
    (out / "keep.txt").write_text("k")
    _run(out, {"a.csv": "1", "overlays/new.png": "n"}, owns=("overlays", "maps.npz", "*.csv"))
    assert _tree(out) == {"a.csv": "1", "overlays/new.png": "n", "keep.txt": "k"}


def test_staged_output_seed_copies_and_never_alters_the_previous_run(tmp_path):
    out = tmp_path / "out"
    _run(out, {"a.csv": "1", "sub/b.txt": "b"})
    with pytest.raises(RuntimeError):
        with files.staged_output(out, "t", seed=True) as stage:
            assert _tree(stage) == {"a.csv": "1", "sub/b.txt": "b"}
            with open(stage / "a.csv", "a") as f:  # appending to the copy
                f.write("more")
            raise RuntimeError("boom")
    assert _tree(out) == {"a.csv": "1", "sub/b.txt": "b"}


def test_a_killed_run_and_a_killed_swap_are_cleaned_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _run(out, {"a.csv": "1", "b.csv": "1"})
    # killed before its swap: a staging folder with half the outputs
    (out / ".fiseclip-staging-t").mkdir()
    (out / ".fiseclip-staging-t" / "a.csv").write_text("half")
    # killed during a swap: the second rename never happens
    real = os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:  # journal, then a.csv -> trash, then (dies) staging a.csv -> out
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _run(out, {"a.csv": "2", "c.csv": "2"})
    monkeypatch.setattr(files.os, "replace", real)
    assert (out / ".fiseclip-swap-t.json").exists()
    with files.staged_output(out, "t") as stage:  # the next run completes the killed swap first ...
        assert _tree(out) == {"a.csv": "2", "c.csv": "2"}
        (stage / "d.csv").write_text("3")
    assert _tree(out) == {"d.csv": "3"}  # ... then replaces it
    assert sorted(p.name for p in out.iterdir()) == [".fiseclip-outputs-t.json", "d.csv"]


def test_staged_output_rejects_a_key_that_is_a_path(tmp_path):
    with pytest.raises(ValueError):
        with files.staged_output(tmp_path, "../x"):
            pass
