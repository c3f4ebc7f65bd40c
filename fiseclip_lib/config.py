"""One typed configuration object for the whole pipeline.

Each field says whether its default is stated by the paper's abstract ("paper") or is our reading
("reconstruction"). `FiseConfig.with_overrides(["key=value", ...])` is what `--set` uses.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from .errors import FiseclipError
from .filtering import FILTER_MODES
from .fusion import FUSION_MODES
from .restore import OPERATORS

METHODS = ("fiseclip", "fiseclip-nofilter", "musc", "text")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class FiseConfig:
    """All options of a FiSeCLIP run. Defaults are the paper setting where stated, else our reconstruction."""

    # method under the common harness
    method: str = "fiseclip"  # fiseclip | fiseclip-nofilter | musc | text
    # encoder (reconstruction: the MuSc / zero-shot AD setting)
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    image_size: int = 518
    layers: typing.Optional[typing.Tuple[int, ...]] = None  # 1-based; None = the encoder's quarters (6,12,18,24 for ViT-L)
    device: str = "auto"
    precision: str = "fp32"
    cache_dir: typing.Optional[str] = None
    encode_batch: int = 8  # images through the encoder at once: a memory knob, changes no number
    # restoration of the last block (paper: restore local semantics; operator: reconstruction)
    restore: str = "clearclip"
    # text (reconstruction: the prompt ensemble of the zero-shot AD literature)
    text_temperature: float = 100.0
    class_names: typing.Dict[str, str] = field(default_factory=dict)
    # reference filtering (paper: text filters noisy references; rule: reconstruction)
    filter: str = "threshold"
    filter_theta: float = 0.5
    filter_ratio: float = 0.1
    filter_min_keep: float = 0.1
    # batch matching (paper: batch-wise, references = other images of the batch; details: MuSc)
    batch_size: int = 16
    shuffle: bool = True
    seed: int = 0
    degrees: typing.Tuple[int, ...] = (1, 3, 5)
    topmin_max: float = 0.3
    match_dtype: str = "fp32"  # fp32 | bf16 GEMMs in matching
    musc_pool: str = "batch"  # batch | category (method musc only: the whole category as one pool)
    # fusion (paper: "mutual filtering"; rule: reconstruction)
    fusion: str = "additive"
    alpha: float = 0.5
    gate_tau: float = 0.5
    # post-processing (reconstruction)
    sigma: float = 4.0
    beta: float = 0.0
    rscin: bool = False
    rscin_ks: typing.Tuple[int, ...] = (1, 2, 3)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "FiseConfig":
        choices = {
            "method": METHODS, "restore": tuple(OPERATORS), "filter": FILTER_MODES, "fusion": FUSION_MODES,
            "precision": PRECISIONS, "match_dtype": ("fp32", "bf16"), "musc_pool": ("batch", "category"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FiseclipError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.batch_size is None or int(self.batch_size) < 1:
            raise FiseclipError(f"batch size {self.batch_size} must be >= 1 (use musc_pool=category for whole categories)")
        if self.encode_batch < 1:
            raise FiseclipError(f"encode_batch {self.encode_batch} must be >= 1")
        if self.image_size < 1:
            raise FiseclipError(f"image size {self.image_size} must be positive")
        if any(r < 1 or r % 2 == 0 for r in self.degrees):
            raise FiseclipError(f"degrees {self.degrees} must be positive odd integers")
        if not 0 < self.topmin_max <= 1:
            raise FiseclipError(f"topmin_max {self.topmin_max} must be in (0, 1]")
        if not 0 <= self.alpha <= 1:
            raise FiseclipError(f"alpha {self.alpha} must be in [0, 1]")
        if not 0 <= self.filter_min_keep <= 1:
            raise FiseclipError(f"filter_min_keep {self.filter_min_keep} must be in [0, 1]")
        if self.sigma < 0:
            raise FiseclipError(f"sigma {self.sigma} must be >= 0")
        return self

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "FiseConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FiseclipError(f"unknown option(s) {unknown}; known: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in d.items()})

    def replace(self, **changes) -> "FiseConfig":
        return FiseConfig.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, pairs) -> "FiseConfig":
        """Apply `key=value` strings (as given to --set)."""
        changes = {}
        for pair in pairs or []:
            if "=" not in pair:
                raise FiseclipError(f"--set {pair!r}: expected key=value, e.g. --set filter_theta=0.4")
            k, v = pair.split("=", 1)
            changes[k.strip()] = v.strip()
        return self.replace(**changes)


def _coerce(name: str, value, hint):
    """Turn strings (from --set or YAML) into the field's type; a bad value is a one-line error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin is typing.Union:  # Optional[X]
            if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
                return None
            inner = [a for a in args if a is not type(None)][0]
            return _coerce(name, value, inner)
        if origin in (tuple, typing.Tuple):
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
            return tuple(args[0](v) for v in value)
        if origin in (dict, typing.Dict):
            if isinstance(value, str):
                value = dict(item.split(":", 1) for item in value.split(",") if item)
            return {str(k): str(v) for k, v in value.items()}
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in {"1", "true", "yes", "on"}:
                    return True
                if value.lower() in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (ValueError, TypeError, AttributeError):
        raise FiseclipError(f"option {name}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
