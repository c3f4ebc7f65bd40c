"""`fiseclip sweep`: grid expansion, one tidy table equal to `fiseclip run`'s numbers, resumable tasks, the same
bytes from the local and the Dask executor (1, 2 and 3 workers: fixed torch threads per task), a killed worker
that loses and duplicates nothing, a failed attempt that leaves the folder's previous sweep intact, a feature
cache shared by concurrent writers, and one-line errors for bad grids and unreachable or silent schedulers.

The random tiny CLIP at 28 px on two categories of six images keeps every task well under a second; the Dask
tests share one LocalCluster (processes, 2 workers) per module.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from fiseclip_lib.cli import main
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation.sweep import expand_grid, load_grid, run_sweep
from helpers import Fresh, cli_without_dask, make_mvtec_tree, start_fresh_server, write_entry

MODEL = "model: fiseclip-tiny\npretrained: none\nimage_size: 28\nbatch_size: 4\n"
GRID = "dataset: mvtec\nroot: {root}\n" + MODEL + "method: [fiseclip, musc]\nalpha: [0.3, 0.7]\n"
METRICS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec_tree(tmp_path_factory.mktemp("sweepdata") / "mvtec")


@pytest.fixture(scope="module")
def grid_file(data, tmp_path_factory):
    p = tmp_path_factory.mktemp("grid") / "grid.yaml"
    p.write_text(GRID.format(root=data))
    return p


@pytest.fixture(scope="module")
def serial(grid_file, tmp_path_factory):
    """The reference: the grid run with the local executor in a fresh process, which must not import Dask."""
    out = tmp_path_factory.mktemp("serial") / "sweep"
    code, text = Fresh(cli_without_dask, ["sweep", str(grid_file), "--out", str(out), "--no-progress",
                                          "--no-feature-cache"]).wait()
    assert code == 0, text
    return out


@contextlib.contextmanager
def forked_workers():
    """Dask worker processes forked from the fresh-process server (helpers.Fresh), which imported the library
    once, instead of spawned interpreters that import it each: seconds per worker, and again after a kill.
    They are still separate processes (own pid, killed with SIGKILL, restarted by their nanny)."""
    import dask
    import distributed  # noqa: F401 - its defaults must be in dask's config before one key is overridden

    start_fresh_server()
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver",
                          "distributed.worker.preload": [str(Path(__file__).with_name("fresh_preload.py"))]}):
        yield


@pytest.fixture(scope="module")
def cluster():
    import logging

    from distributed import LocalCluster

    with forked_workers():
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         silence_logs=logging.ERROR)
        yield c
        c.close()


# ------------------------------------------------------------------------------------------- expansion

def test_grid_expands_to_the_product_in_file_order(data):
    grid = {"dataset": "mvtec", "root": str(data), "categories": ["screw", "bottle"], "model": "fiseclip-tiny",
            "pretrained": "none", "alpha": [0.2, 0.4, 0.6], "degrees": [[1], "1,3"], "seed": 3}
    s = expand_grid(grid)
    assert s.varied == ["alpha", "degrees"]
    assert [(c.config["alpha"], tuple(c.config["degrees"])) for c in s.configs] == [
        (a, d) for a in (0.2, 0.4, 0.6) for d in ((1,), (1, 3))]
    assert all(c.config["seed"] == 3 and c.categories == ["screw", "bottle"] for c in s.configs)
    assert [t[1] for t in s.tasks[:2]] == ["screw", "bottle"] and len(s.tasks) == 12
    ids = [c.config_id for c in s.configs]
    assert len(set(ids)) == 6 and ids == [c.config_id for c in expand_grid(grid).configs]  # stable
    # fields that change no number do not change the id (so --resume finds the task on another device)
    assert expand_grid({**grid, "device": "cpu", "encode_batch": 2}).configs[0].config_id == ids[0]
    assert expand_grid({**grid, "seed": 4}).configs[0].config_id != ids[0]


def test_several_roots_and_datasets(data, tmp_path):
    other = make_mvtec_tree(tmp_path / "other", categories=("pill",))
    s = expand_grid({"dataset": "mvtec", "root": [str(data), str(other)], "model": "fiseclip-tiny"})
    assert s.varied == ["root"] and [c.categories for c in s.configs] == [["bottle", "screw"], ["pill"]]
    s = expand_grid({"datasets": [{"dataset": "mvtec", "root": str(other)},
                                  {"dataset": "mvtec", "root": str(data), "categories": "screw"}],
                     "model": "fiseclip-tiny"})
    assert [(c.root, c.categories) for c in s.configs] == [(str(other), ["pill"]), (str(data), ["screw"])]


# ------------------------------------------------------------------------------------------- the table

@pytest.mark.slow
def test_table_rows_equal_fiseclip_run_per_config(serial, data, tmp_path):
    table = pd.read_csv(serial / "sweep.csv")
    assert list(table.columns) == ["config_id", "dataset", "method", "alpha", "category", *METRICS, "images",
                                   "encoder", "weights", "pretrained", "git_commit", "torch_threads"]
    assert (table.torch_threads == 1).all()
    assert list(table.category) == ["bottle", "screw", "mean"] * 4
    assert (table.encoder == "fiseclip-tiny").all() and (~table.pretrained).all()
    assert table.git_commit.str.len().gt(6).all()
    info = json.loads((serial / "sweep.json").read_text())
    assert info["status"] == "finished" and info["varied"] == ["method", "alpha"]
    # independent reference: `fiseclip run` with each configuration gives the same numbers and the same files
    groups = list(table.groupby(["config_id", "method", "alpha"], sort=False))
    for (cid, method, alpha), rows in groups[::3]:  # one fiseclip and one musc configuration
        out = tmp_path / cid
        assert main(["run", "--dataset", "mvtec", "--root", str(data), "--model", "fiseclip-tiny", "--pretrained",
                     "none", "--image-size", "28", "--batch-size", "4", "--method", method, "--set",
                     f"alpha={alpha}", "--out", str(out), "--no-progress", "--no-feature-cache"]) == 0
        ref = pd.read_csv(out / "metrics.csv")
        assert ref.category.tolist() == rows.category.tolist()
        pd.testing.assert_frame_equal(ref[METRICS].reset_index(drop=True), rows[METRICS].reset_index(drop=True))
        for name in ("metrics.csv", "scores.csv"):
            assert (serial / "configs" / cid / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.slow
def test_resume_reuses_finished_tasks_only(grid_file, serial, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["sweep", str(grid_file), "--out", str(out), "--no-feature-cache"]
    assert main(base) == 0
    assert (out / "sweep.csv").read_bytes() == (serial / "sweep.csv").read_bytes()
    capsys.readouterr()
    cats = sorted((out / "configs").glob("*/categories/*.json"))
    assert len(cats) == 8
    cats[0].unlink()                      # a task killed before it wrote
    cats[1].write_text('{"category": ')   # a torn file (cannot happen with atomic writes, but never trusted)
    assert main(base + ["--resume"]) == 0
    text = capsys.readouterr().out
    assert text.count("reused finished result") == 6 and "[8/8]" in text
    assert (out / "sweep.csv").read_bytes() == (serial / "sweep.csv").read_bytes()
    # a larger grid computes only its new tasks
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(grid_file.read_text().replace("[0.3, 0.7]", "[0.3, 0.7, 0.9]"))
    assert main(["sweep", str(bigger), "--out", str(out), "--no-feature-cache", "--resume"]) == 0
    text = capsys.readouterr().out
    assert text.count("reused finished result") == 8 and "[12/12]" in text
    assert len(pd.read_csv(out / "sweep.csv")) == 18


def failing_grid(tmp_path):
    data = make_mvtec_tree(tmp_path / "mvtec")
    (data / "screw" / "test" / "crack" / "000.png").write_bytes(b"not an image")  # fails screw's tasks only
    grid = tmp_path / "g.yaml"
    grid.write_text(f"dataset: mvtec\nroot: {data}\n{MODEL}sigma: [1, 20]\n")  # sigma 20 px cannot fit 28 px
    return grid


def test_failed_task_is_one_line_and_the_others_are_kept(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["sweep", str(failing_grid(tmp_path)), "--out", str(out), "--no-feature-cache", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 4 sweep tasks failed" in err[0] and "000.png cannot be read" in err[0]
    assert "--resume" in err[0] and f"kept in {out / 'partial'} ({out} is unchanged)" in err[0]
    assert sorted(p.name for p in out.iterdir() if p.name != ".fiseclip.lock") == ["partial"]
    table = pd.read_csv(out / "partial" / "sweep.csv")  # the finished task, no mean over an incomplete config
    assert list(table.category) == ["bottle"] and (table.sigma == 1).all()
    info = json.loads((out / "partial" / "sweep.json").read_text())
    assert info["status"] == "failed" and len(info["failed"]) == 3
    assert any("sigma 20.0 px is too large" in f[2] for f in info["failed"])


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".fiseclip.lock"}


def test_failed_attempt_leaves_the_previous_sweep_intact_and_resumes(tmp_path, capsys):
    """Output folders that never lie (issue 20): a failed attempt changes no byte of the finished sweep in the
    folder and keeps its own finished tasks in partial/; the fixed rerun with --resume reuses them, and the
    folder then holds that grid's sweep only (nothing of the earlier grid), equal to a fresh run's."""
    data = make_mvtec_tree(tmp_path / "mvtec")
    grid_a, grid_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    grid_a.write_text(f"dataset: mvtec\nroot: {data}\n{MODEL}alpha: [0.3, 0.7]\n")
    grid_b.write_text(f"dataset: mvtec\nroot: {data}\n{MODEL}alpha: 0.5\n")
    out = tmp_path / "o"
    base = ["--out", str(out), "--no-feature-cache", "--no-progress"]
    assert main(["sweep", str(grid_a), *base]) == 0
    before = _files(out)
    assert len([k for k in before if k.startswith("configs/") and k.endswith("/metrics.csv")]) == 2
    bad = data / "screw" / "test" / "crack" / "000.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    assert main(["sweep", str(grid_b), *base]) == 2
    assert "(" + str(out) + " is unchanged)" in capsys.readouterr().err
    after = _files(out)
    assert {k: v for k, v in after.items() if not k.startswith("partial/")} == before
    assert json.loads(after["partial/sweep.json"])["status"] == "failed"
    bad.write_bytes(good)
    cats = next((out / "partial" / "configs").glob("*/categories"))
    (cats / ".screw.x1y2z3w4.tmp.json").write_text('{"cat')  # debris of an attempt killed mid-write
    assert main(["sweep", str(grid_b), *base[:-1], "--resume"]) == 0
    assert capsys.readouterr().out.count("reused finished result") == 1  # bottle, from partial/
    fresh = tmp_path / "fresh"
    assert main(["sweep", str(grid_b), "--out", str(fresh), "--no-feature-cache", "--no-progress"]) == 0
    got, ref = _files(out), _files(fresh)
    assert not any(k.startswith("partial/") for k in got)
    assert sorted(got) == sorted(ref) and got["sweep.csv"] == ref["sweep.csv"]
    assert all(got[k] == ref[k] for k in got if k.endswith(("metrics.csv", "scores.csv")))
    assert json.loads(got["sweep.json"])["status"] == "finished"


# ------------------------------------------------------------------------------------------- dask

@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_bytes(grid_file, serial, tmp_path, capsys):
    out = tmp_path / "dask"
    with forked_workers():
        assert main(["sweep", str(grid_file), "--out", str(out), "--executor", "dask", "--workers", "2",
                     "--no-feature-cache"]) == 0
    text = capsys.readouterr().out
    assert "dask: scheduler tcp://" in text and "dashboard http" in text
    assert (out / "sweep.csv").read_bytes() == (serial / "sweep.csv").read_bytes()
    workers = {line.rsplit(", ", 1)[1] for line in text.splitlines() if line.startswith("[")}
    assert all(not w.endswith(f":{os.getpid()})") for w in workers)  # the tasks ran in worker processes
    for cid in (out / "configs").iterdir():
        for name in ("metrics.csv", "scores.csv"):
            assert (cid / name).read_bytes() == (serial / "configs" / cid.name / name).read_bytes()


@pytest.mark.slow
def test_killed_worker_loses_and_duplicates_nothing(cluster, grid_file, serial, tmp_path, capsys):
    marker = tmp_path / "paused.pid"
    killed = []

    def kill_when_paused():
        deadline = time.time() + 120
        while not (marker.exists() and marker.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    out = tmp_path / "killed"
    table = run_sweep(grid_file, out, executor="dask", scheduler=cluster.scheduler_address, use_cache=False,
                      pause={"category": "screw", "seconds": 30, "marker": str(marker)})
    killer.join(5)
    text = capsys.readouterr().out
    assert killed and killed[0] != os.getpid()
    screw_lines = [line for line in text.splitlines() if line.startswith("[") and " screw:" in line]
    assert len(screw_lines) == 4 and not any(line.endswith(f":{killed[0]})") for line in screw_lines)
    assert (out / "sweep.csv").read_bytes() == (serial / "sweep.csv").read_bytes()
    assert len(table) == 12 and not table.duplicated(["config_id", "category"]).any()


@pytest.mark.slow
def test_failed_tasks_on_dask_are_the_same_one_line(cluster, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["sweep", str(failing_grid(tmp_path)), "--out", str(out), "--scheduler", cluster.scheduler_address,
                 "--no-feature-cache"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "3 of 4 sweep tasks failed" in err[0] and "000.png cannot be read" in err[0], err
    assert captured.out.count(": FAILED: ") == 3 and "Traceback" not in captured.out + captured.err
    assert list(pd.read_csv(out / "partial" / "sweep.csv").category) == ["bottle"]
    assert not (out / "sweep.csv").exists()  # no sweep finished in this folder yet


@pytest.mark.slow
def test_dask_resume_reuses_tasks_on_the_workers(cluster, grid_file, serial, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["sweep", str(grid_file), "--out", str(out), "--scheduler", cluster.scheduler_address,
            "--no-feature-cache"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert capsys.readouterr().out.count("reused finished result") == 8
    assert (out / "sweep.csv").read_bytes() == (serial / "sweep.csv").read_bytes()


# ------------------------------------------------------------------------------------------- determinism

# A conv net whose features change with torch's thread count (1 vs 2 threads: scores differ in the 6th decimal;
# the tiny CLIP above gives the same bytes at any count, so it could not catch an executor-dependent table).
THREAD_SENSITIVE = "dataset: mvtec\nroot: {root}\ncategories: [bottle]\nmodel: efficientnet-lite0\n" \
                   "pretrained: none\nimage_size: 32\nmethod: musc\nbatch_size: 8\n"


@contextlib.contextmanager
def process_threads(n):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_task_threads_are_fixed_recorded_and_restored(data, tmp_path):
    """Every task runs with `threads` torch threads whatever the process uses, records it, and gives the
    process its own count back; the count does change this model's scores (so fixing it is what makes the
    table independent of the executor)."""
    import torch

    grid = load_grid(Path(_grid(tmp_path, THREAD_SENSITIVE.format(root=data))[0]))
    outs = {}
    for process, task in ((3, 1), (1, 1), (1, 2)):
        out = outs[process, task] = tmp_path / f"p{process}t{task}"
        with process_threads(process):  # 2 through the grid file's key; 1 by default, or by the argument, which
            # wins over the grid's key
            g, arg = {(3, 1): ({**grid, "task_threads": 2}, 1), (1, 1): (grid, None)}.get(
                (process, task), ({**grid, "task_threads": task}, None))
            run_sweep(g, out, use_cache=False, progress=False, threads=arg)
            assert torch.get_num_threads() == process
        table = pd.read_csv(out / "sweep.csv")
        assert list(table.torch_threads) == [task, task]
        assert json.loads((out / "sweep.json").read_text())["task_threads"] == task
        cat = next((out / "configs").glob("*/categories/bottle.json"))
        assert json.loads(cat.read_text())["torch_threads"] == task
    scores = {k: next((o / "configs").glob("*/scores.csv")).read_bytes() for k, o in outs.items()}
    assert scores[3, 1] == scores[1, 1]  # the process's own count does not reach the task
    assert scores[1, 1] != scores[1, 2]  # the task's count matters for this model
    assert (outs[3, 1] / "sweep.csv").read_bytes() == (outs[1, 1] / "sweep.csv").read_bytes()
    with pytest.raises(FiseclipError, match="threads 0"):
        run_sweep(grid, tmp_path / "bad", threads=0)


@pytest.mark.slow
def test_table_is_the_same_bytes_on_any_executor_and_worker_count(data, tmp_path):
    """Done-when of issue 20: sweep.csv (and each configuration's scores) byte-identical for the local executor
    and LocalClusters of 1, 2 and 3 worker processes, whatever thread count the calling process uses (before,
    local tasks ran with the process's threads and Dask tasks with cores // workers)."""
    grid = load_grid(Path(_grid(tmp_path, THREAD_SENSITIVE.format(root=data))[0]))
    with process_threads(2):
        run_sweep(grid, tmp_path / "local", use_cache=False, progress=False)
    ref = (tmp_path / "local" / "sweep.csv").read_bytes()
    ref_scores = next((tmp_path / "local" / "configs").glob("*/scores.csv")).read_bytes()
    with forked_workers():
        for n in (1, 2, 3):
            out = tmp_path / f"dask{n}"
            run_sweep(grid, out, executor="dask", workers=n, use_cache=False, progress=False)
            assert json.loads((out / "sweep.json").read_text())["workers"] == n
            assert (out / "sweep.csv").read_bytes() == ref, n
            assert next((out / "configs").glob("*/scores.csv")).read_bytes() == ref_scores, n


# ------------------------------------------------------------------------------------------- feature cache


@pytest.mark.slow
def test_two_processes_writing_one_cache_entry_never_tear_a_read(tmp_path):
    """Two processes write the same 800 KB entry over and over while this one reads it: every read is a miss
    or the whole, verified entry (cache.py writes atomically and checks a checksum on read)."""
    from fiseclip_lib.plumbing.cache import FeatureCache

    root, key = tmp_path / "fc", "ab" * 32
    procs = [Fresh(write_entry, str(root), key, 60) for _ in range(2)]
    cache = FeatureCache(root)
    import warnings

    hits = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged entry would warn
        while any(p.poll() is None for p in procs):
            f = cache.get(key, layers=(1, 2, 3))
            if f is not None:
                hits += 1
                assert f.layers[2].shape == (1, 1024, 64) and f.grid == (32, 32)
    assert [(code, text.splitlines()[-1:]) for code, text in (p.wait() for p in procs)] == [(0, ["done"])] * 2
    assert cache.damaged == 0 and hits > 0
    assert cache.get(key, layers=(1, 2, 3)) is not None
    assert not list(root.glob("*/.*.tmp.safetensors"))  # no temp file left behind


# ------------------------------------------------------------------------------------------- errors

def _grid(tmp, text):
    p = tmp / "grid.yaml"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return [str(p)]


# name -> (grid text with {root} or a setup(tmp, root) -> args, extra CLI args, text the one line must hold)
ERRORS = {
    "grid not a mapping": ("- alpha: 0.3\n", [], "must hold a mapping"),
    "grid empty": ("", [], "is empty"),
    "unknown field": ("root: {root}\ndataset: mvtec\ncolour: [red]\n", [], "unknown field 'colour'"),
    "empty list": ("root: {root}\ndataset: mvtec\nalpha: []\n", [], "alpha is an empty list"),
    "wrong type": ("root: {root}\ndataset: mvtec\nalpha: [0.3, lots]\n", [], "alpha='lots' is not a valid float"),
    "out of range": ("root: {root}\ndataset: mvtec\nalpha: [0.3, 2]\n", [], "alpha 2.0 must be in [0, 1]"),
    "bool for a number": ("root: {root}\ndataset: mvtec\nbatch_size: [true]\n", [], "batch_size"),
    "list field flat": ("root: {root}\ndataset: mvtec\ndegrees: [1, 3]\n", [], "degrees takes a list per value"),
    "value twice": ("root: {root}\ndataset: mvtec\nalpha: [0.5, 0.5]\n", [], "alpha lists the value 0.5 twice"),
    "no-number field swept": ("root: {root}\ndataset: mvtec\nencode_batch: [1, 2]\n", [],
                              "two configurations are the same"),
    "unknown method": ("root: {root}\ndataset: mvtec\nmethod: [musc, patchcore]\n", [], "patchcore"),
    "key a number": ("root: {root}\ndataset: mvtec\n1: x\n", [], "key 1 is not a name"),
    "unknown dataset": ("root: {root}\ndataset: kolektor\n", [], "unknown dataset 'kolektor'"),
    "dataset a list": ("root: {root}\ndataset: [mvtec, visa]\n", [], "dataset must be text"),
    "root missing": ("root: {root}/nope\ndataset: mvtec\n", [], "nope"),
    "root a number": ("root: 5\ndataset: mvtec\n", [], "root must be text"),
    "root required": ("dataset: mvtec\n", [], "root is required for dataset mvtec"),
    "unknown category": ("root: {root}\ndataset: mvtec\ncategories: [cable]\n", [], "cable"),
    "categories a number": ("root: {root}\ndataset: mvtec\ncategories: 5\n", [], "categories must be a list"),
    "datasets entry not a mapping": ("datasets: [mvtec]\n", [], "datasets[0] must be a mapping"),
    "datasets entry unknown field": ("datasets:\n  - {{dataset: mvtec, root: {root}, colour: red}}\n", [],
                                     "datasets[0]: unknown field(s) ['colour']"),
    "datasets and root": ("datasets: [{{dataset: mvtec, root: {root}}}]\nroot: {root}\n", [], "not both"),
    "invalid yaml": ("alpha: [0.3\n", [], "not valid YAML"),
    "not utf-8": (b"alpha: \xff\n", [], "not UTF-8"),
    "grid missing": (lambda tmp, root: [str(tmp / "nope.yaml")], [], "does not exist"),
    "grid a folder": (lambda tmp, root: [str(tmp)], [], "is a folder"),
    "scheduler with local executor": ("root: {root}\ndataset: mvtec\n", ["--executor", "local", "--scheduler",
                                                                         "tcp://127.0.0.1:9"], "needs --executor dask"),
    "workers without dask": ("root: {root}\ndataset: mvtec\n", ["--workers", "2"], "add --executor dask"),
    "workers 0": ("root: {root}\ndataset: mvtec\n", ["--executor", "dask", "--workers", "0"], "--workers 0"),
    "workers with scheduler": ("root: {root}\ndataset: mvtec\n", ["--scheduler", "tcp://127.0.0.1:9", "--workers",
                                                                  "2"], "drop one of them"),
    "connect timeout 0": ("root: {root}\ndataset: mvtec\n", ["--connect-timeout", "0"], "--connect-timeout"),
    "scheduler malformed": ("root: {root}\ndataset: mvtec\n", ["--scheduler", "nonsense", "--connect-timeout", "2"],
                            "cannot reach the Dask scheduler at nonsense"),
    "scheduler unreachable": ("root: {root}\ndataset: mvtec\n", ["--scheduler", "tcp://127.0.0.1:9",
                                                                 "--connect-timeout", "0.5"],
                              "cannot reach the Dask scheduler at tcp://127.0.0.1:9 within 0.5 s"),
    "task_threads 0": ("root: {root}\ndataset: mvtec\ntask_threads: 0\n", [],
                       "task_threads 0 must be one whole number >= 1"),
    "task_threads a list": ("root: {root}\ndataset: mvtec\ntask_threads: [1, 2]\n", [], "task_threads [1, 2]"),
    "task error": ("root: {root}\ndataset: mvtec\n" + MODEL + "layers: [[99]]\n", [], "2 of 2 sweep tasks failed"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_grid_or_cluster_is_one_line(name, data, tmp_path, capsys):
    spec, extra, text = ERRORS[name]
    args = spec(tmp_path, data) if callable(spec) else _grid(
        tmp_path, spec if isinstance(spec, bytes) else spec.format(root=data))
    out = tmp_path / "out"
    t0 = time.time()
    try:
        code = main(["sweep", *args, "--out", str(out), "--no-progress", "--no-feature-cache", *extra])
    except SystemExit as e:  # argparse
        code = e.code
    elapsed = time.time() - t0
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2, captured.out + captured.err
    assert len(err) == 1 and err[0].startswith("fiseclip: error:") and text in err[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not (out / "sweep.csv").exists() or name == "task error"
    if name.startswith("scheduler"):
        assert elapsed < 20 and not (out / "sweep.json").exists()  # time-bounded, and nothing written


def test_scheduler_that_accepts_but_never_speaks_is_one_line_in_time(data, tmp_path, capsys):
    """A port that accepts TCP and never answers (another service): distributed's Client would wait forever
    for the handshake; the sweep stops after --connect-timeout with one line naming the address and the fix."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])  # kept open, never written to
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    out = tmp_path / "out"
    t0 = time.time()
    try:
        code = main(["sweep", *_grid(tmp_path, f"root: {data}\ndataset: mvtec\n"), "--out", str(out),
                     "--no-progress", "--no-feature-cache", "--scheduler", address, "--connect-timeout", "2"])
    finally:
        server.close()
        for c in accepted:
            c.close()
    elapsed = time.time() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and accepted and elapsed < 10, (code, elapsed)
    assert len(err) == 1 and f"cannot reach the Dask scheduler at {address} within 2 s" in err[0], err
    assert "never answers" in err[0] and "8786" in err[0]
    assert not (out / "sweep.json").exists()


def test_grid_api_errors_are_fiseclip_errors(tmp_path):
    with pytest.raises(FiseclipError, match="must hold a mapping"):
        load_grid(Path(_grid(tmp_path, "3\n")[0]))
    with pytest.raises(FiseclipError, match="unknown executor"):
        run_sweep({"alpha": 0.5}, tmp_path / "o", executor="slurm")


def test_empty_categories_mean_all_as_in_run(data, tmp_path):
    """`categories: ""` and `[]` mean every category, as in `fiseclip run` (the one parser,
    data.parse_categories), at the top of a grid and in a `datasets` entry (which then covers all of its root,
    whatever the top says); dataset kinds come from data.DATASETS."""
    from fiseclip_lib.evaluation import sweep as S
    from fiseclip_lib.evaluation.data import DATASETS

    base = {"dataset": "mvtec", "root": str(data), "model": "fiseclip-tiny", "pretrained": "none"}
    for value in ("", [], " , ", ["", " "]):
        s = expand_grid({**base, "categories": value})
        assert [c.categories for c in s.configs] == [["bottle", "screw"]], value
    assert expand_grid({**base, "categories": " screw, "}).configs[0].categories == ["screw"]
    other = make_mvtec_tree(tmp_path / "other", categories=("pill", "cable"))
    s = expand_grid({"datasets": [{"dataset": "mvtec", "root": str(data), "categories": ""},
                                  {"dataset": "mvtec", "root": str(other)}],
                     "categories": "pill", "model": "fiseclip-tiny"})
    assert [c.categories for c in s.configs] == [["bottle", "screw"], ["pill"]]
    # a grid file with `categories: ""` runs every category (it was an error before)
    grid = tmp_path / "g.yaml"
    grid.write_text(f"dataset: mvtec\nroot: {data}\ncategories: \"\"\n" + MODEL)
    assert [c.categories for c in expand_grid(load_grid(grid)).configs] == [["bottle", "screw"]]
    # one definition of the dataset kinds
    assert not hasattr(S, "DATASET_KINDS") and DATASETS == ("mvtec", "visa", "folder", "metajson", "demo")
    with pytest.raises(FiseclipError, match=r"unknown dataset 'kolektor' \(anomalib's: anomalib:kolektor\); use mvtec, "
                                            r"visa, folder, metajson, demo or anomalib:<name>"):
        expand_grid({**base, "dataset": "kolektor"}, check_data=False)
