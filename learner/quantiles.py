"""Exact quantiles of a 1-D tensor of any length: torch.quantile refuses more than 2^24 elements,
which one step's tokens exceed (e.g. 512 completions of 32k tokens).

A pure tensor function (no model, no I/O).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def quantiles(values_M: Tensor, qs: Sequence[float]) -> list[float]:
    """The quantiles `qs` of `values_M`, as torch.quantile's default ("linear") computes them.

    Sorted ascending, quantile q sits at position q * (M - 1), interpolated linearly between the
    two values around it (in float64). The values around it are found by selection in the input's
    own dtype (kthvalue, O(M); selecting rounds nothing), never by sorting all M.

    Args:
        values_M: 1-D values, any float dtype and length.
        qs: Quantiles, each in [0, 1].

    Returns:
        One float per q; NaN for all when there are no values or any is NaN (as torch.quantile).
    """
    assert values_M.dim() == 1, f"values must be 1-D, got {tuple(values_M.shape)}"
    assert all(0.0 <= q <= 1.0 for q in qs), f"quantiles must lie in [0, 1], got {list(qs)}"
    count = values_M.numel()
    if count == 0 or bool(values_M.isnan().any()):
        return [math.nan] * len(qs)
    out = []
    for q in qs:
        position = q * (count - 1)
        below = math.floor(position)
        # kthvalue counts from 1: the k-th smallest is slot k - 1 of the sorted values. A position
        # on a slot is that value exactly (and needs one selection, not two).
        below_value = values_M.kthvalue(below + 1).values.double()
        if position == below:
            out.append(float(below_value))
            continue
        above_value = values_M.kthvalue(below + 2).values.double()
        out.append(float(torch.lerp(below_value, above_value, position - below)))
    return out
