"""Pure-PyTorch reference of the fused residual add + RMSNorm (tpssm.ops.add_rms_norm), in
float64 for the norm so kernels can be checked against a value closer to the truth."""

from __future__ import annotations

from typing import Optional

import torch


def add_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     residual: Optional[torch.Tensor] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual += x (rounded to the residual's dtype); h = residual (or x) rounded to x's
    dtype; out = round(weight * round(h / sqrt(mean(h^2) + eps))) with the norm in float64."""
    h = x
    if residual is not None:
        residual.copy_((residual.double() + x.double()).to(residual.dtype))
        h = residual.to(x.dtype)
    hd = h.double()
    normed = (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = (weight.double() * normed.double()).to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)
