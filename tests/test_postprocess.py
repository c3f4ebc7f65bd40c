"""core/postprocess.py: upsampling, smoothing and image scores (RsCIN: tests/test_musc.py)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from fiseclip_lib.core.postprocess import gaussian_smooth, image_scores, upsample


def test_gaussian_smooth_matches_scipy():
    x = torch.rand(2, 40, 33)
    ours = gaussian_smooth(x, sigma=2.0).numpy()
    for i in range(2):
        ref = ndimage.gaussian_filter(x[i].numpy().astype(np.float64), sigma=2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)
    assert torch.equal(gaussian_smooth(x, 0.0), x)


def test_upsample_uses_align_corners():
    m = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # one image, grid 2 x 2
    up = upsample(m, (2, 2), 3)
    assert up.shape == (1, 3, 3)
    assert up[0, 0, 0] == 0 and up[0, 2, 2] == 3 and up[0, 1, 1] == pytest.approx(1.5)


def test_image_scores_against_naive_max():
    maps = torch.rand(5, 8, 8)
    st = torch.rand(5)
    torch.testing.assert_close(image_scores(maps, st, 0.5), maps.amax(dim=(1, 2)) + 0.5 * st)
    torch.testing.assert_close(image_scores(maps, st, 0.0), maps.amax(dim=(1, 2)))
