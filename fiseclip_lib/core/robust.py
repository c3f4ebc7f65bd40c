"""The one definition of the robust location and scale (median, MAD) used by fusion and by thresholds.

The median is the LOWER median: for an even count n it is the (n/2)-th smallest value, not the average of the
two middle ones (torch's `median`, which fusion has always used, so fused scores stay as they were; numpy's
`np.median` averages). Both the torch and the numpy forms below pick the same element, so a batch's fusion
scale and a threshold calibrated on scores agree on what "the median" is.

Not a scoring stage: evaluation/ and decisions/ may import it.
"""
from __future__ import annotations

import numpy as np
import torch

# 1 / Phi^-1(3/4): the MAD of a Gaussian times this is its standard deviation (the rounded value everywhere
# in this library, so that scores and thresholds do not move).
MAD_TO_SIGMA = 1.4826


def lower_median(x):
    """The lower median of all elements of `x` (a torch tensor -> 0-d tensor; else -> float).

    Args:
        x: a torch tensor or anything numpy reads as an array; non-empty. NaNs are not removed (torch returns
            NaN for them; filter them first).
    Returns:
        The ((n - 1) // 2)-th smallest value (0-based), the same element for both forms.
    """
    if isinstance(x, torch.Tensor):
        return x.median()  # torch's median of the flattened tensor is the lower one
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("the median of no values is undefined")
    k = (a.size - 1) // 2
    return float(np.partition(a, k)[k])


def median_mad(x):
    """(lower median, lower median of the absolute deviations from it) of all elements of `x`; torch in, 0-d
    tensors out, else floats."""
    med = lower_median(x)
    if isinstance(x, torch.Tensor):
        return med, lower_median((x - med).abs())
    a = np.asarray(x, dtype=np.float64)
    return med, lower_median(np.abs(a - med))


def mad_sigma(x):
    """MAD_TO_SIGMA * MAD: the standard deviation a Gaussian with the same MAD would have."""
    return MAD_TO_SIGMA * median_mad(x)[1]
