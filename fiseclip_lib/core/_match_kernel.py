"""Compiled (numba) kernel of the box-filtered matching route: one pass per similarity block, on the CPU.

`matching._box_filtered_distances` multiplies image i against a group of references once per layer and derives
every aggregation degree r from that product S1 (see its docstring). In plain torch each degree costs ~15
memory-bound passes over the block (shifted adds, pooling, scaling, -inf fills, two maxima): more time than the
GEMM itself at the paper shape. This kernel does all of it for one block while the data is in cache: for every
work unit (one reference x `TILE_ROWS` of its grid rows; units run on a thread pool) it streams the rows of S1 in
image i's grid order, box-sums each row over the reference's grid, box-sums those rows over image i's grid
through a ring buffer of 2k + 1 grid rows, scales and takes both masked maxima. Only the inputs and the small
`[degrees, g, P]` maxima cross memory.

Conventions (all float32):
    T_r[p, q] = sum of S1 over the r x r window of p (image i's grid) and the r x r window of q (reference's grid),
        zero outside the grid (= r^4 x the zero-padded box mean);
    cos_r[p, q] = T_r[p, q] * a[r, p] * b[r, q], a and b the inverse window norms including 1/r^2 each;
    out_col[r, j, q] = b[r, q] * max over kept rows p of T_r[p, q] * a[r, p]   (reference patch q vs image i)
    out_row[r, j, p] = a[r, p] * max over kept columns q of reference j of T_r[p, q] * b[r, q]   (p vs reference j)
Excluded columns carry a bias of -1e30 (finite, so fastmath may assume no inf); every image keeps >= 1 patch.

numba is optional (pyproject extra `fast`; docs/matching.md): `available()` is False without it (or when it
fails to compile); engine auto then runs the torch passes (box-torch) and engine box-compiled is an error.
"""
from __future__ import annotations

import os

import numpy as np

NEG = np.float32(-1e30)  # "excluded" as a finite number (fastmath assumes no inf)
TILE_ROWS = 8  # reference grid rows per work unit: at w = 37 (padded to 41) its buffers for degrees 1/3/5 take
# ~0.9 MB, about one core's L2; 4 rows were slower (more halo re-reads), 16 rows within 10 %

try:  # pragma: no cover - exercised where numba is installed (requirements.txt installs it)
    import numba
    from numba import njit
except Exception:  # noqa: BLE001 - any import problem means "use the torch passes"
    numba = None


def _window_sum(src, start, stride, m, out, n):
    """out[q] = sum over i < m of src[start + i * stride + q], q < n: one pass for the usual windows (m = 3, 5).

    Every inner loop runs over views from index 0: numba then needs no negative-index wrap-around and LLVM
    vectorises the loops (3-4x faster than offset indices, measured).
    """
    a0 = src[start:start + n]
    if m == 1:
        for q in range(n):
            out[q] = a0[q]
    elif m == 3:
        a1 = src[start + stride:start + stride + n]
        a2 = src[start + 2 * stride:start + 2 * stride + n]
        for q in range(n):
            out[q] = a0[q] + a1[q] + a2[q]
    elif m == 5:
        a1 = src[start + stride:start + stride + n]
        a2 = src[start + 2 * stride:start + 2 * stride + n]
        a3 = src[start + 3 * stride:start + 3 * stride + n]
        a4 = src[start + 4 * stride:start + 4 * stride + n]
        for q in range(n):
            out[q] = a0[q] + a1[q] + a2[q] + a3[q] + a4[q]
    else:
        for q in range(n):
            out[q] = a0[q]
        for i in range(1, m):
            ai = src[start + i * stride:start + i * stride + n]
            for q in range(n):
                out[q] += ai[q]


def _box_units(S, Sb, bf16, h, w, ks, a, b, row_keep, col_bias, out_col, part, tile_rows, u0, u1):
    """Work units u0..u1 of one block S `[P, g * P]` (see the module docstring). A unit is one reference j and
    `tile_rows` grid rows of its columns: it sweeps image i's grid rows once for all degrees.

    The unit's columns live in a padded layout: each grid row of the reference is stored with kmax zero columns
    on either side (row stride W = w + 2 kmax), and kmax zero grid rows above and below the tile, so every box
    sum is a plain window sum (no edge cases); the pad columns carry garbage after the horizontal sums and are
    excluded by a NEG bias and never written out.

    Args:
        S: float32 `[P, g * P]`, rows = image i's patches, columns = g references' patches (grid order).
        Sb, bf16: when bf16 is True, S is read from Sb instead: the bfloat16 block's bits as uint16, converted
            row by row in cache (no float32 copy of the block); the other array is then a dummy.
        h, w: the grid; ks: int64 `[D]`, half widths k = r // 2.
        a: float32 `[D, P]` row factors; b: float32 `[D, g * P]` column factors.
        row_keep: bool `[P]`; col_bias: float32 `[g * P]`, 0 or NEG.
        out_col: float32 `[D, g, P]`, the unit's columns written (finished: every row is seen).
        part: float32 `[units, D, P]`, row u: maxima over the unit's columns only (unscaled), merged by the caller.
        tile_rows: grid rows of a reference per work unit (the unit's buffers stay in cache).
    """
    P = h * w
    nd = ks.shape[0]
    tiles = (h + tile_rows - 1) // tile_rows
    kmax = 0
    for di in range(nd):
        kmax = max(kmax, ks[di])
    W = w + 2 * kmax
    for u in range(u0, u1):
        j = u // tiles
        y0 = (u % tiles) * tile_rows  # the tile's grid rows of the reference: y0 .. y1 - 1
        y1 = min(h, y0 + tile_rows)
        rows = y1 - y0
        n = rows * W  # padded columns of the tile
        base = j * P  # the reference's first column
        # source: grid rows y0 - kmax .. y1 + kmax - 1 (zero outside the grid), padded
        src = np.zeros((rows + 2 * kmax) * W, dtype=np.float32)
        srcbits = src.view(np.uint32)
        ya, yb = max(0, y0 - kmax), min(h, y1 + kmax)
        vb = np.zeros(n, dtype=np.float32)
        # column-filtered rows of the current grid row of image i, with kmax zero rows on either side (x outside
        # the grid), and a ring of 2k + 1 H rows per degree, zero for grid rows outside the grid
        crow = np.zeros((nd, w + 2 * kmax, n), dtype=np.float32)
        ring = np.zeros((nd, 2 * kmax + 1, w, n), dtype=np.float32)
        t = np.empty(n, dtype=np.float32)
        pcs = np.full((nd, n), NEG, dtype=np.float32)  # column maxima
        vt = np.empty(n, dtype=np.float32)
        vti = vt.view(np.int32)
        keys = np.empty(1, dtype=np.int32)
        bqs = np.zeros((nd, n), dtype=np.float32)  # column factors and bias in the padded layout
        cqs = np.full(n, NEG, dtype=np.float32)
        for r in range(rows):
            for x in range(w):
                for di in range(nd):
                    bqs[di, r * W + kmax + x] = b[di, base + (y0 + r) * w + x]
                cqs[r * W + kmax + x] = col_bias[base + (y0 + r) * w + x]
        # one sweep over image i's grid rows for all degrees: each row of S is read from memory once
        for yy in range(h + kmax):
            if yy < h:
                for x in range(w):
                    p_src = yy * w + x
                    for yr in range(ya, yb):  # the source grid rows into the padded layout
                        dst0 = (yr - y0 + kmax) * W + kmax
                        c0 = base + yr * w
                        if bf16:  # bfloat16 -> float32: the high 16 bits
                            sb = Sb[p_src, c0:c0 + w]
                            d = srcbits[dst0:dst0 + w]
                            for q in range(w):
                                d[q] = np.uint32(sb[q]) << 16
                        else:
                            s32 = S[p_src, c0:c0 + w]
                            d32 = src[dst0:dst0 + w]
                            for q in range(w):
                                d32[q] = s32[q]
                    for di in range(nd):
                        k = ks[di]
                        out = crow[di, kmax + x]
                        if k == 0:
                            _window_sum(src, kmax * W, W, 1, out, n)
                        else:  # vertical (grid rows +- d are d * W apart), then horizontal (neighbours)
                            _window_sum(src, (kmax - k) * W, W, 2 * k + 1, vb, n)
                            _window_sum(vb, 0, 1, 2 * k + 1, out[k:], n - 2 * k)
            for di in range(nd):
                k = ks[di]
                span = 2 * k + 1
                if k > 0:
                    slot = ring[di, yy % span]
                    if yy < h:  # H row yy: the column-filtered rows box-summed along x of image i's grid
                        cflat = crow[di].reshape(-1)
                        for x in range(w):
                            _window_sum(cflat, (kmax - k + x) * n, n, span, slot[x], n)
                    else:  # grid row yy is outside the grid: zero padding
                        slot[:, :] = 0.0
                yo = yy - k
                if yo < 0 or yo >= h:
                    continue
                pc = pcs[di]
                pr = part[u, di]
                bq = bqs[di]
                rflat = ring[di].reshape(-1)
                for x in range(w):
                    if k > 0:  # output grid row yo: T = the sum of the ring's 2k + 1 H rows (zeros outside)
                        _window_sum(rflat, x * n, w * n, span, t, n)
                        tv = t
                    else:
                        tv = crow[di, kmax + x]
                    p = yo * w + x
                    ap = a[di, p]
                    keep_p = row_keep[p]
                    for q in range(n):
                        v = tv[q] * ap
                        pc[q] = v if (keep_p and v > pc[q]) else pc[q]
                        vt[q] = tv[q] * bq[q] + cqs[q]
                    # max over the columns as an integer max of order-preserving keys: LLVM vectorises
                    # integer max reductions, not float ones (measured 2 vs 49 G elements/s)
                    m = np.int32(-2147483647)
                    for q in range(n):
                        key = vti[q] ^ ((vti[q] >> 31) & 0x7FFFFFFF)
                        m = key if key > m else m
                    keys[0] = m ^ ((m >> 31) & 0x7FFFFFFF)
                    pr[p] = keys.view(np.float32)[0]
        for di in range(nd):
            for r in range(rows):
                for x in range(w):
                    out_col[di, j, (y0 + r) * w + x] = pcs[di, r * W + kmax + x] * bqs[di, r * W + kmax + x]


def _jit(fn, **options):
    """njit with numba's on-disk cache (compiled once per install, ~5 s); without it where no cache folder is
    writable (numba refuses `cache=True` at decoration time there)."""
    try:
        return njit(fastmath=True, cache=True, **options)(fn)
    except RuntimeError:
        return njit(fastmath=True, **options)(fn)


if numba is not None:  # pragma: no branch
    _window_sum = _jit(_window_sum, inline="always")
    # serial and GIL-free: threads of a Python pool run disjoint units (numba's parallel=True compiles 2.3x
    # slower, 8 s against 3.5 s on a fresh install, for no speed-up here)
    _box_units = _jit(_box_units, nogil=True)

_STATE = {"ok": None}


def available() -> bool:
    """True when the compiled kernel can run here (numba installed and the kernel compiles)."""
    if _STATE["ok"] is None:
        _STATE["ok"] = False
        if numba is not None:
            try:  # compile (or load from numba's cache) on a tiny block and check one value
                ok = True
                for bf16 in (False, True):
                    S = np.ones((4, 8), dtype=np.float32)
                    Sb = np.full((4, 8), 0x3F80, dtype=np.uint16)  # 1.0 in bfloat16
                    oc = np.empty((1, 2, 4), dtype=np.float32)
                    orow = np.empty((1, 2, 4), dtype=np.float32)
                    block_maxima(Sb if bf16 else S, (2, 2), np.array([1], dtype=np.int64), np.ones((1, 4), np.float32),
                                 np.ones((1, 8), np.float32), np.ones(4, np.bool_), np.zeros(8, np.float32), oc, orow, 2, 1)
                    ok = ok and bool(oc[0, 0, 0] == 16.0)  # 2 x 2 grid, r = 3: every window covers all 4 x 4
                _STATE["ok"] = ok
            except Exception:  # noqa: BLE001 - a compiler problem means "use the torch passes"
                _STATE["ok"] = False
    return _STATE["ok"]


_DUMMY = {np.float32: np.zeros((1, 1), dtype=np.float32), np.uint16: np.zeros((1, 1), dtype=np.uint16)}


def block_maxima(S, grid, ks, a, b, row_keep, col_bias, out_col, out_row, threads: int,
                 tile_rows: int | None = None) -> None:
    """Both masked maxima of every degree for one block (see the module docstring).

    Args:
        S: `[P, g * P]` float32, or uint16 holding bfloat16 bits.
        grid: (h, w); ks, a, b, row_keep, col_bias, tile_rows: as in `_box_units`.
        out_col, out_row: float32 `[D, g, P]`, written.
        threads: work units are split into this many contiguous ranges, run by a thread pool.
    """
    h, w = grid
    p = h * w
    tile_rows = tile_rows or TILE_ROWS
    bf16 = S.dtype == np.uint16
    g = S.shape[1] // p
    tiles = -(-h // tile_rows)
    units = g * tiles
    part = np.empty((units, len(ks), p), dtype=np.float32)
    args = (_DUMMY[np.float32] if bf16 else S, S if bf16 else _DUMMY[np.uint16], bf16, h, w, ks, a, b, row_keep,
            col_bias, out_col, part, tile_rows)
    threads = max(1, min(threads, units))
    if threads == 1:
        _box_units(*args, 0, units)
    else:
        bounds = [units * t // threads for t in range(threads + 1)]
        list(_pool(threads).map(lambda t: _box_units(*args, bounds[t], bounds[t + 1]), range(threads)))
    # row maxima: over the tiles of each reference, then the row factor
    np.multiply(part.reshape(g, tiles, len(ks), p).max(axis=1).transpose(1, 0, 2), a[:, None, :], out=out_row)


_POOLS: dict = {}


def _pool(threads: int):
    """One thread pool per size, kept for the process (the kernel releases the GIL). Keyed by pid as well: a
    forked child (a DataLoader or Dask worker) inherits the pool object but not its threads, and would wait on it
    forever."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor

        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="fiseclip-match")
    return _POOLS[key]
