"""Dummy-dataset generators shared by the tests (synthetic trees in the real layouts)."""
from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
from PIL import Image


def _img(path: Path, seed: int, size=32, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def _mask(path: Path, size=32, box=(4, 4, 12, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)


def make_mvtec_tree(root: Path, categories=("bottle", "screw"), n_good=3, defects=(("crack", 2), ("hole", 1)),
                    size=32) -> Path:
    seed = 0
    for cat in categories:
        for i in range(2):
            _img(root / cat / "train" / "good" / f"{i:03d}.png", seed := seed + 1, size)
        for i in range(n_good):
            _img(root / cat / "test" / "good" / f"{i:03d}.png", seed := seed + 1, size)
        for defect, n in defects:
            for i in range(n):
                _img(root / cat / "test" / defect / f"{i:03d}.png", seed := seed + 1, size)
                _mask(root / cat / "ground_truth" / defect / f"{i:03d}_mask.png", size)
    return root


def make_visa_raw_tree(root: Path, categories=("candle", "pcb1"), n_normal=3, n_anomaly=2, size=32) -> Path:
    rows = []
    seed = 100
    for cat in categories:
        for i in range(n_normal):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel, seed := seed + 1, size)
            rows.append({"object": cat, "split": "test", "label": "normal", "image": rel, "mask": ""})
        for i in range(n_anomaly):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel, seed := seed + 1, size)
            _mask(root / mrel, size)
            rows.append({"object": cat, "split": "test", "label": "anomaly", "image": rel, "mask": mrel})
        rel = f"{cat}/Data/Images/Normal/train_{cat}.JPG"
        _img(root / rel, seed := seed + 1, size)
        rows.append({"object": cat, "split": "train", "label": "normal", "image": rel, "mask": ""})
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
        w.writeheader()
        w.writerows(rows)
    return root


def make_folder_tree(root: Path, with_masks=True, size=32) -> Path:
    for i in range(3):
        _img(root / "widget" / "normal" / f"n{i}.png", 200 + i, size)
    for i in range(2):
        _img(root / "widget" / "abnormal" / f"a{i}.png", 300 + i, size)
        if with_masks:
            _mask(root / "widget" / "masks" / f"a{i}.png", size)
    return root


# ------------------------------------------------------------------------------------------- fresh processes

# Tests that need a fresh process (a second process reading a disk cache, a run killed with SIGKILL, concurrent
# writers, a sweep that must not import Dask) fork it from multiprocessing's forkserver: a server process that
# imported torch, open_clip and the library once (conftest starts it in the background once the tests are
# collected) and holds no other state. A child then starts in milliseconds instead of paying seconds of
# imports, and is still a separate process: its own pid, memory, signals and exit code, nothing inherited from
# the test process.
FRESH_PRELOAD = ["fiseclip_lib.cli", "fiseclip_lib.evaluation.run", "fiseclip_lib.notebook.report", "open_clip", "papermill"]


def fresh_context():
    """The forkserver context with the library preloaded (started on first use if conftest did not)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FRESH_PRELOAD)
    return ctx


def start_fresh_server() -> None:
    """Start the forkserver now (a no-op when it runs); it imports FRESH_PRELOAD in its own process while the
    tests go on. Its stdout and stderr, which the processes forked from it inherit, go to /dev/null: pytest
    captures neither for a process started outside a test, so the log lines of Dask workers (a failing task's
    traceback, on purpose in test_sweep) would fill the terminal. A Fresh child writes into its own log; a
    Dask task's error reaches the test through the client."""
    import os
    import sys
    from multiprocessing import forkserver

    fresh_context()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        forkserver.ensure_running()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def _in_child(log, env, cwd, fn, args):
    """In the child: this environment and working directory, stdout and stderr into `log`, then `fn(*args)` as
    the exit code."""
    import os
    import sys

    import fresh_preload  # noqa: F401 - see there

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(fn(*args))


class Fresh:
    """`fn(*args)` in a fresh process (see above) with environment `env` (default: this one), this working
    directory, and its stdout and stderr in one log; `fn` must be a module-level function of an importable
    module (here, `helpers`) and returns the exit code."""

    def __init__(self, fn, *args, env: dict | None = None):
        import os
        import tempfile

        start_fresh_server()
        fd, self.log = tempfile.mkstemp(prefix="fresh-", suffix=".log")
        os.close(fd)
        self.proc = fresh_context().Process(
            target=_in_child, args=(self.log, dict(os.environ if env is None else env), os.getcwd(), fn, args))
        self.proc.start()
        self.pid = self.proc.pid
        _STARTED.append(self)

    def poll(self):
        return self.proc.exitcode

    def kill(self):
        self.proc.kill()  # SIGKILL

    def terminate(self):
        self.proc.terminate()  # SIGTERM

    def wait(self, timeout: float = 300) -> tuple[int | None, str]:
        """(exit code, output); the code is None if the process did not end within `timeout` (it is killed)."""
        import os

        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            code = None
        else:
            code = self.proc.exitcode
        with open(self.log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        os.unlink(self.log)
        return code, text


_STARTED: list[Fresh] = []


def kill_fresh_processes() -> None:
    """Kill (SIGKILL) every fresh process of this session that still runs, reap it and remove its log."""
    import os

    for p in _STARTED:
        if p.proc.exitcode is None:
            p.proc.kill()
            p.proc.join()
        if os.path.exists(p.log):
            os.unlink(p.log)
    _STARTED.clear()


def cli(argv):
    """Child: the `fiseclip` command line."""
    from fiseclip_lib.cli import main

    return main(list(argv))


def cli_without_dask(argv):
    """Child: the command line, then fail if Dask was imported (the local executor must not need it)."""
    import sys

    code = cli(argv)
    assert not {"dask", "distributed"} & set(sys.modules), "local executor imported dask"
    return code


def run_then_pause(marker, full_argv, argv, where="category"):
    """Child: `fiseclip run` uninterrupted (`full_argv`), then again (`argv`) until it reaches `where`, where
    the pid goes to `marker` and the process waits to be killed. `where`: "category" pauses at the start of the
    second category (the first one's result is on disk); "NAME@K" pauses on the K-th atomic write to the file
    NAME, its temporary file complete but not yet renamed into place."""
    import os
    import time

    import fiseclip_lib.evaluation.run as R

    assert cli(full_argv) == 0

    def pause():
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)

    if where == "category":
        score, seen = R.score_and_evaluate, []

        def pausing(detector, samples, category, **kw):
            seen.append(category)
            if len(seen) == 2:
                pause()
            return score(detector, samples, category, **kw)

        R.score_and_evaluate = pausing
    else:
        replace, (name, k), writes = os.replace, where.split("@"), []

        def pausing_replace(src, dst, *a, **kw):
            if os.path.basename(dst) == name:
                writes.append(dst)
                if len(writes) == int(k):
                    pause()
            return replace(src, dst, *a, **kw)

        os.replace = pausing_replace  # this child only
    return cli(argv)


def write_entry(root, key, times):
    """Child: store the same features under `key` over and over."""
    import torch

    from fiseclip_lib.plumbing.cache import FeatureCache
    from fiseclip_lib.encoder import Features

    g = torch.Generator().manual_seed(0)  # both writers store the same features, as two workers encoding one image
    feats = Features(layers={l: torch.randn(1, 1024, 64, generator=g) for l in (1, 2, 3)}, grid=(32, 32),
                     global_embedding=torch.randn(1, 64, generator=g))
    cache = FeatureCache(root)
    for _ in range(times):
        cache.put(key, feats, 0)
    print("done")
    return 0


def embed_and_count(cfg, phrase, out):
    """Child: text embeddings of `phrase` with a fresh encoder (saved to `out`); prints how many prompts went
    through the text tower (CALLS n)."""
    import torch

    from fiseclip_lib.encoder import ClipEncoder, load_encoder
    from fiseclip_lib.core.text import text_embeddings

    calls = []
    real = ClipEncoder.encode_text
    ClipEncoder.encode_text = lambda self, p: calls.append(len(p)) or real(self, p)
    torch.save(text_embeddings(load_encoder(**cfg), phrase), out)
    print("CALLS", len(calls))
    return 0


def hold_output_lock(folder: Path, command: str = "fiseclip (test holder)"):
    """Hold `folder`'s output lock from another thread, as a concurrent run would; returns the function that
    releases it (and joins the thread)."""
    from fiseclip_lib.plumbing.files import output_lock

    held, release = threading.Event(), threading.Event()

    def hold():
        with output_lock(folder, command=command):
            held.set()
            release.wait(60)
    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10), f"the test holder never took the lock of {folder}"
    return lambda: (release.set(), thread.join())
