"""The op backend the models call: the compiled ops (tpssm.ops, default) or their pure-PyTorch
references (tpssm.reference), which take the same arguments. The references let the models run
where the compiled kernels are missing for a device, and give tests a second implementation."""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["BACKENDS", "get_backend"]

BACKENDS = ("ops", "reference")


def _add_rms_norm_torch(x, weight, eps, *, residual=None, out=None):
    """add_rms_norm as the unfused torch chain (the CPU op's arithmetic, on any device)."""
    import torch.nn.functional as F

    h = x
    if residual is not None:
        residual.copy_(residual + x)
        h = residual.to(x.dtype)
    y = weight * F.rms_norm(h, (h.shape[-1],), eps=eps)
    return y if out is None else out.copy_(y)


def _gated_runs(x, z, group_size, first_group_size):
    """The gated values in fp32 and the groups as (begin, end, width) runs of equal width."""
    import torch.nn.functional as F

    dim = x.shape[1]
    gs = group_size or dim
    first = first_group_size or gs
    v = x.float()
    if z is not None:
        v = v * F.silu(z.float())
    runs = [(0, dim, gs)] if first == gs else [(0, first, first), (first, dim, gs)]
    return v, runs


def _gated_rms_norm_torch(x, weight=None, eps=1e-6, *, z=None, group_size=0, first_group_size=0,
                          sum_sq=None, norm_size=0, out=None):
    """gated_rms_norm as the unfused torch chain (the CPU op's arithmetic, on any device)."""
    import torch

    v, runs = _gated_runs(x, z, group_size, first_group_size)
    parts, g0 = [], 0
    for a, b, w in runs:
        g = v[:, a:b].reshape(v.shape[0], -1, w)
        n = g.shape[1]
        mean = (sum_sq[:, g0:g0 + n].unsqueeze(-1) / norm_size if sum_sq is not None
                else g.pow(2).mean(-1, keepdim=True))
        parts.append((g * torch.rsqrt(mean + eps)).reshape(v.shape[0], b - a))
        g0 += n
    y = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).to(x.dtype)
    if weight is not None:
        y = weight * y
    return y if out is None else out.copy_(y)


def _gated_sum_squares_torch(x, *, z=None, group_size=0, first_group_size=0, out=None):
    """gated_sum_squares as the unfused torch chain."""
    import torch

    v, runs = _gated_runs(x, z, group_size, first_group_size)
    y = torch.cat([v[:, a:b].reshape(v.shape[0], -1, w).pow(2).sum(-1) for a, b, w in runs], 1)
    return y if out is None else out.copy_(y)


def _decode_attention_torch(q, k_cache, v_cache, rows, lengths, scale, *, out=None):
    """decode_attention as gather + masked SDPA (the models' torch code before the op): each
    row's whole slot is gathered and keys at or past its length are masked. Rows must be valid
    and lengths in [1, max_len] (the model guarantees both)."""
    import torch
    import torch.nn.functional as F

    max_len = k_cache.shape[2]
    mask = torch.arange(max_len, device=q.device)[None, :] < lengths[:, None]
    # Past a row's length a slot holds whatever its last request left, NaN or inf included: a
    # masked weight of 0 times such a value would still poison the row, so they are zeroed.
    hidden = ~mask[:, None, :, None]
    ks = k_cache.index_select(0, rows).masked_fill(hidden, 0)    # (B, H, max_len, hd)
    vs = v_cache.index_select(0, rows).masked_fill(hidden, 0)
    y = F.scaled_dot_product_attention(q[:, :, None, :], ks, vs,
                                       attn_mask=mask[:, None, None, :], scale=scale)[:, :, 0, :]
    return y if out is None else out.copy_(y)


def get_backend(name: str = "ops") -> SimpleNamespace:
    """Namespace with causal_conv1d, causal_conv1d_update, selective_scan,
    selective_state_update, add_rms_norm, gated_rms_norm, gated_sum_squares, decode_attention and
    gemv_conv_update for backend `name` ("ops" or "reference")."""
    if name == "ops":
        from tpssm import ops

        return SimpleNamespace(
            name="ops",
            causal_conv1d=ops.causal_conv1d,
            causal_conv1d_update=ops.causal_conv1d_update,
            selective_scan=ops.selective_scan,
            selective_state_update=ops.selective_state_update,
            add_rms_norm=ops.add_rms_norm,
            gated_rms_norm=ops.gated_rms_norm,
            gated_sum_squares=ops.gated_sum_squares,
            decode_attention=ops.decode_attention,
            gemv_conv_update=ops.gemv_conv_update,
        )
    if name == "reference":
        from tpssm import reference

        return SimpleNamespace(
            name="reference",
            causal_conv1d=reference.causal_conv1d_ref,
            causal_conv1d_update=reference.causal_conv1d_update_ref,
            selective_scan=reference.selective_scan_ref,
            selective_state_update=reference.selective_state_update_ref,
            add_rms_norm=_add_rms_norm_torch,
            gated_rms_norm=_gated_rms_norm_torch,
            gated_sum_squares=_gated_sum_squares_torch,
            decode_attention=_decode_attention_torch,
            gemv_conv_update=reference.gemv_conv_update_ref,
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
