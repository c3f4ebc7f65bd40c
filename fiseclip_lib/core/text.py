"""Cross-modal alignment: prompt ensembles, text embeddings, the patch text map and the image text score.

Prompt ensemble (METHOD.md step 3, reconstruction following the zero-shot AD literature): every normal and
abnormal state is put into each of 35 photo templates; embeddings are L2-normalised, averaged per class
(normal / abnormal) and L2-normalised again.

Text embeddings are cached in memory on the encoder and on disk, one small safetensors file per (weights
identity, class phrase, prompts hash, precision) under `<FISECLIP_FEATURE_CACHE or ~/.cache/fiseclip>/text/`,
so a second run or process does not pay the prompt ensemble again. Writes are atomic; a file is checked on
read (its key, shape, finiteness and a checksum of its bytes) and one that fails is recomputed with one warning.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from fiseclip_lib.plumbing.files import atomic_path

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a photo of the small {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)
# Category folder names that read badly as words (VisA); a user mapping overrides these.
DEFAULT_CLASS_NAMES = {
    "pcb1": "printed circuit board", "pcb2": "printed circuit board", "pcb3": "printed circuit board",
    "pcb4": "printed circuit board", "macaroni1": "macaroni", "macaroni2": "macaroni",
}
TEXT_TEMPERATURE = 100.0  # CLIP's logit scale


def class_phrase(class_name: str, overrides: dict | None = None) -> str:
    """The words used for a category in prompts: user override, built-in override, or underscores -> spaces."""
    overrides = overrides or {}
    if class_name in overrides:
        return overrides[class_name]
    return DEFAULT_CLASS_NAMES.get(class_name, class_name.replace("_", " "))


def build_prompts(phrase: str) -> tuple[list[str], list[str]]:
    """All normal and abnormal prompts for one class phrase (7 x 35 and 5 x 35)."""
    normal = [t.format(s.format(phrase)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(phrase)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


TEXT_CACHE_VERSION = 1


def text_cache_dir() -> Path:
    """Where text embeddings are cached: `<FISECLIP_FEATURE_CACHE or $XDG_CACHE_HOME/fiseclip>/text`."""
    from fiseclip_lib.encoder import cache_root

    return cache_root() / "text"


def text_cache_key(encoder, phrase: str) -> str:
    """sha256 of what the embeddings depend on: weights identity (model, weights content, QuickGELU),
    the prompts (hash of the full ensemble), precision."""
    normal, abnormal = build_prompts(phrase)
    prompts = hashlib.sha256(json.dumps([normal, abnormal]).encode()).hexdigest()
    payload = {"version": TEXT_CACHE_VERSION, "model": encoder.model_name, "weights_id": encoder.weights_id,
               "quick_gelu": bool(getattr(encoder, "quick_gelu", False)), "precision": encoder.precision,
               "phrase": phrase, "prompts": prompts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _read_cached(path: Path, key: str) -> torch.Tensor | None:
    """The cached `[2, D]` embeddings, None when absent; a damaged file warns once and counts as absent."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = f.get_tensor("text")
        ok = (meta.get("key") == key and t.ndim == 2 and t.shape[0] == 2 and t.dtype == torch.float32
              and bool(torch.isfinite(t).all()) and meta.get("checksum") == _checksum(t))
    except Exception:
        ok = False
    if not ok:
        warnings.warn(f"text embedding cache file {path} is damaged; recomputing it")
        return None
    return t


def _write_cached(path: Path, key: str, t: torch.Tensor) -> None:
    from safetensors.torch import save_file

    t = t.contiguous()
    from fiseclip_lib.plumbing.cache import cache_write_errors, warn_cache_write

    try:
        with atomic_path(path) as tmp:
            save_file({"text": t}, str(tmp), metadata={"key": key, "checksum": _checksum(t)})
    except cache_write_errors() as e:  # a read-only or full disk costs the prompt ensemble next time, nothing else
        warn_cache_write("text embedding cache", path.parent, e)


def text_embeddings(encoder, class_name: str, overrides: dict | None = None, disk_cache: bool = True) -> torch.Tensor:
    """t_n and t_a for a category.

    Args:
        encoder: an encoder with a text tower.
        class_name: category name (mapped to a phrase by `class_phrase`).
        overrides: category -> phrase.
        disk_cache: also read/write the on-disk cache (see module doc).
    Returns:
        `[2, D]` float32 on the CPU: rows t_n (normal) and t_a (abnormal).
    """
    phrase = class_phrase(class_name, overrides)
    key = text_cache_key(encoder, phrase)
    memo = getattr(encoder, "text_memo", None)
    if memo is not None and key in memo:
        return memo[key]
    path = text_cache_dir() / f"{key}.safetensors"
    emb = _read_cached(path, key) if disk_cache else None
    if emb is None:
        rows = []
        for prompts in build_prompts(phrase):
            e = encoder.encode_text(prompts)
            rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        emb = torch.stack(rows).float().cpu()
        if disk_cache:
            _write_cached(path, key, emb)
    if memo is not None:
        memo[key] = emb
    return emb


def text_map(dense: torch.Tensor, text: torch.Tensor, temperature: float = TEXT_TEMPERATURE) -> torch.Tensor:
    """A_T: probability of 'abnormal' per patch, softmax(T [F.t_n, F.t_a])[1]. dense `[N, P, D]` -> `[N, P]`."""
    logits = temperature * dense.float() @ text.to(dense.device).float().T
    return torch.softmax(logits, dim=-1)[..., 1]


def text_score(global_embedding: torch.Tensor, text: torch.Tensor, temperature: float = TEXT_TEMPERATURE) -> torch.Tensor:
    """s_T: the same probability for the global image embedding `[N, D]` -> `[N]`."""
    return text_map(global_embedding[:, None, :], text, temperature)[:, 0]
