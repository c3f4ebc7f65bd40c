"""The library's own open_clip model configs (`model_configs/*.json`, e.g. `fiseclip-tiny`), registered once."""
from __future__ import annotations

from pathlib import Path

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_configs_registered = False


def register_model_configs() -> None:
    """Register the library's model configs (`fiseclip-tiny`) with open_clip, once per process."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _configs_registered = True
