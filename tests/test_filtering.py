"""core/filtering.py: which reference patches may serve as nearest neighbours.

(The text filter's modes and guard, `reference_keep`, are tested in tests/test_matching.py with the matching they
feed.)"""
import numpy as np

from fiseclip_lib.core.filtering import oracle_keep


def test_oracle_keep_drops_patches_touching_a_defect():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 0:3, 0:2] = True  # touches patches (0,0) and (1,0) of a 4 x 4 grid
    keep = oracle_keep(masks, (4, 4))
    assert keep.shape == (2, 16)
    assert not keep[0, 0] and not keep[0, 4] and keep[0, 1] and keep[0].sum() == 14
    assert keep[1].all()


def test_oracle_keep_equals_a_naive_loop_over_patches():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 24, 30)) > 0.995  # scattered single defect pixels
    grid = (4, 5)  # 6 x 6 pixel patches
    naive = np.array([[not m[r * 6:(r + 1) * 6, c * 6:(c + 1) * 6].any() for r in range(4) for c in range(5)]
                      for m in masks])
    assert (oracle_keep(masks, grid).numpy() == naive).all()
    assert not naive.all() and naive.any()  # the case is not trivial
