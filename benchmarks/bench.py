"""Speed and memory benchmark: prints ratios measured in one run and writes them to CSV.

Random weights throughout (speed does not depend on them; nothing is downloaded). Sections:
  encoder   encoder-only vs full-pipeline seconds per image at N = 4, 8, 16, 32, per model and device
  gemm      our matching's GFLOP/s vs plain torch.mm of the same shapes
  sweep     a 10-configuration sweep with the feature cache vs one uncached run
  memory    peak extra memory of matching at N = 16, 32, 64 (paper grid P = 1369, C = 1024), in subprocesses
  musc      our matching vs a MuSc-style cdist formulation on the same features: speed ratio, max difference

    python benchmarks/bench.py                 # everything (about 15-25 min on 2 CPU cores)
    python benchmarks/bench.py --quick         # smaller shapes, a few minutes
    python benchmarks/bench.py --sections gemm,musc
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fiseclip_lib import Detector, FiseConfig, load_encoder  # noqa: E402
from fiseclip_lib.matching import interval_count, lnamd, mutual_scores, reference_distances  # noqa: E402

ROWS: list[dict] = []


def record(section, name, value, unit, **extra):
    ROWS.append({"section": section, "name": name, "value": value, "unit": unit, **extra})
    tail = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"  {section:8s} {name:48s} {value:12.4g} {unit:10s} {tail}", flush=True)


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def random_images(n, size, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- sections

def bench_encoder(models, batch_sizes, precision):
    for spec in models:
        model, size = spec.split("@")
        for device in devices():
            enc = load_encoder(model, "none", int(size), device, precision if device == "cpu" else "fp32")
            cfg = FiseConfig(model=model, pretrained="none", image_size=int(size), device=device,
                             precision=enc.precision, match_dtype="bf16" if precision == "bf16" else "fp32")
            det = Detector(cfg, encoder=enc)
            det.score_batch(random_images(2, int(size)), "object")  # warm-up
            for n in batch_sizes:
                images = random_images(n, int(size), seed=n)
                sync(device)
                t0 = time.perf_counter()
                feats = det.encode(images)
                sync(device)
                t1 = time.perf_counter()
                det.score_features(feats, "object")
                sync(device)
                t2 = time.perf_counter()
                enc_s, full_s = (t1 - t0) / n, (t2 - t0) / n
                tag = dict(model=spec, device=device, precision=enc.precision, N=n)
                record("encoder", "encoder-only s/img", enc_s, "s", **tag)
                record("encoder", "full pipeline s/img", full_s, "s", **tag)
                record("encoder", "full / encoder-only", full_s / enc_s, "ratio", **tag)


def gemm_shapes(n, p, chunk=16384):
    """The GEMM shapes reference_distances issues: per i, groups of reference images."""
    group = max(1, chunk // p)
    return [(p, min(n, g0 + group) - g0) for i in range(n - 1) for g0 in range(i + 1, n, group)]


def bench_gemm(n, p, c, dtypes):
    for device in devices():
        Z = torch.nn.functional.normalize(torch.randn(n, p, c, device=device), dim=-1)
        flops = 2.0 * p * p * c * n * (n - 1) / 2
        for dt in dtypes:
            reference_distances(Z[:2], dtype=dt)
            sync(device)
            t0 = time.perf_counter()
            reference_distances(Z, dtype=dt)
            sync(device)
            ours = time.perf_counter() - t0
            Zd = Z.to(dt)
            shapes = gemm_shapes(n, p)
            mats = {g: Zd[:g].reshape(g * p, c) for _, g in shapes}
            sync(device)
            t0 = time.perf_counter()
            for _, g in shapes:
                torch.mm(Zd[0], mats[g].T)
            sync(device)
            plain = time.perf_counter() - t0
            tag = dict(device=device, dtype=str(dt).replace("torch.", ""), N=n, P=p, C=c)
            record("gemm", "matching GFLOP/s", flops / ours / 1e9, "GFLOP/s", **tag)
            record("gemm", "torch.mm GFLOP/s (same shapes)", flops / plain / 1e9, "GFLOP/s", **tag)
            record("gemm", "matching / torch.mm throughput", plain / ours, "ratio", **tag)


def bench_sweep(model, size, n_images):
    from fiseclip_lib.cache import FeatureCache
    from fiseclip_lib.demo import build_demo
    from fiseclip_lib.run import run_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = build_demo(tmp / "demo", categories=("textile",), n_good=n_images - n_images // 3,
                          n_defect=n_images // 3, n_train=0, size=256)
        enc = load_encoder(model, "none", size, "cpu")
        base = FiseConfig(model=model, pretrained="none", image_size=size, device="cpu")
        t0 = time.perf_counter()
        run_benchmark("demo", root, base, tmp / "single", progress=False, detector=Detector(base, encoder=enc))
        single = time.perf_counter() - t0
        variants = [dict(), dict(filter="soft"), dict(filter="top_ratio"), dict(filter="none"), dict(fusion="gated"),
                    dict(fusion="multiplicative"), dict(alpha=0.7), dict(topmin_max=0.5), dict(degrees=(1, 3)),
                    dict(filter_theta=0.4)]
        cache = FeatureCache(tmp / "cache")
        t0 = time.perf_counter()
        for k, v in enumerate(variants):
            cfg = base.replace(**v)
            run_benchmark("demo", root, cfg, tmp / f"s{k}", progress=False, detector=Detector(cfg, enc, cache))
        sweep = time.perf_counter() - t0
        tag = dict(model=f"{model}@{size}", images=n_images)
        record("sweep", "one uncached run s", single, "s", **tag)
        record("sweep", "10-config sweep with cache s", sweep, "s", **tag)
        record("sweep", "sweep / one run", sweep / single, "ratio", **tag)


def memory_probe(n, p, c, dtype):
    """Child process: peak RSS growth of mutual_scores beyond its inputs (MB)."""
    Z = torch.empty(n, p, c).normal_()  # built in place: no temporaries raise the peak before we measure
    Z.div_(Z.norm(dim=-1, keepdim=True))
    mutual_scores(Z[:2, :8], dtype=getattr(torch, dtype))  # load kernels before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mutual_scores(Z, dtype=getattr(torch, dtype))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (peak - base) / 1024, "input_mb": Z.numel() * 4 / 1e6}))


def bench_memory(ns, p, c, dtypes):
    for dt in dtypes:
        for n in ns:
            out = subprocess.run([sys.executable, __file__, "--memory-probe", f"{n},{p},{c},{dt}"],
                                 capture_output=True, text=True, check=True)
            extra = json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]
            tag = dict(N=n, P=p, C=c, dtype=dt)
            record("memory", "matching peak extra memory", extra, "MB", **tag)
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


def bench_musc(n, p, c):
    h = int(round(p ** 0.5))
    Z = lnamd(torch.randn(n, h * h, c) + torch.randn(1, 1, c), (h, h), 3)
    t0 = time.perf_counter()
    ref = musc_style_scores(Z)
    t_ref = time.perf_counter() - t0
    for dt in (torch.float32, torch.bfloat16):
        t0 = time.perf_counter()
        ours = mutual_scores(Z, dtype=dt)
        t_ours = time.perf_counter() - t0
        tag = dict(N=n, P=h * h, C=c, dtype=str(dt).replace("torch.", ""))
        record("musc", "MuSc-style cdist s", t_ref, "s", **tag)
        record("musc", "ours s", t_ours, "s", **tag)
        record("musc", "speed-up over MuSc-style", t_ref / t_ours, "ratio", **tag)
        record("musc", "max |score difference|", float((ours - ref).abs().max()), "abs", **tag)


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes: a few minutes")
    ap.add_argument("--sections", default="encoder,gemm,sweep,memory,musc")
    ap.add_argument("--models", default=None, help="comma-separated MODEL@SIZE (default ViT-B-16@224,ViT-L-14-336@336)")
    ap.add_argument("--precision", default="fp32", help="encoder precision on CPU for the encoder section")
    ap.add_argument("--out", default="benchmarks/results.csv")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_probe:
        n, p, c, dt = args.memory_probe.split(",")
        memory_probe(int(n), int(p), int(c), dt)
        return 0
    sections = set(args.sections.split(","))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}", flush=True)
    quick = args.quick
    models = (args.models or ("ViT-B-16@224" if quick else "ViT-B-16@224,ViT-L-14-336@336")).split(",")
    if "encoder" in sections:
        bench_encoder(models, [4, 8] if quick else [4, 8, 16, 32], args.precision)
    if "gemm" in sections:
        bench_gemm(8 if quick else 16, 576, 1024, [torch.float32, torch.bfloat16])
    if "sweep" in sections:
        bench_sweep("ViT-B-16", 224, 24 if quick else 48)
    if "memory" in sections:
        bench_memory([8, 16] if quick else [16, 32, 64], 1369, 1024, ["float32", "bfloat16"])
    if "musc" in sections:
        bench_musc(8 if quick else 16, 576, 1024)
    df = pd.DataFrame(ROWS)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    ratios = df[df.unit == "ratio"]
    print("\nratios:\n" + ratios.drop(columns=["unit"]).to_string(index=False))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
