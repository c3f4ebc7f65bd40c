"""open_clip ViTs: patch tokens per block, the restored path over the last block(s), the global embedding.

Positional embeddings are resized (bicubic) on the fly for any input grid and never written back into the
model; the restoration (restore.py) reads the blocks' weights and never changes them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.encoder.base import Encoder
from fiseclip_lib.encoder.device import autocast
from fiseclip_lib.features import Features


def resize_pos_embed(pe: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A positional embedding `[1 + h0 w0, C]` resized bicubically to `[1 + h w, C]` (a new tensor).

    Args:
        pe: the model's positional embedding, class token first.
        old_grid: (h0, w0) the embedding was trained for.
        new_grid: (h, w) wanted.
    Returns:
        The resized copy (`pe` itself when the grids are equal).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pe
    (g0h, g0w), (gh, gw) = old_grid, new_grid
    cls_pe, grid_pe = pe[:1], pe[1:]
    grid_pe = grid_pe.float().reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
    grid_pe = F.interpolate(grid_pe, size=(gh, gw), mode="bicubic", align_corners=False)
    grid_pe = grid_pe.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pe.dtype)
    return torch.cat([cls_pe, grid_pe], dim=0)


class ClipEncoder(Encoder):
    """An open_clip ViT: patch tokens per block, restored last block(s), global embedding."""

    def __init__(self, model, tokenizer, **kw):
        super().__init__(model=model, **kw)
        self.tokenizer = tokenizer
        self._pos_cache: dict = {}
        v = model.visual
        if getattr(v, "attn_pool", None) is not None:
            raise FiseclipError(f"{self.model_name}: attention-pooled vision towers are not supported; use a ViT")
        if not getattr(v.transformer, "batch_first", True):
            raise FiseclipError(f"{self.model_name}: sequence-first transformers are not supported")
        if getattr(v, "pool_type", "tok") not in ("tok", "avg"):
            # 'none' has no global embedding (open_clip returns every token), so image scores could not work.
            raise FiseclipError(f"{self.model_name}: vision pool_type {v.pool_type!r} is not supported; "
                                f"use a model whose vision_cfg pool_type is 'tok' or 'avg'")

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        v = self.model.visual
        if (gh, gw) == tuple(v.grid_size):
            return v.positional_embedding
        if (gh, gw) not in self._pos_cache:
            with torch.no_grad():
                self._pos_cache[(gh, gw)] = resize_pos_embed(v.positional_embedding, tuple(v.grid_size), (gh, gw))
        return self._pos_cache[(gh, gw)]

    def identity(self) -> dict:
        """The base identity, plus the global pooling for non-`tok` towers: their global embeddings changed
        when pooling was made to follow open_clip (ln_post before the mean), so features cached before must
        not be reused. `tok` identities (and their cache keys) are unchanged."""
        ident = super().identity()
        v = self.model.visual
        if v.pool_type != "tok":
            after = bool(getattr(v, "final_ln_after_pool", False))
            ident["global_pool"] = f"{v.pool_type}:" + ("pool-then-ln_post" if after else "ln_post-then-pool")
        return ident

    def _global_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, ln_post-normalised last-block tokens `[N, C]`, as open_clip's VisionTransformer._pool
        computes them: ln_post before pooling unless `final_ln_after_pool` (LayerNorm is per token, so for
        `tok` the order does not matter and one token is normalised)."""
        v = self.model.visual
        if v.pool_type == "tok":
            return v.ln_post(x[:, 0])
        if getattr(v, "final_ln_after_pool", False):
            return v.ln_post(x[:, 1:].mean(1))
        # Normalising the mean is not the mean of the normalised tokens.
        return v.ln_post(x[:, 1:]).mean(1)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.ln_post(x)
        if v.proj is not None:
            x = x @ v.proj
        return F.normalize(x.float(), dim=-1)

    def embed_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT's input sequence: class token and patch embeddings plus position embeddings (before `ln_pre`).

        Args:
            pixels: normalised `[N, 3, H, W]`.
        Returns:
            `[N, 1 + P, C]` in the model's dtype, on its device.
        """
        v = self.model.visual
        x = v.conv1(pixels.to(self.device, next(self.model.parameters()).dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, layers=None, restore: str | None = None,
                return_attention: bool = False) -> Features:
        """One forward.

        Args:
            pixels: a normalised `[N, 3, H, W]` tensor (H, W multiples of the patch size), or images/paths.
            layers: 1-based blocks whose raw patch tokens to return (default: the quarters).
            restore: a restoration operator (restore.py) for the dense features; None skips them.
            return_attention: also return the last restored block's attention.
        Returns:
            Features.
        """
        from fiseclip_lib.encoder.restore import restore_last_blocks

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
        gh, gw = h // ps, w // ps  # the patch grid (conv1's stride is the patch size)
        with autocast(self.device, self.precision):
            x = v.ln_pre(v.patch_dropout(self.embed_tokens(pixels)))
            blocks = v.transformer.resblocks
            first_restored = len(blocks) - self.restore_depth + 1  # 1-based
            tokens: dict[int, torch.Tensor] = {}
            restored_inputs = []
            for i, block in enumerate(blocks, start=1):
                if i >= first_restored:
                    restored_inputs.append(x)
                # Each block returns a new tensor, and we copy the slice, so no layer aliases another.
                x = block(x)
                if i in layers:
                    tokens[i] = x[:, 1:, :].float().clone()
            pooled = self._global_pool(x)
            if v.proj is not None:
                # One row at a time: a [N, C] @ [C, D] product may round differently for N = 1 and N = 8
                # (BLAS picks other kernels), and the global embedding must not depend on `encode_batch`.
                pooled = torch.cat([row[None] @ v.proj for row in pooled])
            glob = F.normalize(pooled.float(), dim=-1)
            dense = attention = None
            if restore is not None:
                restored, attention = restore_last_blocks(list(blocks)[first_restored - 1:], restored_inputs,
                                                          (gh, gw), restore)
                dense = self._project(restored[:, 1:, :])
                attention = attention.float() if (return_attention and attention is not None) else None
        return Features(layers=tokens, grid=(int(gh), int(gw)), global_embedding=glob, dense=dense,
                        attention=attention)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> `[len(prompts), D]` L2-normalised text embeddings."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with autocast(self.device, self.precision):
            emb = self.model.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1)
