"""fiseclip: a workbench for FiSeCLIP zero-shot anomaly detection (reference implementation).

Data flow, one module per stage: encoder -> restore -> text -> filtering -> matching -> fusion ->
postprocess -> metrics; `pipeline.Detector` composes them, `config.FiseConfig` configures them,
`run.run_benchmark` evaluates them over datasets.
"""
__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin while waiting make every small torch op cost milliseconds as soon as another
# process competes for the cores (measured: 4 small batches 9 s instead of 0.09 s with one busy neighbour on
# 2 cores). Passive waiting costs nothing measurable on a quiet machine and lets concurrent runs, notebooks
# and Dask workers degrade gracefully. It only takes effect if torch is not imported yet; set the variable
# yourself to choose otherwise.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import FiseConfig  # noqa: E402
from .encoder import Features, load_encoder  # noqa: E402
from .errors import FiseclipError  # noqa: E402
from .pipeline import BatchResult, Detector  # noqa: E402

__all__ = ["FiseConfig", "Detector", "BatchResult", "Features", "load_encoder", "FiseclipError", "__version__"]
