"""Pure-PyTorch reference of tpssm.ops.decode_attention, in float64 by default so kernels can be
checked against a value closer to the truth."""

from __future__ import annotations

from typing import Optional

import torch


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         rows: torch.Tensor, lengths: torch.Tensor, scale: float, *,
                         out: Optional[torch.Tensor] = None,
                         compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """out[b, h] = softmax(scale * K[rows[b], h, :n] q[b, h]) V[rows[b], h, :n] with
    n = min(lengths[b], max_len), computed in compute_dtype and rounded to q's dtype; a row
    outside [0, num_slots) or a length <= 0 gives zeros. One host read of rows and lengths."""
    S, _, L, _ = k_cache.shape
    y = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    for b, (r, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
        n = min(n, L)
        if not (0 <= r < S) or n <= 0:
            continue
        k = k_cache[r, :, :n].to(compute_dtype)           # (H, n, hd)
        v = v_cache[r, :, :n].to(compute_dtype)
        s = torch.einsum("hnd,hd->hn", k, q[b].to(compute_dtype)) * scale
        p = torch.softmax(s, dim=-1)
        y[b] = torch.einsum("hn,hnd->hd", p, v)
    y = y.to(q.dtype)
    if out is None:
        return y
    return out.copy_(y)
