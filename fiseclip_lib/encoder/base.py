"""The interface every encoder shares, and its identity (what cache keys and provenance record)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.features import Features
from fiseclip_lib.encoder.preprocess import Preprocessing, preprocess_images


@dataclass
class Encoder:
    """Common interface. Subclasses implement `forward`.

    `image_size` is the size maps are reported at; `input_size` (default: the same) is the pixel size the
    network sees, which differs only where the network needs a multiple of its stride (EfficientNet-Lite0).
    """

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
    weights_id: str = ""  # content identity of the weights: sha256 of the file, or the random seed
    interpolation: str = "bicubic"
    quick_gelu: bool = False
    restore_depth: int = 1  # number of last blocks the restored path recomputes
    input_size: int | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)
    # text embeddings by content key (core/text.py): the weights never change, so an entry never goes stale
    text_memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def pixel_size(self) -> int:
        """The square side the network sees."""
        return self.input_size or self.image_size

    @property
    def grid(self) -> tuple[int, int]:
        g = self.pixel_size // self.patch_size
        return (g, g)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(mean=tuple(self.mean), std=tuple(self.std), interpolation=self.interpolation)

    def identity(self) -> dict:
        """A JSON-able description used in provenance and cache keys: it changes whenever features could.

        Returns:
            model, weights (as asked), weights_id (content hash or seed), pretrained, image_size, input_size,
            precision, quick_gelu, mean, std, interpolation, restore_depth.
        """
        return {
            "model": self.model_name,
            "weights": self.weights,
            "weights_id": self.weights_id,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "input_size": self.pixel_size,
            "precision": self.precision,
            "quick_gelu": bool(self.quick_gelu),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
            "interpolation": self.interpolation,
            "restore_depth": int(self.restore_depth),
        }

    def with_restore_depth(self, depth: int) -> "Encoder":
        """The same encoder (sharing the model) with another restoration depth.

        Args:
            depth: number of last blocks the restored path recomputes, 1..num_layers.
        Returns:
            A shallow copy; this encoder is unchanged.
        """
        check_restore_depth(depth, self.num_layers, self.model_name)
        other = copy.copy(self)
        other.restore_depth = int(depth)
        return other

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images, arrays or paths -> normalised `[N, 3, S, S]` float tensor on the CPU (S = pixel_size)."""
        return preprocess_images(images, self.pixel_size, self.preprocessing)

    def _pixels(self, images) -> torch.Tensor:
        """A normalised pixel tensor as is; anything else (PIL images, arrays, paths) goes through `preprocess`."""
        return images if torch.is_tensor(images) else self.preprocess(images)

    def check_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Validate 1-based block indices (None = the defaults) and return them sorted and unique."""
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


def check_restore_depth(depth, num_layers: int, model_name: str) -> None:
    """One-line error unless 1 <= depth <= num_layers."""
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= num_layers:
        raise FiseclipError(f"restore_depth {depth!r} invalid for {model_name}: use 1..{num_layers} "
                            f"(the number of last blocks the restored path recomputes; CLIP Surgery uses 6)")
