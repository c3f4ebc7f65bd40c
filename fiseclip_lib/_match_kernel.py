"""Compiled (numba) kernel of the box-filtered matching route: one pass per similarity block, on the CPU.

`matching._box_filtered_distances` multiplies image i against a group of references once per layer and derives
every aggregation degree r from that product S1 (see its docstring). In plain torch each degree costs ~15
memory-bound passes over the block (shifted adds, pooling, scaling, -inf fills, two maxima): more time than the
GEMM itself at the paper shape. This kernel does all of it for one block while the data is in cache: for every
reference (and half of image i's grid rows, for two threads' worth of work units) it streams the rows of S1 in
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

numba is optional: `available()` is False without it (or when it fails to compile), and the torch passes run.
"""
from __future__ import annotations

import os

import numpy as np

NEG = np.float32(-1e30)  # "excluded" as a finite number (fastmath assumes no inf)
TILE_ROWS = 8  # reference grid rows per work unit: at w = 37 its ring buffers (<= 5 x 37 x 296 floats) fit in L2

try:  # pragma: no cover - exercised where numba is installed (requirements.txt)
    import numba
    from numba import njit
except Exception:  # noqa: BLE001 - any import problem means "use the torch passes"
    numba = None


def _col_filter(src, base, qs, qe, P, w, k, vb, dst):
    """dst[q - qs] = box sum of src[base + q'] over the r x r window of q in the reference's grid (w columns,
    P patches, zero padded), for the columns q in [qs, qe) (whole grid rows). vb: scratch of qe - qs.

    Every inner loop runs over views from index 0: numba then needs no negative-index wrap-around and LLVM
    vectorises the loops (3-4x faster than offset indices, measured).
    """
    n = qe - qs
    s0 = src[base + qs:base + qe]
    for q in range(n):
        vb[q] = s0[q]
    for d in range(1, k + 1):  # vertical: grid rows y +- d are d * w away in memory
        off = d * w
        lo = max(0, off - qs)  # rows above: source column qs + q - off >= 0
        if lo < n:
            a = src[base + qs + lo - off:base + qe - off]
            v = vb[lo:]
            for q in range(n - lo):
                v[q] += a[q]
        hi = min(n, P - off - qs)  # rows below: source column qs + q + off < P
        if hi > 0:
            a = src[base + qs + off:base + qs + off + hi]
            for q in range(hi):
                vb[q] += a[q]
    for q in range(n):
        dst[q] = vb[q]
    for d in range(1, k + 1):  # horizontal: +- d within the grid row; wrapped terms are taken back below
        x1 = dst[d:]
        for q in range(n - d):
            x1[q] += vb[q]
        x2 = vb[d:]
        for q in range(n - d):
            dst[q] += x2[q]
        for row in range(0, n, w):
            for x in range(min(d, w)):
                if row + x - d >= 0:  # x - d < 0 wrapped to the previous grid row
                    dst[row + x] -= vb[row + x - d]
                xr = w - 1 - x  # x + d >= w wrapped to the next grid row
                if xr + d >= w and row + xr + d < n:
                    dst[row + xr] -= vb[row + xr + d]


def _box_units(S, Sb, bf16, h, w, ks, a, b, row_keep, col_bias, out_col, part, tile_rows, u0, u1):
    """Work units u0..u1 of one block S `[P, g * P]` (see the module docstring). A unit is one reference j and
    `tile_rows` grid rows of its columns: it sweeps image i's grid rows once for all degrees.

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
    for u in range(u0, u1):
        j = u // tiles
        qs = (u % tiles) * tile_rows * w
        qe = min(P, qs + tile_rows * w)
        n = qe - qs
        base = j * P  # the reference's first column
        vb = np.empty(n, dtype=np.float32)
        crow = np.empty((nd, w, n), dtype=np.float32)
        t = np.empty(n, dtype=np.float32)
        pcs = np.full((nd, n), NEG, dtype=np.float32)  # column maxima
        vt = np.empty(n, dtype=np.float32)
        vti = vt.view(np.int32)
        keys = np.empty(1, dtype=np.int32)
        ring = np.empty((nd, 2 * kmax + 1, w, n), dtype=np.float32)
        lo, hi = max(0, qs - kmax * w), min(P, qe + kmax * w)  # source columns of the tile
        rowbuf = np.empty(hi - lo, dtype=np.float32)
        rowbits = rowbuf.view(np.uint32)
        # one sweep over image i's grid rows for all degrees: each row of S is read from memory once
        for yy in range(h + kmax):
            if yy < h:
                for x in range(w):
                    if bf16:  # the tile's columns and their halo, bfloat16 -> float32 (the high 16 bits)
                        src = Sb[yy * w + x, base + lo:base + hi]
                        for q in range(hi - lo):
                            rowbits[q] = np.uint32(src[q]) << 16
                        srow, sbase = rowbuf, -lo
                    else:
                        srow, sbase = S[yy * w + x], base
                    for di in range(nd):
                        _col_filter(srow, sbase, qs, qe, P, w, ks[di], vb, crow[di, x])
            for di in range(nd):
                k = ks[di]
                span = 2 * k + 1
                if yy < h:
                    # H row yy: the column-filtered rows of grid row yy, box-summed along x of image i's grid
                    for x in range(w):
                        hx = ring[di, yy % span, x]
                        c0 = crow[di, x]
                        for q in range(n):
                            hx[q] = c0[q]
                        for dx in range(1, k + 1):
                            if x - dx >= 0:
                                cx = crow[di, x - dx]
                                for q in range(n):
                                    hx[q] += cx[q]
                            if x + dx < w:
                                cx = crow[di, x + dx]
                                for q in range(n):
                                    hx[q] += cx[q]
                yo = yy - k
                if yo < 0 or yo >= h:
                    continue
                pc = pcs[di]
                pr = part[u, di]
                bq = b[di, base + qs:base + qe]
                cq = col_bias[base + qs:base + qe]
                # output grid row yo: T = sum of the H rows yo - k .. yo + k inside the grid
                for x in range(w):
                    for q in range(n):
                        t[q] = 0.0
                    for dy in range(-k, k + 1):
                        yr = yo + dy
                        if 0 <= yr < h:
                            hx = ring[di, yr % span, x]
                            for q in range(n):
                                t[q] += hx[q]
                    p = yo * w + x
                    ap = a[di, p]
                    if row_keep[p]:
                        for q in range(n):
                            v = t[q] * ap
                            pc[q] = v if v > pc[q] else pc[q]
                    # max over the columns as an integer max of order-preserving keys: LLVM vectorises
                    # integer max reductions, not float ones (measured 2 vs 49 G elements/s)
                    for q in range(n):
                        vt[q] = t[q] * bq[q] + cq[q]
                    m = np.int32(-2147483647)
                    for q in range(n):
                        key = vti[q] ^ ((vti[q] >> 31) & 0x7FFFFFFF)
                        m = key if key > m else m
                    keys[0] = m ^ ((m >> 31) & 0x7FFFFFFF)
                    pr[p] = keys.view(np.float32)[0]
        for di in range(nd):
            bq = b[di, base + qs:base + qe]
            for q in range(n):
                out_col[di, j, qs + q] = pcs[di, q] * bq[q]


def _jit(fn, **options):
    """njit with numba's on-disk cache (compiled once per install, ~5 s); without it where no cache folder is
    writable (numba refuses `cache=True` at decoration time there)."""
    try:
        return njit(fastmath=True, cache=True, **options)(fn)
    except RuntimeError:
        return njit(fastmath=True, **options)(fn)


if numba is not None:  # pragma: no branch
    _col_filter = _jit(_col_filter, inline="always")
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
