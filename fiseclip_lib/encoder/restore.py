"""Local semantic restoration: the last ViT block(s) recomputed with another attention (option `restore`).

CLIP's last block attends globally, so its patch tokens carry image-level semantics and align poorly with
text at the patch level. The training-free fix (paper: "restore local semantic correlation") recomputes the
last block from `ln_1(x)` with the block's own q, k, v and out_proj weights. Each operator below is one small
function returning the attention matrix (None = identity attention, out = v); `OPERATORS` says whether the
residual and the MLP are kept. Which operator FiSeCLIP uses is not public: `clearclip` is our default
(reconstruction), the others are there to compare.

Depth (option `restore_depth`, default 1 = the last block only): `restore_last_blocks` rewrites the last d
blocks as a second path beside the original one, the way CLIP Surgery's dual path does: each rewritten block
takes q, k, v from the ORIGINAL tokens entering it (`ln_1` of the original path), and adds its output to the
restored path's own running residual (the previous rewritten block's output); the MLP is applied to the
restored path when the operator keeps it. The original path, and so the raw tokens used for matching, is
never changed. Consequences: depth 1 is `restore_block` itself; `vanilla` gives the original tokens at any
depth; for operators without residual (`clearclip`, `naclip`) only the last block's output survives, so
depth changes nothing for them.

`vv` is CLIP Surgery's v-v attention (softmax(v v^T s), residual kept, MLP skipped). CLIP Surgery applies it
to the last six blocks (`restore_depth=6` here); GEM is a different operator (iterated, normalised
self-self attention over q, k and v with its own temperature) and is not implemented here.

Shapes: q, k, v are `[N, heads, L, d]` with the class token at position 0 and L = 1 + h * w.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fiseclip_lib.errors import FiseclipError

NACLIP_SIGMA = 5.0  # Gaussian std in patches (NACLIP's choice)


def attn_vanilla(q, k, v, grid):
    """softmax(q k^T s): the block as CLIP computes it."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def attn_maskclip(q, k, v, grid):
    """Identity attention: each token keeps its own value (MaskCLIP)."""
    return None


def attn_sclip(q, k, v, grid):
    """softmax(q q^T s) + softmax(k k^T s): correlative self-attention (SCLIP)."""
    s = q.shape[-1] ** -0.5
    return torch.softmax(q @ q.transpose(-1, -2) * s, dim=-1) + torch.softmax(k @ k.transpose(-1, -2) * s, dim=-1)


def attn_clearclip(q, k, v, grid):
    """softmax(q q^T s) (ClearCLIP; residual and MLP removed)."""
    return torch.softmax(q @ q.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def gaussian_window(grid: tuple[int, int], sigma: float = NACLIP_SIGMA, device=None, dtype=None) -> torch.Tensor:
    """`[L, L]` additive bias exp(-d^2 / 2 sigma^2) over patch-grid distance; zero for the class token."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(torch.float32)
    d2 = torch.cdist(pos, pos).pow(2)
    g = torch.zeros(h * w + 1, h * w + 1, device=device, dtype=torch.float32)
    g[1:, 1:] = torch.exp(-d2 / (2 * sigma ** 2))
    return g.to(dtype or torch.float32)


def attn_naclip(q, k, v, grid):
    """softmax(k k^T s + G), G a Gaussian neighbourhood window (NACLIP; residual and MLP removed)."""
    s = q.shape[-1] ** -0.5
    return torch.softmax(k @ k.transpose(-1, -2) * s + gaussian_window(grid, device=k.device, dtype=k.dtype), dim=-1)


def attn_vv(q, k, v, grid):
    """softmax(v v^T s) (CLIP Surgery's v-v attention; residual kept, MLP removed)."""
    return torch.softmax(v @ v.transpose(-1, -2) * v.shape[-1] ** -0.5, dim=-1)


@dataclass(frozen=True)
class Operator:
    attention: Callable
    residual: bool
    mlp: bool
    source: str  # where the variant comes from


OPERATORS: dict[str, Operator] = {
    "vanilla": Operator(attn_vanilla, residual=True, mlp=True, source="CLIP"),
    "maskclip": Operator(attn_maskclip, residual=True, mlp=True, source="MaskCLIP"),
    "sclip": Operator(attn_sclip, residual=True, mlp=True, source="SCLIP"),
    "clearclip": Operator(attn_clearclip, residual=False, mlp=False, source="ClearCLIP"),
    "naclip": Operator(attn_naclip, residual=False, mlp=False, source="NACLIP"),
    "vv": Operator(attn_vv, residual=True, mlp=False, source="CLIP Surgery (v-v attention; it uses 6 blocks)"),
}
DEFAULT_OPERATOR = "clearclip"  # reconstruction: cleanest patch-text alignment in the open-vocabulary literature


def qkv_heads(block, x: torch.Tensor):
    """q, k, v `[N, heads, L, d]` from a ResidualAttentionBlock's own weights (no copies of them)."""
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention):
        raise FiseclipError(f"restoration needs nn.MultiheadAttention blocks, got {type(attn).__name__}")
    y = block.ln_1(x)
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    n, L, c = q.shape
    heads = attn.num_heads

    def split(t):
        return t.reshape(n, L, heads, c // heads).transpose(1, 2)

    return split(q), split(k), split(v)


def restore_block(block, x: torch.Tensor, grid: tuple[int, int], operator: str = DEFAULT_OPERATOR,
                  stream: torch.Tensor | None = None):
    """Recompute `block` on its input `x` `[N, L, C]` with the chosen operator.

    Args:
        block: an open_clip ResidualAttentionBlock (its weights are read, never changed).
        x: the original tokens entering the block: q, k, v come from `ln_1(x)`.
        grid: the patch grid (h, w).
        operator: a key of `OPERATORS`.
        stream: the restored path's running residual (default `x`; see `restore_last_blocks`).
    Returns:
        The block output `[N, L, C]` (before ln_post / proj) and the attention `[N, heads, L, L]`
        (None for identity attention). `vanilla` reproduces `block(x)`.
    """
    if operator not in OPERATORS:
        raise FiseclipError(f"unknown restoration {operator!r}: choose one of {sorted(OPERATORS)}")
    op = OPERATORS[operator]
    q, k, v = qkv_heads(block, x)
    a = op.attention(q, k, v, grid)
    out = v if a is None else a.to(v.dtype) @ v
    n, heads, L, d = out.shape
    out = block.attn.out_proj(out.transpose(1, 2).reshape(n, L, heads * d))
    out = (x if stream is None else stream) + block.ls_1(out) if op.residual else out
    if op.mlp:
        out = out + block.ls_2(block.mlp(block.ln_2(out)))
    return out, a


def restore_last_blocks(blocks, inputs, grid: tuple[int, int], operator: str = DEFAULT_OPERATOR):
    """The restored path over the last `len(inputs)` blocks (CLIP Surgery's dual path; module doc).

    Args:
        blocks: the rewritten blocks, in order (the last d blocks of the tower).
        inputs: the original tokens entering each of them `[N, L, C]` (the original path, unchanged).
        grid: the patch grid (h, w).
        operator: a key of `OPERATORS`.
    Returns:
        The restored output `[N, L, C]` of the last block and that block's attention (None for identity).
    """
    if len(blocks) != len(inputs) or not inputs:
        raise FiseclipError(f"restoration needs one input per rewritten block ({len(blocks)} blocks, {len(inputs)} inputs)")
    stream, attention = inputs[0], None
    for block, x in zip(blocks, inputs):
        stream, attention = restore_block(block, x, grid, operator, stream=stream)
    return stream, attention


def mean_attention_distance(attention: torch.Tensor | None, grid: tuple[int, int]) -> float:
    """Locality of an attention `[N, heads, L, L]`: the attention-weighted mean distance (in patches) from each
    patch to the patches it attends to, averaged over patches, heads and images (class token excluded and the
    patch rows renormalised). Identity attention (None) has distance 0."""
    if attention is None:
        return 0.0
    h, w = grid
    a = attention[..., 1:, 1:].float()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float().to(a.device)
    dist = torch.cdist(pos, pos)
    return float((a * dist).sum(-1).mean())
