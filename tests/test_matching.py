import math
import warnings

import pytest
import torch

from fiseclip_lib.filtering import apply_min_keep, reference_keep
from fiseclip_lib.matching import interval_count, lnamd, mutual_scores, reference_distances


def brute_force_scores(Z, keep=None, topmin_max=0.3, penalty=None):
    n, p, _ = Z.shape
    out = torch.zeros(n, p)
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
    torch.testing.assert_close(got, brute_force_scores(Z, keep), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("n", [2, 5])
def test_mutual_scores_with_penalty_and_keep_equal_brute_force(n):
    g = torch.Generator().manual_seed(10 + n)
    Z = torch.nn.functional.normalize(torch.randn(n, 8, 4, generator=g), dim=-1)
    pen = torch.rand(n, 8, generator=g)
    keep = torch.rand(n, 8, generator=g) > 0.3
    keep[:, 0] = True
    got = mutual_scores(Z, keep=keep, penalty=pen)
    torch.testing.assert_close(got, brute_force_scores(Z, keep, penalty=pen), rtol=1e-4, atol=1e-4)


def test_chunked_and_bf16_distances_agree_with_fp32():
    Z = torch.nn.functional.normalize(torch.randn(4, 30, 16), dim=-1)
    full = reference_distances(Z)
    chunked = reference_distances(Z, chunk=7)
    assert torch.isinf(torch.diagonal(full)).all()
    torch.testing.assert_close(full, chunked, rtol=0, atol=1e-5)
    bf = mutual_scores(Z, dtype=torch.bfloat16)
    assert (bf - mutual_scores(Z)).abs().max() < 0.03  # the tolerance stated in matching.py


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_equals_naive(r):
    tokens = torch.randn(2, 20, 6)
    torch.testing.assert_close(lnamd(tokens, (4, 5), r), naive_lnamd(tokens, (4, 5), r), rtol=1e-4, atol=1e-4)


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
