"""Bad inputs: each gives a one-line error naming the problem, or completes with the documented warning; a run
killed anywhere resumes to the same bytes; encode_batch and the feature cache change no byte of a run."""
import json
import shutil
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fiseclip_lib.cli import main
from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.errors import FiseclipError
from helpers import Fresh, cli, make_mvtec_tree, run_then_pause


def img_path(root, cat="bottle", defect="crack", i=0):
    return root / cat / "test" / defect / f"{i:03d}.png"


def rewrite(path, mode):
    arr = np.asarray(Image.open(path).convert("RGB"))
    if mode == "I;16":
        Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(arr).convert(mode).save(path)


def corrupt(path):
    path.write_bytes(b"not an image at all")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resize_mask(root):
    m = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    Image.open(m).resize((48, 48), Image.NEAREST).save(m)


def only(root, keep_defects):
    for cat in ("bottle", "screw"):
        for d in (root / cat / "test").iterdir():
            if d.name not in keep_defects:
                shutil.rmtree(d)
                shutil.rmtree(root / cat / "ground_truth" / d.name, ignore_errors=True)


def empty_category(root):
    for d in (root / "bottle" / "test").iterdir():
        for f in d.iterdir():
            f.unlink()
    shutil.rmtree(root / "bottle" / "ground_truth")


def good_mask(root):
    (root / "bottle" / "ground_truth" / "good").mkdir()
    shutil.copy(root / "bottle" / "ground_truth" / "crack" / "000_mask.png",
                root / "bottle" / "ground_truth" / "good" / "000_mask.png")


# name, how to break the tree, extra CLI args, expected ("error" | "ok"), text expected in stderr/stdout
CASES = [
    ("unreadable image", lambda r: corrupt(img_path(r)), [], "error", "000.png cannot be read"),
    ("truncated image", lambda r: truncate(img_path(r)), [], "error", "000.png cannot be read"),
    ("grayscale image", lambda r: rewrite(img_path(r), "L"), [], "ok", ""),
    ("rgba image", lambda r: rewrite(img_path(r), "RGBA"), [], "ok", ""),
    ("palette image", lambda r: rewrite(img_path(r), "P"), [], "ok", ""),
    ("16-bit image", lambda r: rewrite(img_path(r), "I;16"), [], "ok", ""),
    ("mask of another size", resize_mask, [], "ok", "resized with nearest"),
    ("unreadable mask", lambda r: corrupt(r / "bottle" / "ground_truth" / "crack" / "000_mask.png"), [], "error",
     "000_mask.png cannot be read"),
    ("anomalous image without mask", lambda r: (r / "bottle" / "ground_truth" / "hole" / "000_mask.png").unlink(), [],
     "ok", "without mask"),
    ("mask for a good image", good_mask, [], "ok", "normal images have masks"),
    ("empty category", empty_category, [], "ok", "category bottle has no test images"),
    ("only normal images", lambda r: only(r, {"good"}), [], "ok", "only normal images"),
    ("only anomalous images", lambda r: only(r, {"crack", "hole"}), [], "ok", "only anomalous images"),
    ("unknown dataset", None, ["--dataset", "kolektor"], "error", "--dataset: unknown dataset 'kolektor'"),
    ("unknown category", None, ["--categories", "cable"], "error", "unknown categories ['cable']"),
    ("unknown model", None, ["--model", "ViT-Q-1"], "error", "unknown model 'ViT-Q-1'"),
    ("unknown method", None, ["--method", "patchcore"], "error", "unknown method 'patchcore'"),
    ("unknown option", None, ["--set", "colour=blue"], "error", "unknown option(s) ['colour']"),
    ("bad option value", None, ["--set", "alpha=lots"], "error", "alpha='lots' is not a valid float"),
    ("root missing", lambda r: shutil.rmtree(r), [], "error", "does not exist"),
    ("batch size 0", None, ["--batch-size", "0"], "error", "batch size 0 must be >= 1"),
    ("batch size larger than category", None, ["--batch-size", "50"], "ok", "scored as one batch"),
    ("image size not a multiple of the patch", None, ["--image-size", "60"], "error", "not a multiple of the patch size"),
    ("cuda absent", None, ["--device", "cuda"], "ok" if torch.cuda.is_available() else "error",
     "" if torch.cuda.is_available() else "CUDA is not available"),
    ("output folder not writable", None, ["--out", "__file__/sub"], "error", "is not writable"),
]


@pytest.mark.parametrize("name,breaker,extra,expect,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, name, breaker, extra, expect, text):
    root = make_mvtec_tree(tmp_path / "data")
    if breaker:
        breaker(root)
    out = tmp_path / "out"
    if "__file__/sub" in extra:
        (tmp_path / "a_file").write_text("x")
        extra = [e.replace("__file__", str(tmp_path / "a_file")) for e in extra]
    args = ["run", "--dataset", "mvtec", "--root", str(root), "--model", "fiseclip-tiny", "--pretrained", "none",
            "--image-size", "28", "--batch-size", "4", "--out", str(out), "--no-progress", "--no-feature-cache"]
    try:
        code = main(args + extra)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    both = captured.out + captured.err
    if expect == "error":
        assert code == 2, both
        err_lines = [l for l in captured.err.strip().splitlines() if not l.startswith("warning:")]
        assert len(err_lines) == 1 and err_lines[0].startswith("fiseclip: error:"), captured.err
        assert text in err_lines[0]
        assert "Traceback" not in both
    else:
        assert code == 0, both
        assert text in both
        metrics = pd.read_csv(out / "metrics.csv")
        assert "mean" in set(metrics.category)
        if name.startswith("only "):
            assert metrics.image_auroc.isna().all()
        if name == "only anomalous images":
            assert metrics.pixel_auroc.notna().all()
        if name == "anomalous image without mask":
            row = metrics.set_index("category").loc["bottle"]
            assert np.isnan(row.pixel_auroc) and not np.isnan(row.image_auroc)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FiseclipError):
        main(["--debug", "run", "--dataset", "mvtec", "--root", str(tmp_path / "none"), "--model", "fiseclip-tiny",
              "--pretrained", "none", "--image-size", "28", "--out", str(tmp_path / "o")])


def test_nan_features_are_a_clear_error(tiny_encoder, mvtec_tree):
    class NaNEncoder:
        def __getattr__(self, name):
            return getattr(tiny_encoder, name)

        def __call__(self, pixels, **kw):
            f = tiny_encoder(pixels, **kw)
            f.layers = {k: v * float("nan") for k, v in f.layers.items()}
            return f

    det = Detector(FiseConfig(model="fiseclip-tiny", pretrained="none", image_size=tiny_encoder.image_size, device="cpu"), NaNEncoder())
    path = str(img_path(mvtec_tree))
    with pytest.raises(FiseclipError, match="NaN or inf in the encoder.s features of .*000.png"):
        det.score_batch([path, path], "bottle")


# Where the run is killed: between categories; inside the atomic write of the second category's result; inside
# the write of scores.csv after the first category (its 1st write is the empty one at the start; config.json
# already rewritten, metrics.csv removed).
@pytest.mark.slow  # a fresh process, killed, then a second one
@pytest.mark.parametrize("where", ["category", "gravel.json@1", "scores.csv@2"])
def test_killed_run_resumes_to_identical_metrics(tmp_path, where):
    from fiseclip_lib.evaluation.demo import build_demo

    root = build_demo(tmp_path / "demo", categories=("textile", "brick", "gravel"), n_good=6, n_defect=3,
                      n_train=0, size=64)
    args = ["run", "--dataset", "demo", "--root", str(root), "--model", "fiseclip-tiny", "--pretrained", "none",
            "--image-size", "56", "--batch-size", "4", "--no-progress", "--no-feature-cache"]
    full, out, marker = tmp_path / "full", tmp_path / "killed", tmp_path / "paused.pid"
    # one process: the uninterrupted reference run, then the run to kill, paused at `where`
    proc = Fresh(run_then_pause, str(marker), args + ["--out", str(full)], args + ["--out", str(out)], where)
    deadline = time.time() + 300
    while not (marker.exists() and marker.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.wait()  # paused, not finished or failed
    assert int(marker.read_text()) == proc.pid
    proc.kill()  # SIGKILL
    assert proc.wait()[0] == -signal.SIGKILL
    done = sorted(p.name for p in (out / "categories").glob("[!.]*.json"))
    assert done == ["brick.json"], done  # the first category finished, the second not
    debris = [p for p in out.rglob(".*.tmp*")]
    assert bool(debris) == (where != "category"), debris  # a write cut short leaves its temporary file
    for p in (out / "categories").glob("*.json"):  # every file a later run would trust is complete
        json.loads(p.read_text())
    code, text = Fresh(cli, args + ["--out", str(out), "--resume"]).wait()
    assert code == 0, text
    assert "reused finished result" in text
    for name in ("metrics.csv", "scores.csv"):
        assert (out / name).read_bytes() == (full / name).read_bytes()
    assert not list(out.rglob(".*.tmp*"))  # the resumed run removed the killed run's temporary files


@pytest.mark.parametrize("method", ["fiseclip", "musc"])
def test_encode_batch_and_cache_change_no_byte(small_demo, tmp_path, method):
    """encode_batch, a cold or warm feature cache and --no-feature-cache give byte-identical CSVs; the run's
    record says what ran."""
    base = ["run", "--dataset", "demo", "--root", str(small_demo), "--model", "fiseclip-tiny", "--pretrained",
            "none", "--image-size", "112", "--batch-size", "6", "--method", method, "--no-progress"]
    cache = ["--feature-cache", str(tmp_path / "fc")]
    variants = {
        "nocache-8": ["--no-feature-cache", "--set", "encode_batch=8"],
        "nocache-1": ["--no-feature-cache", "--set", "encode_batch=1"],
        "cold-3": [*cache, "--set", "encode_batch=3"],
        "warm-5": [*cache, "--set", "encode_batch=5"],
    }
    outputs = {}
    for name, extra in variants.items():
        out = tmp_path / name
        assert main(base + ["--out", str(out)] + extra) == 0
        outputs[name] = {f: (out / f).read_bytes() for f in ("metrics.csv", "scores.csv")}
        if name == "warm-5":
            conf = json.loads((out / "config.json").read_text())
            assert conf["feature_cache"]["misses"] == 0 and conf["feature_cache"]["hits"] > 0
    first = outputs.pop("nocache-8")
    for name, files in outputs.items():
        assert files == first, name
    # what the run wrote: one row per category and the mean, every image once, in batches of 6 or (musc) the
    # whole category, random weights labelled as such
    out = tmp_path / "nocache-8"
    metrics, scores = pd.read_csv(out / "metrics.csv"), pd.read_csv(out / "scores.csv")
    assert list(metrics["category"]) == ["brick", "textile", "mean"]
    assert (metrics["pretrained"] == False).all()  # noqa: E712
    assert list(scores.columns) == ["path", "category", "label", "defect", "score", "batch"]
    assert len(scores) == len(set(scores["path"])) == 26
    assert set(scores["batch"]) == ({0} if method == "musc" else {0, 1})  # 13 images: 6 + 7 (a last 1 merged)
    conf = json.loads((out / "config.json").read_text())
    assert conf["weights_note"].startswith("RANDOM WEIGHTS")
    assert conf["config"]["method"] == method and "git_commit" in conf and "wall_time_s" in conf
