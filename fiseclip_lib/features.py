"""The container one encoder forward returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    """What one encoder forward returns.

    layers: 1-based block index -> raw patch tokens `[N, P, C]` (residual stream, class token dropped).
    grid: the patch grid `(h, w)`, `P = h * w`, row-major.
    global_embedding: `[N, D]` L2-normalised image embedding (CLIP only).
    dense: `[N, P, D]` restored patch features in the joint text space, L2-normalised (CLIP only).
    attention: `[N, heads, L, L]` attention of the last restored block (when asked for).
    windows: {scale: `[N, W, D]`} WinCLIP's window embeddings (encoder/windows.py), for methods whose spec has
        window scales; None otherwise.
    """

    layers: dict[int, torch.Tensor]
    grid: tuple[int, int]
    global_embedding: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    windows: dict[int, torch.Tensor] | None = None

    def to(self, device) -> "Features":
        """The same features on another device (cached features live on the CPU).

        Args:
            device: a torch device or its name.
        Returns:
            A new Features; tensors already there are not copied.
        """
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Features(layers={l: t.to(device) for l, t in self.layers.items()}, grid=self.grid,
                        global_embedding=move(self.global_embedding), dense=move(self.dense),
                        attention=move(self.attention),
                        windows=None if self.windows is None else {s: t.to(device) for s, t in self.windows.items()})
