"""Provenance: versions, git commit and machine facts recorded with every result."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: this encoder was randomly initialised; its numbers test the code path "
                       "and say nothing about the method's quality")


def banner_html(pretrained: bool) -> str:
    """The red banner shown wherever numbers from random weights appear (empty for pretrained weights)."""
    if pretrained:
        return ""
    import html

    return ('<div style="background:#b00020;color:white;padding:8px 12px;margin:6px 0;font-weight:bold">'
            f"{html.escape(RANDOM_WEIGHTS_NOTE)}</div>")


def git_commit() -> str:
    """The commit of the checkout this package runs from ('unknown' outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import sys
    from importlib import metadata

    import numpy
    import torch

    from . import __version__

    out = {"fiseclip": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__}
    # The installed distribution's version, without importing it (papermill, sklearn and open_clip cost seconds
    # to import in every notebook kernel and run that records provenance); a module already loaded says its own.
    for name, dist in (("open_clip", "open_clip_torch"), ("timm", "timm"), ("sklearn", "scikit-learn"),
                       ("pandas", "pandas"), ("papermill", "papermill")):
        if name in sys.modules:
            out[name] = getattr(sys.modules[name], "__version__", "?")
            continue
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.machine(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "machine": machine()}
