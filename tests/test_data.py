"""evaluation/data.py: the dataset loaders on generated trees, batches, images and masks."""
import numpy as np
import pytest
from PIL import Image

from fiseclip_lib.evaluation import data as D
from fiseclip_lib.errors import DatasetError, FiseclipError
from helpers import make_folder_tree, make_mvtec_tree, make_visa_raw_tree


def test_mvtec_loader_reads_labels_defects_and_pairs_masks(mvtec_tree):
    samples = D.load_mvtec(mvtec_tree)
    assert D.categories_of(samples) == ["bottle", "screw"]
    bottle = [s for s in samples if s.category == "bottle"]
    assert len(bottle) == 6
    assert sum(s.label for s in bottle) == 3
    for s in bottle:
        if s.label:
            assert s.mask is not None and s.mask.endswith(s.path.split("/")[-1].replace(".png", "_mask.png"))
            assert f"/ground_truth/{s.defect}/" in s.mask
        else:
            assert s.defect == "good" and s.mask is None
    assert len(D.load_mvtec(mvtec_tree, ["screw"])) == 6


def test_mvtec_orphan_mask_is_an_error_naming_the_file(mvtec_tree):
    (mvtec_tree / "bottle" / "test" / "crack" / "001.png").unlink()
    with pytest.raises(DatasetError, match="001_mask.png"):
        D.load_mvtec(mvtec_tree)


def test_unknown_category_and_missing_root(mvtec_tree, tmp_path):
    with pytest.raises(DatasetError, match="unknown categories.*available: bottle, screw"):
        D.load_mvtec(mvtec_tree, ["cable"])
    with pytest.raises(DatasetError, match="does not exist"):
        D.load_dataset("mvtec", tmp_path / "nowhere")
    with pytest.raises(FiseclipError, match="unknown dataset"):
        D.load_dataset("kolektor", mvtec_tree)


def test_visa_raw_and_converted(tmp_path):
    raw = make_visa_raw_tree(tmp_path / "visa")
    samples = D.load_visa(raw)
    assert D.categories_of(samples) == ["candle", "pcb1"]
    assert len(samples) == 10  # train rows excluded
    assert all((s.mask is not None) == bool(s.label) for s in samples)
    conv = make_mvtec_tree(tmp_path / "visa_pytorch", categories=("candle",))
    assert len(D.load_visa(conv)) == 6


def test_visa_missing_mask_file_is_named(tmp_path):
    raw = make_visa_raw_tree(tmp_path / "visa")
    (raw / "candle" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
    with pytest.raises(DatasetError, match="Masks/Anomaly/000.png"):
        D.load_visa(raw)


@pytest.mark.parametrize("with_masks", [True, False])
def test_folder_dataset(tmp_path, with_masks):
    root = make_folder_tree(tmp_path / "f", with_masks=with_masks)
    samples = D.load_folder(root)
    assert [s.label for s in samples] == [0, 0, 0, 1, 1]
    assert all((s.mask is not None) == (with_masks and s.label == 1) for s in samples)
    check = D.validate_category(samples) if with_masks else None
    if not with_masks:
        with pytest.warns(UserWarning, match="image level only"):
            check = D.validate_category(samples)
    assert check["pixel"] == with_masks


def test_batches_seeded_shuffle_file_order_and_last_batch_rule(mvtec_tree):
    samples = [D.Sample(f"{i:03d}.png", "c", 0, "good") for i in range(37)]
    a = D.make_batches(samples, 16, seed=0)
    b = D.make_batches(samples, 16, seed=0)
    c = D.make_batches(samples, 16, seed=1)
    assert a == b and a != c
    assert [len(x) for x in a] == [16, 16, 5]  # a last batch of 5 is kept
    assert sorted(s.path for x in a for s in x) == [s.path for s in samples]
    merged = D.make_batches(samples[:35], 16, seed=0)
    assert [len(x) for x in merged] == [16, 19]  # a last batch of 3 (< 5) is merged
    ordered = D.make_batches(samples, 16, shuffle=False)
    assert [s.path for s in ordered[0]] == [s.path for s in samples[:16]]
    assert [len(x) for x in D.make_batches(samples, 0)] == [37]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "RGB"])
def test_load_image_converts_modes_to_rgb(tmp_path, mode):
    arr = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "I;16":
        im = Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    else:
        im = im.convert(mode)
    path = tmp_path / "x.png"
    im.save(path)
    out = D.load_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    if mode == "I;16":
        assert abs(int(np.asarray(out)[..., 0].astype(int).max()) - int(arr[..., 0].max())) <= 1


def test_unreadable_image_and_mask_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(FiseclipError, match="broken.png"):
        D.load_image(bad)
    with pytest.raises(FiseclipError, match="broken.png"):
        D.load_mask(bad)


def test_mask_resized_with_nearest(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = D.load_mask(tmp_path / "m.png", (16, 16))
    assert out.dtype == bool and out.shape == (16, 16) and out.sum() == 64


def test_compose_batch_share_and_errors():
    samples = [D.Sample(f"g{i}", "c", 0, "good") for i in range(10)] + [D.Sample(f"b{i}", "c", 1, "x") for i in range(4)]
    b = D.compose_batch(samples, 8, 0.25, seed=1)
    assert len(b) == 8 and sum(s.label for s in b) == 2
    assert len({s.path for s in b}) == 8 and {s.path for s in b} <= {s.path for s in samples}
    assert b == D.compose_batch(samples, 8, 0.25, seed=1)
    with pytest.raises(FiseclipError, match="needs more images"):
        D.compose_batch(samples, 8, 0.75)


def test_image_arrays_of_every_depth_read_as_8bit_rgb_or_fail_in_one_line():
    from fiseclip_lib.plumbing.images import rgb_image

    u8 = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(rgb_image(u8)), u8)
    assert np.array_equal(np.asarray(rgb_image(u8.astype(np.float32))), u8)  # floats on the 0-255 scale
    wide = u8.astype(np.uint16) * 257  # 16-bit: scaled by its own maximum, as 16-bit files are
    assert np.array_equal(np.asarray(rgb_image(wide)), (wide / wide.max() * 255).astype(np.uint8))
    with pytest.raises(FiseclipError, match=r"values in \[0, 1\]") as e:
        rgb_image(u8 / 255.0)  # would be read as black
    assert "\n" not in str(e.value)
