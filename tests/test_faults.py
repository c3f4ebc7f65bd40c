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

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fiseclip_lib.cli import main
from helpers import hold_output_lock, make_mvtec_tree, make_visa_raw_tree

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


def _registrar(table: dict):
    """A decorator factory that files a fault case under its name in `table`."""
    def case(name, expect, text=""):
        def register(fn):
            table[name] = (fn, expect, text)
            return fn
        return register
    return case


case = _registrar(CASES)


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
    out = tmp / "out"
    out.mkdir()
    return {"args": [], "cleanup": hold_output_lock(out, command="fiseclip run (test holder)")}


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


def run_checked(args, spec, capsys, expect, texts, error_starts=("fiseclip: error:",)):
    """main(args) as the command line runs it (argparse's SystemExit gives the code), the case's cleanup after,
    and the checks every fault case shares: no traceback, the expected exit code; a failure is one line on stderr
    (warnings aside) starting with one of `error_starts` and naming the culprit (one of `texts`); a success names
    it somewhere and warns one line at a time. Returns the captured output."""
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
    if expect != 0:
        lines = [l for l in cap.err.splitlines() if l.strip() and not l.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith(error_starts), cap.err
        assert any(s in lines[0] for s in texts), lines[0]
    else:
        assert any(s in both for s in texts), both
        for line in cap.err.splitlines():  # warnings one line each
            assert line.startswith("warning:") or not line.strip() or "it/s" in line, line
    return cap


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
    cap = run_checked(args, spec, capsys, expect, (text,))
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


# =========================================================================== predict, stream, calibrate, sweep
# Each case: id -> (setup(tmp, imgs) -> spec dict, expected exit code, culprit text or a tuple of alternatives).
# The spec holds "args" (after the command; "predict" defaults to --images imgs --out tmp/out and the tiny CLIP),
# optionally "command" (predict | calibrate | sweep), "inject" (monkeypatch -> None), "skip" (a reason),
# "rows" (a success case: how many images the run scored). Before every case the output already holds a
# complete previous run; afterwards a failed case must leave it byte-identical (nothing half-written, no
# hidden leftovers), and a successful one must hold exactly its own outputs (no stale overlays).

CLI_TINY = ["--model", "fiseclip-tiny", "--pretrained", "none", "--image-size", "28", "--batch-size", "4",
            "--no-progress", "--no-feature-cache"]
N_IMAGES = 6
DCASES: dict[str, tuple] = {}
dcase = _registrar(DCASES)


def png(path, seed=0, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def image_folder(folder, n=N_IMAGES, seed=0):
    for i in range(n):
        png(folder / f"{i:03d}.png", seed + i)
    return folder


def P(t, imgs, *extra, cli=CLI_TINY):
    """predict arguments: the case's images into tmp/out with the tiny CLIP, plus `extra`."""
    return {"args": ["--images", str(imgs), "--class-name", "x", "--out", str(t / "out"), *cli, *extra]}


def with_file(t, imgs, name, text, flag):
    """P(...) with `flag FILE`, FILE (in the case's folder) holding `text`."""
    (t / name).write_text(text)
    return P(t, imgs, flag, str(t / name))


def swap(cli, old, new):
    return [new if a == old else a for a in cli]


def as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --- inputs: --images
dcase("predict: images missing", 2, "does not exist")(lambda t, i: P(t, t / "nope"))
dcase("predict: images folder empty", 2, "no image files")(
    lambda t, i: (t / "empty").mkdir() or P(t, t / "empty"))
dcase("predict: glob matches nothing", 2, "matches no image")(lambda t, i: P(t, str(i / "*.tif")))
dcase("predict: images is empty text", 2, "--images")(lambda t, i: P(t, ""))
dcase("predict: no --images", 2, "--images is required")(
    lambda t, i: {"args": ["--class-name", "x", "--out", str(t / "out"), *CLI_TINY]})
dcase("predict: no --class-name", 2, "--class-name is required")(
    lambda t, i: {"args": ["--images", str(i), "--out", str(t / "out"), *CLI_TINY]})
dcase("predict: blank --class-name", 2, "--class-name is required")(
    lambda t, i: {"args": ["--images", str(i), "--class-name", "  ", "--out", str(t / "out"), *CLI_TINY]})
dcase("predict: image is junk bytes", 2, "003.png")(lambda t, i: (i / "003.png").write_bytes(b"junk") and P(t, i))
dcase("predict: zero-byte image", 2, "003.png")(lambda t, i: (i / "003.png").write_bytes(b"") or P(t, i))


@dcase("predict: truncated PNG", 2, "002.png")
def _(t, i):
    data = (i / "002.png").read_bytes()
    (i / "002.png").write_bytes(data[:len(data) // 2])
    return P(t, i)


dcase("predict: text file named .png", 2, "004.png")(
    lambda t, i: (i / "004.png").write_text("not an image") and P(t, i))


@dcase("predict: hidden images are skipped with a count", 0, "skipped 2 hidden file(s)")
def _(t, i):
    png(i / ".a.png", 50)
    png(i / ".b.png", 51)
    return {**P(t, i), "rows": N_IMAGES}


@dcase("predict: folder with only hidden images", 2, "2 hidden file(s)")
def _(t, i):
    for k in range(2):
        png(t / "hid" / f".{k}.png", k)
    return P(t, t / "hid")


@dcase("predict: brackets in a folder name are literal", 0, "")
def _(t, i):
    shutil.move(i, t / "lot[1]")
    return {**P(t, t / "lot[1]"), "rows": N_IMAGES}


@dcase("predict: brackets in the folder of a glob are literal", 0, "")
def _(t, i):
    shutil.move(i, t / "lot[1]")
    return {**P(t, str(t / "lot[1]" / "*.png")), "rows": N_IMAGES}


@dcase("predict: a real character class still globs", 0, "")
def _(t, i):
    return {**P(t, str(i / "00[0-2].png")), "rows": 3}


@dcase("predict: recursive glob never takes the output folder", 0, "")
def _(t, i):
    # the previous run's overlays lie under tmp/out, inside the glob's reach
    return {**P(t, str(t / "**" / "*.png")), "rows": N_IMAGES}


@dcase("predict: images inside the output folder", 2, "inside the output folder")
def _(t, i):
    return P(t, t / "out" / "overlays")


@dcase("predict: a folder named like an image is not an image", 0, "")
def _(t, i):
    (i / "dir.png").mkdir()
    return {**P(t, str(i / "*.png")), "rows": N_IMAGES}


@dcase("predict: a broken link named like an image is skipped", 0, "")
def _(t, i):
    os.symlink(t / "gone.png", i / "zz.png")
    return {**P(t, i), "rows": N_IMAGES}


@dcase("predict: a rerun with fewer images leaves no stale overlay", 0, "")
def _(t, i):
    (i / "005.png").unlink()
    (i / "004.png").unlink()
    return {**P(t, i), "rows": N_IMAGES - 2}


# --- references
dcase("predict: reference dir missing", 2, "--reference-dir")(
    lambda t, i: P(t, i, "--reference-dir", str(t / "refs")))
dcase("predict: reference dir empty names --reference-dir", 2, "--reference-dir")(
    lambda t, i: (t / "refs").mkdir() or P(t, i, "--reference-dir", str(t / "refs")))
dcase("predict: reference dir is empty text", 2, "--reference-dir")(lambda t, i: P(t, i, "--reference-dir", ""))
dcase("predict: reference glob matches nothing", 2, "--reference-dir")(
    lambda t, i: P(t, i, "--reference-dir", str(t / "refs" / "*.png")))
dcase("predict: references are the images", 2, "is also an image to score")(
    lambda t, i: P(t, i, "--reference-dir", str(i)))


def _reference_made_by(make):
    def case(t, i):
        image_folder(t / "refs", 2, seed=100)
        make(i / "001.png", t / "refs" / "good.png")
        return P(t, i, "--reference-dir", str(t / "refs"))
    return case


for _how, _make in (("a copy of", shutil.copy), ("a hard link to", os.link), ("a symlink to", os.symlink)):
    dcase(f"predict: a reference is {_how} an image", 2, "good.png")(_reference_made_by(_make))


@dcase("predict: an unreadable reference", 2, "bad.png")
def _(t, i):
    image_folder(t / "refs", 2, seed=100)
    (t / "refs" / "bad.png").write_bytes(b"\x89PNG\r\n")
    return P(t, i, "--reference-dir", str(t / "refs"))


# --- thresholds
dcase("predict: threshold file missing", 2, "t.json")(lambda t, i: P(t, i, "--threshold", str(t / "t.json")))
dcase("predict: threshold file not JSON", 2, "t.json")(lambda t, i: with_file(t, i, "t.json", "{", "--threshold"))
dcase("predict: threshold file foreign", 2, "t.json")(
    lambda t, i: with_file(t, i, "t.json", '{"value": 1}', "--threshold"))
dcase("predict: threshold file empty", 2, "t.json")(lambda t, i: with_file(t, i, "t.json", "", "--threshold"))
dcase("predict: threshold value NaN", 2, ("t.json", "finite"))(
    lambda t, i: with_file(t, i, "t.json", '{"format": "fiseclip-threshold/1", "value": NaN}', "--threshold"))
dcase("predict: threshold is a folder", 2, "thr")(
    lambda t, i: (t / "thr").mkdir() or P(t, i, "--threshold", str(t / "thr")))
dcase("predict: threshold number nan", 2, ("nan", "threshold"))(lambda t, i: P(t, i, "--threshold", "nan"))
dcase("predict: threshold number inf", 2, ("inf", "threshold"))(lambda t, i: P(t, i, "--threshold", "inf"))
dcase("predict: false-alarm rate 2", 2, "false-alarm rate 2")(lambda t, i: P(t, i, "--false-alarm-rate", "2"))
dcase("predict: false-alarm rate negative", 2, "-0.1")(lambda t, i: P(t, i, "--false-alarm-rate", "-0.1"))
dcase("predict: false-alarm rate nan", 2, "nan")(lambda t, i: P(t, i, "--false-alarm-rate", "nan"))
dcase("predict: a fixed threshold number works", 0, "")(lambda t, i: {**P(t, i, "--threshold", "0.5"),
                                                                       "rows": N_IMAGES})

# --- config values
dcase("predict: --set value out of range", 2, "alpha")(lambda t, i: P(t, i, "--set", "alpha=9"))
dcase("predict: --set unknown key", 2, "bogus_key")(lambda t, i: P(t, i, "--set", "bogus_key=1"))
dcase("predict: --set without =", 2, "alpha")(lambda t, i: P(t, i, "--set", "alpha"))
dcase("predict: negative batch size", 2, "batch size -1")(
    lambda t, i: P(t, i, cli=swap(CLI_TINY, "4", "-1")))
dcase("predict: batch size 0", 2, "batch size 0")(lambda t, i: P(t, i, cli=swap(CLI_TINY, "4", "0")))
dcase("predict: image size 0", 2, "image size 0")(lambda t, i: P(t, i, cli=swap(CLI_TINY, "28", "0")))
dcase("predict: batch size not a number", 2, "--batch-size")(lambda t, i: P(t, i, cli=swap(CLI_TINY, "4", "four")))
dcase("predict: unknown model", 2, "nosuchmodel")(
    lambda t, i: P(t, i, cli=swap(CLI_TINY, "fiseclip-tiny", "nosuchmodel")))
dcase("predict: weights file missing", 2, "w.safetensors")(
    lambda t, i: P(t, i, cli=swap(CLI_TINY, "none", str(t / "w.safetensors"))))
dcase("predict: params file missing", 2, "p.yaml")(lambda t, i: P(t, i, "--params", str(t / "p.yaml")))
dcase("predict: params file not YAML", 2, "p.yaml")(lambda t, i: with_file(t, i, "p.yaml", "a: [", "--params"))
dcase("predict: params file a list", 2, "p.yaml")(lambda t, i: with_file(t, i, "p.yaml", "- a\n", "--params"))
dcase("predict: params images not text", 2, "images")(
    lambda t, i: (t / "p.yaml").write_text("images: 3\n") and {"args": [
        "--params", str(t / "p.yaml"), "--class-name", "x", "--out", str(t / "out"), *CLI_TINY]})


# --- the output folder
@dcase("predict: out is a file", 2, "f")
def _(t, i):
    (t / "f").write_text("x")
    return {"args": ["--images", str(i), "--class-name", "x", "--out", str(t / "f"), *CLI_TINY],
            "after": lambda: (t / "f").read_text() == "x"}


dcase("predict: out under a file", 2, "is not writable")(
    lambda t, i: (t / "f").write_text("x") and {"args": ["--images", str(i), "--class-name", "x", "--out",
                                                         str(t / "f" / "sub"), *CLI_TINY]})


@dcase("predict: read-only output folder", 2, "out")
def _(t, i):
    if as_root():
        return {"skip": "root writes into read-only folders"}
    (t / "out").chmod(0o555)
    return {**P(t, i), "cleanup": lambda: (t / "out").chmod(0o755)}


@dcase("predict: lock path is a folder", 2, ".fiseclip.lock")
def _(t, i):
    (t / "out" / ".fiseclip.lock").unlink()
    (t / "out" / ".fiseclip.lock").mkdir()
    return {**P(t, i), "cleanup": lambda: (t / "out" / ".fiseclip.lock").rmdir(), "hidden_ok": True}


@dcase("predict: output folder in use", 2, "is in use by")
def _(t, i):
    return {**P(t, i), "cleanup": hold_output_lock(t / "out", command="fiseclip predict (test holder)")}


@dcase("predict: leftovers of a killed run are cleaned", 0, "")
def _(t, i):
    (t / "out" / ".fiseclip-staging-predict" / "overlays").mkdir(parents=True)
    (t / "out" / ".fiseclip-staging-predict" / "predictions.csv").write_text("half")
    return {**P(t, i), "rows": N_IMAGES}


@dcase("predict: the user's own files in --out are kept", 0, "")
def _(t, i):
    (t / "out" / "notes.txt").write_text("mine")
    return {**P(t, i), "rows": N_IMAGES, "extra_files": {"notes.txt"}}


def _fail_nth(n, exc):
    """A render_overlay that works n - 1 times, then raises `exc` (a run that fails part-way)."""
    import fiseclip_lib.decisions.predict as pred

    real, calls = pred.render_overlay, []

    def render(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*a, **k)
    return lambda mp: mp.setattr(pred, "render_overlay", render)


dcase("predict: full disk part-way through the overlays", 2, "No space left on device")(
    lambda t, i: {**P(t, i), "inject": _fail_nth(3, OSError(errno.ENOSPC, "No space left on device", "x.png"))})
dcase("predict: interrupted part-way", 130, "interrupted")(
    lambda t, i: {**P(t, i), "inject": _fail_nth(3, KeyboardInterrupt())})


@dcase("predict: full disk writing predictions.csv", 2, "No space left on device")
def _(t, i):
    import fiseclip_lib.decisions.predict as pred

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return {**P(t, i, "--save-maps"), "inject": lambda mp: mp.setattr(pred, "write_csv_atomic", full)}


@dcase("predict: full disk under the feature cache (SafetensorError)", 0, "No space left on device")
def _(t, i):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at path "
                              f"\"{filename}\"")
    cli = [a for a in CLI_TINY if a != "--no-feature-cache"] + ["--feature-cache", str(t / "fc")]
    return {**P(t, i, cli=cli), "inject": lambda mp: mp.setattr(safetensors.torch, "save_file", full),
            "rows": N_IMAGES}


@dcase("predict: full disk under the feature cache (OSError)", 0, "No space left on device")
def _(t, i):
    import fiseclip_lib.plumbing.cache as cache_mod


    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    cli = [a for a in CLI_TINY if a != "--no-feature-cache"] + ["--feature-cache", str(t / "fc")]
    return {**P(t, i, cli=cli), "inject": lambda mp: mp.setattr(cache_mod, "atomic_path", full), "rows": N_IMAGES}


@dcase("predict: HF_ENDPOINT accepts and never answers", 2, "sent no answer")
def _(t, i):
    import socket

    import fiseclip_lib.encoder.hub as hub_mod

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"

    def inject(mp):
        mp.setenv("HF_HOME", str(t / "hf"))
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setenv("HF_ENDPOINT", url)
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                     "https_proxy", "all_proxy"):
            mp.delenv(name, raising=False)
        mp.setattr(hub_mod, "ANSWER_TIMEOUT_S", 1.0)
    return {**P(t, i, cli=swap(CLI_TINY, "none", "hf-hub:org-x/silent")), "inject": inject,
            "cleanup": silent.close}


# --- streams
dcase("stream: bank size 0", 2, "--bank-size 0")(lambda t, i: P(t, i, "--stream", "--bank-size", "0"))
dcase("stream: bank size negative", 2, "--bank-size -3")(lambda t, i: P(t, i, "--stream", "--bank-size", "-3"))
dcase("stream: bank size not a number", 2, "--bank-size")(lambda t, i: P(t, i, "--stream", "--bank-size", "x"))
dcase("stream: an unreadable image", 2, "003.png")(
    lambda t, i: (i / "003.png").write_bytes(b"junk") and P(t, i, "--stream", "--bank-size", "2"))
dcase("stream: threshold value NaN", 2, ("t.json", "finite"))(
    lambda t, i: (t / "t.json").write_text('{"format": "fiseclip-threshold/1", "value": NaN}')
    and P(t, i, "--stream", "--threshold", str(t / "t.json")))
dcase("stream: references are the images", 2, "is also an image to score")(
    lambda t, i: P(t, i, "--stream", "--reference-dir", str(i)))
dcase("stream: empty reference dir", 2, "--reference-dir")(
    lambda t, i: (t / "refs").mkdir() or P(t, i, "--stream", "--reference-dir", str(t / "refs")))
dcase("stream: a complete stream run", 0, "")(lambda t, i: {**P(t, i, "--stream", "--bank-size", "2"),
                                                            "rows": N_IMAGES})
dcase("stream: --bank-size 1 without references says so", 0, ("bank size 1", "bank-size 1"))(
    lambda t, i: {**P(t, i, "--stream", "--bank-size", "1"), "rows": N_IMAGES})
dcase("stream: interrupted part-way", 130, "interrupted")(
    lambda t, i: {**P(t, i, "--stream", "--bank-size", "2"), "inject": _fail_nth(2, KeyboardInterrupt())})


# --- calibrate (previous threshold file: tmp/t.json, which a failure must leave as it was)
def C(t, *args, csv=None, raw=None):
    s = t / "s.csv"
    if raw is not None:
        s.write_bytes(raw)
    elif csv is not None:
        s.write_text(csv)
    return {"command": "calibrate", "args": ["--scores", str(s), "--out", str(t / "t.json"), *args]}


dcase("calibrate: scores missing", 2, "s.csv")(lambda t, i: C(t))
dcase("calibrate: scores is a folder", 2, "s.csv")(lambda t, i: (t / "s.csv").mkdir() or C(t))
dcase("calibrate: scores file empty", 2, "s.csv")(lambda t, i: C(t, csv=""))
dcase("calibrate: header only", 2, "s.csv")(lambda t, i: C(t, csv="score\n"))
dcase("calibrate: no score column", 2, "no score column")(lambda t, i: C(t, csv="a,b\n1,2\n"))
dcase("calibrate: not UTF-8", 2, "s.csv")(lambda t, i: C(t, raw=b"score\n\xff\xfe\n"))
dcase("calibrate: text in the score column", 2, "s.csv")(lambda t, i: C(t, csv="score\n1\nabc\n"))
dcase("calibrate: NaN score names the row", 2, ("row", "nan", "NaN"))(lambda t, i: C(t, csv="score\n1\nnan\n2\n"))
dcase("calibrate: infinite score names the row", 2, ("row", "inf"))(lambda t, i: C(t, csv="score\n1\ninf\n2\n"))
dcase("calibrate: labels not 0/1", 2, "labels must be 0")(lambda t, i: C(t, csv="score,label\n1,0\n2,7\n"))
dcase("calibrate: f1 without anomalies", 2, "needs both")(
    lambda t, i: C(t, "--method", "f1", csv="score,label\n1,0\n2,0\n"))
dcase("calibrate: unknown category", 2, "no category 'b'")(
    lambda t, i: C(t, "--category", "b", csv="score,category\n1,a\n"))
dcase("calibrate: unknown method", 2, "--method")(lambda t, i: C(t, "--method", "bogus", csv="score\n1\n2\n"))
dcase("calibrate: false-alarm rate 2", 2, "2")(lambda t, i: C(t, "--false-alarm-rate", "2", csv="score\n1\n2\n"))
dcase("calibrate: false-alarm rate nan", 2, "nan")(
    lambda t, i: C(t, "--false-alarm-rate", "nan", csv="score\n1\n2\n"))


@dcase("calibrate: out is a folder", 2, "is a folder")
def _(t, i):
    (t / "o").mkdir()
    return {**C(t, csv="score\n1\n2\n"), "args": ["--scores", str(t / "s.csv"), "--out", str(t / "o")]}


@dcase("calibrate: out under a file", 2, "is a file")
def _(t, i):
    (t / "f").write_text("x")
    return {**C(t, csv="score\n1\n2\n"), "args": ["--scores", str(t / "s.csv"), "--out", str(t / "f" / "t.json")]}


# --- sweep (previous sweep folder: tmp/out with a sweep.csv that a failure must leave as it was)
def S(t, grid: str | None, *args, name="g.yaml"):
    g = t / name
    if grid is not None:
        g.write_text(grid)
    return {"command": "sweep", "args": [str(g), "--out", str(t / "out"), "--no-progress", "--no-feature-cache",
                                         *args]}


GOOD_GRID = "dataset: mvtec\nroot: {root}\nmodel: fiseclip-tiny\npretrained: none\nimage_size: 28\n"
dcase("sweep: grid file missing", 2, "g.yaml")(lambda t, i: S(t, None))
dcase("sweep: grid not YAML", 2, "g.yaml")(lambda t, i: S(t, "a: ["))
dcase("sweep: grid empty", 2, "g.yaml")(lambda t, i: S(t, ""))
dcase("sweep: grid a list", 2, "g.yaml")(lambda t, i: S(t, "- 1\n"))
dcase("sweep: unknown field", 2, "bogus")(lambda t, i: S(t, GOOD_GRID.format(root=t) + "bogus: 1\n"))
dcase("sweep: empty list of values", 2, "alpha")(lambda t, i: S(t, GOOD_GRID.format(root=t) + "alpha: []\n"))
dcase("sweep: value out of range", 2, "alpha")(lambda t, i: S(t, GOOD_GRID.format(root=t) + "alpha: [0.5, 9]\n"))
dcase("sweep: root missing", 2, "nope")(lambda t, i: S(t, GOOD_GRID.format(root=t / "nope")))
dcase("sweep: --workers 0", 2, "--workers")(lambda t, i: S(t, GOOD_GRID.format(root=t), "--executor", "dask",
                                                           "--workers", "0"))
dcase("sweep: --connect-timeout 0", 2, "--connect-timeout")(
    lambda t, i: S(t, GOOD_GRID.format(root=t), "--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "0"))


@dcase("sweep: out is a file", 2, "f")
def _(t, i):
    (t / "f").write_text("x")
    spec = S(t, GOOD_GRID.format(root=make_mvtec_tree(t / "data", n_good=3)))
    spec["args"][2] = str(t / "f")
    return spec


# ------------------------------------------------------------------------------------------- its runner

def _snapshot(folder) -> dict:
    """Every file under `folder` (the lock's contents aside) -> its bytes."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".fiseclip.lock"}


@pytest.fixture(scope="module")
def previous_predict(tmp_path_factory):
    """A complete previous `predict` run (8 images, so a rerun differs from it) to copy into each case."""
    t = tmp_path_factory.mktemp("previous")
    imgs = image_folder(t / "imgs", 8, seed=40)
    assert main(["predict", "--images", str(imgs), "--class-name", "x", "--out", str(t / "out"), *CLI_TINY,
                 "--save-maps"]) == 0
    return t / "out"


@pytest.mark.parametrize("name", list(DCASES))
def test_decision_fault(name, tmp_path, capsys, monkeypatch, previous_predict):
    setup, expect, text = DCASES[name]
    imgs = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    shutil.copytree(previous_predict, out)
    (tmp_path / "t.json").write_text("PREVIOUS threshold\n")
    spec = setup(tmp_path, imgs)
    if spec.get("skip"):
        pytest.skip(spec["skip"])
    command = spec.get("command", "predict")
    state = tmp_path / "t.json" if command == "calibrate" else out
    if command == "sweep":
        shutil.rmtree(out)
        out.mkdir()
        (out / "sweep.csv").write_text("PREVIOUS sweep\n")
    before = _snapshot(state)
    if "inject" in spec:
        spec["inject"](monkeypatch)
    capsys.readouterr()
    texts = text if isinstance(text, tuple) else (text,)
    run_checked([command, *spec["args"]], spec, capsys, expect, texts, ("fiseclip: error:", "fiseclip: interrupted"))
    if expect != 0:
        # the previous run is intact, byte for byte, and nothing half-written is left beside it
        assert _snapshot(state) == before
        if state.is_dir() and not spec.get("hidden_ok"):
            hidden = [p.name for p in state.rglob(".*") if p.name != ".fiseclip.lock"]
            assert not hidden, hidden
        if "after" in spec:
            assert spec["after"]()
        return
    # exactly this run's outputs: one overlay per row, nothing stale (the previous run had 8 images and maps)
    df = pd.read_csv(out / "predictions.csv")
    assert len(df) == spec["rows"]
    visible = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert visible == {"predictions.csv", "config.json", *df.overlay, *spec.get("extra_files", ())}
    assert not [p.name for p in out.rglob(".*") if p.name != ".fiseclip.lock"]
    assert json.loads((out / "config.json").read_text())["images"] == spec["rows"]


def test_the_decision_fault_table_is_large_enough():
    assert len(DCASES) >= 60
    kinds = {n.split(":")[0] for n in DCASES}
    assert kinds == {"predict", "stream", "calibrate", "sweep"}


def test_images_in_the_output_folder_itself_are_read_without_its_outputs(tmp_path, capsys):
    """--out equal to the images folder: its images are scored, its overlays/ never, twice in a row."""
    imgs = image_folder(tmp_path / "lot")
    for _ in range(2):
        assert main(["predict", "--images", str(imgs), "--class-name", "x", "--out", str(imgs), *CLI_TINY]) == 0
        df = pd.read_csv(imgs / "predictions.csv")
        assert sorted(df.path) == [f"{i:03d}.png" for i in range(N_IMAGES)]
        assert len(list((imgs / "overlays").glob("*.png"))) == N_IMAGES
