"""References of the decode-sized projection ops (tpssm.ops.gemv, tpssm.ops.gemv_conv_update)."""

from __future__ import annotations

from typing import Optional

import torch

from tpssm.reference.norm import add_rms_norm_ref
from tpssm.reference.ssm import PAD_SLOT_ID, causal_conv1d_update_ref


def _normed_input(x, norm_weight, residual, residual_out, norm_eps):
    """x, or with the norm prologue add_rms_norm_ref of x on a copy of the residual written to
    residual_out."""
    if norm_weight is None:
        return x
    if residual is not None:
        residual_out.copy_(residual)
    return add_rms_norm_ref(x, norm_weight, norm_eps, residual=residual_out)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             *, out: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
             residual: Optional[torch.Tensor] = None,
             residual_out: Optional[torch.Tensor] = None,
             norm_eps: float = 1e-5) -> torch.Tensor:
    """x (M, K) . weight (N, K)^T (+ bias (N,)) in float64, rounded once to x's dtype; with
    norm_weight the product reads add_rms_norm_ref(x, ...) (residual + x to residual_out)."""
    x = _normed_input(x, norm_weight, residual, residual_out, norm_eps)
    y = x.double() @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)


def gemv_conv_update_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         conv_state: torch.Tensor, conv_weight: torch.Tensor,
                         conv_bias: Optional[torch.Tensor] = None, *, conv_start: int,
                         activation: Optional[str] = None,
                         cache_indices: Optional[torch.Tensor] = None,
                         pad_slot_id: int = PAD_SLOT_ID,
                         out: Optional[torch.Tensor] = None,
                         norm_weight: Optional[torch.Tensor] = None,
                         residual: Optional[torch.Tensor] = None,
                         residual_out: Optional[torch.Tensor] = None,
                         norm_eps: float = 1e-5) -> torch.Tensor:
    """gemv_ref (with its norm prologue), then causal_conv1d_update_ref of the columns
    [conv_start, conv_start + conv_dim) in place (padded rows keep the product there);
    conv_state updated in place."""
    y = gemv_ref(x, weight, bias, out=out, norm_weight=norm_weight, residual=residual,
                 residual_out=residual_out, norm_eps=norm_eps)
    cols = y[:, conv_start:conv_start + conv_weight.shape[0]]
    causal_conv1d_update_ref(cols.clone(), conv_state, conv_weight, conv_bias,
                             activation=activation, cache_indices=cache_indices,
                             pad_slot_id=pad_slot_id, out=cols)
    return y
