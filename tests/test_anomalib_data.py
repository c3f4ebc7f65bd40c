"""evaluation/anomalib_data.py: every anomalib image dataset (`anomalib:<name>`) and AnomalyCLIP/AdaCLIP's
meta.json (`metajson`), each on a small synthetic tree in its published layout, read and then run through
`fiseclip run` with the CNN. The trees record what they hold (label, defect, mask drawn in memory); a reader
passes when the samples, and the masks the harness evaluates against, equal that record. The anomalib cases
skip without the extra (`pip install 'fiseclip[anomalib]'`); metajson needs nothing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fiseclip_lib.cli import main
from fiseclip_lib.errors import DatasetError, FiseclipError
from fiseclip_lib.evaluation import anomalib_data as A
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.evaluation.run import eval_masks
from helpers import make_mvtec_tree

SIZE = 64  # images and masks at the CNN's input size: the evaluated masks are the drawn ones, unresized
CNN = ["--model", "efficientnet-lite0", "--pretrained", "none", "--method", "musc", "--image-size", str(SIZE),
       "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-feature-cache"]


def needs_anomalib():
    pytest.importorskip("anomalib", reason="the anomalib extra is not installed (pip install 'fiseclip[anomalib]')")


class Tree:
    """A synthetic dataset tree and the record of what it holds: {image path: (label, defect, mask or None)}."""

    def __init__(self, root: Path):
        self.root, self.expected, self.seed = root, {}, 0

    def image(self, rel: str, label: int, defect: str, mask=None, mode="RGB") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.seed += 1
        arr = np.random.default_rng(self.seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(path)
        self.expected[str(path)] = (label, defect, mask)
        return path

    def mask(self, rel: str, box, value=255, fmt=None) -> np.ndarray:
        """Draw a mask file with `value` inside `box` (x0, y0, x1, y1); return the defect as bools."""
        m = np.zeros((SIZE, SIZE), np.uint8)
        x0, y0, x1, y1 = box
        m[y0:y1, x0:x1] = value
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(path, format=fmt)
        return m != 0

    def empty_mask(self, rel: str, fmt=None) -> None:
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(self.root / rel, format=fmt)


def box(k: int):
    """A different defect box per k."""
    return (4 + 6 * (k % 5), 8 + 3 * (k % 7), 20 + 6 * (k % 5), 22 + 3 * (k % 7))


# ------------------------------------------------------------------------------------------- the layouts

def mvtecad2_tree(root: Path) -> Tree:
    """MVTec AD 2: <cat>/test_public/{good,bad}, masks test_public/ground_truth/bad/<stem>_mask.png; the private
    test sets (no labels) and train/validation are not test images."""
    t = Tree(root)
    for cat in ("can", "vial"):
        base = f"{cat}/test_public"
        for i in range(3):
            t.image(f"{base}/good/{i:03d}_regular.png", 0, "good")
        for i in range(3):
            m = t.mask(f"{base}/ground_truth/bad/{i:03d}_regular_mask.png", box(i))
            t.image(f"{base}/bad/{i:03d}_regular.png", 1, "bad", m)
        for rel in (f"{cat}/train/good/000_regular.png", f"{cat}/validation/good/000_regular.png",
                    f"{cat}/test_private/000_regular.png", f"{cat}/test_private_mixed/000_regular.png"):
            t.image(rel, 0, "good")
            t.expected.pop(str(root / rel))
    return t


def mvtec_loco_tree(root: Path) -> Tree:
    """MVTec LOCO: <cat>/test/<defect>/NNN.png, masks <cat>/ground_truth/<defect>/NNN/000.png, 001.png, ...
    (one per defect region, values other than 255 too): the image's mask is their union."""
    t = Tree(root)
    cat = "breakfast_box"
    t.image(f"{cat}/train/good/000.png", 0, "good")
    t.image(f"{cat}/validation/good/000.png", 0, "good")
    t.expected = {}
    for i in range(3):
        t.image(f"{cat}/test/good/{i:03d}.png", 0, "good")
    for i in range(3):  # logical anomalies: two or three masks each, values 255 and 1
        parts = [t.mask(f"{cat}/ground_truth/logical_anomalies/{i:03d}/{k:03d}.png", box(i + 2 * k), value=v)
                 for k, v in enumerate((255, 1, 7)[:2 + i % 2])]
        t.image(f"{cat}/test/logical_anomalies/{i:03d}.png", 1, "logical_anomalies", np.logical_or.reduce(parts))
    for i in range(2):  # structural: one mask each
        m = t.mask(f"{cat}/ground_truth/structural_anomalies/{i:03d}/000.png", box(i + 5))
        t.image(f"{cat}/test/structural_anomalies/{i:03d}.png", 1, "structural_anomalies", m)
    return t


def btech_tree(root: Path) -> Tree:
    """BTech: <01|02|03>/test/{ok,ko}/NNNN.bmp, masks <cat>/ground_truth/ko/NNNN.png."""
    t = Tree(root)
    t.image("01/train/ok/0000.bmp", 0, "good")
    t.expected = {}
    for i in range(3):
        t.image(f"01/test/ok/{i:04d}.bmp", 0, "good")
    for i in range(3):
        m = t.mask(f"01/ground_truth/ko/{i:04d}.png", box(i))
        t.image(f"01/test/ko/{i:04d}.bmp", 1, "ko", m)
    return t


def mpdd_tree(root: Path) -> Tree:
    """MPDD: MVTec AD's layout, <cat>/test/<defect>/NNN.png, <cat>/ground_truth/<defect>/NNN_mask.png."""
    t = Tree(root)
    cat = "bracket_black"
    t.image(f"{cat}/train/good/000.png", 0, "good")
    t.expected = {}
    for i in range(3):
        t.image(f"{cat}/test/good/{i:03d}.png", 0, "good")
    for i, defect in enumerate(("hole", "hole", "scratches")):
        m = t.mask(f"{cat}/ground_truth/{defect}/{i:03d}_mask.png", box(i))
        t.image(f"{cat}/test/{defect}/{i:03d}.png", 1, defect, m)
    return t


def realiad_tree(root: Path, resolutions=("256",)) -> Tree:
    """Real-IAD: realiad_jsons/realiad_jsons/<cat>.json lists the images of realiad_<res>/<cat>/ with their
    anomaly_class ("OK": normal) and mask_path (null for normal ones)."""
    t = Tree(root)
    cat = "audiojack"
    for res in resolutions:
        t.expected = {}
        entries = {"train": [], "test": []}
        img = f"OK/S0000/{cat}_0000_OK_C1_20231021130325.jpg"
        t.image(f"realiad_{res}/{cat}/{img}", 0, "good")
        entries["train"].append({"category": cat, "anomaly_class": "OK", "image_path": img, "mask_path": None})
        t.expected = {}
        for i in range(3):
            img = f"OK/S{i + 1:04d}/{cat}_{i + 1:04d}_OK_C{i + 1}_20231021130325.jpg"
            t.image(f"realiad_{res}/{cat}/{img}", 0, "good")
            entries["test"].append({"category": cat, "anomaly_class": "OK", "image_path": img, "mask_path": None})
        for i, kind in enumerate(("AK", "QS", "AK")):
            stem = f"NG/{kind}/S{i + 10:04d}/{cat}_{i + 10:04d}_NG_C1_20231021130325"
            m = t.mask(f"realiad_{res}/{cat}/{stem}.png", box(i))
            t.image(f"realiad_{res}/{cat}/{stem}.jpg", 1, kind, m)
            entries["test"].append({"category": cat, "anomaly_class": kind, "image_path": f"{stem}.jpg",
                                    "mask_path": f"{stem}.png"})
        jsons = root / "realiad_jsons" / "realiad_jsons"
        jsons.mkdir(parents=True, exist_ok=True)
        (jsons / f"{cat}.json").write_text(json.dumps({"meta": {"prefix": ""}, **entries}))
    return t


def kolektor_tree(root: Path) -> Tree:
    """KolektorSDD: kosNN/PartN.jpg with PartN_label.bmp beside; an all-zero label is a normal image.
    anomalib keeps 80 % of the normal images for training (its fixed split), so only some are test images."""
    t = Tree(root)
    k = 0
    for folder, parts in (("kos01", 8), ("kos02", 5)):
        for p in range(parts):
            rel = f"{folder}/Part{p}"
            if k in (2, 7, 11):
                m = t.mask(f"{rel}_label.bmp", box(k), fmt="BMP")
                t.image(f"{rel}.jpg", 1, "Bad", m)  # anomalib's label
            else:
                t.empty_mask(f"{rel}_label.bmp", fmt="BMP")
                t.image(f"{rel}.jpg", 0, "good")
            k += 1
    return t


def visa_tree(root: Path) -> Tree:
    """anomalib's VisA: its datamodule's conversion, <root>/visa_pytorch/<cat>/test/{good,bad}, masks
    ground_truth/bad/NNN.png with 0/1 values (VisA's own convention)."""
    t = Tree(root)
    for cat in ("candle", "pcb1"):
        base = f"visa_pytorch/{cat}"
        for i in range(3):
            t.image(f"{base}/test/good/{i:03d}.JPG", 0, "good")
        for i in range(3):
            m = t.mask(f"{base}/ground_truth/bad/{i:03d}.png", box(i), value=1)
            t.image(f"{base}/test/bad/{i:03d}.JPG", 1, "bad", m)
    return t


LAYOUTS = {"mvtecad2": mvtecad2_tree, "mvtec_loco": mvtec_loco_tree, "btech": btech_tree, "mpdd": mpdd_tree,
           "realiad": realiad_tree, "kolektor": kolektor_tree, "visa": visa_tree}


# ------------------------------------------------------------------------------------------- checks

def check_samples(samples: list[D.Sample], tree: Tree, subset: bool = False) -> None:
    """Labels, defects and the evaluated masks (the harness's own path: run.eval_masks) equal the record."""
    got = {s.path: s for s in samples}
    if subset:  # Kolektor: anomalib's split keeps part of the normal images for training
        assert set(got) <= set(tree.expected)
        assert {p for p, e in tree.expected.items() if e[0] == 1} <= set(got)
    else:
        assert set(got) == set(tree.expected)
    for path, s in got.items():
        label, defect, mask = tree.expected[path]
        assert (s.label, s.defect) == (label, defect), path
        if label == 0:
            assert s.mask is None, path
            continue
        evaluated = eval_masks([s], SIZE)[0]
        assert evaluated.shape == mask.shape and (evaluated == mask).all(), f"mask of {path}"


def run_cli(tmp_path: Path, dataset: str, root: Path, tree: Tree, subset: bool = False) -> pd.DataFrame:
    """`fiseclip run` on the tree: every test image scored with its label and defect, pixel metrics defined."""
    out = tmp_path / "out"
    assert main(["run", "--dataset", dataset, "--root", str(root), "--out", str(out), *CNN]) == 0
    scores = pd.read_csv(out / "scores.csv")
    got = {str(Path(root) / p): (label, defect) for p, label, defect in zip(scores.path, scores.label, scores.defect)}
    want = {p: e[:2] for p, e in tree.expected.items()}
    if subset:
        assert set(got) <= set(want) and {p for p, e in want.items() if e[0] == 1} <= set(got)
        want = {p: want[p] for p in got}
    assert got == want
    metrics = pd.read_csv(out / "metrics.csv").set_index("category")
    assert metrics.drop("mean").pixel_auroc.notna().all() and metrics.drop("mean").image_auroc.notna().all()
    assert json.loads((out / "config.json").read_text())["dataset"] == dataset
    return metrics


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_anomalib_layout_reads_labels_and_masks_and_runs(name, tmp_path, no_network, monkeypatch):
    needs_anomalib()
    monkeypatch.setenv("FISECLIP_FEATURE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / name
    tree = LAYOUTS[name](root)
    subset = name == "kolektor"
    samples = D.load_dataset(A.PREFIX + name, root)
    check_samples(samples, tree, subset)
    if name == "kolektor":
        assert {s.category for s in samples} == {"kolektor"} and any(s.label == 0 for s in samples)
    if name == "mvtec_loco":  # an image with several masks: its mask is their folder, read as their union
        several = [s for s in samples if s.mask and Path(s.mask).is_dir()]
        assert several and all(len(list(Path(s.mask).glob("*.png"))) > 1 for s in several)
        assert not (tmp_path / "cache").exists()  # nothing written
        assert D.load_dataset(A.PREFIX + name, root) == samples
    run_cli(tmp_path, A.PREFIX + name, root, tree, subset)


def test_anomalib_mvtecad_reads_what_our_own_mvtec_reader_reads(tmp_path, no_network):
    """Two independent readers of one layout agree, file by file and mask by mask."""
    needs_anomalib()
    root = make_mvtec_tree(tmp_path / "mv")
    ours, theirs = D.load_dataset("mvtec", root), D.load_dataset("anomalib:mvtecad", root, ["screw"])
    assert theirs == [s for s in ours if s.category == "screw"]


def test_realiad_resolution_is_the_one_there_or_named(tmp_path, no_network):
    needs_anomalib()
    root = tmp_path / "riad"
    tree = realiad_tree(root, resolutions=("256", "512"))  # the record holds the last: 512
    with pytest.raises(DatasetError, match="several resolutions.*anomalib:realiad:256, anomalib:realiad:512"):
        D.load_dataset("anomalib:realiad", root)
    check_samples(D.load_dataset("anomalib:realiad:512", root), tree)
    with pytest.raises(DatasetError, match="no folder realiad_1024"):
        D.load_dataset("anomalib:realiad:1024", root)


def test_anomalib_errors_are_one_line(tmp_path, no_network, monkeypatch):
    needs_anomalib()
    with pytest.raises(DatasetError, match=f"dataset root {tmp_path / 'none'} does not exist"):
        D.load_dataset("anomalib:mvtec_loco", tmp_path / "none")
    with pytest.raises(FiseclipError, match="unknown anomalib dataset 'anomalib:loco'.*anomalib:mvtec_loco"):
        D.load_dataset("anomalib:loco", tmp_path)
    raw = tmp_path / "visa_raw"
    (raw / "split_csv").mkdir(parents=True)
    with pytest.raises(DatasetError, match="raw VisA.*use --dataset visa"):
        D.load_dataset("anomalib:visa", raw)
    # LOCO: an anomalous image whose mask folder is missing is anomalib's mismatch, named in one line
    root = tmp_path / "loco"
    mvtec_loco_tree(root)
    import shutil

    shutil.rmtree(root / "breakfast_box" / "ground_truth" / "structural_anomalies" / "001")
    with pytest.raises(DatasetError, match="MVTecLOCODataset cannot read .*breakfast_box") as e:
        D.load_dataset("anomalib:mvtec_loco", root)
    assert "\n" not in str(e.value)
    # BTech: anomalib lists a mask it never opens; a missing one is named as a mask, not as an unreadable image
    root = tmp_path / "btech"
    btech_tree(root)
    gone = root / "01" / "ground_truth" / "ko" / "0001.png"
    gone.unlink()
    with pytest.raises(DatasetError, match=f"mask {gone} of anomalous image .* does not exist"):
        D.load_dataset("anomalib:btech", root)
    # without the extra: one line saying how to install it
    monkeypatch.setitem(__import__("sys").modules, "anomalib.data.datasets.image.btech", None)
    with pytest.raises(FiseclipError, match=r"pip install 'fiseclip\[anomalib\]'"):
        D.load_dataset("anomalib:btech", tmp_path)


def test_dataset_names_are_checked_without_anomalib(tmp_path, capsys):
    """Names are checked before anything is read, by the same rule for run, params files and sweeps."""
    assert D.check_dataset("anomalib:mvtecad2") == "anomalib:mvtecad2"
    with pytest.raises(FiseclipError, match=r"unknown dataset 'kolektor' \(anomalib's: anomalib:kolektor\)"):
        D.check_dataset("kolektor")
    with pytest.raises(FiseclipError, match="only anomalib:realiad takes a variant"):
        D.check_dataset("anomalib:btech:256")
    assert main(["run", "--dataset", "anomalib:nope", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("fiseclip: error: --dataset: unknown anomalib dataset")


# ------------------------------------------------------------------------------------------- meta.json

def write_meta(root: Path, samples: list[D.Sample]) -> Path:
    """meta.json as AnomalyCLIP's and AdaCLIP's generators write it for an MVTec-layout root."""
    index: dict = {"train": {}, "test": {}}
    for s in samples:
        rel = lambda p: str(Path(p).relative_to(root))  # noqa: E731
        index["test"].setdefault(s.category, []).append({
            "img_path": rel(s.path), "mask_path": rel(s.mask) if s.mask else "", "cls_name": s.category,
            "specie_name": s.defect, "anomaly": s.label})
    (root / "meta.json").write_text(json.dumps(index, indent=4))
    return root / "meta.json"


def test_metajson_reads_what_the_mvtec_reader_reads_and_runs(tmp_path):
    root = make_mvtec_tree(tmp_path / "mv", size=SIZE)
    ours = D.load_dataset("mvtec", root)
    write_meta(root, ours)
    assert D.load_dataset("metajson", root) == ours
    assert D.load_dataset("metajson", root, ["screw"]) == [s for s in ours if s.category == "screw"]
    tree = Tree(root)
    tree.expected = {s.path: (s.label, s.defect, None) for s in ours}
    run_cli(tmp_path, "metajson", root, tree)


def test_metajson_masks_any_nonzero_pixel_and_bad_files_are_one_line(tmp_path):
    root = tmp_path / "meta"
    t = Tree(root)
    t.image("a/test/good/0.png", 0, "good")
    m = t.mask("a/gt/bad/0.png", box(1), value=1)
    t.image("a/test/bad/0.png", 1, "bad", m)
    entries = [{"img_path": "a/test/good/0.png", "mask_path": "", "cls_name": "a", "specie_name": "good", "anomaly": 0},
               {"img_path": "a/test/bad/0.png", "mask_path": "a/gt/bad/0.png", "cls_name": "a", "specie_name": "bad",
                "anomaly": 1}]
    meta = root / "meta.json"
    meta.write_text(json.dumps({"test": {"a": entries}}))
    check_samples(D.load_dataset("metajson", root), t)
    for text, culprit in [("{", "not valid JSON"), ('{"train": {}}', '"test" mapping'),
                          (json.dumps({"test": {"a": [{"img_path": "x.png", "anomaly": 0}]}}),
                           "x.png, which does not exist"),
                          (json.dumps({"test": {"a": [{"img_path": entries[0]["img_path"], "anomaly": "yes"}]}}),
                           r"test/a\[0\] needs img_path"),
                          (json.dumps({"test": {"a": [{**entries[1], "mask_path": ["a/gt/bad/0.png"]}]}}),
                           r"test/a\[0\]: mask_path must be text"),
                          (json.dumps({"test": {"a": [entries[1], {**entries[1], "anomaly": 0}]}}),
                           r"test/a\[1\] lists a/test/bad/0.png again \(first at test/a\[0\]\)")]:
        meta.write_text(text)
        with pytest.raises(DatasetError, match=culprit):
            D.load_dataset("metajson", root)
    meta.write_bytes(b"\xef\xbb\xbf" + json.dumps({"test": {"a": entries}}).encode())  # a byte-order mark
    check_samples(D.load_dataset("metajson", root), t)
    with pytest.raises(DatasetError, match="is a file; pass --root to the folder that holds it"):
        D.load_dataset("metajson", meta)
    meta.unlink()
    with pytest.raises(DatasetError, match="meta.json does not exist"):
        D.load_dataset("metajson", root)


def test_params_files_and_sweeps_take_the_new_names(tmp_path):
    """`dataset:` in a params file and in a sweep grid's `datasets:` accepts metajson and anomalib:<name> alike."""
    root = make_mvtec_tree(tmp_path / "mv", categories=("bottle",), size=SIZE)
    ours = D.load_dataset("mvtec", root)
    write_meta(root, ours)
    params = tmp_path / "p.yaml"
    params.write_text(f"dataset: metajson\nroot: {root}\n")
    out = tmp_path / "run"
    assert main(["run", "--params", str(params), "--out", str(out), *CNN]) == 0
    assert sorted(pd.read_csv(out / "scores.csv").path) == sorted(str(Path(s.path).relative_to(root)) for s in ours)
    entries = [{"dataset": "metajson", "root": str(root)}]
    if importlib.util.find_spec("anomalib"):  # with the extra, an anomalib dataset beside it
        entries.append({"dataset": "anomalib:mpdd", "root": str(mpdd_tree(tmp_path / "mpdd").root)})
    grid = tmp_path / "g.yaml"
    grid.write_text(json.dumps({"datasets": entries, "model": "efficientnet-lite0", "pretrained": "none",
                                "method": "musc", "image_size": SIZE, "batch_size": 4, "device": "cpu"}))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep"), "--no-progress", "--no-feature-cache"]) == 0
    table = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert set(table.dataset) == {e["dataset"] for e in entries}
    assert table[table.category != "mean"].pixel_auroc.notna().all()
