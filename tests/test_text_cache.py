"""Text embeddings cached on disk: a second Detector or process does not pay the prompt ensemble again."""
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.encoder import ClipEncoder, load_encoder
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.text import build_prompts, text_cache_dir, text_cache_key, text_embeddings
from helpers import Fresh, embed_and_count

CFG = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu")
ENSEMBLE = [len(prompts) for prompts in build_prompts("any phrase")]  # prompts per encode_text call: normal, abnormal


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """A fresh text cache and a count of encode_text calls on every ClipEncoder."""
    monkeypatch.setenv("FISECLIP_FEATURE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = ClipEncoder.encode_text

    def spy(self, prompts):
        calls.append(len(prompts))
        return real(self, prompts)

    monkeypatch.setattr(ClipEncoder, "encode_text", spy)
    return calls


def _naive(encoder, phrase):
    """The ensemble straight from open_clip's text tower (not through the encoder or the cache)."""
    rows = []
    for prompts in build_prompts(phrase):
        e = torch.nn.functional.normalize(encoder.model.encode_text(encoder.tokenizer(prompts)).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def test_embeddings_are_computed_once_per_class(tiny_encoder, counted):
    a = text_embeddings(tiny_encoder, "screw")
    b = text_embeddings(tiny_encoder, "screw")
    text_embeddings(tiny_encoder, "cable")
    assert torch.equal(a, b) and a.shape == (2, 64)
    assert counted == ENSEMBLE * 2  # screw once, cable once
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))


def test_second_detector_reads_the_disk_cache(counted):
    images = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(3)]
    first = Detector(FiseConfig(**CFG))
    a = text_embeddings(first.encoder, "metal_nut")
    assert counted == ENSEMBLE
    with torch.no_grad():
        torch.testing.assert_close(a, _naive(first.encoder, "metal nut"), rtol=1e-5, atol=1e-6)
    res1 = first.score_batch(images, "metal_nut")
    assert counted == ENSEMBLE  # the disk cache
    path = text_cache_dir() / f"{text_cache_key(first.encoder, 'metal nut')}.safetensors"
    assert path.is_file() and path.parent == Path(os.environ["FISECLIP_FEATURE_CACHE"]) / "text"
    second = Detector(FiseConfig(**CFG))  # a new encoder: no in-memory cache
    b = text_embeddings(second.encoder, "metal_nut")
    res2 = second.score_batch(images, "metal_nut")
    assert counted == ENSEMBLE, "the second Detector did not run the prompt ensemble"
    assert torch.equal(a, b)
    np.testing.assert_array_equal(res1.text_map, res2.text_map)


@pytest.mark.slow  # a fresh process
def test_second_process_reads_the_disk_cache(counted, tmp_path):
    enc = load_encoder(**CFG)
    a = text_embeddings(enc, "screw head")
    code, text = Fresh(embed_and_count, CFG, "screw head", str(tmp_path / "emb.pt")).wait()
    assert code == 0, text[-2000:]
    assert "CALLS 0" in text
    assert torch.equal(torch.load(tmp_path / "emb.pt", weights_only=True), a)


def test_damaged_or_foreign_cache_file_is_recomputed_with_one_warning(counted):
    enc = load_encoder(**CFG)
    good = text_embeddings(enc, "cable")
    path = text_cache_dir() / f"{text_cache_key(enc, 'cable')}.safetensors"
    other = text_cache_dir() / f"{text_cache_key(enc, 'zipper')}.safetensors"
    text_embeddings(enc, "zipper")
    for damage in ("junk", "truncate", "foreign"):
        if damage == "junk":
            path.write_bytes(os.urandom(300))
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[:-8])
        else:
            path.write_bytes(other.read_bytes())  # a valid file written for another key
        fresh = load_encoder(**CFG)
        n = len(counted)
        with pytest.warns(UserWarning, match="damaged; recomputing") as record:
            again = text_embeddings(fresh, "cable")
        assert len([w for w in record if "text embedding cache" in str(w.message)]) == 1
        assert len(counted) == n + 2 and torch.equal(again, good)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # repaired: read back silently
            assert torch.equal(text_embeddings(load_encoder(**CFG), "cable"), good)


def test_key_follows_weights_phrase_and_precision_not_image_size(counted):
    base = load_encoder(**CFG)
    key = text_cache_key(base, "bottle")
    assert text_cache_key(load_encoder(**{**CFG, "image_size": 168}), "bottle") == key
    for other in (dict(seed=1), dict(precision="bf16"), dict(quick_gelu=True)):
        assert text_cache_key(load_encoder(**{**CFG, **other}), "bottle") != key, other
    assert text_cache_key(base, "glass bottle") != key
    text_embeddings(base, "bottle", disk_cache=False)
    assert not text_cache_dir().exists() or not any(text_cache_dir().iterdir())


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_under_the_text_cache_warns_once_and_keeps_the_embeddings(counted, monkeypatch, kind):
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at path "
                              f"\"{filename}\"")

    enc = load_encoder(**CFG)
    want = _naive(enc, "bottle")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [text_embeddings(load_encoder(**CFG), name) for name in ("bottle", "cable", "bottle")]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "No space left on device" in msgs[0], msgs
    assert str(text_cache_dir()) in msgs[0]
    torch.testing.assert_close(got[0], want.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], got[2])
    assert not list(text_cache_dir().glob("*.safetensors"))  # nothing written, nothing half-written
