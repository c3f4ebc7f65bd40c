"""fiseclip: a workbench for FiSeCLIP zero-shot anomaly detection (reference implementation).

Layers, each importing only the ones before it (docs/architecture.md):
  errors, config, features   the vocabulary: errors, the one typed config, the encoder's output
  plumbing/                  atomic files and locks, feature cache, provenance, images, resources
  encoder/                   CLIP ViTs (with the last-block restoration operators) and the CNN
  core/                      the method: text, filtering, matching, fusion, postprocess, and the one scoring
                             path (detector.py: queries against references; pool.py; references.py)
  evaluation/                datasets, demo data, metrics, `run` and `sweep`
  decisions/                 calibrate, predict, stream
  notebook/                  workbench, studies, plots and the report series
  cli.py                     the `fiseclip` command
"""
from fiseclip_lib.version import __version__  # noqa: E402

import os as _os

# OpenMP threads that spin while waiting make every small torch op cost milliseconds as soon as another
# process competes for the cores (measured: 4 small batches 9 s instead of 0.09 s with one busy neighbour on
# 2 cores). Passive waiting costs nothing measurable on a quiet machine and lets concurrent runs, notebooks
# and Dask workers degrade gracefully. It only takes effect if torch is not imported yet; set the variable
# yourself to choose otherwise.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib as _importlib  # noqa: E402
import importlib.abc as _abc  # noqa: E402
import importlib.util as _util  # noqa: E402
import sys as _sys  # noqa: E402

from fiseclip_lib.config import FiseConfig  # noqa: E402
from fiseclip_lib.encoder import Features, load_encoder  # noqa: E402
from fiseclip_lib.errors import FiseclipError  # noqa: E402
from fiseclip_lib.core.detector import BatchResult, Detector  # noqa: E402

__all__ = ["FiseConfig", "Detector", "BatchResult", "Features", "load_encoder", "FiseclipError", "__version__"]

# Module paths before the layers existed (`fiseclip_lib.pipeline`, `fiseclip_lib.predict`, ...) stay importable:
# each old name is the new module itself (same object: monkeypatching through either name works).
MOVED = {
    "pipeline": "core.detector", "filtering": "core.filtering", "fusion": "core.fusion", "matching": "core.matching",
    "_match_kernel": "core._match_kernel", "postprocess": "core.postprocess", "text": "core.text",
    "restore": "encoder.restore", "encoder.features": "features",
    "_io": "plumbing.files", "cache": "plumbing.cache", "provenance": "plumbing.provenance",
    "data": "evaluation.data", "demo": "evaluation.demo", "metrics": "evaluation.metrics", "run": "evaluation.run",
    "sweep": "evaluation.sweep", "calibrate": "decisions.calibrate", "predict": "decisions.predict",
    "stream": "decisions.stream", "workbench": "notebook.workbench", "studies": "notebook.studies",
    "plots": "notebook.plots", "report": "notebook.report",
}


class _MovedModules(_abc.MetaPathFinder, _abc.Loader):
    def find_spec(self, name, path=None, target=None):
        prefix = __name__ + "."
        if name.startswith(prefix) and name[len(prefix):] in MOVED:
            return _util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = _importlib.import_module(f"{__name__}.{MOVED[spec.name[len(__name__) + 1:]]}")
        spec.loader_state = module.__spec__  # the import system replaces it with this alias spec
        return module

    def exec_module(self, module):
        # already executed; give it back its real spec, which reload and autoreload use
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _MovedModules) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModules())
