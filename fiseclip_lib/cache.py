"""On-disk feature cache: encoder outputs per image, so that sweeps over matching, filtering and fusion
options do no encoder work.

Key = sha256 of (encoder identity: model, weights, input size, precision; requested layers; restoration
operator; image content hash). Values are safetensors files in the encoder's own float32 output, so a cached
run gives the same numbers as an uncached one. Writes are atomic; a size cap evicts the least recently used
files. Location: `FISECLIP_FEATURE_CACHE` or `$XDG_CACHE_HOME/fiseclip/features` (default `~/.cache/...`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ._io import atomic_path
from .encoder import Features

DEFAULT_MAX_GB = 8.0
CACHE_VERSION = 1  # bump when preprocessing or the stored layout changes


def default_cache_dir() -> Path:
    env = os.environ.get("FISECLIP_FEATURE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fiseclip" / "features"


def image_hash(image) -> str:
    """Content hash of a path (file bytes) or an in-memory image (mode, size, pixels)."""
    h = hashlib.sha256()
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif hasattr(image, "tobytes"):
        h.update(f"{getattr(image, 'mode', '')}{getattr(image, 'size', '')}{getattr(image, 'shape', '')}".encode())
        h.update(image.tobytes())
    else:
        raise TypeError(f"cannot hash {type(image).__name__}")
    return h.hexdigest()


class FeatureCache:
    """Per-image encoder outputs on disk. `max_gb` caps the folder (least recently used files go first)."""

    def __init__(self, root: str | os.PathLike | None = None, max_gb: float = DEFAULT_MAX_GB):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_bytes = int(max_gb * 1e9)
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ keys and files
    @staticmethod
    def key(encoder_identity: dict, layers, restore: str | None, content_hash: str) -> str:
        payload = json.dumps({"version": CACHE_VERSION, "encoder": encoder_identity, "layers": sorted(layers), "restore": restore,
                              "image": content_hash}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> Features | None:
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            grid = tuple(int(x) for x in meta["grid"].split(","))
        except Exception:  # a damaged entry is a miss, never an error
            self.misses += 1
            return None
        os.utime(path)  # recency for LRU eviction
        self.hits += 1
        layers = {int(k.split(".", 1)[1]): v[None] for k, v in tensors.items() if k.startswith("layer.")}
        return Features(layers=dict(sorted(layers.items())), grid=grid,
                        global_embedding=tensors["global"][None] if "global" in tensors else None,
                        dense=tensors["dense"][None] if "dense" in tensors else None)

    def put(self, key: str, feats: Features, index: int) -> None:
        """Store image `index` of a batch of features."""
        from safetensors.torch import save_file

        tensors = {f"layer.{l}": t[index].contiguous().cpu() for l, t in feats.layers.items()}
        if feats.global_embedding is not None:
            tensors["global"] = feats.global_embedding[index].contiguous().cpu()
        if feats.dense is not None:
            tensors["dense"] = feats.dense[index].contiguous().cpu()
        path = self._path(key)
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"grid": ",".join(map(str, feats.grid))})
        except OSError:
            return  # a full or read-only disk costs speed, not results
        self._enforce_cap()

    # ------------------------------------------------------------------ maintenance
    def _files(self) -> list[Path]:
        return list(self.root.glob("*/*.safetensors")) if self.root.is_dir() else []

    def _enforce_cap(self) -> None:
        files = self._files()
        sizes = {p: p.stat().st_size for p in files}
        total = sum(sizes.values())
        if total <= self.max_bytes:
            return
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            total -= sizes[p]
            p.unlink(missing_ok=True)

    def info(self) -> dict:
        files = self._files()
        size = sum(p.stat().st_size for p in files)
        return {"root": str(self.root), "entries": len(files), "bytes": size, "max_bytes": self.max_bytes}

    def clear(self) -> int:
        files = self._files()
        for p in files:
            p.unlink(missing_ok=True)
        return len(files)
