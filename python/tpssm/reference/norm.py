"""Pure-PyTorch references of the fused norm ops (tpssm.ops.add_rms_norm, gated_rms_norm), in
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


def _gated_groups(x, z, group_size, first_group_size):
    """v = x * silu(z) in float64 and the groups' column bounds."""
    dim = x.shape[1]
    gs = group_size or dim
    first = first_group_size or gs
    v = x.double()
    if z is not None:
        zd = z.double()
        v = v * zd * torch.sigmoid(zd)
    bounds = [0, first] + list(range(first + gs, dim + 1, gs))
    return v, list(zip(bounds, bounds[1:]))


def gated_rms_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                       *, z: Optional[torch.Tensor] = None, group_size: int = 0,
                       first_group_size: int = 0, sum_sq: Optional[torch.Tensor] = None,
                       norm_size: int = 0,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """v = x * silu(z) (x without z); per group (a first group of first_group_size columns when
    > 0, then groups of group_size; 0: all), out = round(weight * round(v / sqrt(mean(v^2) + eps)))
    (no weight: the inner rounding only), in float64. With sum_sq (rows, groups) the mean is
    sum_sq / norm_size."""
    v, groups = _gated_groups(x, z, group_size, first_group_size)
    parts = []
    for i, (a, b) in enumerate(groups):
        g = v[:, a:b]
        mean = (sum_sq[:, i:i + 1].double() / norm_size if sum_sq is not None
                else g.pow(2).mean(-1, keepdim=True))
        parts.append(g * torch.rsqrt(mean + eps))
    y = torch.cat(parts, 1).to(x.dtype)
    if weight is not None:
        y = (weight.double() * y.double()).to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)


def gated_sum_squares_ref(x: torch.Tensor, *, z: Optional[torch.Tensor] = None,
                          group_size: int = 0, first_group_size: int = 0) -> torch.Tensor:
    """float64 (rows, groups): each group's sum of (x * silu(z))^2."""
    v, groups = _gated_groups(x, z, group_size, first_group_size)
    return torch.stack([v[:, a:b].pow(2).sum(-1) for a, b in groups], 1)
