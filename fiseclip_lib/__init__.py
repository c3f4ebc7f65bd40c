"""fiseclip: a workbench for FiSeCLIP zero-shot anomaly detection (reference implementation).

Data flow, one module per stage: encoder -> restore -> text -> filtering -> matching -> fusion ->
postprocess -> metrics; `pipeline.Detector` composes them, `config.FiseConfig` configures them,
`run.run_benchmark` evaluates them over datasets.
"""
__version__ = "0.1.0"

from .config import FiseConfig  # noqa: E402
from .encoder import Features, load_encoder  # noqa: E402
from .errors import FiseclipError  # noqa: E402
from .pipeline import BatchResult, Detector  # noqa: E402

__all__ = ["FiseConfig", "Detector", "BatchResult", "Features", "load_encoder", "FiseclipError", "__version__"]
