"""Speed and memory benchmark: prints ratios measured in one run and writes them to CSV.

Random weights throughout (speed does not depend on them; nothing is downloaded). Every timed comparison is
run as interleaved repeats (A, B, A, B, ...) after a warm-up of each side; the median and the spread (min-max)
of the per-repeat values are reported, so a load spike on a shared machine hits both sides. Sections:
  pipeline  encoder-only vs full pipeline (encoder + score_features) per model@size, device and precision
            (fp32; bf16 = precision=bf16 + match_dtype=bf16); one-off costs (model load, text embeddings)
            are reported separately and paid before timing
  matching  the matching as the pipeline calls it (visual_map: raw tokens -> masked MSM over layers x degrees,
            the text filter's keep-mask on) vs torch.mm of the per-degree route's GEMMs (one per pair, layer and
            degree): effective throughput = degree-equivalent FLOPs per second; also visual_map's time over that
            of its own GEMMs (one per pair and layer), its speed-up over the other engines (`--match-compare`:
            per-degree, box-torch, box-compiled, selected by visual_map's engine argument); bf16 score error
  sweep     a 10-configuration sweep with the feature cache vs one uncached run (model load and text
            embeddings paid before both sides, reported separately)
  memory    peak extra memory of matching (one layer, degrees 1/3/5) at N = 16, 32 (64 as a dry run: GEMM
            outputs allocated, not computed), paper grid P = 1369, C = 1024, in subprocesses
  musc      ours vs a MuSc-style cdist formulation on the same features, both warm: speed ratio, max difference
  dask      `fiseclip sweep`: a 12-task grid on 2 local Dask workers vs the serial executor (wall-time ratio;
            the cluster start reported separately)
  stream    streaming (one image at a time, bank of K = 8, 16, 32) vs batch scoring of the same images (N = K + 1):
            images per second for efficientnet-lite0 and the tiny CLIP, and their ratio (issue 20's goal: >= 1.0 at
            K = 16). The stream runs as a line would (`Streamer.run`: the encoder takes `encode_batch` images per
            call, decisions stay one at a time, the bank stays stacked); `--stream-ks`, `--stream-images`,
            `--stream-models` pick the shapes
  tiles     large images and aligned parts (issue 22) on the demo's procedural categories (board: an aligned part;
            wafer: a large image; texture categories when those are missing), efficientnet-lite0 (ImageNet) with
            method musc: tiles 1 / 4 / 16 (2x2, 4x4) and match_window unset / 1 / 2 / 4, each against the
            untiled, global run of the same round (interleaved): time per image, peak memory, pixel and image
            AUROC; and the matching alone, windowed vs global at one grid: measured time ratio beside
            (2r + 1)^2 / P, the share of the P x P products a window of radius r computes

    python benchmarks/bench.py --quick     # tiny model, small shapes, no sweep: < 60 s (CI smoke run)
    python benchmarks/bench.py             # paper setting: ViT-L-14-336 at 336 and 518 px (hours on 2 CPU cores)
    python benchmarks/bench.py --sections matching,musc --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "FISECLIP_FEATURE_CACHE" not in os.environ:  # a cold, private text cache: one-off costs are really paid here
    os.environ["FISECLIP_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="fiseclip-bench-")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fiseclip_lib import Detector, FiseConfig, load_encoder  # noqa: E402
from fiseclip_lib.encoder import Features  # noqa: E402
from fiseclip_lib.core.matching import (QUERY_CHUNK, interval_count, lnamd, mutual_scores,  # noqa: E402
                                   visual_map)
from fiseclip_lib.core import _match_kernel, matching  # noqa: E402
from fiseclip_lib.core.text import text_embeddings  # noqa: E402

ROWS: list[dict] = []


def record(section, name, value, unit, **extra):
    ROWS.append({"section": section, "name": name, "value": value, "unit": unit, **extra})
    tail = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"  {section:8s} {name:44s} {value:12.4g} {unit:8s} {tail}", flush=True)


def record_series(section, name, values, unit, **extra):
    """Median of repeats, with the spread (min-max) and the number of repeats."""
    record(section, name, statistics.median(values), unit, spread=f"{min(values):.4g}-{max(values):.4g}",
           repeats=len(values), **extra)


def interleaved(fns: dict, repeats: int, warm: bool = True) -> dict[str, list[float]]:
    """Seconds of each callable over `repeats` round-robin rounds (after one untimed warm-up call of each)."""
    if warm:
        for f in fns.values():
            f()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            out[k].append(time.perf_counter() - t0)
    return out


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_images(n, size, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def tile_features(f: Features, n: int, seed: int = 0) -> Features:
    """A batch of n from k < n encoded images: repeats with small noise, so no two images are identical
    (the post-encoder cost does not depend on the values; the encoder cost is linear in the images)."""
    k = next(iter(f.layers.values())).shape[0]
    if k >= n:
        return f
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.arange(n) % k

    def rep(x, scale):
        if x is None:
            return None
        y = x[idx].clone()
        noise = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
        return y.add_(scale * noise * y.float().std().to(y.dtype))

    norm = lambda x: None if x is None else torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)  # noqa: E731
    return Features(layers={l: rep(t, 0.05) for l, t in f.layers.items()}, grid=f.grid,
                    global_embedding=norm(rep(f.global_embedding, 0.05)), dense=norm(rep(f.dense, 0.05)))


# ----------------------------------------------------------------------------------------------- sections

def bench_pipeline(models, batch_sizes, precisions, repeats, encode_images):
    for spec in models:
        model, size = spec.split("@")
        size = int(size)
        for device in devices():
            for prec in precisions:
                t0 = time.perf_counter()
                enc = load_encoder(model, "none", size, device, prec if device == "cpu" else "fp32")
                load_s = time.perf_counter() - t0
                cfg = FiseConfig(model=model, pretrained="none", image_size=size, device=device,
                                 precision=enc.precision, match_dtype="bf16" if prec == "bf16" else "fp32")
                det = Detector(cfg, encoder=enc)
                tag = dict(model=spec, device=device, precision=prec)
                t0 = time.perf_counter()
                text_embeddings(enc, "object", cfg.class_names)
                record("pipeline", "one-off: model load s", load_s, "s", **tag)
                record("pipeline", "one-off: text embeddings s", time.perf_counter() - t0, "s", **tag)
                det.score_features(tile_features(det.encode(random_images(1, size)), 2), "object")  # warm-up
                for n in batch_sizes:
                    k = min(n, encode_images or n)
                    images = random_images(k, size, seed=n)
                    enc_s, post_s, ratio = [], [], []
                    for _ in range(repeats):  # encoder and post-encoder timed back to back in every repeat
                        sync()
                        t0 = time.perf_counter()
                        feats = det.encode(images)
                        sync()
                        t1 = time.perf_counter()
                        batch = tile_features(feats, n)
                        sync()
                        t2 = time.perf_counter()
                        det.score_features(batch, "object")
                        sync()
                        t3 = time.perf_counter()
                        enc_s.append((t1 - t0) / k)
                        post_s.append(t3 - t2)
                        ratio.append((enc_s[-1] * n + post_s[-1]) / (enc_s[-1] * n))
                    ntag = dict(tag, N=n, encoded=k)
                    record_series("pipeline", "encoder-only s/img", enc_s, "s", **ntag)
                    record_series("pipeline", "score_features s/batch", post_s, "s", **ntag)
                    record_series("pipeline", "full / encoder-only", ratio, "ratio", **ntag)
                del det, enc


def matching_gemms(Zd: torch.Tensor, chunk: int = QUERY_CHUNK):
    """The GEMM shapes of one layer (visual_map) or one layer and degree (per-degree route): per image i, groups of
    references j > i."""
    n, p, c = Zd.shape
    group = max(1, chunk // p)
    for i in range(n - 1):
        for g0 in range(i + 1, n, group):
            torch.mm(Zd[i], Zd[g0:min(n, g0 + group)].reshape(-1, c).T)


def bench_matching(n, h, c, n_layers, degrees, repeats, kept=0.9, compare=("mm", "own", "per-degree", "box-torch")):
    """visual_map (engine auto) vs torch.mm and vs the other engines. Throughput is EFFECTIVE: degree-equivalent
    FLOPs (2 P^2 C per pair, layer and degree: what the per-degree route multiplies) per second, so that one GEMM
    per pair and layer plus box filters is credited with the work it replaces. Its own GEMMs (one per pair and
    layer) are timed too. compare: what is timed beside auto, interleaved with it: "mm" (the per-degree route's
    GEMMs alone), "own" (auto's GEMMs alone) and engine names of matching.ENGINES (box-compiled on the CPU only,
    where numba works; "reference" is far too slow for these shapes)."""
    p = h * h
    compare = list(compare)
    bad = [x for x in compare if x not in ("mm", "own") and x not in matching.ENGINES[1:-1]]
    if bad:
        raise SystemExit(f"--match-compare: unknown {bad}; choose from mm, own, {', '.join(matching.ENGINES[1:-1])}")
    for device in devices():
        g = torch.Generator().manual_seed(0)
        layers = {l: (torch.randn(n, p, c, generator=g) + torch.randn(1, 1, c, generator=g)).to(device)
                  for l in range(n_layers)}
        keep = (torch.rand(n, p, generator=g) < kept).to(device)  # the text filter's mask: ~10 % excluded
        combos = n_layers * len(degrees)
        flops = 2.0 * p * p * c * n * (n - 1) / 2 * combos  # degree-equivalent
        kernel = device == "cpu" and _match_kernel.available()
        # the route auto takes here (visual_map's own rule)
        auto = matching._route("auto", list(degrees), c, None, torch.device(device))
        engines = [e for e in compare if e in matching.ENGINES and (e != "box-compiled" or kernel)]
        maps = {}
        fns = {}
        for dt in (torch.float32, torch.bfloat16):
            Zd = lnamd(layers[0], (h, h), degrees[-1]).to(dt)

            def run(engine, dt=dt):
                maps[engine, dt] = visual_map(layers, (h, h), degrees, keep=keep, dtype=dt, engine=engine)

            def per_degree(Zd=Zd):
                for _ in range(combos):  # the per-degree route: one GEMM set per layer and degree
                    matching_gemms(Zd)

            def own(Zd=Zd):
                for _ in range(n_layers):  # the GEMMs visual_map issues: one set per layer, its block width
                    matching_gemms(Zd, matching.BOX_CHUNK)

            fns[f"auto {dt}"] = lambda dt=dt: run("auto", dt)
            if "mm" in compare:
                fns[f"mm {dt}"] = per_degree
            if "own" in compare:
                fns[f"own {dt}"] = own
            for e in engines:
                fns[f"{e} {dt}"] = lambda e=e, dt=dt: run(e, dt)
        for dt in (torch.float32, torch.bfloat16):  # warm-up on a small slice: the full shape costs minutes
            for e in ["auto"] + engines:
                visual_map({l: t[:2] for l, t in layers.items()}, (h, h), degrees, keep=keep[:2], dtype=dt, engine=e)
            matching_gemms(lnamd(layers[0][:2], (h, h), 1).to(dt))
        t = interleaved(fns, repeats, warm=False)
        for dt in (torch.float32, torch.bfloat16):
            tag = dict(device=device, dtype=str(dt).replace("torch.", ""), N=n, P=p, C=c, layers=n_layers,
                       degrees="/".join(map(str, degrees)), kept=kept, engine=f"auto = {auto}")
            ours_s = t[f"auto {dt}"]
            record_series("matching", "visual_map effective GFLOP/s", [flops / s / 1e9 for s in ours_s], "GFLOP/s",
                          **tag)
            record_series("matching", "visual_map s", ours_s, "s", **tag)
            if "mm" in compare:
                mm_s = t[f"mm {dt}"]
                record_series("matching", "torch.mm GFLOP/s (per-degree GEMMs)", [flops / s / 1e9 for s in mm_s],
                              "GFLOP/s", **tag)
                record_series("matching", "visual_map effective / torch.mm throughput",
                              [m / o for m, o in zip(mm_s, ours_s)], "ratio", **tag)
            if "own" in compare:
                record_series("matching", "visual_map time / its own GEMMs' time",
                              [o / m for m, o in zip(t[f"own {dt}"], ours_s)], "ratio", **tag)
            for e in engines:  # same run, interleaved: the speed-up of auto over each engine (~1 for its own route)
                record_series("matching", f"engine {e} s", t[f"{e} {dt}"], "s", **tag)
                name = ("speed-up over the per-degree route" if e == "per-degree" else
                        "speed-up over box-torch (torch passes)" if e == "box-torch" else f"speed-up over {e}")
                record_series("matching", name, [q / o for q, o in zip(t[f"{e} {dt}"], ours_s)], "ratio", **tag)
            if "box-torch" in engines and "box-compiled" in engines:  # what numba buys, repeat by repeat
                record_series("matching", "box-torch time / box-compiled time",
                              [q / o for q, o in zip(t[f"box-torch {dt}"], t[f"box-compiled {dt}"])], "ratio", **tag)
                record_series("matching", "box-torch - box-compiled s",
                              [q - o for q, o in zip(t[f"box-torch {dt}"], t[f"box-compiled {dt}"])], "s", **tag)
            if dt == torch.bfloat16:
                ref = maps["auto", torch.float32]
                err = float((maps["auto", dt] - ref).abs().max())
                record("matching", "bf16 max |A_V - A_V(fp32)|", err, "abs", **tag)
                record("matching", "bf16 max error / max A_V(fp32)", err / float(ref.max()), "rel", **tag)
            for e in engines:  # every engine computes the same map (up to rounding)
                record("matching", f"max |A_V({e}) - A_V(auto)|",
                       float((maps[e, dt] - maps["auto", dt]).abs().max()), "abs", **tag)


def bench_sweep(model, size, n_images, repeats):
    from fiseclip_lib.plumbing.cache import FeatureCache
    from fiseclip_lib.evaluation.demo import build_demo
    from fiseclip_lib.evaluation.run import run_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = build_demo(tmp / "demo", categories=("textile",), n_good=n_images - n_images // 3,
                          n_defect=n_images // 3, n_train=0, size=max(64, size))
        t0 = time.perf_counter()
        enc = load_encoder(model, "none", size, "cpu")
        load_s = time.perf_counter() - t0
        base = FiseConfig(model=model, pretrained="none", image_size=size, device="cpu")
        t0 = time.perf_counter()
        text_embeddings(enc, "textile", base.class_names)  # paid once, before both sides
        text_s = time.perf_counter() - t0
        variants = [dict(), dict(filter="soft"), dict(filter="top_ratio"), dict(filter="none"), dict(fusion="gated"),
                    dict(fusion="multiplicative"), dict(alpha=0.7), dict(topmin_max=0.5), dict(degrees=(1, 3)),
                    dict(filter_theta=0.4)]
        runs = iter(range(10 ** 6))

        def single():
            run_benchmark("demo", root, base, tmp / f"single{next(runs)}", progress=False,
                          detector=Detector(base, encoder=enc))

        def sweep():
            r = next(runs)
            cache = FeatureCache(tmp / f"cache{r}")  # a cold cache in every repeat
            for k, v in enumerate(variants):
                cfg = base.replace(**v)
                run_benchmark("demo", root, cfg, tmp / f"s{r}-{k}", progress=False, detector=Detector(cfg, enc, cache))

        t = interleaved({"single": single, "sweep": sweep}, repeats, warm=False)
        tag = dict(model=f"{model}@{size}", images=n_images)
        record("sweep", "one-off: model load s", load_s, "s", **tag)
        record("sweep", "one-off: text embeddings s", text_s, "s", **tag)
        record_series("sweep", "one uncached run s", t["single"], "s", **tag)
        record_series("sweep", "10-config sweep with cache s", t["sweep"], "s", **tag)
        record_series("sweep", "sweep / one run", [b / a for a, b in zip(t["single"], t["sweep"])], "ratio", **tag)


def memory_probe(n, p, c, dtype, dry):
    """Child process: peak RSS growth of visual_map (one layer, degrees 1/3/5 as the pipeline calls it: the
    box-filtered route, keep-mask on) beyond its inputs (MB)."""
    h = int(round(p ** 0.5))
    tokens = torch.empty(n, h * h, c).normal_()  # built in place: no temporaries raise the peak before we measure
    keep = torch.rand(n, h * h) < 0.9
    dt = getattr(torch, dtype)
    degrees = (1, 3, 5)
    visual_map({0: tokens[:2]}, (h, h), degrees, keep=keep[:2], dtype=dt)  # load kernels before the baseline
    if dry:  # allocate and touch each GEMM's output, skip its arithmetic: the same peak, minutes saved
        def mm(a, b, out=None):
            return out.zero_() if out is not None else torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
        torch.mm = mm
    base = _rss_reset_peak()
    visual_map({0: tokens}, (h, h), degrees, keep=keep, dtype=dt)
    peak = _rss_peak_kb()
    print(json.dumps({"extra_mb": (peak - base) / 1024, "input_mb": tokens.numel() * 4 / 1e6}))


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_reset_peak():
    """Current RSS in kB, with the peak reset to it (Linux clear_refs), so that an earlier peak (imports) does
    not hide ours; elsewhere the lifetime peak (ru_maxrss), which can only under-report."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_peak_kb():
    try:
        return _status_kb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_memory(runs, p, c, dtypes):
    for dt in dtypes:
        for n, dry in runs:
            out = subprocess.run([sys.executable, __file__, "--memory-probe", f"{n},{p},{c},{dt},{int(dry)}"],
                                 capture_output=True, text=True, check=True)
            extra = json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]
            tag = dict(N=n, P=p, C=c, dtype=dt, dry_run=dry)
            record("memory", "visual_map peak extra memory", extra, "MB", **tag)
            record("memory", "naive all-pairs distance matrix", n * n * p * p * 4 / 1e6, "MB", **tag)


def musc_style_scores(Z, topmin_max=0.3):
    """MuSc's formulation: each image's patches against all other images' patches stacked, via cdist."""
    n, p, c = Z.shape
    k = interval_count(n - 1, topmin_max)
    out = torch.empty(n, p)
    for i in range(n):
        others = torch.cat([Z[j] for j in range(n) if j != i])  # [(n-1) p, c]
        d = torch.cdist(Z[i], others).reshape(p, n - 1, p).min(dim=2).values  # [p, n-1]
        out[i] = torch.topk(d, k, dim=1, largest=False).values.mean(dim=1)
    return out


def bench_musc(n, p, c, repeats):
    h = int(round(p ** 0.5))
    Z = lnamd(torch.randn(n, h * h, c) + torch.randn(1, 1, c), (h, h), 3)
    res = {}
    fns = {"musc": lambda: res.__setitem__("musc", musc_style_scores(Z))}
    for dt in (torch.float32, torch.bfloat16):
        fns[str(dt)] = lambda dt=dt: res.__setitem__(dt, mutual_scores(Z, dtype=dt))
    t = interleaved(fns, repeats)  # warm on both sides
    for dt in (torch.float32, torch.bfloat16):
        tag = dict(N=n, P=h * h, C=c, dtype=str(dt).replace("torch.", ""))
        record_series("musc", "MuSc-style cdist s", t["musc"], "s", **tag)
        record_series("musc", "ours s", t[str(dt)], "s", **tag)
        record_series("musc", "speed-up over MuSc-style", [a / b for a, b in zip(t["musc"], t[str(dt)])], "ratio",
                      **tag)
        record("musc", "max |score difference|", float((res[dt] - res["musc"]).abs().max()), "abs", **tag)


def bench_stream(specs, ks, n_images, repeats):
    """Streaming (issue 13): images per second at bank size K, one image at a time (encoder included), against
    batch scoring of the same images in batches of K + 1, where every image also has K references."""
    from fiseclip_lib.decisions.stream import Streamer

    for spec in specs:
        model, size = spec.split("@")
        size = int(size)
        for device in devices():
            cfg = FiseConfig(model=model, pretrained="none", image_size=size, device=device,
                             method="musc" if model == "efficientnet-lite0" else "fiseclip", rscin=False)
            det = Detector(cfg)
            det.score_batch(random_images(2, size), "object")  # warm-up (kernels, text embeddings)
            for k in ks:
                warm = random_images(k, size, seed=1000 + k)
                images = random_images(n_images, size, seed=k)
                stream_s, batch_s, stream_m, batch_m = [], [], [], []
                for _ in range(repeats):  # interleaved: a load spike hits both sides
                    s = Streamer(det, "object", bank_size=k, threshold=1e9, text_gate=None)
                    for _ in s.run(warm):  # fill the bank (not timed)
                        pass
                    sync()
                    m0, t0 = det.costs["match_s"], time.perf_counter()
                    for _ in s.run(images):  # encoder batched, decisions one image at a time
                        pass
                    sync()
                    stream_s.append(time.perf_counter() - t0)
                    stream_m.append((det.costs["match_s"] - m0) / n_images)
                    m0, t0 = det.costs["match_s"], time.perf_counter()
                    for b in range(0, n_images, k + 1):
                        chunk = (images + warm)[b:b + k + 1]
                        det.score_batch(chunk, "object")
                    sync()
                    n_batch = sum(len((images + warm)[b:b + k + 1]) for b in range(0, n_images, k + 1))
                    batch_s.append((time.perf_counter() - t0) * n_images / n_batch)
                    batch_m.append((det.costs["match_s"] - m0) / n_batch)
                tag = dict(model=spec, device=device, K=k, images=n_images)
                record_series("stream", "stream images/s", [n_images / t for t in stream_s], "img/s", **tag)
                record_series("stream", "batch (N = K + 1) images/s", [n_images / t for t in batch_s], "img/s", **tag)
                record_series("stream", "stream / batch throughput", [b / s_ for s_, b in zip(stream_s, batch_s)],
                              "ratio", **tag)
                # why the ratio stays below 1 (issue 20): a batch multiplies each pair of images once and reads the
                # product both ways, N (N - 1) / 2 products for N (N - 1) image-reference relations, i.e. K / 2 per
                # image; a stream needs K products per image (its references never score it back)
                record_series("stream", "matching s per image, stream", stream_m, "s", **tag)
                record_series("stream", "matching s per image, batch", batch_m, "s", **tag)
                record_series("stream", "matching stream / batch", [a / b for a, b in zip(stream_m, batch_m)],
                              "ratio", **tag)
            del det


def bench_dask_sweep(repeats, n_images=24, size=64):
    """`fiseclip sweep` overhead: a 12-task grid (6 configurations x 2 categories, efficientnet-lite0 musc at
    `size` px, no feature cache) on 2 local Dask workers vs the serial local executor; the cluster start is
    timed separately (paid once per sweep) and the tasks run on a cluster that is already up."""
    import logging

    from distributed import LocalCluster

    from fiseclip_lib.evaluation.demo import build_demo
    from fiseclip_lib.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = build_demo(tmp / "demo", categories=("textile", "brick"), n_good=n_images - n_images // 3,
                          n_defect=n_images // 3, n_train=0, size=max(64, size))
        grid = {"dataset": "demo", "root": str(root), "method": "musc", "model": "efficientnet-lite0",
                "pretrained": "imagenet", "image_size": size, "musc_pool": "batch", "batch_size": 8,
                "topmin_max": [0.1, 0.3, 0.5], "degrees": [[1], [1, 3]]}
        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        start_s = time.perf_counter() - t0
        runs = iter(range(10 ** 6))
        try:
            fns = {"serial": lambda: run_sweep(grid, tmp / f"serial{next(runs)}", use_cache=False, progress=False),
                   "dask": lambda: run_sweep(grid, tmp / f"dask{next(runs)}", executor="dask", use_cache=False,
                                             scheduler=cluster.scheduler_address, progress=False)}
            t = interleaved(fns, repeats, warm=True)  # warm: encoders loaded in this process and in the workers
        finally:
            cluster.close()
        tag = dict(tasks=12, workers=2, images=2 * n_images, model=f"efficientnet-lite0@{size}")
        record("dask", "one-off: LocalCluster start s", start_s, "s", **tag)
        record_series("dask", "serial sweep s", t["serial"], "s", **tag)
        record_series("dask", "dask sweep (2 workers) s", t["dask"], "s", **tag)
        record_series("dask", "dask / serial wall time", [b / a for a, b in zip(t["serial"], t["dask"])], "ratio",
                      **tag)


TILE_CONFIGS = {"tiles 1, window unset": {}, "tiles 4 (2x2)": {"tiles": "2x2"}, "tiles 16 (4x4)": {"tiles": "4x4"},
                "window 1": {"match_window": 1}, "window 2": {"match_window": 2}, "window 4": {"match_window": 4}}


def _release_freed_memory():
    """Hand memory freed by earlier runs back to the system and stop glibc from keeping it (a fixed mmap
    threshold: large tensors are mapped and unmapped), so that the next run's peak RSS counts its own memory."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB, no longer raised by frees
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak can only over-report
        pass


def bench_tiles(size, n_good, n_defect, repeats, match_shape):
    """Section `tiles` (module doc). size: the demo's side (the wafer is demo.LARGE_FACTOR times larger) and the
    encoder's input side; match_shape: (N, grid side, C, layers) of the matching-only rows."""
    from fiseclip_lib.core.matching import windowed_visual_map
    from fiseclip_lib.evaluation import demo
    from fiseclip_lib.evaluation.data import load_dataset
    from fiseclip_lib.evaluation.run import evaluate_category, score_category

    parts = tuple(getattr(demo, "PART_CATEGORIES", ()))
    cats = parts or ("textile",)
    with tempfile.TemporaryDirectory() as tmp:
        root = demo.build_demo(Path(tmp) / "demo", categories=cats, n_good=n_good, n_defect=n_defect, n_train=0,
                               size=size)
        enc = load_encoder("efficientnet-lite0", "imagenet", size, "cpu")
        base = FiseConfig(model="efficientnet-lite0", pretrained="imagenet", image_size=size, device="cpu",
                          method="musc")
        for cat in cats:
            samples = load_dataset("demo", root, [cat])
            dets = {name: Detector(base.replace(**o), encoder=enc) for name, o in TILE_CONFIGS.items()}
            secs = {name: [] for name in dets}
            mem = {name: [] for name in dets}
            metrics = {}
            for r in range(repeats + 1):  # round 0 warms every configuration up (not timed)
                for name, det in dets.items():  # interleaved: a load spike hits every configuration
                    _release_freed_memory()
                    base_kb = _rss_reset_peak()
                    t0 = time.perf_counter()
                    rows, maps = score_category(det, samples, cat, progress=False, dataset="demo")
                    dt = time.perf_counter() - t0
                    peak = _rss_peak_kb() - base_kb
                    if r:
                        secs[name].append(dt / len(samples))
                        mem[name].append(peak / 1024)
                    else:
                        metrics[name] = evaluate_category([x[0] for x in rows], np.array([x[1] for x in rows]), maps,
                                                          True)
            first = next(iter(dets))
            for name in dets:
                tag = dict(category=cat, config=name, size=size, images=len(samples), method="musc",
                           model="efficientnet-lite0")
                record_series("tiles", "s per image", secs[name], "s", **tag)
                record_series("tiles", "peak extra memory", mem[name], "MB", **tag)
                record("tiles", "image AUROC", metrics[name]["image_auroc"], "auroc", **tag)
                record("tiles", "pixel AUROC", metrics[name]["pixel_auroc"], "auroc", **tag)
                if name != first:
                    record_series("tiles", "time / untiled global", [a / b for a, b in zip(secs[name], secs[first])],
                                  "ratio", **tag)
                    if min(mem[first]) >= 1:  # below 1 MB the baseline is allocator noise, not a scale
                        record_series("tiles", "memory / untiled global",
                                      [a / b for a, b in zip(mem[name], mem[first])], "ratio", **tag)
                    record("tiles", "image AUROC - untiled global",
                           metrics[name]["image_auroc"] - metrics[first]["image_auroc"], "abs", **tag)
    n, h, c, n_layers = match_shape  # the matching alone: O(P^2) vs O(P r^2) per pair
    g = torch.Generator().manual_seed(0)
    layers = {l: torch.randn(n, h * h, c, generator=g) + torch.randn(1, 1, c, generator=g) for l in range(n_layers)}
    fns = {"global": lambda: visual_map(layers, (h, h), (1, 3, 5))}
    for r in (1, 2, 4):
        fns[f"window {r}"] = lambda r=r: windowed_visual_map(layers, (h, h), r, (1, 3, 5))
    t = interleaved(fns, repeats)
    for r in (1, 2, 4):
        tag = dict(N=n, P=h * h, C=c, layers=n_layers, degrees="1/3/5", window=r)
        record_series("tiles", "matching s, window", t[f"window {r}"], "s", **tag)
        record_series("tiles", "matching s, global (engine auto)", t["global"], "s", **tag)
        record_series("tiles", "matching time window / global", [a / b for a, b in zip(t[f"window {r}"], t["global"])],
                      "ratio", **tag)
        record("tiles", "products computed: (2r + 1)^2 / P", (2 * r + 1) ** 2 / (h * h), "ratio", **tag)


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and small shapes: < 60 s (CI)")
    ap.add_argument("--sections", default=None,
                    help="comma-separated (default all; --quick: all but sweep, whose run overhead swamps a tiny model)")
    ap.add_argument("--models", default=None,
                    help="comma-separated MODEL@SIZE (default ViT-L-14-336@336,ViT-L-14-336@518; quick: fiseclip-tiny@112)")
    ap.add_argument("--precisions", default="fp32,bf16", help="pipeline section: fp32 and/or bf16 (+ bf16 matching)")
    ap.add_argument("--batch-sizes", default=None, help="pipeline section N values (default 16; quick 8)")
    ap.add_argument("--encode-images", type=int, default=0,
                    help="pipeline: encode this many images and tile the features to N (0 = encode all N)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 2)")
    ap.add_argument("--match-layers", type=int, default=4, help="matching section: layers (paper: 4)")
    ap.add_argument("--match-n", type=int, default=16,
                    help="matching section: images per batch (paper: 16; the ratios are per pair of images)")
    ap.add_argument("--match-p", type=int, default=37, help="matching section: grid side (paper: 37, P = 1369)")
    ap.add_argument("--match-compare", default="mm,own,per-degree,box-torch",
                    help="matching section: timed beside engine auto, interleaved: mm, own and engine names "
                         "(per-degree, box-torch, box-compiled); e.g. box-torch,box-compiled for what numba buys")
    ap.add_argument("--memory-ns", default="16,32,64dry",
                    help="memory section batch sizes; 'dry' = GEMM outputs allocated, not computed (same peak)")
    ap.add_argument("--stream-ks", help="stream section bank sizes K (default 8,16,32; quick 8)")
    ap.add_argument("--stream-images", type=int, help="stream section images timed per repeat (default 12; quick 4)")
    ap.add_argument("--stream-models", help="stream section MODEL@SIZE list (default efficientnet-lite0@256,"
                                            "fiseclip-tiny@224; quick @128 and @112)")
    ap.add_argument("--out", default="benchmarks/results.csv")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_probe:
        n, p, c, dt, dry = args.memory_probe.split(",")
        memory_probe(int(n), int(p), int(c), dt, dry == "1")
        return 0
    quick = args.quick
    sections = set((args.sections or ("pipeline,matching,memory,musc" if quick else
                                      "pipeline,matching,sweep,memory,musc,dask")).split(","))
    repeats = args.repeats or (2 if quick else 3)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}, load {load:.2f}", flush=True)
    models = (args.models or ("fiseclip-tiny@112" if quick else "ViT-L-14-336@336,ViT-L-14-336@518")).split(",")
    batch_sizes = [int(x) for x in (args.batch_sizes or ("8" if quick else "16")).split(",")]
    if "pipeline" in sections:
        bench_pipeline(models, batch_sizes, args.precisions.split(","), repeats, args.encode_images)
    if "matching" in sections:
        compare = args.match_compare.split(",")
        if quick:  # C >= BOX_FILTER_MIN_CHANNELS: the route the paper uses
            bench_matching(8, 16, 512, 2, (1, 3, 5), repeats, compare=list(dict.fromkeys(compare + ["box-compiled"])))
        else:
            bench_matching(args.match_n, args.match_p, 1024, args.match_layers, (1, 3, 5), repeats, compare=compare)
    if "sweep" in sections:
        bench_sweep("fiseclip-tiny", 112, 9, repeats) if quick else bench_sweep("ViT-B-16", 224, 48, repeats)
    if "memory" in sections:
        if quick:
            bench_memory([(16, False)], 576, 1024, ["float32"])
        else:
            runs = [(int(x.replace("dry", "")), x.endswith("dry")) for x in args.memory_ns.split(",")]
            bench_memory(runs, 1369, 1024, ["float32", "bfloat16"])
    if "dask" in sections:
        bench_dask_sweep(repeats)
    if "musc" in sections:
        bench_musc(6 if quick else 16, 144 if quick else 576, 128 if quick else 1024, repeats)
    if "tiles" in sections or (args.sections is None and not quick):  # large images, aligned parts (issue 22)
        bench_tiles(128 if quick else 256, 12 if quick else 24, 8 if quick else 16, 1 if quick else repeats,
                    (8, 24, 256, 2) if quick else (16, 37, 1024, 4))
    if "stream" in sections or args.sections is None:  # streaming throughput (issue 13), part of every default run
        stream_models = (args.stream_models.split(",") if args.stream_models else
                         ["efficientnet-lite0@128", "fiseclip-tiny@112"] if quick else
                         ["efficientnet-lite0@256", "fiseclip-tiny@224"])
        stream_ks = [int(x) for x in args.stream_ks.split(",")] if args.stream_ks else [8] if quick else [8, 16, 32]
        bench_stream(stream_models, stream_ks, args.stream_images or (4 if quick else 12),
                     args.repeats or (1 if quick else repeats))
    df = pd.DataFrame(ROWS)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    ratios = df[df.unit.isin(["ratio", "abs", "rel"])]
    print("\nratios and errors:\n" + ratios.drop(columns=["unit"]).dropna(axis=1, how="all").to_string(index=False))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
