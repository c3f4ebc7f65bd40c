"""WinCLIP's encoder side: window embeddings of a ViT, and text embeddings before normalisation.

A window of `s x s` patches is embedded as WinCLIP defines it: the class token and only the window's patch
tokens (position embeddings already added) go through `ln_pre`, every block, `ln_post` and the projection, as
a sequence of their own, so that the class token summarises that window alone. Windows slide with stride 1
over the patch grid, in row-major order of their top-left patch (`window_index`); the scoring that uses them
is `core/winclip.py`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fiseclip_lib.encoder.device import autocast
from fiseclip_lib.errors import FiseclipError

WINDOW_SEQUENCES = 2048  # windows per transformer call: bounds memory on large grids, results do not change


def window_index(grid: tuple[int, int], scale: int) -> torch.Tensor:
    """Patch indices of every `scale x scale` window of a patch grid (stride 1).

    Args:
        grid: (h, w) of the patch grid; patches are numbered row-major.
        scale: the window side in patches.
    Returns:
        Long tensor `[W, scale * scale]`, W = (h - scale + 1)(w - scale + 1): row i lists the patches of the
        window whose top-left patch is the i-th in row-major order, each window's patches row-major.
    """
    h, w = (int(g) for g in grid)
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise FiseclipError(f"window scale {scale!r} must be a positive number of patches")
    if scale > min(h, w):
        raise FiseclipError(f"a {scale}x{scale}-patch window does not fit the {h}x{w} patch grid: use a larger "
                            f"image size (more patches) or smaller window scales")
    rows = torch.arange(h - scale + 1)[:, None] * w + torch.arange(w - scale + 1)[None, :]  # top-left patches
    offsets = torch.arange(scale)[:, None] * w + torch.arange(scale)[None, :]  # within a window
    return (rows.reshape(-1, 1) + offsets.reshape(1, -1)).long()


def _embed_sequences(encoder, seqs: torch.Tensor) -> torch.Tensor:
    """Sequences `[B, L, C]` (class token first, before `ln_pre`) -> projected pooled embeddings `[B, D]`."""
    v = encoder.model.visual
    x = v.ln_pre(v.patch_dropout(seqs))
    for block in v.transformer.resblocks:
        x = block(x)
    pooled = encoder._global_pool(x)
    return pooled @ v.proj if v.proj is not None else pooled


@torch.no_grad()
def window_embeddings(encoder, pixels: torch.Tensor, scales: Sequence[int]) -> dict[int, torch.Tensor]:
    """WinCLIP's window embeddings at each scale (module doc).

    Args:
        encoder: a `ClipEncoder` (a ViT with class-token or average pooling).
        pixels: normalised `[N, 3, H, W]`.
        scales: window sides in patches (WinCLIP: 2 and 3).
    Returns:
        {scale: `[N, W, D]` float32 on the CPU}, not L2-normalised (WinCLIP's scores are cosines), windows in
        `window_index` order. Each image is embedded alone, so a result does not depend on the batch.
    """
    if getattr(encoder.model, "visual", None) is None or not hasattr(encoder.model.visual, "transformer"):
        raise FiseclipError(f"{encoder.model_name}: WinCLIP's windows need a CLIP ViT; use e.g. ViT-B-16-plus-240")
    out: dict[int, list] = {int(s): [] for s in scales}
    with autocast(encoder.device, encoder.precision):
        tokens = encoder.embed_tokens(pixels)
        gh, gw = pixels.shape[-2] // encoder.patch_size, pixels.shape[-1] // encoder.patch_size
        for s in out:
            # class token (index 0) first, then the window's patches (token i + 1 is patch i)
            win = window_index((gh, gw), s)
            idx = torch.cat([torch.zeros(len(win), 1, dtype=torch.long), win + 1], dim=1).to(tokens.device)
            for image in tokens:
                seqs = image[idx]  # [W, 1 + s*s, C]
                parts = [_embed_sequences(encoder, seqs[i:i + WINDOW_SEQUENCES])
                         for i in range(0, len(seqs), WINDOW_SEQUENCES)]
                out[s].append(torch.cat(parts).float().cpu())
    return {s: torch.stack(v) for s, v in out.items()}


@torch.no_grad()
def raw_text_embeddings(encoder, prompts: Sequence[str]) -> torch.Tensor:
    """The text tower's embeddings of prompts before L2 normalisation (WinCLIP averages these per class).

    Args:
        encoder: a `ClipEncoder`.
        prompts: the prompts.
    Returns:
        `[len(prompts), D]` float32 on the CPU.
    """
    tokens = encoder.tokenizer(list(prompts)).to(encoder.device)
    with autocast(encoder.device, encoder.precision):
        emb = encoder.model.encode_text(tokens, normalize=False)
    return emb.float().cpu()


@torch.no_grad()
def patch_embeddings(encoder, last_tokens: torch.Tensor) -> torch.Tensor:
    """WinCLIP's patch embeddings: the last block's patch tokens after `ln_post`, not projected.

    Args:
        encoder: a `ClipEncoder`.
        last_tokens: `[N, P, C]` raw patch tokens of the last block (`Features.layers[num_layers]`).
    Returns:
        `[N, P, C]` float32 on the CPU.
    """
    v = encoder.model.visual
    dtype = next(encoder.model.parameters()).dtype
    with autocast(encoder.device, encoder.precision):
        return v.ln_post(last_tokens.to(encoder.device, dtype)).float().cpu()
