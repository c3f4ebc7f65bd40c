import math
import warnings

import pytest
import numpy as np
import torch

from fiseclip_lib import _match_kernel
from fiseclip_lib.config import MatchEngine
from fiseclip_lib.core.matching_reference import reference_visual_map
from fiseclip_lib.filtering import apply_min_keep, reference_keep
from fiseclip_lib.matching import (ENGINES, interval_count, lnamd, match, mutual_scores, reference_distances,
                                   visual_map)

NO_NUMBA = _match_kernel.numba is None  # numba is optional (docs/matching.md)
needs_numba = pytest.mark.skipif(NO_NUMBA, reason="numba is not installed")


def engines(*names):
    """Engine names as test parameters; box-compiled is skipped where numba is not installed."""
    return [pytest.param(e, marks=needs_numba) if e == "box-compiled" else e for e in names]


FAST = engines(*(e for e in ENGINES if e != "reference"))
ALL = engines(*ENGINES)


def brute_force_scores(Z, keep=None, topmin_max=0.3, penalty=None):
    """Naive loops in float64; an image with no kept patch is a reference through all of its patches."""
    n, p, _ = Z.shape
    Z = Z.double()
    if keep is not None:
        keep = keep.clone()
        keep[~keep.any(dim=1)] = True
    out = torch.zeros(n, p, dtype=torch.float64)
    for i in range(n):
        for a in range(p):
            per_ref = []
            for j in range(n):
                if j == i:
                    continue
                best = math.inf
                for q in range(p):
                    if keep is not None and not keep[j, q]:
                        continue
                    extra = 0.0 if penalty is None else penalty[j, q].item()
                    best = min(best, torch.linalg.norm(Z[i, a] - Z[j, q]).item() + extra)
                per_ref.append(best)
            per_ref.sort()
            k = max(1, math.floor(topmin_max * (n - 1)))
            out[i, a] = sum(per_ref[:k]) / k
    return out


def naive_lnamd(tokens, grid, r):
    n, p, c = tokens.shape
    h, w = grid
    out = torch.zeros(n, p, c)
    for i in range(n):
        x = tokens[i].reshape(h, w, c).double()
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)
        for y in range(h):
            for xx in range(w):
                acc = torch.zeros(c, dtype=torch.float64)
                for dy in range(-(r // 2), r // 2 + 1):
                    for dx in range(-(r // 2), r // 2 + 1):
                        yy, xq = y + dy, xx + dx
                        if 0 <= yy < h and 0 <= xq < w:
                            acc += x[yy, xq]
                v = acc / (r * r)
                out[i, y * w + xx] = (v / v.norm()).float()
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("unit", [True, False])
def test_mutual_scores_equal_brute_force(n, masked, unit):
    g = torch.Generator().manual_seed(n)
    Z = 3 * torch.randn(n, 9, 5, generator=g)
    if unit:
        Z = torch.nn.functional.normalize(Z, dim=-1)
    keep = (torch.rand(n, 9, generator=g) > 0.4) if masked else None
    if keep is not None:
        keep[:, 0] = True  # every image keeps something
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = mutual_scores(Z, keep=keep)
    if n == 1:
        assert torch.equal(got, torch.zeros(1, 9))
        return
    torch.testing.assert_close(got.double(), brute_force_scores(Z, keep), rtol=0, atol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("n", [2, 5])
def test_mutual_scores_with_penalty_and_keep_equal_brute_force(n):
    g = torch.Generator().manual_seed(10 + n)
    Z = torch.nn.functional.normalize(torch.randn(n, 8, 4, generator=g), dim=-1)
    pen = torch.rand(n, 8, generator=g)
    keep = torch.rand(n, 8, generator=g) > 0.3
    keep[:, 0] = True
    got = mutual_scores(Z, keep=keep, penalty=pen)
    torch.testing.assert_close(got.double(), brute_force_scores(Z, keep, penalty=pen), rtol=0, atol=1e-5)


def test_image_with_no_kept_patch_warns_and_uses_all_of_them():
    g = torch.Generator().manual_seed(3)
    Z = torch.nn.functional.normalize(torch.randn(4, 10, 6, generator=g), dim=-1)
    keep = torch.rand(4, 10, generator=g) > 0.5
    keep[:, 0] = True
    keep[2] = False
    with pytest.warns(UserWarning, match="reference image 2 has no kept patch"):
        got = mutual_scores(Z, keep=keep)
    full = keep.clone()
    full[2] = True
    torch.testing.assert_close(got.double(), brute_force_scores(Z, full), rtol=0, atol=1e-5)
    assert not keep[2].any()  # the caller's mask is not modified


def test_non_unit_and_zero_features_take_the_exact_path():
    g = torch.Generator().manual_seed(4)
    Z = torch.nn.functional.normalize(torch.randn(3, 8, 5, generator=g), dim=-1)
    Z[1, 2] *= 1.01  # almost unit is not unit: |a|^2 + |b|^2 - 2 a.b, not 2 - 2 a.b
    Z[0, 3] = 0.0
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[1, 5:] = False
    torch.testing.assert_close(mutual_scores(Z, keep=keep).double(), brute_force_scores(Z, keep), rtol=0, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_and_bf16_distances_agree_with_fp32(masked):
    g = torch.Generator().manual_seed(5)
    Z = torch.nn.functional.normalize(torch.randn(4, 30, 16, generator=g), dim=-1)
    keep = (torch.rand(4, 30, generator=g) > 0.3) if masked else None
    full = reference_distances(Z, keep=keep)
    assert torch.isinf(torch.diagonal(full)).all()
    for chunk in (7, 30, 61, 90):  # one, two and three reference images per GEMM, and a partial group
        torch.testing.assert_close(full, reference_distances(Z, keep=keep, chunk=chunk), rtol=0, atol=1e-5)
    d = torch.linalg.vector_norm(Z.double()[None, :, :, None] - Z.double()[:, None, None, :], dim=-1)  # [j, i, p, q]
    if keep is not None:
        d = d.masked_fill(~keep[:, None, None, :], math.inf)
    ref = d.amin(dim=-1)
    ref[torch.arange(4), torch.arange(4)] = math.inf
    torch.testing.assert_close(full.double(), ref, rtol=0, atol=1e-5)
    bf = mutual_scores(Z, dtype=torch.bfloat16)
    assert (bf - mutual_scores(Z)).abs().max() < 0.03  # the tolerance stated in matching.py


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_equals_naive(r):
    tokens = torch.randn(2, 20, 6)
    got = lnamd(tokens, (4, 5), r)
    assert got.is_contiguous()  # the GEMMs consume it without a copy
    torch.testing.assert_close(got, naive_lnamd(tokens, (4, 5), r), rtol=1e-4, atol=1e-4)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the compiled kernel's calls, so that a test can check which engine really ran (a missing numba
    must not silently turn box-compiled into box-torch)."""
    _match_kernel.available()  # its first call runs the kernel once (compile and check): not counted
    calls = []
    real = _match_kernel.block_maxima
    monkeypatch.setattr(_match_kernel, "block_maxima", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_engine_names_are_one_list():
    """config.MatchEngine (what a run may choose) and matching.ENGINES (what matching accepts) are the same."""
    import typing

    assert typing.get_args(MatchEngine) == ENGINES


def test_compiled_kernel_is_available():
    """numba is optional (docs/matching.md), but installed by requirements.txt, so that the tests exercise the
    kernel: where it is installed, the fast route must not fall back to the torch passes unnoticed."""
    if NO_NUMBA:
        pytest.skip("numba is not installed")
    assert _match_kernel.available()


@pytest.mark.parametrize("mode", ["none", "keep", "keep-empty", "soft"])
@pytest.mark.parametrize("engine", ALL)  # C = 6: auto takes the per-degree route; soft: every engine does
def test_visual_map_equals_brute_force_over_layers_and_degrees(mode, engine, kernel_calls):
    g = torch.Generator().manual_seed(6)
    n, grid, degrees = 4, (3, 4), (1, 3)
    layers = {2: torch.randn(n, 12, 6, generator=g), 5: 2 + torch.randn(n, 12, 6, generator=g)}
    keep = penalty = None
    if mode.startswith("keep"):
        keep = torch.rand(n, 12, generator=g) > 0.4
        keep[:, 0] = True
        if mode == "keep-empty":
            keep[1] = False
    if mode == "soft":
        penalty = 2 * torch.rand(n, 12, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = visual_map(layers, grid, degrees, keep=keep, penalty=penalty, engine=engine)
    assert len([w for w in caught if "no kept patch" in str(w.message)]) == (mode == "keep-empty")  # once per batch
    assert bool(kernel_calls) == (engine == "box-compiled" and mode != "soft")
    ref = torch.stack([brute_force_scores(naive_lnamd(t, grid, r), keep, penalty=penalty)
                       for t in layers.values() for r in degrees]).mean(0)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = reference_visual_map(layers, grid, degrees, keep=keep, penalty=penalty)
        torch.testing.assert_close(got, oracle, rtol=0, atol=1e-5)
        bf = visual_map(layers, grid, degrees, keep=keep, penalty=penalty, dtype=torch.bfloat16, engine=engine)
    assert (bf.double() - ref).abs().max() < 0.03  # BF16_TOLERANCE


def _batch_and_bank(seed, n=4, nr=3, grid=(3, 4), c=6, degrees=(1, 3)):
    """Raw query tokens over two layers, and an external set aggregated as `references` (lnamd per layer and
    degree), with random keep-masks (one image keeping nothing) and penalties for both."""
    g = torch.Generator().manual_seed(seed)
    p = grid[0] * grid[1]
    layers = {l: torch.randn(n, p, c, generator=g) + l for l in (1, 4)}
    bank = {l: torch.randn(nr, p, c, generator=g) + l for l in (1, 4)}
    references = {(l, r): lnamd(bank[l], grid, r) for l in bank for r in degrees}
    keep = torch.rand(n, p, generator=g) > 0.4
    keep[:, 0] = True
    keep[2] = False
    ref_keep = torch.rand(nr, p, generator=g) > 0.5
    ref_keep[:, 3] = True
    ref_keep[0] = False
    return (layers, references, keep, torch.rand(n, p, generator=g), ref_keep, torch.rand(nr, p, generator=g))


@pytest.mark.parametrize("mode", ["batch", "external", "both", "not-mutual"])
@pytest.mark.parametrize("filtered", ["none", "keep", "penalty", "keep+penalty"])
@pytest.mark.parametrize("engine", FAST)
def test_match_every_mode_equals_the_reference_engine(mode, filtered, engine):
    """match() in each of its modes (the batch alone, against an external set, both, the external set only) with
    keep-masks and penalties on the queries and the external references: every fast engine == engine reference
    (float32 within 1e-5), and bf16 within BF16_TOLERANCE."""
    grid, degrees = (3, 4), (1, 3)
    layers, references, keep, pen, ref_keep, ref_pen = _batch_and_bank(len(mode) + len(filtered), grid=grid)
    use_keep, use_pen = "keep" in filtered, "penalty" in filtered
    kw = dict(references=None if mode == "batch" else references, mutual=mode != "not-mutual",
              keep=keep if use_keep else None, penalty=pen if use_pen else None,
              ref_keep=ref_keep if use_keep else None, ref_penalty=ref_pen if use_pen else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the images that keep nothing
        want = match(layers, grid, degrees, engine="reference", **kw)
        got = match(layers, grid, degrees, engine=engine, **kw)
        bf = match(layers, grid, degrees, engine=engine, dtype=torch.bfloat16, **kw)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (4, 12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (bf - want).abs().max() < 0.03  # BF16_TOLERANCE


@pytest.mark.parametrize("engine", ALL)
def test_match_without_any_reference_is_zero_with_a_warning(engine):
    layers = {1: torch.randn(1, 12, 6)}
    for kw in (dict(), dict(mutual=False)):
        with pytest.warns(UserWarning, match="no reference"):
            assert torch.equal(match(layers, (3, 4), (1, 3), engine=engine, **kw), torch.zeros(1, 12))


def test_engine_choice_is_checked_and_box_compiled_never_falls_back(monkeypatch, kernel_calls):
    layers = {1: torch.randn(3, 12, 6)}
    with pytest.raises(Exception, match="unknown match_engine"):
        match(layers, (3, 4), engine="fast")
    with pytest.raises(Exception, match="unknown match_engine"):
        visual_map(layers, (3, 4), engine="compiled")
    monkeypatch.setattr(_match_kernel, "available", lambda: False)  # as without numba
    with pytest.raises(Exception, match="needs numba"):
        match(layers, (3, 4), engine="box-compiled")
    wide = {1: torch.randn(3, 12, 512)}  # auto picks a box engine from 512 channels: box-torch here, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = match(wide, (3, 4))
    assert not kernel_calls
    torch.testing.assert_close(got, match(wide, (3, 4), engine="reference"), rtol=0, atol=1e-5)


def test_visual_map_checks_inputs_once():
    with pytest.raises(Exception, match="NaN or inf"):
        visual_map({1: torch.full((2, 4, 3), math.nan)}, (2, 2))
    with pytest.raises(Exception, match="odd"):
        visual_map({1: torch.randn(2, 4, 3)}, (2, 2), degrees=(2,))
    with pytest.raises(Exception, match="grid"):
        visual_map({1: torch.randn(2, 5, 3)}, (2, 2))
    with pytest.raises(Exception, match="keep must be"):
        visual_map({1: torch.randn(2, 4, 3)}, (2, 2), keep=torch.ones(2, 3, dtype=torch.bool))


def test_lnamd_rejects_even_degree_and_bad_grid():
    with pytest.raises(Exception, match="odd"):
        lnamd(torch.randn(1, 4, 3), (2, 2), 2)
    with pytest.raises(Exception, match="grid"):
        lnamd(torch.randn(1, 5, 3), (2, 2), 1)


def test_interval_count_never_zero():
    assert [interval_count(n - 1, 0.3) for n in (2, 3, 4, 5, 11, 17)] == [1, 1, 1, 1, 3, 4]


def contaminated_batch(seed=0, n=8, p=16, c=12, n_bad=4):
    """Normal patches near one cluster; the same defect (near another cluster) at patches 0-2 of n_bad images."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(c, generator=g)
    defect = torch.randn(c, generator=g)
    Z = normal + 0.3 * torch.randn(n, p, c, generator=g)
    truth = torch.zeros(n, p, dtype=torch.bool)
    truth[:n_bad, :3] = True
    Z[truth] = defect + 0.3 * torch.randn(int(truth.sum()), c, generator=g)
    return torch.nn.functional.normalize(Z, dim=-1), truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_filter_never_lowers_defect_scores(seed):
    Z, truth = contaminated_batch(seed)
    plain = mutual_scores(Z, keep=None)
    oracle = mutual_scores(Z, keep=~truth)
    assert torch.all(oracle[truth] >= plain[truth] - 1e-6)
    assert oracle[truth].mean() > plain[truth].mean() + 0.1  # and the contamination really hurt
    # separation of defect and normal patches improves
    assert (oracle[truth].min() - oracle[~truth].max()) > (plain[truth].min() - plain[~truth].max())


def test_reference_keep_modes_and_guard():
    a = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.9, 0.95, 0.99, 0.97]])
    keep, pen = reference_keep(a, "threshold", theta=0.5, min_keep=0.25)
    assert pen is None
    assert keep[0].tolist() == [True, False, True, False]
    assert keep[1].tolist() == [True, False, False, False]  # guard keeps the least abnormal patch
    keep, _ = reference_keep(a, "top_ratio", ratio=0.25, min_keep=0.0)
    assert (~keep).sum() == 2 and not keep[1, 2] and not keep[1, 3]
    keep, pen = reference_keep(a, "soft")
    assert keep is None and torch.allclose(pen, 2 * a)
    assert reference_keep(a, "none") == (None, None)
    with pytest.raises(Exception, match="unknown filter"):
        reference_keep(a, "magic")
    assert apply_min_keep(torch.zeros(2, 10, dtype=torch.bool), torch.rand(2, 10), 0.3).sum(1).tolist() == [3, 3]


def test_soft_penalty_pushes_noisy_references_away():
    Z, truth = contaminated_batch(0)
    pen = 2.0 * truth.float()
    soft = mutual_scores(Z, penalty=pen)
    oracle = mutual_scores(Z, keep=~truth)
    torch.testing.assert_close(soft[truth], oracle[truth], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("grid,degrees", [((5, 7), (1, 3, 5)), ((7, 5), (3, 5)), ((2, 3), (1, 5)), ((4, 4), (1, 3))])
@pytest.mark.parametrize("engine", engines("box-torch", "box-compiled"))
def test_visual_map_box_filtered_route_equals_per_degree_route(n, grid, degrees, engine, monkeypatch, kernel_calls):
    """One GEMM per pair, degrees as box filters of it == aggregate, normalise and match each degree separately
    (engine per-degree) == the reference engine."""
    from fiseclip_lib import matching

    g = torch.Generator().manual_seed(100 * n + grid[0])
    p = grid[0] * grid[1]
    layers = {l: torch.randn(n, p, 8, generator=g) + torch.randn(1, 1, 8, generator=g) for l in (3, 7)}
    keep = torch.rand(n, p, generator=g) > 0.3
    keep[:, 0] = True
    keep[0, 1:] = False  # one reference keeps a single patch
    ref = visual_map(layers, grid, degrees, keep=keep, engine="per-degree")
    plain = visual_map(layers, grid, degrees, engine="per-degree")
    torch.testing.assert_close(ref, reference_visual_map(layers, grid, degrees, keep=keep), rtol=0, atol=1e-5)
    torch.testing.assert_close(plain, reference_visual_map(layers, grid, degrees), rtol=0, atol=1e-5)
    monkeypatch.setattr(matching, "_sorted_distances", None)  # the box route and nothing else: per-degree would fail
    # one, two (partial last group) and all references per GEMM; the kernel's work units one grid row, two, all
    for chunk, tile_rows in ((1, 1), (2 * p, 2), (3 * p - 1, 8), (4096, 1)):
        monkeypatch.setattr(_match_kernel, "TILE_ROWS", tile_rows)
        got = visual_map(layers, grid, degrees, keep=keep, chunk=chunk, engine=engine)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(visual_map(layers, grid, degrees, engine=engine), plain, rtol=0, atol=1e-5)
    bf = visual_map(layers, grid, degrees, keep=keep, dtype=torch.bfloat16, engine=engine)
    assert (bf - ref).abs().max() < 0.03  # BF16_TOLERANCE
    assert bool(kernel_calls) == (engine == "box-compiled")


@needs_numba
@pytest.mark.parametrize("grid", [(1, 6), (6, 1), (2, 2), (3, 5)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_block_maxima_equals_dense_filtering(grid, threads):
    """The kernel on one block (degrees 1, 3, 5 on grids narrower than the window, bf16 bits and float32, any
    split of the work) equals the 4-D box sums of the block computed densely with numpy, then scaled and maxed."""
    from fiseclip_lib import _match_kernel

    rng = np.random.default_rng(sum(grid) + threads)
    h, w = grid
    p, g, degrees = h * w, 3, [1, 3, 5]
    S = rng.standard_normal((p, g * p)).astype(np.float32)
    a = rng.uniform(0.5, 2, (3, p)).astype(np.float32)
    b = rng.uniform(0.5, 2, (3, g * p)).astype(np.float32)
    row_keep = rng.random(p) > 0.3
    row_keep[0] = True
    col_keep = rng.random(g * p) > 0.3
    col_keep[::p] = True
    bias = np.where(col_keep, 0, _match_kernel.NEG).astype(np.float32)
    for bf16 in (False, True):
        src = torch.from_numpy(S).to(torch.bfloat16) if bf16 else torch.from_numpy(S)
        dense = src.float().numpy().astype(np.float64).reshape(h, w, g, h, w)
        oc, orow = np.empty((3, g, p), np.float32), np.empty((3, g, p), np.float32)
        arr = src.view(torch.uint16).numpy() if bf16 else S
        _match_kernel.block_maxima(arr, grid, np.array([r // 2 for r in degrees]), a, b, row_keep, bias, oc, orow,
                                   threads, tile_rows=2)
        for di, r in enumerate(degrees):
            k = r // 2
            T = np.zeros_like(dense)
            pad = np.pad(dense, ((k, k), (k, k), (0, 0), (k, k), (k, k)))
            for dy in range(r):  # naive 4-D box sum: every shift of both windows
                for dx in range(r):
                    for ey in range(r):
                        for ex in range(r):
                            T += pad[dy:dy + h, dx:dx + w, :, ey:ey + h, ex:ex + w]
            T = T.reshape(p, g * p)
            cos = T * a[di][:, None] * b[di][None, :]
            want_col = np.where(row_keep[:, None], cos, -np.inf).max(axis=0).reshape(g, p)
            want_row = np.where(col_keep[None, :], cos, -np.inf).reshape(p, g, p).max(axis=2).T
            np.testing.assert_allclose(oc[di], want_col, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(orow[di], want_row, rtol=1e-5, atol=1e-4)


@needs_numba
def test_kernel_compiles_where_numba_cannot_cache():
    """numba refuses cache=True for code whose folder it cannot write (here: code without a file); the kernel's
    decorator then compiles without the on-disk cache instead of breaking the import."""
    from fiseclip_lib import _match_kernel

    ns = {}
    exec("def f(x):\n    return x + 1\n", ns)
    assert _match_kernel._jit(ns["f"])(2) == 3


@needs_numba
def test_kernel_threads_work_in_a_forked_child():
    """A child forked after the kernel's thread pool started must not wait on the parent's (absent) threads."""
    import multiprocessing as mp

    assert _kernel_on_ones() == 16.0  # the parent's pool exists now
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_kernel_on_ones).get(timeout=60) == 16.0


def _kernel_on_ones() -> float:
    """The kernel with 2 threads on a 2 x 2 grid of ones, r = 3: every window covers all 4 x 4 entries."""
    from fiseclip_lib import _match_kernel

    S = np.ones((4, 8), dtype=np.float32)
    oc, orow = np.empty((1, 2, 4), np.float32), np.empty((1, 2, 4), np.float32)
    _match_kernel.block_maxima(S, (2, 2), np.array([1]), np.ones((1, 4), np.float32), np.ones((1, 8), np.float32),
                               np.ones(4, np.bool_), np.zeros(8, np.float32), oc, orow, 2, 1)
    return float(oc[0, 0, 0])


# ---------------------------------------------------------------------- the box route against external references

def _external(nq, nr, grid, c=20, seed=0, keep=True):
    """Queries' raw tokens, references' raw tokens and their filter: about half the patches kept, one reference
    keeping none (it then uses all of them, with a warning), some patch kept everywhere."""
    g = torch.Generator().manual_seed(seed)
    p = grid[0] * grid[1]
    shift = torch.randn(1, 1, c, generator=g)  # a shared component: cosines spread over (-1, 1), not all near 0
    layers = {l: torch.randn(nq, p, c, generator=g) + shift for l in (2, 5)}
    ref_raw = {l: torch.randn(nr, p, c, generator=g) + shift for l in (2, 5)}
    ref_keep = None
    if keep:
        ref_keep = torch.rand(nr, p, generator=g) > 0.5
        ref_keep[:, p // 2] = True
        ref_keep[0] = False
    return layers, ref_raw, ref_keep


def _bank_inputs(ref_raw, grid, degrees):
    """What a bank keeps (`reference_features`: tokens and window norms), the features from `lnamd` itself."""
    from fiseclip_lib.core.matching import reference_features
    references = {(l, r): lnamd(t, grid, r) for l, t in ref_raw.items() for r in degrees}
    kept = {l: reference_features(t, grid, degrees) for l, t in ref_raw.items()}
    tokens = {l: x for l, (_, x, _) in kept.items()}
    norms = {(l, r): n for l, (_, _, ns) in kept.items() for r, n in ns.items()}
    return references, tokens, norms


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 4), (7, 7)])
@pytest.mark.parametrize("k", [1, 2, 16])
@pytest.mark.parametrize("engine", engines("box-torch", "box-compiled"))
def test_box_route_against_references_equals_cross_distances(grid, k, engine):
    """`_box_cross_distances` (one GEMM per layer and block of references, degrees by box filters) == the
    per-degree `cross_distances` on lnamd features within 1e-5, with keep-masks, for every degree; and the whole
    visual_map_against == the per-degree engine and the float64 reference engine."""
    from fiseclip_lib.core.matching import (_box_cross_distances, _layer_norm, _usable_keep, cross_distances,
                                            visual_map_against)
    degrees = (1, 3, 5)
    layers, ref_raw, ref_keep = _external(2, k, grid, seed=k + grid[1])
    references, tokens, norms = _bank_inputs(ref_raw, grid, degrees)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference that keeps nothing
        keep = _usable_keep(ref_keep, k, grid[0] * grid[1], torch.device("cpu"))
        for l, t in layers.items():
            for given_norms in ({r: norms[(l, r)] for r in degrees}, None):
                box = _box_cross_distances(_layer_norm(t), tokens[l], given_norms, grid, list(degrees), keep,
                                           torch.float32, 4096, compiled=engine == "box-compiled")
                for r in degrees:
                    want = cross_distances(lnamd(t, grid, r), references[(l, r)], ref_keep)
                    assert box[r].shape == want.shape == (k, 2, grid[0] * grid[1])
                    torch.testing.assert_close(box[r], want, rtol=0, atol=1e-5)
        kw = dict(keep=ref_keep, mutual=False)
        got = visual_map_against(layers, grid, references, degrees, engine=engine, ref_tokens=tokens, ref_norms=norms,
                                 **kw)
        per_degree = visual_map_against(layers, grid, references, degrees, engine="per-degree", **kw)
        oracle = reference_visual_map(layers, grid, degrees, references, False, ref_keep=ref_keep)
    torch.testing.assert_close(got, per_degree, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, oracle, rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", engines("box-torch", "box-compiled"))
def test_box_route_against_references_small_blocks_mutual_bf16_and_penalty(engine, monkeypatch):
    """References split over several blocks (BOX_CHUNK small), mutual queries beside the bank, bf16 within its
    tolerance; with a penalty (no box term for it) the route is cross_distances: equal to the oracle."""
    from fiseclip_lib.core import matching
    grid, degrees = (5, 3), (3, 1, 5)
    layers, ref_raw, ref_keep = _external(3, 7, grid, seed=3)
    references, tokens, norms = _bank_inputs(ref_raw, grid, degrees)
    monkeypatch.setattr(matching, "BOX_CHUNK", 2 * 15)  # two references per block: 4 blocks, the last narrower
    pen = torch.rand(7, 15, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mutual in (True, False):
            for penalty in (None, pen):
                kw = dict(references=references, mutual=mutual, ref_keep=ref_keep, ref_penalty=penalty)
                want = match(layers, grid, degrees, engine="reference", **kw)
                got = match(layers, grid, degrees, engine=engine, ref_tokens=tokens, ref_norms=norms, **kw)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
                bf = match(layers, grid, degrees, engine=engine, ref_tokens=tokens, ref_norms=norms,
                           dtype=torch.bfloat16, **kw)
                assert (bf - want).abs().max() < 0.03  # BF16_TOLERANCE


def test_box_route_against_references_is_taken_and_checks_the_queries(monkeypatch):
    """A box engine with the references' tokens runs `_box_cross_distances` (not cross_distances); without the
    tokens, or on the per-degree engine, cross_distances; non-finite query tokens are a one-line error."""
    from fiseclip_lib.core import matching
    from fiseclip_lib.errors import FiseclipError
    grid, degrees = (4, 4), (1, 3)
    layers, ref_raw, _ = _external(1, 3, grid, keep=False)
    references, tokens, norms = _bank_inputs(ref_raw, grid, degrees)
    calls = []
    real = matching.cross_distances
    monkeypatch.setattr(matching, "cross_distances", lambda *a, **k: calls.append(1) or real(*a, **k))
    match(layers, grid, degrees, references=references, mutual=False, engine="box-torch", ref_tokens=tokens,
          ref_norms=norms)
    assert not calls
    match(layers, grid, degrees, references=references, mutual=False, engine="box-torch")
    match(layers, grid, degrees, references=references, mutual=False, engine="per-degree", ref_tokens=tokens)
    assert len(calls) == 2 * 2 * len(degrees)
    bad = {l: t.clone() for l, t in layers.items()}
    bad[2][0, 3, 1] = float("nan")
    with pytest.raises(FiseclipError, match="NaN or inf"):
        match(bad, grid, degrees, references=references, mutual=False, engine="box-torch", ref_tokens=tokens)


def test_cross_distances_trusts_a_bank_checked_once():
    """ref_unit (a bank's features checked once, `checked_unit`) gives the bytes of the per-call checks; a wrong
    claim of unit rows on non-unit features changes the result (the flag is really used), NaN is caught once."""
    from fiseclip_lib.core.matching import checked_unit, cross_distances
    grid = (4, 4)
    g = torch.Generator().manual_seed(4)
    Zq = lnamd(torch.randn(1, 16, 6, generator=g), grid, 3)
    Zr = lnamd(torch.randn(5, 16, 6, generator=g), grid, 3)
    keep = torch.rand(5, 16, generator=g) > 0.4
    assert checked_unit(Zr) is True
    assert torch.equal(cross_distances(Zq, Zr, keep, ref_unit=True), cross_distances(Zq, Zr, keep))
    raw = torch.randn(5, 16, 6, generator=g)
    assert checked_unit(raw) is False
    assert torch.equal(cross_distances(Zq, raw, ref_unit=False), cross_distances(Zq, raw))
    assert not torch.allclose(cross_distances(Zq, raw, ref_unit=True), cross_distances(Zq, raw))
    bad = Zr.clone()
    bad[1, 2, 0] = float("nan")
    assert checked_unit(bad) is None  # not trusted: the per-call check names the error
