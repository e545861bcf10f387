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


def get_backend(name: str = "ops") -> SimpleNamespace:
    """Namespace with causal_conv1d, causal_conv1d_update, selective_scan,
    selective_state_update and add_rms_norm for backend `name` ("ops" or "reference")."""
    if name == "ops":
        from tpssm import ops

        return SimpleNamespace(
            name="ops",
            causal_conv1d=ops.causal_conv1d,
            causal_conv1d_update=ops.causal_conv1d_update,
            selective_scan=ops.selective_scan,
            selective_state_update=ops.selective_state_update,
            add_rms_norm=ops.add_rms_norm,
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
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
