"""Reference of the decode-sized projection op (tpssm.ops.gemv)."""

from __future__ import annotations

from typing import Optional

import torch


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) . weight (N, K)^T (+ bias (N,)) in float64, rounded once to x's dtype."""
    y = x.double() @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)
