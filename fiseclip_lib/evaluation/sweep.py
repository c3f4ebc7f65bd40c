"""`fiseclip sweep`: a grid of configurations x categories, one task each, in-process or on a Dask cluster.

A grid file is a YAML mapping. `dataset`, `root` (text or a list of roots of that layout) and `categories`
(left out, "" or []: every category, as in `fiseclip run`) name the data, or `datasets` lists
`{dataset, root, categories}` entries; every other key is a `FiseConfig` field with one value or a list of
values, and the grid is the product of the lists; `task_threads` (one whole number) sets the torch threads
of every task (below). List-valued fields (`layers`, `degrees`, `rscin_ks`) take a list of lists
(`degrees: [[1], [1, 3, 5]]`) or text (`degrees: "1,3,5"`). Each (configuration, category) is one task, which
writes its result atomically in the form `fiseclip run` uses:

    DIR/configs/<config-id>/config.json             the configuration (written before its tasks run)
    DIR/configs/<config-id>/categories/<cat>.json   one task's result (rows, metrics, key, provenance)
    DIR/configs/<config-id>/metrics.csv, scores.csv when all of its categories are done
    DIR/sweep.csv                                   one row per (config, category) + a mean row per config
    DIR/sweep.json                                  the grid, the varied fields, the tasks, provenance
    DIR/partial/                                    the same layout: the attempt under way, or the last one
                                                    that failed or was killed

A sweep never lies about its folder: each attempt writes into DIR/partial/ and only a complete one (every task
finished) replaces DIR's configs/, sweep.csv and sweep.json (`plumbing.files.staged_output`, a journaled swap)
and removes partial/. So DIR holds one finished sweep and nothing of another grid, and a failed or killed
attempt leaves DIR's previous sweep intact. partial/ is not staged_output's own staging folder (which a failed
run discards): it persists, so that `--resume` finds the failed attempt's finished tasks.

A killed task, worker or client loses only the unfinished tasks; `--resume` reuses a finished task (from
partial/ or from DIR's sweep) when its content key (config, encoder, every image's bytes; `run.category_key`)
still matches; without `--resume` an attempt starts from an empty partial/. The table depends only on the
results, never on the executor: `local` and `dask` give byte-identical `sweep.csv` files, because every task
runs with the same number of torch threads (`task_threads` in the grid or `threads` here, default
`TASK_THREADS` = 1; recorded per row in the `torch_threads` column): torch's reductions split by thread count,
so 1 and 2 threads differ in the 6th decimal.
Executors: `local` (default) runs the tasks one after the other in this process without importing Dask; `dask`
starts a LocalCluster (cores // threads worker processes, at most 4, one task at a time each) or connects to a
running scheduler (`--scheduler tcp://host:port`, e.g. one started by dask-jobqueue on Slurm/PBS).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import time
import typing
import warnings
from pathlib import Path

import pandas as pd

from fiseclip_lib.plumbing.files import output_lock, remove_debris, staged_output, write_json_atomic
from fiseclip_lib.plumbing.resources import usable_cpus
from fiseclip_lib.config import SCORE_NEUTRAL_FIELDS, FiseConfig, scoring_fields, show_default
from fiseclip_lib.evaluation.data import check_dataset, parse_categories
from fiseclip_lib.errors import FiseclipError

DATA_KEYS = ("dataset", "root", "categories", "datasets")
RUN_KEYS = ("task_threads",)  # how every task runs, not what it computes (see TASK_THREADS)
DEFAULT_DEMO_ROOT = "demo_data"
PARTIAL = "partial"  # DIR/partial/: the attempt under way or the last failed one (module doc)
OUTPUTS = ("configs", "sweep.csv", "sweep.json")  # what a finished attempt replaces in DIR
PROVENANCE_COLUMNS = ["images", "method", "encoder", "weights", "pretrained", "git_commit", "torch_threads"]
CONNECT_TIMEOUT_S = 20.0
# torch intra-op threads of every task, wherever it runs: a fixed count makes a task's numbers independent of the
# executor and the worker count (the numba matching kernel splits disjoint work units, so it is exact at any
# count, and takes its count from torch). 1 fits the grid's own parallelism: one task per core.
TASK_THREADS = 1


def _list_fields() -> set[str]:
    """FiseConfig fields whose single value is itself a list (tuples) or a mapping."""
    out = set()
    for name, hint in typing.get_type_hints(FiseConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        origin = typing.get_origin(args[0]) if typing.get_origin(hint) is typing.Union else typing.get_origin(hint)
        if origin in (tuple, typing.Tuple, dict, typing.Dict):
            out.add(name)
    return out


# ----------------------------------------------------------------------------------------------- grid

@dataclasses.dataclass
class SweepConfig:
    """One configuration of a sweep: a dataset (kind, root) and a FiseConfig, and the categories it covers."""

    config_id: str
    dataset: str
    root: str  # absolute path, where the tasks read the data
    root_label: str  # as written in the grid file (shown in the table: independent of where the sweep ran)
    categories: list
    config: dict  # FiseConfig.to_dict()
    varied: dict  # varied field -> value as shown in the table


@dataclasses.dataclass
class Sweep:
    """An expanded grid: configurations in grid order, the varied fields, and one task per (config, category)."""

    source: str
    grid: dict
    configs: list
    varied: list
    threads: int = TASK_THREADS  # torch threads of every task (grid key task_threads)

    @property
    def tasks(self) -> list[tuple[SweepConfig, str]]:
        return [(c, cat) for c in self.configs for cat in c.categories]


def load_grid(path) -> dict:
    """Read a grid file: a UTF-8 YAML mapping with text keys; anything else is a one-line error naming it.

    Args:
        path: the grid file.
    Returns:
        the mapping as read (not yet expanded; see `expand_grid`).
    """
    from fiseclip_lib.plumbing.files import read_yaml_mapping

    grid = read_yaml_mapping(path, "grid file", empty="name dataset, root and the config fields to sweep")
    return grid


def _values(grid: dict, name: str, src: str, list_field: bool) -> list:
    """The values a grid field takes: a list of values, or one value (a list field's one value is a list)."""
    value = grid[name]
    if isinstance(value, list):
        if not value:
            raise FiseclipError(f"{src}: {name} is an empty list; give at least one value")
        if list_field and not all(isinstance(v, (list, str, type(None))) for v in value):
            raise FiseclipError(f"{src}: {name} takes a list per value: write one value as [{_flow(value)}] or "
                                f"\"{','.join(map(str, value))}\", several as [[1], [1, 3, 5]]")
        return value
    return [value]


def _flow(value) -> str:
    return json.dumps(value)


def _display(value, name: str = ""):
    """A field value as shown in the table: None -> auto (unset for tiles, match_window), lists -> 1,3,5,
    mappings -> JSON."""
    if value is None:
        return show_default(name, None)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _text(value, name: str, src: str):
    if not isinstance(value, str) or not value.strip():
        raise FiseclipError(f"{src}: {name} must be text, got {type(value).__name__} {value!r}")
    return value


def _dataset_entries(grid: dict, src: str) -> list[dict]:
    """[{dataset, root_label, categories}] from `datasets:` or from `dataset`/`root`/`categories`."""
    if "datasets" in grid:
        if "dataset" in grid or "root" in grid:
            raise FiseclipError(f"{src}: give either datasets (a list of {{dataset, root, categories}}) or "
                                f"dataset/root, not both")
        entries = grid["datasets"]
        if not isinstance(entries, list) or not entries:
            raise FiseclipError(f"{src}: datasets must be a non-empty list of {{dataset, root, categories}} mappings")
        top = parse_categories(grid.get("categories"), src)
        out = []
        for i, e in enumerate(entries):
            where = f"{src}: datasets[{i}]"
            if not isinstance(e, dict):
                raise FiseclipError(f"{where} must be a mapping with dataset, root and optional categories, "
                                    f"got {e!r}")
            unknown = sorted(set(map(str, e)) - {"dataset", "root", "categories"})
            if unknown:
                raise FiseclipError(f"{where}: unknown field(s) {unknown}; use dataset, root, categories")
            kind = _text(e.get("dataset", "demo"), "dataset", where)
            root = e.get("root", DEFAULT_DEMO_ROOT if kind == "demo" else None)
            if root is None:
                raise FiseclipError(f"{where}: root is required for dataset {kind}")
            cats = parse_categories(e.get("categories"), where) if "categories" in e else top
            out.append({"dataset": kind, "root_label": _text(root, "root", where), "categories": cats})
    else:
        kind = _text(grid.get("dataset", "demo"), "dataset", src)
        roots = grid.get("root", DEFAULT_DEMO_ROOT if kind == "demo" else None)
        if roots is None:
            raise FiseclipError(f"{src}: root is required for dataset {kind}")
        roots = _values(grid, "root", src, False) if "root" in grid else [roots]
        cats = parse_categories(grid.get("categories"), src)
        out = [{"dataset": kind, "root_label": _text(r, "root", src), "categories": cats} for r in roots]
    for e in out:
        check_dataset(e["dataset"], src)
    labels = [(e["dataset"], e["root_label"]) for e in out]
    if len(set(labels)) != len(labels):
        raise FiseclipError(f"{src}: a dataset root is listed twice")
    return out


def config_id(dataset: str, root_label: str, config: dict) -> str:
    """A configuration's stable id: a hash of the dataset, its root as written, and the config's fields that
    change numbers (so the same grid always maps to the same folders, and `--resume` finds them)."""
    relevant = scoring_fields(config)
    payload = json.dumps({"dataset": dataset, "root": root_label, "config": relevant}, sort_keys=True, default=str)
    return "c" + hashlib.sha256(payload.encode()).hexdigest()[:11]


def expand_grid(grid: dict, source: str = "grid", base_dir=None, check_data: bool = True) -> Sweep:
    """Expand a grid mapping into configurations (product of the value lists, in the file's key order).

    Args:
        grid: the mapping (`load_grid`).
        source: how errors name the grid ("grid file g.yaml").
        base_dir: relative roots are resolved against it (default: the current folder, as for `run`).
        check_data: list each dataset (unknown categories and missing roots are errors here, before any task;
            the demo set is built when missing).
    Returns:
        a Sweep; every configuration is validated by FiseConfig (a bad value is one line naming the field).
    """
    src = source
    bad = [k for k in grid if not isinstance(k, str)]
    if bad:
        raise FiseclipError(f"{src}: key {bad[0]!r} is not a name; write every key as text (e.g. quote it)")
    fields = {f.name for f in dataclasses.fields(FiseConfig)}
    unknown = [k for k in grid if k not in fields and k not in DATA_KEYS + RUN_KEYS]
    if unknown:
        raise FiseclipError(f"{src}: unknown field {unknown[0]!r}; use dataset, root, categories, datasets, "
                            f"task_threads or a config field: {', '.join(sorted(fields))}")
    threads = grid.get("task_threads", TASK_THREADS)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise FiseclipError(f"{src}: task_threads {threads!r} must be one whole number >= 1 (torch threads per "
                            f"task, the same on every executor)")
    list_fields = _list_fields()
    names = [k for k in grid if k in fields]
    choices = {}
    for name in names:
        values = _values(grid, name, src, name in list_fields)
        coerced = []
        for v in values:
            try:
                coerced.append(FiseConfig.from_dict({name: v}).to_dict()[name])
            except FiseclipError as e:
                raise FiseclipError(f"{src}: {e}") from None
        seen = [json.dumps(c, sort_keys=True) for c in coerced]
        dups = [v for v, s in zip(values, seen) if seen.count(s) > 1]
        if dups:
            raise FiseclipError(f"{src}: {name} lists the value {dups[0]!r} twice")
        choices[name] = coerced
    entries = _dataset_entries(grid, src)
    varied = [n for n in names if len(choices[n]) > 1]
    if len({e["root_label"] for e in entries}) > 1:
        varied = ["root"] + varied
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    configs = []
    for e in entries:
        root = str((base / Path(e["root_label"]).expanduser()).resolve())
        cats = e["categories"]
        if check_data:
            from fiseclip_lib.evaluation import data as D
            from fiseclip_lib.evaluation.run import prepare_dataset

            samples = prepare_dataset(e["dataset"], root, cats)
            cats = list(cats) if cats else D.categories_of(samples)
            empty = [c for c in cats if not any(s.category == c for s in samples)]
            if empty:
                raise FiseclipError(f"category {empty[0]} has no test images under {e['root_label']}")
        for combo in itertools.product(*(choices[n] for n in names)):
            values = dict(zip(names, combo))
            try:
                cfg = FiseConfig.from_dict(values).to_dict()
            except FiseclipError as err:
                raise FiseclipError(f"{src}: {err}") from None
            cid = config_id(e["dataset"], e["root_label"], cfg)
            shown = {n: _display(values[n], n) for n in varied if n != "root"}
            if "root" in varied:
                shown = {"root": e["root_label"], **shown}
            configs.append(SweepConfig(cid, e["dataset"], root, e["root_label"], list(cats or []), cfg, shown))
    ids = [c.config_id for c in configs]
    if len(set(ids)) != len(ids):
        twice = next(c for c in configs if ids.count(c.config_id) > 1)
        raise FiseclipError(f"{src}: two configurations are the same ({twice.varied}); fields that change no "
                            f"number ({', '.join(sorted(SCORE_NEUTRAL_FIELDS))}) cannot be swept")
    return Sweep(src, grid, configs, varied, threads)


# ----------------------------------------------------------------------------------------------- tasks

_ENCODERS: "collections.OrderedDict" = collections.OrderedDict()
_MAX_ENCODERS = 2  # per process: enough for a grid ordered by model, bounded for ViT-L sized weights
_COMMIT: list = []


def _git_commit() -> str:
    if not _COMMIT:
        from fiseclip_lib.plumbing.provenance import git_commit

        _COMMIT.append(git_commit())
    return _COMMIT[0]


def _encoder_for(cfg: FiseConfig):
    """Load an encoder once per process (tasks of one worker share it; it is never modified)."""
    from fiseclip_lib.encoder import load_encoder

    args = cfg.encoder_args()
    key = tuple(sorted(args.items()))
    if key in _ENCODERS:
        _ENCODERS.move_to_end(key)
        return _ENCODERS[key]
    enc = load_encoder(**args)
    _ENCODERS[key] = enc
    while len(_ENCODERS) > _MAX_ENCODERS:
        _ENCODERS.popitem(last=False)
    return enc


def task_dir(out, config_id_: str) -> Path:
    return Path(out) / "configs" / config_id_


def run_task(sc: SweepConfig, category: str, out, cache_dir=None, use_cache: bool = True, resume: bool = False,
             threads: int = TASK_THREADS, pause: dict | None = None) -> dict:
    """Score and evaluate one (configuration, category); write `categories/<category>.json` atomically.

    Args:
        sc: the configuration.
        category: the category.
        out: the sweep folder (the task writes under `configs/<config-id>/`).
        cache_dir, use_cache: the feature cache (shared safely by concurrent tasks: atomic, verified entries).
        resume: reuse a finished result whose content key matches.
        threads: torch intra-op threads while this task runs (the process's setting is restored after); it
            is recorded in the result as `torch_threads`.
        pause: test hook {"category", "seconds", "marker"}: the first attempt at that task writes its pid to
            `marker`, then sleeps (so that a test can kill the worker mid-task).
    Returns:
        {"config_id", "category", "result" (the saved json), "reused", "seconds", "worker"}.
    """
    import torch

    t0 = time.time()
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _run_task(sc, category, out, cache_dir, use_cache, resume, int(threads), pause, t0)
    finally:
        torch.set_num_threads(before)


def _run_task(sc, category, out, cache_dir, use_cache, resume, threads, pause, t0) -> dict:
    from fiseclip_lib.core.detector import Detector
    from fiseclip_lib.evaluation.run import prepare_dataset, run_category
    from fiseclip_lib.plumbing.cache import FeatureCache

    cfg = FiseConfig.from_dict(sc.config)
    samples = prepare_dataset(sc.dataset, sc.root, [category])
    det = Detector(cfg, encoder=_encoder_for(cfg), cache=FeatureCache(cache_dir) if use_cache else None)
    ident = det.encoder.identity()
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def paused():
        if pause and pause.get("category") == category and not Path(pause["marker"]).exists():
            Path(pause["marker"]).write_text(str(os.getpid()))
            time.sleep(float(pause["seconds"]))

    result, reused = run_category(det, sc.dataset, sc.root, category, samples, task_dir(out, sc.config_id),
                                  resume=resume, progress=False, before_scoring=paused,
                                  extra={"encoder": ident, "layers": list(det.layers), "git_commit": _git_commit(),
                                         "torch_threads": threads})
    if reused:
        result.setdefault("encoder", ident)
        result.setdefault("layers", list(det.layers))
    return {"config_id": sc.config_id, "category": category, "result": result, "reused": reused,
            "seconds": time.time() - t0, "worker": worker}


# ----------------------------------------------------------------------------------------------- table

def sweep_table(sweep: Sweep, results: dict) -> pd.DataFrame:
    """One row per (config, category) in grid order plus a mean row per complete config (unweighted, as `run`;
    a configuration with failed tasks has rows for its finished categories and no mean row).

    Columns: config_id, dataset, the varied fields, category, the metrics, then provenance per row: images,
    method, encoder, weights (as asked), pretrained (False = random weights), git_commit (of the code that
    computed the row; the mean row lists each distinct commit), torch_threads (the torch threads the task ran
    with, likewise).
    """
    from fiseclip_lib.evaluation.run import METRIC_NAMES, metrics_frame

    frames = []
    varied = [v for v in sweep.varied if v != "root"]
    for sc in sweep.configs:
        res = [results[(sc.config_id, cat)] for cat in sc.categories if (sc.config_id, cat) in results]
        if not res:
            continue
        enc = res[0]["encoder"]
        df = metrics_frame(res, enc, sc.config["method"]).drop(columns=varied, errors="ignore")
        commits = [r.get("git_commit", "unknown") for r in res]
        df["git_commit"] = commits + [" ".join(sorted(set(commits)))]
        threads = [str(r.get("torch_threads", "unknown")) for r in res]  # results of older code: unknown
        df["torch_threads"] = threads + [" ".join(sorted(set(threads)))]
        if len(res) < len(sc.categories):  # a mean over some categories would rank beside complete ones
            df = df.iloc[:-1]
        df.insert(0, "config_id", sc.config_id)
        df.insert(1, "dataset", sc.dataset)
        for i, name in enumerate(sweep.varied):
            df.insert(2 + i, name, sc.varied[name])
        frames.append(df)
    columns = ["config_id", "dataset"] + sweep.varied + ["category"] + METRIC_NAMES + \
        [c for c in PROVENANCE_COLUMNS if c not in varied]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def load_table(sweep_dir) -> tuple[pd.DataFrame, dict]:
    """A finished sweep's table and its record: (sweep.csv as a DataFrame, sweep.json)."""
    d = Path(sweep_dir)
    if not (d / "sweep.csv").is_file() or not (d / "sweep.json").is_file():
        raise FiseclipError(f"{d} is not a sweep folder (no sweep.csv and sweep.json); run fiseclip sweep first")
    info = json.loads((d / "sweep.json").read_text(encoding="utf-8"))
    return pd.read_csv(d / "sweep.csv", keep_default_na=False, na_values=["nan"]), info


def report_params(sweep_dir) -> dict:
    """What `fiseclip report --sweep DIR` states in each report's header: the sweep folder, its encoders,
    weights and input sizes (weights `none` as soon as one configuration has random weights: the red banner)."""
    from fiseclip_lib.encoder import is_random_weights

    _, info = load_table(sweep_dir)
    cfgs = [FiseConfig.from_dict(c["config"]) for c in info.get("configs", [])]
    join = lambda xs: ", ".join(dict.fromkeys(str(x) for x in xs))  # noqa: E731
    weights = [getattr(c, "weights_tag", c.pretrained) for c in cfgs]
    return {"sweep_dir": str(sweep_dir), "model": join(c.model for c in cfgs),
            "pretrained": "none" if any(is_random_weights(w) for w in weights) else join(weights),
            "image_size": join(c.input_size for c in cfgs)}


def mean_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The mean row of each configuration (the table's rows whose category starts with `mean`)."""
    return df[df["category"].astype(str).str.startswith("mean")].reset_index(drop=True)


def best_configs(df: pd.DataFrame, metric: str = "pixel_auroc", k: int = 5) -> pd.DataFrame:
    """The k configurations with the highest mean `metric` (ties keep grid order)."""
    means = mean_rows(df)
    return means.sort_values(metric, ascending=False, kind="stable").head(k).reset_index(drop=True)


def plot_metric_vs_field(df: pd.DataFrame, field: str, metric: str = "pixel_auroc", ax=None):
    """Mean `metric` of each configuration against one varied field: a dot per configuration, and the best and
    the average over the other fields at each value (values in grid order)."""
    import matplotlib.pyplot as plt

    means = mean_rows(df)
    order = list(dict.fromkeys(means[field].astype(str)))
    x = means[field].astype(str).map({v: i for i, v in enumerate(order)})
    ax = ax or plt.subplots(figsize=(4, 3))[1]
    ax.scatter(x, means[metric], s=18, alpha=0.7, color="tab:gray", label="configurations", zorder=3)
    grouped = means.assign(_x=x).groupby("_x")[metric]
    ax.plot(grouped.max().index, grouped.max().values, "o-", color="tab:green", label="best")
    ax.plot(grouped.mean().index, grouped.mean().values, "s--", color="tab:blue", label="average")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=30 if max(map(len, order)) > 6 else 0)
    ax.set_xlabel(field)
    ax.set_ylabel(f"mean {metric}")
    ax.legend(fontsize=7)
    return ax


# ----------------------------------------------------------------------------------------------- running

def _connect(scheduler: str | None, workers: int, timeout: float, progress: bool):
    """A Dask client: connected to `scheduler`, or to a new LocalCluster of `workers` processes."""
    try:
        import logging

        from distributed import Client, LocalCluster
    except ImportError:
        raise FiseclipError("--executor dask needs Dask: pip install 'dask[distributed]'") from None
    if scheduler:
        try:
            _handshake(scheduler, timeout)
            client = Client(scheduler, timeout=timeout)
        except Exception as e:  # refused, timed out, malformed address, or something that is not a scheduler
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            if isinstance(e, MemoryError):
                why = "the reply is not Dask's protocol"
            if isinstance(e, TimeoutError) and "handshake" in str(e):
                why = "it accepts connections but never answers as Dask does: is it the scheduler's own port " \
                      "(8786 by default), not its dashboard's or another service's?"
            raise FiseclipError(f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s ({why}); "
                                f"start it (dask scheduler / dask-jobqueue, see README, Sweeps) or drop --scheduler "
                                f"for a local cluster") from None
        cluster = None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # port-in-use notes of the dashboard
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster)
    if progress:
        link = client.dashboard_link if _has_dashboard() else "none (pip install bokeh for the dashboard)"
        print(f"dask: scheduler {client.scheduler.address}, dashboard {link}", flush=True)
    return client, cluster


def _handshake(address: str, timeout: float) -> None:
    """Open and close one Dask connection to `address` within `timeout` seconds, or raise.

    distributed's `Client(address, timeout=...)` bounds the TCP connect but then waits without limit for the
    peer's handshake: a port that accepts and never speaks (another service, a half-dead proxy) would hang the
    sweep forever. The probe runs in its own thread and event loop, so it also works where a loop is running
    (Jupyter), and the deadline cancels the pending read.
    """
    import asyncio
    import concurrent.futures

    from distributed.comm import connect

    async def probe():
        comm = await connect(address, timeout=timeout)  # the TCP connect itself, with distributed's retries
        await comm.close()

    async def bounded():
        try:
            await asyncio.wait_for(probe(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no handshake from {address} within {timeout:g} s") from None

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, bounded()).result()


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def _config_record(sc: SweepConfig, sweep: Sweep, prov: dict) -> dict:
    return {"config": FiseConfig.from_dict(sc.config).resolved(sc.dataset), "dataset": sc.dataset, "root": sc.root,
            "categories": sc.categories,
            "save_maps": False, "sweep": {"config_id": sc.config_id, "varied": sc.varied, "grid": sweep.source},
            **prov}


def _finish_config(out: Path, sc: SweepConfig, sweep: Sweep, results: dict, prov: dict) -> None:
    """A finished configuration's folder as `fiseclip run` writes it: metrics.csv, scores.csv, config.json."""
    from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE
    from fiseclip_lib.evaluation.run import write_outputs

    res = [results[(sc.config_id, c)] for c in sc.categories]
    enc = res[0]["encoder"]
    notes = [n for r in res for n in r.get("notes", [])]
    record = {**_config_record(sc, sweep, prov), "encoder": enc, "layers": res[0].get("layers"),
              "weights_note": None if enc["pretrained"] else RANDOM_WEIGHTS_NOTE, "status": "finished",
              "notes": notes}
    write_outputs(task_dir(out, sc.config_id), res, enc, record)


def run_sweep(grid, out, executor: str = "local", scheduler: str | None = None, workers: int | None = None,
              resume: bool = False, cache_dir=None, use_cache: bool = True, progress: bool = True,
              connect_timeout: float = CONNECT_TIMEOUT_S, base_dir=None, pause: dict | None = None,
              threads: int | None = None) -> pd.DataFrame:
    """Run every task of a grid and write the sweep folder (see the module doc); return the table.

    Args:
        grid: a grid file path, a grid mapping, or an expanded Sweep.
        out: the sweep folder (one writer at a time; a second sweep into it stops at once).
        executor: `local` (in this process) or `dask`.
        scheduler: a Dask scheduler address (tcp://host:port); None starts a LocalCluster of `workers`.
        workers: LocalCluster worker processes (default: cores // threads, at most 4).
        resume: reuse finished tasks whose content key matches.
        cache_dir, use_cache: the feature cache, shared by all tasks and workers.
        connect_timeout: seconds to reach `scheduler` before a one-line error.
        base_dir: relative roots are resolved against it (default: the current folder).
        pause: test hook, see `run_task`.
        threads: torch threads of every task, on any executor, so that the table does not depend on where
            tasks ran (None: the grid's `task_threads`, else TASK_THREADS; with a running scheduler, size its
            workers' task slots so that slots x threads fit the cores).
    Returns:
        the table written to sweep.csv.
    """
    from fiseclip_lib.plumbing.provenance import provenance
    from fiseclip_lib.plumbing.files import write_csv_atomic as write_csv
    from fiseclip_lib.plumbing.files import ensure_writable

    if executor not in ("local", "dask"):
        raise FiseclipError(f"unknown executor {executor!r}; use local or dask")
    if scheduler and executor != "dask":
        raise FiseclipError("--scheduler needs --executor dask")
    if workers is not None and executor != "dask":
        raise FiseclipError("--workers sets the size of a local Dask cluster: add --executor dask")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise FiseclipError(f"--workers {workers} must be a whole number >= 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise FiseclipError(f"threads {threads!r} (torch threads per sweep task) must be a whole number >= 1")
    if scheduler and workers is not None:
        raise FiseclipError("--workers sets the size of a local cluster; with --scheduler the cluster's own "
                            "workers run the tasks (drop one of them)")
    if isinstance(grid, Sweep):
        sweep = grid
    elif isinstance(grid, dict):
        sweep = expand_grid(grid, "grid", base_dir)
    else:
        sweep = expand_grid(load_grid(grid), f"grid file {grid}", base_dir)
    threads = threads or sweep.threads
    out = ensure_writable(out)
    if cache_dir is not None:  # workers may run in another folder: give them the same absolute path
        cache_dir = str(Path(cache_dir).expanduser().resolve())
    with output_lock(out, command=f"fiseclip sweep ({sweep.source}, {len(sweep.tasks)} tasks)"):
        client = cluster = None
        if executor == "dask":  # connect before writing anything: an unreachable scheduler leaves no trace
            workers = workers or (None if scheduler else max(1, min(4, usable_cpus() // threads)))
            client, cluster = _connect(scheduler, workers, connect_timeout, progress)
        try:
            with staged_output(out, key="sweep", owns=OUTPUTS) as stage:
                table = _run_locked(sweep, out, executor, client, scheduler, workers, threads, resume, cache_dir,
                                    use_cache, progress, pause, provenance(), write_csv)
                _publish(out / PARTIAL, stage, sweep)
            shutil.rmtree(out / PARTIAL, ignore_errors=True)
            return table
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()


def _run_locked(sweep, out, executor, client, scheduler, workers, threads, resume, cache_dir, use_cache,
                progress, pause, prov, write_csv):
    t0 = time.time()
    tasks = sweep.tasks
    record = {"grid": sweep.grid, "source": sweep.source, "varied": sweep.varied, "executor": executor,
              "scheduler": scheduler, "workers": workers, "task_threads": threads,
              "configs": [dataclasses.asdict(c) for c in sweep.configs], "tasks": len(tasks), **prov}
    final, out = out, _start_attempt(out, sweep, resume)  # from here on, `out` is the attempt's folder
    write_json_atomic(out / "sweep.json", {**record, "status": "running"})
    (out / "sweep.csv").unlink(missing_ok=True)  # never leave a table that this attempt does not describe
    for sc in sweep.configs:
        write_json_atomic(task_dir(out, sc.config_id) / "config.json",
                          {**_config_record(sc, sweep, prov), "status": "running"})
    if progress:
        print(f"sweep: {len(sweep.configs)} configurations x categories = {len(tasks)} tasks "
              f"({executor}, {threads} torch thread{'s' * (threads > 1)} per task); varied: "
              f"{', '.join(sweep.varied) or 'nothing'}", flush=True)
    results, failures, reused = {}, [], 0

    def collect(i, outcome):
        nonlocal reused
        results[(outcome["config_id"], outcome["category"])] = outcome["result"]
        reused += outcome["reused"]
        if progress:
            m = outcome["result"]["metrics"]
            what = "reused finished result" if outcome["reused"] else f"{outcome['seconds']:.1f} s"
            print(f"[{i}/{len(tasks)}] {outcome['config_id']} {outcome['category']}: image_auroc "
                  f"{m['image_auroc']:.3f} pixel_auroc {m['pixel_auroc']:.3f} ({what}, {outcome['worker']})",
                  flush=True)
            for n in outcome["result"].get("notes", []) if not outcome["reused"] else []:
                print("warning: " + n.replace("\r", "\\r").replace("\n", "\\n"), flush=True)

    def fail(i, sc, cat, e):
        failures.append((sc, cat, e))
        if progress:
            print(f"[{i}/{len(tasks)}] {sc.config_id} {cat}: FAILED: {str(e).splitlines()[0] if str(e) else e!r}",
                  flush=True)

    if executor == "local":
        for i, (sc, cat) in enumerate(tasks, 1):
            try:
                collect(i, run_task(sc, cat, out, cache_dir, use_cache, resume, threads, pause))
            except FiseclipError as e:
                fail(i, sc, cat, e)
    else:
        _run_dask(sweep, out, client, resume, cache_dir, use_cache, threads, pause, collect, fail)
    for sc in sweep.configs:
        if all((sc.config_id, c) in results for c in sc.categories):
            _finish_config(out, sc, sweep, results, prov)
    table = sweep_table(sweep, results)
    write_csv(out / "sweep.csv", table)
    status = "finished" if not failures else "failed"
    write_json_atomic(out / "sweep.json", {**record, "status": status, "reused": reused,
                                           "failed": [[sc.config_id, cat, str(e)] for sc, cat, e in failures],
                                           "wall_time_s": round(time.time() - t0, 3)})
    if failures:
        order = {(sc.config_id, cat): i for i, (sc, cat) in enumerate(tasks)}
        sc, cat, e = min(failures, key=lambda f: order[(f[0].config_id, f[1])])  # the first in grid order
        raise FiseclipError(f"{len(failures)} of {len(tasks)} sweep tasks failed, first {sc.config_id} "
                            f"({sc.varied or sc.config['method']}) category {cat}: {e}; the finished tasks and "
                            f"their table are kept in {out} ({final} is unchanged): fix it and rerun with --resume")
    return table


def _start_attempt(out: Path, sweep: Sweep, resume: bool) -> Path:
    """The folder an attempt writes into, DIR/partial/: emptied first unless resuming; when resuming it also
    offers DIR's finished tasks of this grid (hard links: a result file is only ever replaced by a rename, never
    edited, so the two names cannot diverge). `run_category` then checks each one's content key."""
    stage = out / PARTIAL
    if not resume and stage.exists():
        try:
            shutil.rmtree(stage)
        except OSError as e:
            raise FiseclipError(f"cannot clear {stage} ({e.strerror}); remove it by hand or rerun with "
                                f"--resume") from None
    if resume and stage.is_dir():  # temporary files of a killed attempt (we hold the lock, no task runs yet)
        remove_debris(stage, *(d for c in sorted((stage / "configs").glob("*")) for d in (c, c / "categories")))
    for sc in sweep.configs if resume else []:
        src, dst = task_dir(out, sc.config_id) / "categories", task_dir(stage, sc.config_id) / "categories"
        for f in sorted(src.glob("*.json")) if src.is_dir() else []:
            if not (dst / f.name).exists():
                dst.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, dst / f.name)
                except OSError:  # a file system without hard links
                    shutil.copy2(f, dst / f.name)
    stage.mkdir(exist_ok=True)
    return stage


def _publish(partial: Path, stage: Path, sweep: Sweep) -> None:
    """Move a complete attempt's outputs (this grid's configurations only) into staged_output's folder."""
    keep = {sc.config_id for sc in sweep.configs}
    for d in (partial / "configs").iterdir():
        if d.name not in keep:  # a configuration of an earlier failed attempt's grid
            shutil.rmtree(d)
    for name in OUTPUTS:
        os.replace(partial / name, stage / name)


def _run_dask(sweep, out, client, resume, cache_dir, use_cache, threads, pause, collect, fail):
    """Submit every task to the cluster; collect results as they finish (a task lost with its worker is
    rerun by the scheduler; one that kills workers repeatedly or raises is a failure of that task only)."""
    from distributed import as_completed

    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        KilledWorker = ()
    out_abs = str(Path(out).resolve())  # workers of a local cluster or on a shared file system see this path
    futures = {}
    for sc, cat in sweep.tasks:
        key = f"fiseclip-{sc.config_id}-{hashlib.sha1(cat.encode()).hexdigest()[:8]}-{time.time_ns()}"
        f = client.submit(run_task, sc, cat, out_abs, cache_dir, use_cache, resume, threads, pause, key=key,
                          pure=False)
        futures[f] = (sc, cat)
    for i, f in enumerate(as_completed(list(futures)), 1):
        sc, cat = futures[f]
        if f.status == "finished":
            collect(i, f.result())
            continue
        e = f.exception()
        if isinstance(e, FiseclipError):
            fail(i, sc, cat, e)
        elif KilledWorker and isinstance(e, KilledWorker):
            fail(i, sc, cat, FiseclipError("the task killed its worker several times (out of memory? lower "
                                           "batch_size or image_size)"))
        else:
            for g in futures:
                g.cancel()
            raise e
