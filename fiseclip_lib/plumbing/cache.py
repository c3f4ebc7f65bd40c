"""On-disk feature cache: encoder outputs per image, so that sweeps over matching, filtering and fusion
options do no encoder work.

Key = sha256 of (encoder identity: model, content hash of the weights, QuickGELU, preprocessing statistics,
precision, input size, restoration depth; requested layers; restoration operator; image content hash). Values
are safetensors files in the encoder's own float32 output, so a cached run gives the same numbers as an
uncached one. Each entry carries its key, its shapes and a checksum of its bytes; an entry that fails any of
these checks (truncated, corrupted, mis-shaped, written for another key) is reported once, deleted and
re-encoded, never trusted. Writes are atomic (concurrent processes may share a cache); a size cap evicts the
least recently used entries. `clear` removes only files in this cache's own format.
Location: `FISECLIP_FEATURE_CACHE` or `$XDG_CACHE_HOME/fiseclip/features` (default `~/.cache/...`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from fiseclip_lib.plumbing.files import atomic_path
from fiseclip_lib.features import Features

DEFAULT_MAX_GB = 8.0
CACHE_VERSION = 2  # bump when preprocessing or the stored layout changes
FORMAT = "fiseclip-features"
_ENTRY_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_TMP_NAME = re.compile(r"^\.[0-9a-f]{64}\..*\.tmp\.safetensors$")
_WRITE_WARNED: set = set()  # (cache kind, folder): a failing cache folder is reported once per process


def cache_write_errors() -> tuple:
    """The exceptions a failed cache write raises: OSError, and safetensors' own SafetensorError (which wraps
    the OS error, e.g. a full disk, and is not an OSError)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return (OSError,)
    return (OSError, SafetensorError)


def warn_cache_write(kind: str, folder, error: BaseException) -> None:
    """Report a failed cache write once per cache folder, in one line; the caller carries on without caching
    (a cache only saves time: its result was computed and is used).

    Args:
        kind: the cache's name in the message ("feature cache", "text embedding cache").
        folder: the cache folder (named in the message, and the once-only key).
        error: the OSError or SafetensorError raised by the write.
    """
    if (kind, str(folder)) in _WRITE_WARNED:
        return
    _WRITE_WARNED.add((kind, str(folder)))
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:  # SafetensorError: "Error while serializing: I/O error: No space left on device (os error 28) at ..."
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        m = re.search(r"I/O error: ([^(]+?)\s*\(os error", text)
        reason = m.group(1) if m else text[:160]
    warnings.warn(f"{kind} {folder} cannot be written ({reason}); carrying on without caching (results are "
                  f"unchanged, only slower): free disk space or point FISECLIP_FEATURE_CACHE elsewhere")


def default_cache_dir() -> Path:
    env = os.environ.get("FISECLIP_FEATURE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fiseclip" / "features"


def image_hash(image) -> str:
    """Content hash of a path (file bytes; a folder: its files' names and bytes, e.g. MVTec LOCO's mask parts) or
    an in-memory image (mode, size, pixels)."""
    h = hashlib.sha256()
    if isinstance(image, (str, os.PathLike)) and os.path.isdir(image):
        for name in sorted(n for n in os.listdir(image) if not n.startswith(".")):
            part = os.path.join(image, name)
            if os.path.isfile(part):
                h.update(name.encode("utf-8", "surrogateescape") + b"\0" + image_hash(part).encode())
        return h.hexdigest()
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            from fiseclip_lib.errors import FiseclipError

            raise FiseclipError(f"image {image} cannot be read ({e.strerror or type(e).__name__})") from None
    elif hasattr(image, "tobytes"):
        h.update(f"{getattr(image, 'mode', '')}{getattr(image, 'size', '')}{getattr(image, 'shape', '')}".encode())
        h.update(image.tobytes())
    else:
        raise TypeError(f"cannot hash {type(image).__name__}")
    return h.hexdigest()


def tensors_checksum(tensors: dict) -> str:
    """A checksum over names, dtypes, shapes and bytes of a dict of CPU tensors."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CacheEntryError(ValueError):
    """A cache entry that cannot be trusted."""


class FeatureCache:
    """Per-image encoder outputs on disk. `max_gb` caps the folder (least recently used files go first).

    Args:
        root: the cache folder (default `default_cache_dir()`).
        max_gb: size cap in GB.

    Example:
        >>> cache = FeatureCache("/tmp/fc")  # doctest: +SKIP
        >>> Detector(cfg, cache=cache).score_batch(paths, "bottle")  # second call skips the encoder  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike | None = None, max_gb: float = DEFAULT_MAX_GB):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_bytes = int(max_gb * 1e9)
        self.hits = 0
        self.misses = 0
        self.damaged = 0
        self._scanned_bytes: int | None = None  # folder size at the last scan (None: not scanned yet)
        self._added = 0  # bytes this process wrote since

    # ------------------------------------------------------------------ keys and files
    @staticmethod
    def key(encoder_identity: dict, layers, restore: str | None, content_hash: str) -> str:
        payload = json.dumps({"version": CACHE_VERSION, "encoder": encoder_identity, "layers": sorted(layers),
                              "restore": restore, "image": content_hash}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, layers=None) -> Features | None:
        """The cached features of one image (`[1, ...]` tensors), or None on a miss.

        A damaged entry (unreadable, truncated, wrong checksum, wrong key, mis-shaped, other layers than
        `layers`) is reported once with a warning naming it, deleted, and counted as a miss.
        """
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            feats = self._read(path, key, layers)
        except CacheEntryError as e:
            self.misses += 1
            self.damaged += 1
            warnings.warn(f"feature cache entry {path} is damaged ({e}); it is deleted and the image re-encoded")
            try:
                path.unlink()
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # recency for LRU eviction
        except OSError:
            pass
        self.hits += 1
        return feats

    @staticmethod
    def _read(path: Path, key: str, layers) -> Features:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CacheEntryError(f"unreadable: {type(e).__name__}") from None
        if meta.get("format") != FORMAT or meta.get("version") != str(CACHE_VERSION):
            raise CacheEntryError("not written by this version of fiseclip")
        if meta.get("key") != key:
            raise CacheEntryError("written for another key")
        if meta.get("checksum") != tensors_checksum(tensors):
            raise CacheEntryError("checksum mismatch")
        try:
            grid = tuple(int(x) for x in meta["grid"].split(","))
            p = grid[0] * grid[1]
        except (KeyError, ValueError, IndexError):
            raise CacheEntryError("no valid grid") from None
        found = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("layer.")}
        if layers is not None and sorted(found) != sorted(int(l) for l in layers):
            raise CacheEntryError(f"layers {sorted(found)} instead of {sorted(layers)}")
        shapes_ok = all(t.ndim == 2 and t.shape[0] == p for t in found.values()) and found
        if "dense" in tensors:
            shapes_ok = shapes_ok and tensors["dense"].ndim == 2 and tensors["dense"].shape[0] == p
        if "global" in tensors:
            shapes_ok = shapes_ok and tensors["global"].ndim == 1
        if not shapes_ok:
            raise CacheEntryError("mis-shaped tensors")
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise CacheEntryError("non-finite values")
        return Features(layers={l: found[l][None] for l in sorted(found)}, grid=grid,
                        global_embedding=tensors["global"][None] if "global" in tensors else None,
                        dense=tensors["dense"][None] if "dense" in tensors else None)

    def put(self, key: str, feats: Features, index: int) -> None:
        """Store image `index` of a batch of features (atomically; a full or read-only disk costs speed only:
        one warning per cache folder, `warn_cache_write`)."""
        from safetensors.torch import save_file

        tensors = {f"layer.{l}": t[index].contiguous().cpu() for l, t in feats.layers.items()}
        if feats.global_embedding is not None:
            tensors["global"] = feats.global_embedding[index].contiguous().cpu()
        if feats.dense is not None:
            tensors["dense"] = feats.dense[index].contiguous().cpu()
        meta = {"format": FORMAT, "version": str(CACHE_VERSION), "key": key,
                "grid": ",".join(map(str, feats.grid)), "checksum": tensors_checksum(tensors)}
        path = self._path(key)
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        except cache_write_errors() as e:
            warn_cache_write("feature cache", self.root, e)
            return
        try:
            self._added += path.stat().st_size
        except OSError:
            pass
        self._enforce_cap()

    # ------------------------------------------------------------------ maintenance
    def _files(self) -> list[Path]:
        """Files named like this cache's entries (`<2 hex>/<64 hex>.safetensors`)."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.glob("[0-9a-f][0-9a-f]/*.safetensors")
                if _ENTRY_NAME.match(p.name) and p.parent.name == p.name[:2]]

    def _is_own(self, path: Path) -> bool:
        """Whether a file carries this cache's format in its safetensors header."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("format") == FORMAT
        except Exception:
            return False

    def _enforce_cap(self) -> None:
        """Evict least recently used entries above the cap. The folder is scanned once, then only when what this
        process added since could have crossed the cap (a scan per write is quadratic on a cold cache)."""
        if self._scanned_bytes is not None and self._scanned_bytes + self._added <= self.max_bytes:
            return
        files = self._files()
        sizes = {}
        for p in files:
            try:
                sizes[p] = p.stat()
            except OSError:
                continue
        total = sum(st.st_size for st in sizes.values())
        self._added = 0
        self._scanned_bytes = total
        if total <= self.max_bytes:
            return
        for p, st in sorted(sizes.items(), key=lambda kv: kv[1].st_mtime):
            if total <= self.max_bytes:
                break
            total -= st.st_size
            p.unlink(missing_ok=True)
        self._scanned_bytes = total

    def info(self) -> dict:
        files = self._files()
        size = sum(p.stat().st_size for p in files)
        return {"root": str(self.root), "entries": len(files), "bytes": size, "max_bytes": self.max_bytes}

    def clear(self) -> int:
        """Delete this cache's entries (and temp files of interrupted writes); other files are left alone."""
        removed = 0
        for p in self._files():
            if self._is_own(p):
                p.unlink(missing_ok=True)
                removed += 1
        if self.root.is_dir():
            for p in self.root.glob("[0-9a-f][0-9a-f]/.*.tmp.safetensors"):
                if _TMP_NAME.match(p.name):
                    p.unlink(missing_ok=True)
            for d in self.root.glob("[0-9a-f][0-9a-f]"):
                try:
                    d.rmdir()  # only when empty
                except OSError:
                    pass
        return removed
