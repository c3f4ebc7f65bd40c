"""Provenance: versions, git commit and machine facts recorded with every result."""
from __future__ import annotations

import contextlib
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
    import numpy
    import torch

    from fiseclip_lib.version import __version__

    out = {"fiseclip": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__}
    for name, dist in (("open_clip", "open_clip_torch"), ("timm", "timm"), ("sklearn", "scikit-learn"),
                       ("pandas", "pandas"), ("papermill", "papermill")):
        version = _module_version(name, dist)
        if version is not None:
            out[name] = version
    return out


def _module_version(name: str, dist: str) -> str | None:
    """The version of the module `import name` would load (None if it cannot be imported).

    Read from the installed distribution `dist` without importing the module when that distribution is what
    the import would load (papermill, sklearn and open_clip cost seconds to import in every notebook kernel
    and run that records provenance); otherwise (a checkout earlier on sys.path, an editable install) from
    the module itself."""
    import importlib
    import importlib.util
    import sys
    from importlib import metadata

    module = sys.modules.get(name)
    if module is None:
        try:
            spec = importlib.util.find_spec(name)  # locates the package without running it
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        with contextlib.suppress(metadata.PackageNotFoundError, TypeError, OSError):
            installed = metadata.distribution(dist)
            init = Path(installed.locate_file(f"{name}/__init__.py"))
            if spec.origin and init.is_file() and init.resolve() == Path(spec.origin).resolve():
                return installed.version
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken optional package is left out of the record
            return None
    return str(getattr(module, "__version__", "?"))


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.machine(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "machine": machine()}
