"""Command line: `fiseclip run | predict | calibrate | report | demo-data | fetch-weights | cache` (also `python -m fiseclip_lib`).

Errors caused by input or environment print one line (`fiseclip: error: ...`) and exit 2; `--debug` shows
the full traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
import warnings
from pathlib import Path

from fiseclip_lib.errors import FiseclipError

DEFAULT_DEMO_ROOT = "demo_data"
# Keys a params file may hold for the notebooks (`fiseclip report`); `fiseclip run` ignores them.
NOTEBOOK_KEYS = {"baseline_model", "baseline_pretrained", "run_dir", "operators", "matching_model",
                 "matching_pretrained", "batch_sizes", "contamination", "n_references", "n_trials", "thetas", "methods",
                 "fiseclip_operators", "contamination_counts", "n_kinds", "text_qualities",
                 "sweep_dir", "sweep_grid", "sweep_metric", "sweep_top_k", "norm_batch_sizes", "norm_image_size",
                 "text_auroc", "norm_shares",
                 "matching_image_size", "bank_references", "bank_batch_sizes", "stream_bank_size", "false_alarm_rate",
                 "bank_images"}


def _load_params(path) -> dict:
    """Read a params file: a YAML mapping with string keys. Anything else is a one-line error naming the file."""
    from fiseclip_lib.plumbing.files import read_yaml_mapping

    p = Path(path)
    params = read_yaml_mapping(p, "params file")
    _check_keys(params, p)
    options = params.get("options")
    if options is not None:
        if not isinstance(options, dict):
            raise FiseclipError(f"params file {p}: options must be a mapping of config field: value, "
                                f"not a {type(options).__name__}")
        _check_keys(options, p, "options")
    return params


def _check_keys(mapping: dict, path, where: str = "") -> None:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise FiseclipError(f"params file {path}: key {bad[0]!r}{' in ' + where if where else ''} is not a name; "
                            f"write every key as text (e.g. quote it)")


def _text_param(params: dict, name: str, source: str):
    """A run-level setting that must be text (dataset, root, out), or None when absent."""
    value = params.get(name)
    if value is not None and not isinstance(value, str):
        raise FiseclipError(f"{source}: {name} must be text, got {type(value).__name__} {value!r}")
    return value


_RUN_FLAGS = {"method", "model", "pretrained", "image_size", "batch_size", "seed", "device", "cache_dir"}


def _add_config_args(p):
    """The config flags shared by `run` and `predict`: one flag per field in _RUN_FLAGS and --set for every
    field, with help, choices and defaults from the config's field metadata (config.py)."""
    from fiseclip_lib.config import FiseConfig, field_help, show_default

    helps = field_help()
    types = {"image_size": int, "batch_size": int, "seed": int}
    for name in sorted(_RUN_FLAGS, key=list(helps).index):
        p.add_argument("--" + name.replace("_", "-"), type=types.get(name), help=helps[name])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, repeatable; fields and defaults: " +
                        ", ".join(f"{k}={show_default(k, v)}" for k, v in FiseConfig().to_dict().items()
                                  if k not in _RUN_FLAGS) + " (auto: see README, Options)")


def _add_cache_args(p) -> None:
    """Progress and feature-cache flags shared by the commands that encode images."""
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--feature-cache", metavar="DIR", help="feature cache folder (default: ~/.cache/fiseclip/features)")
    p.add_argument("--no-feature-cache", action="store_true", help="encode every image, store nothing")


def _add_run(sub):
    from fiseclip_lib.evaluation.data import DATASETS

    p = sub.add_parser("run", help="score a dataset with one method and write metrics.csv, scores.csv, config.json")
    p.add_argument("--params", help="YAML file of options (config fields plus dataset/root/categories/out)")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help=f"dataset layout: {', '.join(DATASETS)} or anomalib:<name> (anomalib's reader, the extra "
                        f"fiseclip[anomalib]; docs/anomalib.md) (default: demo)")
    p.add_argument("--root", help=f"dataset root (default for demo: ./{DEFAULT_DEMO_ROOT}, built if missing)")
    p.add_argument("--categories", help="comma-separated subset of categories (\"\": all, as when left out)")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: runs/<dataset>-<method>)")
    p.add_argument("--save-maps", action="store_true", help="also write maps/<category>.npz (float16)")
    p.add_argument("--resume", action="store_true", help="reuse categories already finished in --out")
    _add_cache_args(p)
    return p


def cmd_run(args) -> int:
    from fiseclip_lib.plumbing.cache import FeatureCache
    from fiseclip_lib.evaluation.data import check_dataset, parse_categories
    from fiseclip_lib.evaluation.run import format_table, run_benchmark

    params = _load_params(args.params) if args.params else {}
    source = f"params file {args.params}"
    params.update(params.pop("options", None) or {})
    params = {k: v for k, v in params.items() if k not in NOTEBOOK_KEYS}
    # run-level settings, checked even where the command line overrides them (the file is wrong); then the
    # command line wins over the params file
    for key in ("dataset", "root", "out"):
        _text_param(params, key, source)
    file_cats = parse_categories(params.get("categories"), source)
    dataset = args.dataset or params.pop("dataset", None) or "demo"
    root = args.root or params.pop("root", None) or (DEFAULT_DEMO_ROOT if dataset == "demo" else None)
    # an explicit --categories "" means all categories, over the file's list (None: every category)
    cats = parse_categories(args.categories, "--categories") if args.categories is not None else file_cats
    out = args.out or params.pop("out", None)
    for key in ("dataset", "root", "categories", "out"):
        params.pop(key, None)
    check_dataset(dataset, "--dataset" if args.dataset else source)
    if root is None:
        raise FiseclipError(f"--root is required for dataset {dataset}")
    config = _config_from_args(args, params, source)
    out = out or f"runs/{dataset.replace(':', '-')}-{config.method}"
    cache = None if args.no_feature_cache else FeatureCache(args.feature_cache)
    df = run_benchmark(dataset, root, config, out, categories=cats, save_maps=args.save_maps,
                       resume=args.resume, progress=not args.no_progress, cache=cache)
    print(format_table(df))
    if not bool(df["pretrained"].iloc[0]):
        from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE

        print(f"NOTE: {RANDOM_WEIGHTS_NOTE}")
    print(f"results in {out}/ (metrics.csv, scores.csv, config.json)")
    return 0


def _add_predict(sub):
    p = sub.add_parser("predict", help="score unlabeled images of one object, decide normal/anomalous, write "
                                       "predictions.csv and overlays/")
    p.add_argument("--params", help="YAML file of options (config fields plus images/class_name/reference_dir/out)")
    p.add_argument("--images", help="folder of images, or a quoted glob such as 'line3/**/*.png'")
    p.add_argument("--class-name", help="the object's name for the text prompts, e.g. bottle")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: predictions/<class-name>)")
    p.add_argument("--reference-dir", metavar="DIR_OR_GLOB",
                   help="known-good images added as references of every batch (encoded once, never scored or "
                        "filtered)")
    p.add_argument("--stream", action="store_true", help="one image at a time against a rolling bank of the last "
                                                         "--bank-size accepted images")
    p.add_argument("--bank-size", type=int, default=16, help="K, accepted images kept as references (default 16)")
    p.add_argument("--confirm", metavar="FILE", help="with --stream: a text file of image paths (one a line) that "
                                                    "are the new normal after a change; when the first arrives, the "
                                                    "rolling bank and score history are reset to them")
    p.add_argument("--threshold", metavar="FILE_OR_NUMBER",
                   help="threshold.json from fiseclip calibrate, or a number (default: robust_z over the known-good "
                        "bank's scores when --reference-dir allows it, else over this run's scores)")
    p.add_argument("--false-alarm-rate", type=float, help="target of the unsupervised rule (default 0.01)")
    p.add_argument("--force-threshold", action="store_true",
                   help="apply a threshold calibrated for another config with a warning instead of stopping")
    p.add_argument("--save-maps", action="store_true", help="also write maps.npz (float16)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/")
    _add_cache_args(p)
    return p


def _config_from_args(args, params: dict, source: str):
    """FiseConfig from a params mapping (config fields), the config flags and --set; as `run` builds it."""
    from fiseclip_lib.config import FiseConfig

    if args.params:
        try:
            FiseConfig.from_dict(params)
        except FiseclipError as e:
            raise FiseclipError(f"{source}: {e}") from None
    cli = {"method": args.method, "model": args.model, "pretrained": args.pretrained, "image_size": args.image_size,
           "batch_size": args.batch_size, "seed": args.seed, "device": args.device, "cache_dir": args.cache_dir}
    params.update({k: v for k, v in cli.items() if v is not None})
    return FiseConfig.from_dict(params).with_overrides(args.set)


def _confirm_paths(path, stream: bool):
    """The image paths listed in a --confirm file (one a line, blank lines and # comments skipped), or None."""
    if path is None:
        return None
    if not stream:
        raise FiseclipError("--confirm resets a stream's rolling bank: use it with --stream")
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FiseclipError(f"--confirm {path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__}): "
                            f"give a text file of image paths, one a line") from None
    paths = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not paths:
        raise FiseclipError(f"--confirm {path} lists no image: give the paths of the new normal images, one a line")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FiseclipError(f"--confirm {path}: {missing[0]} is not a file ({len(missing)} missing); list existing "
                            f"image paths, as --images names them")
    return paths


def cmd_predict(args) -> int:
    from fiseclip_lib.plumbing.cache import FeatureCache
    from fiseclip_lib.decisions.predict import predict
    from fiseclip_lib.evaluation.data import parse_categories

    params = _load_params(args.params) if args.params else {}
    source = f"params file {args.params}"
    params.update(params.pop("options", None) or {})
    params = {k: v for k, v in params.items() if k not in NOTEBOOK_KEYS}
    for key in ("dataset", "root", "out", "images", "class_name", "reference_dir"):
        _text_param(params, key, source)
    parse_categories(params.get("categories"), source)  # checked: the file is shared with `run`
    images = args.images or params.get("images")
    class_name = args.class_name or params.get("class_name")
    out = args.out or params.get("out")
    refs = args.reference_dir if args.reference_dir is not None else params.get("reference_dir")
    for key in ("dataset", "root", "categories", "out", "images", "class_name", "reference_dir"):
        params.pop(key, None)
    if not images:
        raise FiseclipError("--images is required: a folder of images or a quoted glob")
    if not class_name or not class_name.strip():
        raise FiseclipError("--class-name is required: the object's name for the text prompts, e.g. bottle")
    config = _config_from_args(args, params, source)
    if args.bank_size < 1:
        raise FiseclipError(f"--bank-size {args.bank_size} must be >= 1")
    out = out or f"predictions/{class_name}"
    cache = None if args.no_feature_cache else FeatureCache(args.feature_cache)
    df = predict(images, class_name, out=out, config=config, cache=cache, reference_dir=refs, stream=args.stream,
                 bank_size=args.bank_size, threshold=args.threshold, false_alarm_rate=args.false_alarm_rate,
                 force_threshold=args.force_threshold, save_maps=args.save_maps, overlays=not args.no_overlays,
                 progress=not args.no_progress, confirm=_confirm_paths(args.confirm, args.stream))
    counts = df["decision"].value_counts().to_dict()
    print(f"{len(df)} images: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("normal", "anomalous", "undecided")
                                            if counts.get(k, 0) or k != "undecided") +
          (f"; rule: {df['threshold_method'].iloc[0]}" if len(df) else ""))
    print(f"results in {out}/ (predictions.csv, overlays/, config.json)")
    return 0


def _add_calibrate(sub):
    from fiseclip_lib.decisions.calibrate import DEFAULT_FALSE_ALARM_RATE, METHODS

    p = sub.add_parser("calibrate", help="a decision threshold from scores.csv (run) or predictions.csv (predict)")
    p.add_argument("--scores", required=True, help="scores.csv of fiseclip run or predictions.csv of fiseclip predict "
                                                   "(its config.json beside it is recorded)")
    p.add_argument("--out", default="threshold.json", help="threshold file to write (default: threshold.json)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="f1: labelled scores; robust_z: unlabeled (median + z MAD); quantile: normal images only "
                        "(conformal); auto: f1 with labels, else robust_z")
    p.add_argument("--false-alarm-rate", type=float, default=DEFAULT_FALSE_ALARM_RATE,
                   help=f"target rate for robust_z and quantile (default {DEFAULT_FALSE_ALARM_RATE})")
    p.add_argument("--category", help="the category to calibrate (needed when the scores hold several)")
    return p


def cmd_calibrate(args) -> int:
    from fiseclip_lib.decisions.calibrate import calibrate_file

    out = Path(args.out)
    if out.is_dir():
        raise FiseclipError(f"--out {out} is a folder; pass a file name such as {out / 'threshold.json'}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = calibrate_file(args.scores, out, args.method, args.false_alarm_rate, args.category)
    for w in caught:
        warnings.warn(str(w.message))
    extra = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.stats.items())
    flagged = round(t.flag_rate * t.n_used)
    print(f"threshold {t.value:.6g} ({t.method}{', category ' + t.category if t.category else ''}"
          f"{', mode ' + t.mode if t.mode else ''}; {extra}); flags {flagged} of the {t.n_used} scores used "
          f"({t.flag_rate:.1%}); written to {out}")
    return 0


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="run a grid of configurations x categories (in-process or on Dask) into one "
                                     "table, sweep.csv; resumable")
    p.add_argument("grid", help="YAML grid file: dataset/root/categories (or datasets) and config fields, each one "
                                "value or a list of values (see README, Sweeps)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<grid file name>)")
    p.add_argument("--executor", choices=["local", "dask"], default=None,
                   help="local: tasks in this process (default); dask: a local cluster or --scheduler")
    p.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. tcp://host:8786 "
                                                          "(implies --executor dask)")
    p.add_argument("--workers", type=int, help="worker processes of the local Dask cluster (default: cores // "
                                               "task_threads, at most 4); every task runs with the grid's "
                                               "task_threads torch threads (default 1) on any executor")
    p.add_argument("--connect-timeout", type=float, default=20.0, help="seconds to reach --scheduler (default 20)")
    p.add_argument("--resume", action="store_true", help="reuse tasks already finished in --out (content-keyed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--feature-cache", metavar="DIR", help="feature cache folder shared by all workers "
                                                          "(default: ~/.cache/fiseclip/features)")
    p.add_argument("--no-feature-cache", action="store_true", help="encode every image, store nothing")
    return p


def cmd_sweep(args) -> int:
    from fiseclip_lib.evaluation.run import METRIC_NAMES
    from fiseclip_lib.evaluation.sweep import PROVENANCE_COLUMNS, mean_rows, run_sweep

    executor = args.executor or ("dask" if args.scheduler else "local")
    out = args.out or f"sweeps/{Path(args.grid).stem}"
    if not args.connect_timeout > 0:
        raise FiseclipError(f"--connect-timeout {args.connect_timeout} must be > 0 seconds")
    df = run_sweep(args.grid, out, executor=executor, scheduler=args.scheduler, workers=args.workers,
                   resume=args.resume, cache_dir=args.feature_cache, use_cache=not args.no_feature_cache,
                   progress=not args.no_progress, connect_timeout=args.connect_timeout)
    means = mean_rows(df)
    if len(means):  # one line per configuration: its varied fields and mean metrics in percent
        view = means.drop(columns=["category"] + [c for c in PROVENANCE_COLUMNS if c != "method"])
        view[METRIC_NAMES] = (view[METRIC_NAMES].astype(float) * 100).round(1)
        print(view.to_string(index=False, na_rep="nan"))
    if len(df) and not df["pretrained"].astype(bool).all():
        from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE

        print(f"NOTE: some rows come from random weights. {RANDOM_WEIGHTS_NOTE}")
    print(f"results in {out}/ (sweep.csv, sweep.json, configs/<config-id>/)")
    return 0


def cmd_demo_data(args) -> int:
    from fiseclip_lib.evaluation.demo import DEFAULT_CATEGORIES, build_demo

    cats = [c.strip() for c in args.categories.split(",")] if args.categories else list(DEFAULT_CATEGORIES)
    out = build_demo(args.out, categories=cats, seed=args.seed, force=args.force)
    print(f"demo dataset in {out}")
    return 0


def cmd_fetch_weights(args) -> int:
    from fiseclip_lib.encoder import fetch_weights

    path = fetch_weights(args.model, args.pretrained, args.cache_dir)
    print(f"weights for {args.model} ({args.pretrained}) in {path}")
    return 0


def cmd_report(args) -> int:
    from fiseclip_lib.evaluation.data import parse_categories
    from fiseclip_lib.notebook.report import run_reports

    params = _load_params(args.params) if args.params else {}
    source = f"params file {args.params}"
    for key in ("dataset", "root", "model", "pretrained", "run_dir"):
        _text_param(params, key, source)
    parse_categories(params.get("categories"), source)
    only = args.only
    if args.sweep:  # report on a finished sweep: notebook 06 unless --only names others
        from fiseclip_lib.evaluation.sweep import report_params

        params.update(report_params(args.sweep))
        only = only or "06"
    results = run_reports(args.out, params, only=only, notebooks_dir=args.notebooks, timeout=args.timeout)
    failed = [r["name"] for r in results if r["status"] != "ok"]
    print(f"reports in {Path(args.out) / 'index.html'}: {len(results) - len(failed)} ok" +
          (f", failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_cache(args) -> int:
    from fiseclip_lib.plumbing.cache import FeatureCache

    cache = FeatureCache(args.dir)
    if args.action == "clear":
        print(f"removed {cache.clear()} cached feature files from {cache.root}")
    else:
        info = cache.info()
        print(f"feature cache {info['root']}: {info['entries']} images, {info['bytes'] / 1e6:.1f} MB "
              f"(cap {info['max_bytes'] / 1e9:.1f} GB)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), like every other fiseclip error."""

    def error(self, message):
        self.exit(2, f"fiseclip: error: {message} (see fiseclip {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fiseclip", description="FiSeCLIP zero-shot anomaly detection workbench")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub).set_defaults(func=cmd_run)
    _add_predict(sub).set_defaults(func=cmd_predict)
    _add_calibrate(sub).set_defaults(func=cmd_calibrate)
    _add_sweep(sub).set_defaults(func=cmd_sweep)
    p = sub.add_parser("demo-data", help="build the offline demo dataset (MVTec layout)")
    p.add_argument("--out", default=DEFAULT_DEMO_ROOT)
    p.add_argument("--categories", help="comma-separated: textile, brick, gravel, board (an aligned part), wafer (a "
                                        "large image) (default textile,brick; `run --dataset demo --categories "
                                        "board` adds board to an existing set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("fetch-weights", help="download open_clip weights into a cache (on a connected machine)")
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_fetch_weights)
    p = sub.add_parser("report", help="run the notebook series headless (papermill) into HTML reports")
    p.add_argument("--params", help="YAML file of notebook parameters (same keys as for run)")
    p.add_argument("--only", help="comma-separated notebook names or number prefixes, e.g. 00,03")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p.add_argument("--notebooks", help="folder of NN_name.ipynb notebooks (default: ./notebooks)")
    p.add_argument("--timeout", type=int, help="seconds allowed per cell (default 1800)")
    p.add_argument("--sweep", metavar="DIR", help="a finished `fiseclip sweep` folder: runs notebook "
                                                  "06_sweep_report on it (unless --only says otherwise)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("cache", help="inspect or clear the feature cache")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--dir", help="cache folder (default: ~/.cache/fiseclip/features)")
    p.set_defaults(func=cmd_cache)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {_one_line(str(message))}", file=file or sys.stderr)


# What an interrupted command leaves behind (every output is written atomically, so nothing is half-written).
_INTERRUPTED = {"run": "; finished categories are kept (rerun with --resume)",
                "sweep": "; finished tasks are kept (rerun with --resume)",
                "report": "; finished reports are kept (rerun the others with --only)"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restored on return: main() may run inside another program
        if not debug:
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            warnings.showwarning = _one_line_warning
        try:
            return args.func(args)
        except FiseclipError as e:
            if debug:
                raise
            print(f"fiseclip: error: {_one_line(str(e))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"fiseclip: interrupted{_INTERRUPTED.get(args.command, '')}", file=sys.stderr)
            return 130
        except (MemoryError, RuntimeError) as e:
            if debug or not _is_out_of_memory(e):
                raise
            print(f"fiseclip: error: out of memory ({_first_line(e)}); lower --set encode_batch=1, --batch-size, "
                  f"--set precision=bf16 (CPU) or fp16 (CUDA), or --image-size", file=sys.stderr)
            return 2
        except OSError as e:
            if debug or e.errno not in _ENV_ERRNOS:
                raise
            where = f" writing {e.filename}" if e.filename else ""
            print(f"fiseclip: error: {e.strerror or _first_line(e)}{where}; nothing half-written was left. "
                  f"{_ENV_ERRNOS[e.errno]}", file=sys.stderr)
            return 2


_ENV_ERRNOS = {
    errno.ENOSPC: "Free disk space or write elsewhere (--out, FISECLIP_FEATURE_CACHE), then rerun with --resume.",
    errno.EDQUOT: "Free quota or write elsewhere (--out, FISECLIP_FEATURE_CACHE), then rerun with --resume.",
    errno.EROFS: "The file system is read-only: choose another --out.",
    errno.EACCES: "Permission denied: choose another --out or fix the folder's permissions.",
    errno.EPERM: "Permission denied: choose another --out or fix the folder's permissions.",
}


def _one_line(text: str) -> str:
    """Messages quote user data (file and category names), which may hold line breaks: keep one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError is a RuntimeError, and so is a failed CPU allocation."""
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
