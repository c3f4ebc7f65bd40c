"""Weights files: safe loading, one-line errors for bad files, and content identity (sha256, memoised).

Checkpoints load only through safetensors or `torch.load(weights_only=True)`. A file must be what its suffix
says: `.safetensors` a safetensors file, anything else a torch zip archive or pickle. Every failure (not the
format its name says, damaged, not a state dict, keys or shapes that do not fit the model) is one
`FiseclipError` line naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import torch

from fiseclip_lib.plumbing.files import write_json_atomic
from fiseclip_lib.errors import FiseclipError

HASH_SIDECAR = "weights-sha256.json"


def is_random_weights(pretrained) -> bool:
    """Whether a `pretrained` value asks for random initialisation ('none', 'random' or empty)."""
    return str(pretrained).lower() in {"none", "random", ""}


def cache_root() -> Path:
    """fiseclip's own cache folder: `FISECLIP_FEATURE_CACHE` when set, else `$XDG_CACHE_HOME/fiseclip`
    (default `~/.cache/fiseclip`). Read from the environment at each call."""
    env = os.environ.get("FISECLIP_FEATURE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fiseclip"


def _file_stamp(path: Path) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised in `<cache_root()>/weights-sha256.json` keyed by real path, size,
    mtime_ns and inode, so a 1.7 GB checkpoint is read once (any change of the file rehashes it).

    Args:
        path: the weights file.
    Returns:
        The hex digest.
    """
    real = os.path.realpath(path)
    stamp = _file_stamp(Path(real))
    sidecar = cache_root() / HASH_SIDECAR
    try:
        memo = json.loads(sidecar.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(real)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and entry.get("sha256"):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo[real] = {**stamp, "sha256": digest}
    try:
        write_json_atomic(sidecar, memo)
    except OSError:
        pass  # a read-only cache costs a rehash next time, nothing else
    return digest


def _sniff(path: Path) -> str:
    """What the bytes of a file look like: safetensors, zip, pickle, empty, text or unknown."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in {bytes([p]) for p in range(2, 6)}:
        return "pickle"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return "text"
    except UnicodeDecodeError:
        pass
    return "unknown"


_LOOKS = {"zip": "a torch zip archive", "pickle": "a torch pickle", "empty": "empty", "text": "a text file",
          "unknown": "of an unknown format", "safetensors": "a safetensors file"}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely: safetensors, or torch weights with `weights_only=True`.

    Args:
        path: a `.safetensors` file, or a torch file (`.pt`, `.pth`, `.bin`, ...) holding a state dict
            (possibly under 'state_dict', 'model' or 'module', keys possibly prefixed 'module.').
    Returns:
        name -> tensor on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FiseclipError(f"checkpoint {path} does not exist")
    kind = _sniff(path)
    if path.suffix == ".safetensors":
        if kind != "safetensors":
            raise FiseclipError(f"{path} is named .safetensors but is {_LOOKS[kind]}; "
                                f"pass the real safetensors file (or rename a torch file to .pt)")
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:
            raise FiseclipError(f"{path} is a damaged safetensors file ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); download or export it again") from None
    else:
        if kind not in ("zip", "pickle"):
            hint = "; rename it to .safetensors" if kind == "safetensors" else ""
            raise FiseclipError(f"{path} is not a torch checkpoint (it is {_LOOKS[kind]}){hint}; "
                                f"pass a .safetensors file or a torch state dict")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if kind == "zip":
                try:
                    names = zipfile.ZipFile(path).namelist()
                except zipfile.BadZipFile:
                    names = []
                if any(n.endswith("constants.pkl") for n in names):
                    raise FiseclipError(
                        f"{path} is a TorchScript archive (OpenAI's original .pt), which cannot be loaded safely; "
                        f"use the open_clip hub weights (`fiseclip fetch-weights`) or a .safetensors export"
                    ) from None
            raise FiseclipError(f"{path} cannot be loaded with weights_only=True ({type(e).__name__}); "
                                f"save it as .safetensors or a plain state dict") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise FiseclipError(f"{path} does not hold a state dict (name -> tensor); save model.state_dict()")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_into(module: torch.nn.Module, sd: dict, path) -> None:
    """Copy a state dict into a module; keys and shapes must fit exactly (else one line naming the file).

    Args:
        module: the freshly built model.
        sd: name -> tensor.
        path: shown in errors.
    """
    target = module.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise FiseclipError(
            f"{path} does not fit this model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); check --model"
        )
    wrong = [(k, tuple(sd[k].shape), tuple(t.shape)) for k, t in target.items() if tuple(sd[k].shape) != tuple(t.shape)]
    if wrong:
        k, got, want = wrong[0]
        raise FiseclipError(
            f"{path} does not fit this model: {len(wrong)} tensors of the wrong shape (e.g. {k}: {got}, "
            f"model expects {want}); check --model"
        )
    module.load_state_dict(sd, strict=True)
