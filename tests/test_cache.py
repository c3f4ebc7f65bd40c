import numpy as np
import pytest
import torch

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.plumbing.cache import FeatureCache
from fiseclip_lib.evaluation.run import run_benchmark

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=5)


class CountingEncoder:
    """Wraps an encoder and counts images sent through it."""

    def __init__(self, enc):
        self.enc, self.images = enc, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def __call__(self, pixels, **kw):
        self.images += pixels.shape[0]
        return self.enc(pixels, **kw)


def test_cached_features_equal_fresh_ones_and_skip_the_encoder(small_demo, tiny_encoder, tmp_path):
    paths = sorted(str(p) for p in (small_demo / "textile" / "test").rglob("*.png"))[:6]
    cache = FeatureCache(tmp_path / "c")
    enc = CountingEncoder(tiny_encoder)
    det = Detector(FiseConfig(**TINY), encoder=enc, cache=cache)
    first = det.encode(paths)
    assert enc.images == 6 and cache.info()["entries"] == 6
    second = det.encode(paths)
    assert enc.images == 6 and cache.hits == 6
    for l in first.layers:
        assert torch.equal(first.layers[l], second.layers[l])
    assert torch.equal(first.dense, second.dense) and torch.equal(first.global_embedding, second.global_embedding)
    # another restoration is another key
    Detector(FiseConfig(**TINY, restore="naclip"), encoder=enc, cache=cache).encode(paths)
    assert enc.images == 12


def test_second_run_with_other_matching_options_does_no_encoder_work(small_demo, tiny_encoder, tmp_path):
    cache = FeatureCache(tmp_path / "c")
    enc = CountingEncoder(tiny_encoder)
    cfg = FiseConfig(**TINY)
    run_benchmark("demo", small_demo, cfg, tmp_path / "a", progress=False, detector=Detector(cfg, enc, cache))
    n = enc.images
    assert n == 26
    other = cfg.replace(filter="soft", fusion="gated", degrees=(1, 3), topmin_max=0.5)
    run_benchmark("demo", small_demo, other, tmp_path / "b", progress=False, detector=Detector(other, enc, cache))
    assert enc.images == n
    # the cost record says so: encoder time only where images were encoded, the cache state beside it
    import json
    first, second = (json.loads((tmp_path / d / "config.json").read_text())["cost"] for d in "ab")
    assert first["feature_cache"] == "miss" and first["images_encoded"] == n and first["encoder_s_per_image"] > 0
    assert second["feature_cache"] == "hit" and second["images_encoded"] == 0 and second["encoder_s_per_image"] is None
    for c in (first, second):
        assert c["images_scored"] == n and 0 < c["matching_s_per_image"] <= c["scoring_s_per_image"]
    text = cfg.replace(method="text")
    run_benchmark("demo", small_demo, text, tmp_path / "t", progress=False, detector=Detector(text, enc, cache))
    assert json.loads((tmp_path / "t" / "config.json").read_text())["cost"]["matching_s_per_image"] is None
    # and a cached rerun of the same config reproduces the uncached numbers exactly
    run_benchmark("demo", small_demo, cfg, tmp_path / "c2", progress=False, detector=Detector(cfg, enc, cache))
    assert (tmp_path / "a" / "scores.csv").read_bytes() == (tmp_path / "c2" / "scores.csv").read_bytes()


def test_size_cap_evicts_least_recently_used(small_demo, tiny_encoder, tmp_path):
    paths = sorted(str(p) for p in (small_demo / "brick" / "test").rglob("*.png"))[:4]
    cache = FeatureCache(tmp_path / "c", max_gb=0)
    Detector(FiseConfig(**TINY), encoder=tiny_encoder, cache=cache).encode(paths)
    assert cache.info()["entries"] == 0
    big = FeatureCache(tmp_path / "c", max_gb=1)
    Detector(FiseConfig(**TINY), encoder=tiny_encoder, cache=big).encode(paths)
    assert big.info()["entries"] == 4 and big.clear() == 4 and big.info()["entries"] == 0


def test_damaged_entry_is_a_miss(small_demo, tiny_encoder, tmp_path):
    paths = sorted(str(p) for p in (small_demo / "brick" / "test").rglob("*.png"))[:2]
    cache = FeatureCache(tmp_path / "c")
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder, cache=cache)
    a = det.encode(paths)
    for f in (tmp_path / "c").rglob("*.safetensors"):
        f.write_bytes(b"garbage")
    b = det.encode(paths)
    np.testing.assert_array_equal(a.dense.numpy(), b.dense.numpy())


def _full_disk(kind):
    """A save_file that fails as a full disk does: OSError ENOSPC, or safetensors' own error type."""
    import errno

    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at "
                              f"path \"{filename}\"")
    return save_file


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_under_the_cache_warns_once_and_keeps_the_result(small_demo, tiny_encoder, tmp_path,
                                                                    monkeypatch, kind):
    import warnings

    import safetensors.torch

    paths = sorted(str(p) for p in (small_demo / "brick" / "test").rglob("*.png"))[:4]
    fresh = Detector(FiseConfig(**TINY), encoder=tiny_encoder).encode(paths)  # no cache: the reference
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk(kind))
    cache = FeatureCache(tmp_path / "c")
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder, cache=cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = det.encode(paths)
        det.encode(paths)  # every write fails again: still one warning
    msgs = [str(w.message) for w in caught if "cache" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert str(tmp_path / "c") in msgs[0] and "No space left on device" in msgs[0]
    np.testing.assert_array_equal(fresh.dense.numpy(), got.dense.numpy())
    for l in fresh.layers:
        assert torch.equal(fresh.layers[l], got.layers[l])
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # nothing half-written
