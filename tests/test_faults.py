"""Fault suite: realistic mistakes and hostile inputs, each through the command line as a user meets them.

Every case asserts the exit code; for errors, exactly one line `fiseclip: error: ...` that names the culprit and
no traceback; for handled cases, the warning that names the culprit; and in every case that the output folder
holds nothing half-written (no temp files) and nothing stale (config.json describes the metrics.csv beside it).
Small images, the random tiny CLIP at 28 px, two categories of six images: each case takes well under a second.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fiseclip_lib.cli import main
from helpers import make_mvtec_tree, make_visa_raw_tree

BASE = ["--model", "fiseclip-tiny", "--pretrained", "none", "--image-size", "28", "--batch-size", "4",
        "--no-progress", "--no-feature-cache"]


# ------------------------------------------------------------------------------------------- breakers

def img(root, cat="bottle", defect="crack", i=0):
    return root / cat / "test" / defect / f"{i:03d}.png"


def gt(root, cat="bottle", defect="crack", i=0):
    return root / cat / "ground_truth" / defect / f"{i:03d}_mask.png"


def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)


def recode_masks(root, encode):
    """Rewrite every mask with another encoding of the same defect pixels."""
    for p in root.glob("*/ground_truth/*/*_mask.png"):
        m = np.asarray(Image.open(p)) > 0
        encode(m).save(p)


def params_file(tmp, text: str | bytes):
    p = tmp / "params.yaml"
    write(p, text)
    return ["--params", str(p)]


def cache_entries(cache_dir):
    return sorted(cache_dir.glob("*/*.safetensors"))


def flip_byte(p, offset=-100):
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


# Each case: id -> (setup(root, tmp) -> extra CLI args or None, expected exit code, culprit text or "").
# Setups may return a dict {"args": [...], "command": [...]} to run another command than `run`.
CASES: dict[str, tuple] = {}


def case(name, expect, text=""):
    def register(fn):
        CASES[name] = (fn, expect, text)
        return fn
    return register


# --- config values (each is one line naming the field)
for name, pair, text in [
    ("sigma nan", "sigma=nan", "sigma"), ("sigma inf", "sigma=inf", "sigma"), ("sigma -1", "sigma=-1", "sigma"),
    ("sigma too large", "sigma=50", "sigma 50.0 px is too large"), ("rscin_ks 0", "rscin_ks=0", "rscin_ks"),
    ("rscin_ks negative", "rscin_ks=1,-2", "rscin_ks"), ("filter_theta nan", "filter_theta=nan", "filter_theta"),
    ("filter_theta 2", "filter_theta=2", "filter_theta"), ("text_temperature nan", "text_temperature=nan",
                                                             "text_temperature"),
    ("text_temperature 0", "text_temperature=0", "text_temperature"),
    ("text_temperature negative", "text_temperature=-5", "text_temperature"),
    ("batch_size true", "batch_size=true", "batch_size"), ("encode_batch 0", "encode_batch=0", "encode_batch"),
    ("degrees even", "degrees=2", "degrees"), ("degrees text", "degrees=a,b", "degrees"),
    ("topmin_max 0", "topmin_max=0", "topmin_max"), ("alpha 2", "alpha=2", "alpha"),
    ("filter_ratio 1", "filter_ratio=1", "filter_ratio"), ("match_dtype fp64", "match_dtype=fp64", "match_dtype"),
    ("precision fp16 on cpu", "precision=fp16", "fp16"), ("unknown option", "colour=blue", "colour"),
    ("set without value", "alpha", "key=value"), ("restore bogus", "restore=gem", "restore"),
    ("layers out of range", "layers=99", "layers"),
]:
    case(f"config: {name}", 2, text)(lambda root, tmp, pair=pair: ["--set", pair])

for name, args, text in [
    ("method bogus", ["--method", "patchcore"], "patchcore"), ("model bogus", ["--model", "ViT-Q-1"], "ViT-Q-1"),
    ("dataset bogus", ["--dataset", "kolektor"], "kolektor"), ("batch size 0", ["--batch-size", "0"], "batch size 0"),
    ("image size 0", ["--image-size", "0"], "image size"), ("category unknown", ["--categories", "cable"], "cable"),
    ("device bogus", ["--device", "tpu9"], "tpu9"),
]:
    case(f"cli: {name}", 2, text)(lambda root, tmp, args=args: args)


# --- params files
for name, text, culprit in [
    ("options not a mapping", "options: [1, 2]\n", "options must be a mapping"),
    ("categories a number", "categories: 5\n", "categories"), ("root a number", "root: 5\n", "root must be text"),
    ("dataset a number", "dataset: 7\n", "dataset must be text"),
    ("mixed key types", "1: x\nmodel: fiseclip-tiny\n", "key 1"),
    ("option key a number", "options:\n  3: x\n", "key 3 in options"),
    ("top level a list", "- a\n- b\n", "must hold a mapping"), ("invalid yaml", "a: [1, 2\n", "not valid YAML"),
    ("batch_size true", "batch_size: true\n", "batch_size"), ("sigma nan", "sigma: .nan\n", "sigma"),
    ("option of wrong type", "options:\n  alpha: [1]\n", "alpha"), ("model a list", "model: [a]\n", "model"),
]:
    case(f"params: {name}", 2, culprit)(lambda root, tmp, text=text: params_file(tmp, text))


@case("params: non-UTF-8 bytes", 2, "not UTF-8")
def _(root, tmp):
    return params_file(tmp, b"model: \xff\xfe\n")


@case("params: a folder", 2, "is a folder")
def _(root, tmp):
    (tmp / "p").mkdir()
    return ["--params", str(tmp / "p")]


@case("params: missing", 2, "does not exist")
def _(root, tmp):
    return ["--params", str(tmp / "nope.yaml")]


# --- datasets and images
@case("data: unreadable image", 2, "000.png cannot be read")
def _(root, tmp):
    write(img(root), b"not an image")


@case("data: truncated image", 2, "000.png cannot be read")
def _(root, tmp):
    data = img(root).read_bytes()
    img(root).write_bytes(data[: len(data) // 2])


@case("data: orphan mask", 2, "999_mask.png")
def _(root, tmp):
    shutil.copy(gt(root), gt(root, i=999))


@case("data: unreadable mask", 2, "000_mask.png cannot be read")
def _(root, tmp):
    write(gt(root), b"garbage")


@case("data: root missing", 2, "does not exist")
def _(root, tmp):
    shutil.rmtree(root)


@case("data: no categories", 2, "no categories found")
def _(root, tmp):
    shutil.rmtree(root)
    root.mkdir()


@case("data: empty category", 0, "category bottle has no test images")
def _(root, tmp):
    for f in (root / "bottle" / "test").rglob("*.png"):
        f.unlink()
    shutil.rmtree(root / "bottle" / "ground_truth")


for mode, word in [("L", "grayscale"), ("RGBA", "RGBA"), ("P", "palette"), ("I;16", "16-bit")]:
    @case(f"data: {word} images warned once", 0, f"{word} image(s) converted to 8-bit RGB")
    def _(root, tmp, mode=mode):
        for p in (root / "bottle" / "test" / "good").glob("*.png"):
            arr = np.asarray(Image.open(p).convert("RGB"))
            im = Image.fromarray(arr[..., 0].astype(np.uint16) * 257) if mode == "I;16" else \
                Image.fromarray(arr).convert(mode)
            im.save(p)


@case("data: visa split CSV not UTF-8", 2, "1cls.csv is not UTF-8")
def _(root, tmp):
    v = make_visa_raw_tree(tmp / "visa")
    p = v / "split_csv" / "1cls.csv"
    p.write_bytes(p.read_bytes().replace(b"candle", b"c\xe4ndle"))
    return {"args": ["--dataset", "visa", "--root", str(v)]}


@case("data: visa split CSV without columns", 2, "columns")
def _(root, tmp):
    v = make_visa_raw_tree(tmp / "visa")
    (v / "split_csv" / "1cls.csv").write_text("a,b\n1,2\n")
    return {"args": ["--dataset", "visa", "--root", str(v)]}


@case("data: visa CSV lists a missing image", 2, "does not exist")
def _(root, tmp):
    v = make_visa_raw_tree(tmp / "visa")
    (v / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG").unlink()
    return {"args": ["--dataset", "visa", "--root", str(v)]}


@case("data: corrupt demo manifest", 2, "manifest.json is damaged")
def _(root, tmp):
    (root / "manifest.json").write_text("{ not json")
    return {"args": ["--dataset", "demo"]}


# --- masks: any non-zero pixel is a defect, whatever the encoding; empty masks are named
for name, enc in [("0/1 (raw VisA)", lambda m: Image.fromarray(m.astype(np.uint8))),
                  ("16-bit", lambda m: Image.fromarray(m.astype(np.uint16) * 1000)),
                  ("palette", lambda m: Image.fromarray(m.astype(np.uint8)).convert("P")),
                  ("RGB red", lambda m: Image.fromarray(np.stack([m * 200, 0 * m, 0 * m], -1).astype(np.uint8))),
                  ("1-bit", lambda m: Image.fromarray(m).convert("1"))]:
    @case(f"masks: {name} equals 0/255", 0, "")
    def _(root, tmp, enc=enc):
        recode_masks(root, enc)
        return {"same_as_clean": True}


@case("masks: an empty mask is named", 0, "000_mask.png of anomalous image 000.png is empty")
def _(root, tmp):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(gt(root))


@case("masks: all empty masks noted", 0, "category bottle: all 3 masks are empty")
def _(root, tmp):
    for p in (root / "bottle" / "ground_truth").rglob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(p)


# --- weights
@case("weights: missing local file", 2, "nothing.safetensors")
def _(root, tmp):
    return ["--pretrained", str(tmp / "nothing.safetensors")]


@case("weights: random bytes named .safetensors", 2, "junk.safetensors")
def _(root, tmp):
    write(tmp / "junk.safetensors", os.urandom(2048))
    return ["--pretrained", str(tmp / "junk.safetensors")]


@case("weights: text named .pt", 2, "notes.pt")
def _(root, tmp):
    write(tmp / "notes.pt", "these are not weights\n")
    return ["--pretrained", str(tmp / "notes.pt")]


@case("weights: wrong shapes", 2, "wrong.safetensors")
def _(root, tmp):
    import torch
    from safetensors.torch import save_file

    from fiseclip_lib.encoder import load_encoder

    sd = load_encoder("fiseclip-tiny", "none", image_size=28, device="cpu").model.state_dict()
    sd = {k: v.clone() for k, v in sd.items()}
    key = next(k for k, v in sd.items() if v.ndim == 2)
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    save_file(sd, str(tmp / "wrong.safetensors"))
    return ["--pretrained", str(tmp / "wrong.safetensors")]


@case("weights: typo'd path for efficientnet", 2, "efficientnet_weigths.pth")
def _(root, tmp):
    return ["--model", "efficientnet-lite0", "--method", "musc", "--image-size", "64", "--pretrained",
            str(tmp / "efficientnet_weigths.pth")]


# --- resume: only the same content and output options are reused
def _resume(root, tmp, change):
    out = tmp / "out"
    assert main(["run", "--dataset", "mvtec", "--root", str(root), "--out", str(out), *BASE]) == 0
    change(root, out)
    return ["--resume"]


@case("resume: image content changed under the same name", 0, "")
def _(root, tmp):
    def change(root, out):
        shutil.copy(img(root, defect="good", i=1), img(root, defect="good", i=0))
    return {"args": _resume(root, tmp, change), "not_reused": "bottle"}


@case("resume: mask content changed", 0, "")
def _(root, tmp):
    def change(root, out):
        m = np.zeros((32, 32), np.uint8)
        m[20:30, 20:30] = 255
        Image.fromarray(m).save(gt(root))
    return {"args": _resume(root, tmp, change), "not_reused": "bottle"}


@case("resume: --save-maps after a run without maps", 0, "")
def _(root, tmp):
    return {"args": _resume(root, tmp, lambda r, o: None) + ["--save-maps"], "maps": True}


@case("resume: damaged category result", 0, "bottle.json is damaged")
def _(root, tmp):
    return {"args": _resume(root, tmp, lambda r, o: (o / "categories" / "bottle.json").write_text('{"cat'))}


@case("resume: other config", 0, "")
def _(root, tmp):
    return {"args": _resume(root, tmp, lambda r, o: None) + ["--set", "alpha=0.3"], "not_reused": "bottle"}


# --- feature cache: never trusts a damaged entry, numbers unchanged
def _cached(root, tmp, damage):
    cache = tmp / "fcache"
    args = ["run", "--dataset", "mvtec", "--root", str(root), "--out", str(tmp / "warm"), *BASE[:-1],
            "--feature-cache", str(cache)]
    assert main(args) == 0
    entries = cache_entries(cache)
    assert entries
    damage(entries)
    return {"args": ["--feature-cache", str(cache)], "drop": "--no-feature-cache", "same_as_clean": True}


@case("cache: flipped byte", 0, "is damaged (checksum mismatch)")
def _(root, tmp):
    return _cached(root, tmp, lambda es: flip_byte(es[0]))


@case("cache: truncated entry", 0, "is damaged (unreadable")
def _(root, tmp):
    return _cached(root, tmp, lambda es: es[0].write_bytes(es[0].read_bytes()[:200]))


@case("cache: entry under another key", 0, "is damaged (written for another key)")
def _(root, tmp):
    return _cached(root, tmp, lambda es: shutil.copy(es[1], es[0]))


@case("cache: empty entry", 0, "is damaged (unreadable")
def _(root, tmp):
    return _cached(root, tmp, lambda es: es[0].write_bytes(b""))


@case("cache clear: leaves foreign files", 0, "")
def _(root, tmp):
    cache = tmp / "fcache"
    assert main(["run", "--dataset", "mvtec", "--root", str(root), "--out", str(tmp / "warm"), *BASE[:-1],
                 "--feature-cache", str(cache)]) == 0
    write(cache / "ab" / ("ab" + "0" * 62 + ".safetensors"), b"someone else's file")
    write(cache / "notes.txt", "mine")
    return {"command": ["cache", "clear", "--dir", str(cache)],
            "after": lambda: (cache / "notes.txt").is_file() and (cache / "ab" / ("ab" + "0" * 62 + ".safetensors")
                                                                   ).is_file() and not cache_entries(cache)[1:]}


# --- output folder
@case("out: a file", 2, "is not writable")
def _(root, tmp):
    write(tmp / "a_file", "x")
    return {"out": tmp / "a_file" / "sub"}


@case("out: in use by another run", 2, "is in use by")
def _(root, tmp):
    from fiseclip_lib.plumbing.files import output_lock

    out = tmp / "out"
    out.mkdir()
    held, release = threading.Event(), threading.Event()

    def hold():
        with output_lock(out, command="fiseclip run (test holder)"):
            held.set()
            release.wait(30)
    t = threading.Thread(target=hold, daemon=True)
    t.start()
    held.wait(10)
    return {"args": [], "cleanup": lambda: (release.set(), t.join())}


@case("out: lock left by a killed run", 0, "took over the lock left by")
def _(root, tmp):
    out = tmp / "out"
    write(out / ".fiseclip.lock", json.dumps({"pid": 999999, "command": "fiseclip run", "started": "yesterday"}))


@case("out: disk full while writing", 2, "No space left on device")
def _(root, tmp):
    return {"inject": "enospc"}


@case("out: CUDA out of memory", 2, "encode_batch")
def _(root, tmp):
    return {"inject": "oom"}


@case("names: category called mean", 0, "")
def _(root, tmp):
    shutil.move(root / "screw", root / "mean")
    return {"mean_rows": 1}


@case("names: non-UTF-8 file name", 0, "")
def _(root, tmp):
    src = img(root, defect="good", i=0)
    os.rename(src, os.fsencode(src.parent) + b"/n\xe9e.png")


@case("names: hostile category name", 0, "")
def _(root, tmp):
    shutil.move(root / "screw", root / "a$b$ <i>x</i> & \"q\"")


# ------------------------------------------------------------------------------------------- the runner

def _clean_metrics(tmp):
    root = make_mvtec_tree(tmp / "clean_data")
    out = tmp / "clean_out"
    assert main(["run", "--dataset", "mvtec", "--root", str(root), "--out", str(out), *BASE]) == 0
    return pd.read_csv(out / "metrics.csv")


def _no_debris(out):
    """Nothing half-written: no temp files; config.json describes the metrics.csv beside it."""
    if not out.is_dir():
        return
    debris = [p.name for p in out.rglob(".*") if p.name != ".fiseclip.lock"]
    assert not debris, debris
    if (out / "metrics.csv").is_file():
        conf = json.loads((out / "config.json").read_text())
        rows = pd.read_csv(out / "metrics.csv", keep_default_na=False).category.tolist()
        assert rows[:-1] == conf["categories_done"]


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, tmp_path, capsys, monkeypatch):
    setup, expect, text = CASES[name]
    root = make_mvtec_tree(tmp_path / "data", n_good=3)
    (root / "manifest.json").write_text("{}")  # only read by --dataset demo
    spec = setup(root, tmp_path) or []
    spec = {"args": spec} if isinstance(spec, list) else spec
    capsys.readouterr()
    out = spec.get("out", tmp_path / "out")
    if spec.get("inject") == "enospc":
        import fiseclip_lib.evaluation.run as run_mod

        def full_disk(path, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        monkeypatch.setattr(run_mod, "write_csv_atomic", full_disk)
    if spec.get("inject") == "oom":
        import torch

        import fiseclip_lib.core.detector as pipe

        def oom(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        monkeypatch.setattr(pipe.Detector, "score", oom)
    base = [a for a in BASE if a != spec.get("drop")]
    args = spec.get("command") or ["run", "--dataset", "mvtec", "--root", str(root), "--out", str(out), *base,
                                   *spec.get("args", [])]
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        if "cleanup" in spec:
            spec["cleanup"]()
    cap = capsys.readouterr()
    both = cap.out + cap.err
    assert "Traceback" not in both
    assert code == expect, both
    if expect == 2:
        lines = [l for l in cap.err.splitlines() if l.strip() and not l.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith("fiseclip: error:"), cap.err
        assert text in lines[0], lines[0]
    else:
        assert text in both, both
        for line in cap.err.splitlines():
            assert line.startswith("warning:") or not line.strip() or "it/s" in line, line
    if "after" in spec:
        assert spec["after"]()
    if spec.get("command"):
        return
    _no_debris(out)
    if expect != 0:
        return
    metrics = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values=["nan"])
    if spec.get("same_as_clean"):
        clean = _clean_metrics(tmp_path)
        cols = [c for c in clean.columns if c.startswith(("image_", "pixel_"))]
        np.testing.assert_array_equal(metrics[cols].to_numpy(), clean[cols].to_numpy())
    if "not_reused" in spec:
        assert f"{spec['not_reused']}: reused" not in cap.out
    if spec.get("maps"):
        assert (out / "maps" / "bottle.npz").is_file() and (out / "maps" / "screw.npz").is_file()
    if "mean_rows" in spec:
        assert list(metrics.category).count("mean") == spec["mean_rows"]
    # files others can read: the process umask decides, as for any file a program writes
    mode = (out / "metrics.csv").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask(), oct(mode)


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_names_are_escaped_in_html_and_markdown(tmp_path):
    from fiseclip_lib.notebook.report import _header, _index
    from fiseclip_lib.notebook.workbench import markdown_escape

    hostile = 'a$b$ <script>alert(1)</script> & "q"'
    _index(tmp_path, [{"name": hostile, "status": "ok", "error": "", "wall_s": 1.0, "result": hostile,
                       "pretrained": False, "links": {"html": hostile + ".html", "ipynb": hostile + ".ipynb"}, "params": {"dataset": hostile}}],
           {"git_commit": "x", "versions": {}})
    page = (tmp_path / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    head = _header(hostile, "ok", "", 1.0, {"root": hostile}, {"git_commit": "x", "versions": {}},
                   {"level": "random", "text": hostile})
    assert "<script>" not in head
    md = markdown_escape(hostile)
    assert "$" not in md.replace("\\$", "") and "<" not in md.replace("\\<", "")


def test_dollar_in_titles_is_literal(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from fiseclip_lib.notebook import plots

    fig = plots.bar_metrics(pd.DataFrame({"category": ["a$b", "c$d$e"], "v": [0.2, 0.4]}), "category", "v",
                            title="cost in $ and $$")
    fig.savefig(tmp_path / "f.png")  # mathtext would fail to parse "$ and $$" or render math
    assert fig.axes[0].get_title() == "cost in $ and $$"
