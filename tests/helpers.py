"""Dummy-dataset generators shared by the tests (synthetic trees in the real layouts)."""
from __future__ import annotations

import csv
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
