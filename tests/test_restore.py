"""encoder/restore.py: the last-block restoration operators against naive per-head code, and the attention
statistics of the studies."""
import numpy as np
import pytest
import torch

from fiseclip_lib.encoder.restore import OPERATORS, gaussian_window, mean_attention_distance, restore_block


def naive(block, x, grid, op):
    """Per-head loop written from the formulas in METHOD.md, independent of restore.py."""
    attn = block.attn
    heads = attn.num_heads
    c = x.shape[-1]
    d = c // heads
    y = block.ln_1(x)
    W, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = y @ W[:c].T + b[:c], y @ W[c:2 * c].T + b[c:2 * c], y @ W[2 * c:].T + b[2 * c:]
    s = d ** -0.5
    h, w = grid
    L = x.shape[1]
    G = torch.zeros(L, L)
    for i in range(1, L):
        for j in range(1, L):
            yi, xi = divmod(i - 1, w)
            yj, xj = divmod(j - 1, w)
            G[i, j] = torch.exp(torch.tensor(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * 5.0 ** 2)))
    outs = []
    for hd in range(heads):
        qh, kh, vh = (t[..., hd * d:(hd + 1) * d] for t in (q, k, v))
        if op == "vanilla":
            a = torch.softmax(qh @ kh.transpose(-1, -2) * s, -1)
        elif op == "maskclip":
            a = torch.eye(L).expand(x.shape[0], L, L)
        elif op == "sclip":
            a = torch.softmax(qh @ qh.transpose(-1, -2) * s, -1) + torch.softmax(kh @ kh.transpose(-1, -2) * s, -1)
        elif op == "clearclip":
            a = torch.softmax(qh @ qh.transpose(-1, -2) * s, -1)
        elif op == "naclip":
            a = torch.softmax(kh @ kh.transpose(-1, -2) * s + G, -1)
        elif op == "vv":
            a = torch.softmax(vh @ vh.transpose(-1, -2) * s, -1)
        outs.append(a @ vh)
    o = torch.cat(outs, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    residual = op in ("vanilla", "maskclip", "sclip", "vv")
    mlp = op in ("vanilla", "maskclip", "sclip")
    if residual:
        o = x + o
    if mlp:
        o = o + block.mlp(block.ln_2(o))
    return o


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_operator_equals_naive_per_head_implementation(tiny_encoder, op):
    block = tiny_encoder.model.visual.transformer.resblocks[-1]
    grid = (4, 5)
    x = torch.randn(2, 1 + 20, 64)
    with torch.no_grad():
        got, _ = restore_block(block, x, grid, op)
        want = naive(block, x, grid, op)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_vanilla_equals_the_block_itself(tiny_encoder):
    block = tiny_encoder.model.visual.transformer.resblocks[-1]
    x = torch.randn(3, 1 + 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restore_block(block, x, (8, 8), "vanilla")[0], block(x), rtol=1e-5, atol=1e-5)


def test_operators_differ_from_each_other(tiny_encoder):
    block = tiny_encoder.model.visual.transformer.resblocks[-1]
    x = torch.randn(1, 1 + 16, 64)
    with torch.no_grad():
        outs = {op: restore_block(block, x, (4, 4), op)[0] for op in OPERATORS}
    names = sorted(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_gaussian_window_zero_for_class_token_and_peaks_on_diagonal():
    g = gaussian_window((3, 3))
    assert g.shape == (10, 10)
    assert torch.all(g[0] == 0) and torch.all(g[:, 0] == 0)
    assert torch.allclose(torch.diagonal(g)[1:], torch.ones(9))
    assert g[1, 2] > g[1, 3] > 0  # neighbour closer than two steps away


def test_mean_attention_distance_of_uniform_identity_and_local_attention():
    grid = (3, 3)
    L = 10
    assert mean_attention_distance(None, grid) == 0.0
    eye = torch.eye(L)[None, None]
    assert mean_attention_distance(eye, grid) == pytest.approx(0.0)
    uniform = torch.full((1, 1, L, L), 1.0 / L)
    ys, xs = np.meshgrid(range(3), range(3), indexing="ij")
    pos = np.stack([ys.ravel(), xs.ravel()], 1)
    naive = np.mean([np.mean([np.linalg.norm(a - b) for b in pos]) for a in pos])
    assert mean_attention_distance(uniform, grid) == pytest.approx(naive, rel=1e-5)
