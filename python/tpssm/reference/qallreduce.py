"""Pure-PyTorch reference of the quantized two-shot all-reduce (design: docs/qallreduce.md).

The kernels (CPU and CUDA) must reproduce these bytes exactly, so every step here is written as
separate fp32 operations in the order the kernels use (no fused multiply-add).

Numerics of one group of G contiguous values v (fp32):
- a = max|v| with NaN propagation.
- a is NaN or +Inf: q = 0 and s = NaN (canonical 0x7fc00000) or +Inf, so the whole group
  dequantizes to NaN (0 * Inf and 0 * NaN are NaN): a non-finite value spreads over its own
  group and no further.
- a < TINY_ABSMAX (a == 0 included): q = 0, s = 0. The threshold (2^-118, about 3e-36) keeps
  qmax / a finite in fp32; such groups hold only bf16/fp32 denormal-range values.
- otherwise inv = qmax / a, t = v * inv,
  int8: q = clamp(round_half_even(t), -127, 127); fp8 e4m3: q = rne_e4m3(clamp(t, -448, 448)),
  s = a / qmax.
Dequantized value: float(q) * s.

Payload layout: M elements, ng = M / G groups, sg = ceil(ng / N) groups per chunk; chunk k holds
groups [k*sg, (k+1)*sg) (those >= ng are zero padding) as
    [sg*G one-byte codes | pad to 16 B | sg fp32 scales | pad to 16 B],
and a buffer of N chunks is the uint8 array of their concatenation.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

__all__ = [
    "CODECS",
    "TINY_ABSMAX",
    "qar_layout",
    "qar_chunk_bytes",
    "qar_wire_bytes",
    "quantize_groups_ref",
    "dequantize_groups_ref",
    "qar_quantize_pack_ref",
    "qar_reduce_requant_ref",
    "qar_dequant_ref",
    "qar_all_reduce_ref",
    "fp16_all_reduce_ref",
    "exact_all_reduce_ref",
]

# Codec name -> (id passed to the ops, qmax).
CODECS = {"int8": (0, 127.0), "fp8": (1, 448.0)}
TINY_ABSMAX = 2.0 ** -118
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


def pick_group_size(width: int, group_size: int) -> int:
    """The largest supported group size <= group_size dividing `width` (groups never straddle
    rows), or 0 when none does (the message is then reduced exactly)."""
    return max((g for g in SUPPORTED_GROUP_SIZES if g <= group_size and width % g == 0),
               default=0)


def _codec(codec) -> tuple:
    if isinstance(codec, int):
        for name, (cid, qmax) in CODECS.items():
            if cid == codec:
                return name, cid, qmax
        raise ValueError(f"codec must be 0 (int8) or 1 (fp8), got {codec}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    return (codec,) + CODECS[codec]


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def qar_layout(numel: int, world_size: int, group_size: int) -> dict:
    """Sizes of the payload for `numel` elements over `world_size` ranks.

    Returns num_groups (ng), groups_per_chunk (sg), values_bytes (offset of the scales inside a
    chunk) and chunk_bytes.
    """
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if numel % group_size != 0:
        raise ValueError(f"numel ({numel}) must be a multiple of group_size ({group_size})")
    ng = numel // group_size
    sg = -(-ng // world_size)
    values_bytes = _round_up(sg * group_size, 16)
    chunk_bytes = values_bytes + _round_up(sg * 4, 16)
    return {"num_groups": ng, "groups_per_chunk": sg, "values_bytes": values_bytes,
            "chunk_bytes": chunk_bytes}


def qar_chunk_bytes(numel: int, world_size: int, group_size: int) -> int:
    return qar_layout(numel, world_size, group_size)["chunk_bytes"]


def qar_wire_bytes(numel: int, world_size: int, scheme: str, group_size: int = 128,
                   elem_bytes: int = 2) -> int:
    """Bytes each rank sends for one all-reduce of `numel` elements (its own chunk excluded).

    exact: ring all-reduce, 2(N-1)/N * M * elem_bytes; fp16: the same with 2-byte elements;
    int8 / fp8: the two-shot payload, (N-1) chunks in the all-to-all plus (N-1) in the all-gather,
    which is 2(N-1)/N * M * (1 + 4/G) bytes up to the 16-byte padding.
    """
    n = world_size
    if n == 1:
        return 0
    if scheme == "exact":
        return 2 * (n - 1) * numel * elem_bytes // n
    if scheme == "fp16":
        return 2 * (n - 1) * numel * 2 // n
    _codec(scheme)
    return 2 * (n - 1) * qar_chunk_bytes(numel, n, group_size)


def quantize_groups_ref(v: torch.Tensor, codec="int8"):
    """v: (num_groups, G) float32 -> (codes (num_groups, G) uint8, scales (num_groups,) float32)."""
    name, _, qmax = _codec(codec)
    v = v.to(torch.float32)
    a = v.abs().amax(dim=1)
    tiny = a < TINY_ABSMAX
    ok = torch.isfinite(a) & ~tiny
    # Tensor / tensor of one shape: `scalar / tensor` would be computed as scalar * (1 / tensor),
    # two roundings instead of the kernels' one.
    qmax_t = torch.full_like(a, qmax)
    inv = qmax_t / torch.where(ok, a, torch.ones_like(a))
    t = v * inv[:, None]
    t = torch.where(ok[:, None], t, torch.zeros_like(t))
    if name == "int8":
        q = torch.round(t).clamp(-127.0, 127.0).to(torch.int8)
    else:
        q = t.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    s = torch.where(tiny, torch.zeros_like(a), a / qmax_t)
    s = torch.where(torch.isnan(a), torch.full_like(a, float("nan")), s)
    return q.view(torch.uint8), s


def dequantize_groups_ref(q: torch.Tensor, s: torch.Tensor, codec="int8") -> torch.Tensor:
    """codes (num_groups, G) uint8, scales (num_groups,) -> float32 (num_groups, G)."""
    name, _, _ = _codec(codec)
    codes = q.view(torch.int8 if name == "int8" else torch.float8_e4m3fn)
    return codes.to(torch.float32) * s[:, None]


def _pack_chunks(q: torch.Tensor, s: torch.Tensor, num_chunks: int, lay: dict, G: int):
    """q (num_chunks*sg, G) uint8, s (num_chunks*sg,) -> uint8 (num_chunks * chunk_bytes,)."""
    sg, vb, cb = lay["groups_per_chunk"], lay["values_bytes"], lay["chunk_bytes"]
    out = torch.zeros(num_chunks, cb, dtype=torch.uint8)
    out[:, : sg * G] = q.reshape(num_chunks, sg * G)
    out[:, vb: vb + sg * 4] = s.contiguous().view(torch.uint8).reshape(num_chunks, sg * 4)
    return out.reshape(-1)


def _unpack_chunks(buf: torch.Tensor, num_chunks: int, lay: dict, G: int):
    sg, vb, cb = lay["groups_per_chunk"], lay["values_bytes"], lay["chunk_bytes"]
    chunks = buf.reshape(-1)[: num_chunks * cb].reshape(num_chunks, cb)
    q = chunks[:, : sg * G].reshape(num_chunks * sg, G)
    s = chunks[:, vb: vb + sg * 4].contiguous().view(torch.float32).reshape(num_chunks * sg)
    return q, s


def qar_quantize_pack_ref(x: torch.Tensor, world_size: int, group_size: int = 128,
                          codec="int8") -> torch.Tensor:
    """x (..., D), D % G == 0 -> send buffer uint8 (N * chunk_bytes,), chunk k for owner k."""
    G = group_size
    if x.shape[-1] % G != 0:
        raise ValueError(f"group_size ({G}) must divide the hidden dim ({x.shape[-1]})")
    lay = qar_layout(x.numel(), world_size, G)
    ng, sg = lay["num_groups"], lay["groups_per_chunk"]
    v = torch.zeros(world_size * sg, G, dtype=torch.float32)
    v[:ng] = x.reshape(ng, G).to(torch.float32)
    q, s = quantize_groups_ref(v, codec)
    return _pack_chunks(q, s, world_size, lay, G)


def qar_reduce_requant_ref(recv: torch.Tensor, numel: int, world_size: int,
                           group_size: int = 128, codec="int8") -> torch.Tensor:
    """recv (N * chunk_bytes,) uint8, chunk r from rank r -> this owner's chunk (chunk_bytes,).

    acc = 0; acc = acc + float(q_r) * s_r for r = 0..N-1 (fp32, product and sum rounded
    separately), then requantized with the same codec.
    """
    G = group_size
    lay = qar_layout(numel, world_size, G)
    sg = lay["groups_per_chunk"]
    q, s = _unpack_chunks(recv, world_size, lay, G)
    q = q.reshape(world_size, sg, G)
    s = s.reshape(world_size, sg)
    acc = torch.zeros(sg, G, dtype=torch.float32)
    for r in range(world_size):
        acc = acc + dequantize_groups_ref(q[r], s[r], codec)
    q2, s2 = quantize_groups_ref(acc, codec)
    return _pack_chunks(q2, s2, 1, lay, G)


def qar_dequant_ref(gathered: torch.Tensor, shape, dtype: torch.dtype, world_size: int,
                    group_size: int = 128, codec="int8",
                    residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gathered (N * chunk_bytes,) uint8 -> y of `shape` / `dtype`.

    y = cast(float(q) * t), or cast(float(q) * t + float(residual)) with a residual.
    """
    G = group_size
    numel = math.prod(shape)
    lay = qar_layout(numel, world_size, G)
    ng = lay["num_groups"]
    q, s = _unpack_chunks(gathered, world_size, lay, G)
    y = dequantize_groups_ref(q[:ng], s[:ng], codec)
    if residual is not None:
        y = y + residual.reshape(ng, G).to(torch.float32)
    return y.to(dtype).reshape(shape)


def qar_all_reduce_ref(xs: Sequence[torch.Tensor], group_size: int = 128, codec="int8",
                       residual: Optional[torch.Tensor] = None,
                       return_buffers: bool = False):
    """The whole N-rank two-shot all-reduce simulated in one process.

    xs: N tensors of one shape/dtype (rank r's partial sum). Returns the N outputs (identical by
    construction); with return_buffers also a dict of every rank's send, recv, mine and gathered
    buffers (lists indexed by rank) for byte-level comparison.
    """
    n = len(xs)
    shape, dtype = xs[0].shape, xs[0].dtype
    numel = xs[0].numel()
    lay = qar_layout(numel, n, group_size)
    cb = lay["chunk_bytes"]
    send = [qar_quantize_pack_ref(x.cpu(), n, group_size, codec) for x in xs]
    recv = [torch.cat([send[r][k * cb:(k + 1) * cb] for r in range(n)]) for k in range(n)]
    mine = [qar_reduce_requant_ref(recv[k], numel, n, group_size, codec) for k in range(n)]
    gathered = torch.cat(mine)
    res = None if residual is None else residual.cpu()
    ys = [qar_dequant_ref(gathered, shape, dtype, n, group_size, codec, res) for _ in range(n)]
    if return_buffers:
        return ys, {"send": send, "recv": recv, "mine": mine,
                    "gathered": [gathered.clone() for _ in range(n)]}
    return ys


def fp16_all_reduce_ref(xs: Sequence[torch.Tensor],
                        residual: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """The paper's baseline: cast every partial sum to fp16, sum (fp32 accumulation in rank order,
    one fp16 rounding; NCCL's own order and roundings may differ), cast back to the input dtype."""
    acc = torch.zeros(xs[0].shape, dtype=torch.float32)
    for x in xs:
        acc = acc + x.cpu().to(torch.float16).to(torch.float32)
    y = acc.to(torch.float16).to(torch.float32)
    if residual is not None:
        y = y + residual.cpu().to(torch.float32)
    return [y.to(xs[0].dtype) for _ in xs]


def exact_all_reduce_ref(xs: Sequence[torch.Tensor],
                         residual: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """fp64 sum of the partial sums (plus the residual), cast to the input dtype."""
    acc = torch.zeros(xs[0].shape, dtype=torch.float64)
    for x in xs:
        acc = acc + x.cpu().to(torch.float64)
    if residual is not None:
        acc = acc + residual.cpu().to(torch.float64)
    return [acc.to(xs[0].dtype) for _ in xs]
