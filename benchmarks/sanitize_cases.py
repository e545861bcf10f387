"""Small runs of every CUDA op for compute-sanitizer (memcheck, racecheck): dense and varlen
batches with empty and length-1 sequences, padded rows, distinct read / write slots, 16-bit
states and forced tiny chunks, so that every kernel and every boundary path runs once; then
malformed index values (slots out of range, query_start_loc negative, past the token count, out
of order), which the CUDA ops do not check on the host: memcheck must find no access outside the
tensors.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_cases.py [GROUP ...]

GROUPs (default all): conv, scan, staged, ssd, malformed, decode. The malformed-index group only
matters to memcheck: its out-of-order sequences race between blocks on purpose, in global
memory, which racecheck (shared memory) does not examine.
"""

import os
import sys
from pathlib import Path

# One cudaMalloc per tensor, so that memcheck sees an access past a tensor instead of a hit inside
# the caching allocator's segment; index values unchecked on the host, as in production.
os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
os.environ.pop("TPSSM_DEBUG_CHECKS", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from tpssm import ops  # noqa: E402

dev = torch.device("cuda")
i32 = dict(dtype=torch.int32, device=dev)


def conv_cases():
    dim, width = 40, 4
    for chunk_len in (0, 2):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(10, dim, device=dev, dtype=dtype)
            w = torch.randn(dim, width, device=dev, dtype=dtype)
            states = torch.randn(5, dim, width - 1, device=dev, dtype=dtype)
            ops.causal_conv1d(x, w, torch.randn(dim, device=dev, dtype=dtype),
                              conv_states=states,
                              query_start_loc=torch.tensor([0, 6, 6, 7, 10, 10], **i32),
                              cache_indices=torch.tensor([0, 1, -1, 3, 4], **i32),
                              has_initial_state=torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool,
                                                             device=dev),
                              activation="silu", chunk_len=chunk_len)
            xd = torch.randn(2, 9, dim + 3, device=dev, dtype=dtype)[..., 1:dim + 1]
            ops.causal_conv1d(xd, w, None, conv_states=states,
                              cache_indices=torch.tensor([2, -1], **i32),
                              has_initial_state=torch.tensor([1, 1], dtype=torch.bool,
                                                             device=dev),
                              chunk_len=chunk_len)
            ops.causal_conv1d_update(torch.randn(3, dim, device=dev, dtype=dtype), states, w,
                                     cache_indices=torch.tensor([4, -1, 0], **i32),
                                     activation="silu")


def scan_cases():
    for split_len in (0, 3):
        for form, h, p, n, g in (("mamba1", 24, 1, 16, 1), ("mamba2", 4, 8, 128, 2),
                                 ("mamba2", 3, 5, 40, 1)):
            for dtype, sdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (torch.float16, torch.float16)):
                dim, T = h * p, 11
                A = -torch.rand(h, n, device=dev) if form == "mamba1" else -torch.rand(h, device=dev)
                delta_dim = h
                st_shape = (6, dim, n) if form == "mamba1" else (6, h, p, n)
                states = torch.randn(st_shape, device=dev, dtype=sdtype)
                rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
                ops.selective_scan(
                    rnd(T, dim), rnd(T, delta_dim), A, rnd(T, g, n), rnd(T, g, n),
                    torch.randn(h, device=dev), rnd(T, dim), torch.randn(h, device=dev),
                    delta_softplus=True, ssm_states=states,
                    query_start_loc=torch.tensor([0, 1, 1, 8, 8, 11, 11], **i32),
                    cache_indices=torch.tensor([0, 1, 2, -1, 4, 5], **i32),
                    has_initial_state=torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool,
                                                   device=dev),
                    split_len=split_len)
                ops.selective_state_update(
                    states, rnd(4, dim), rnd(4, delta_dim), A, rnd(4, g, n), rnd(4, g, n),
                    torch.randn(h, device=dev), rnd(4, dim), torch.randn(h, device=dev),
                    dt_softplus=True, state_batch_indices=torch.tensor([0, -1, 2, 3], **i32),
                    dst_state_batch_indices=torch.tensor([5, 1, -1, 4], **i32))


def staged_scan_cases():
    """The Mamba1 staged walk with its double-buffered cp.async tiles: 72 channels (one lane a
    channel: a full 2-warp block, then a block of one full warp and one of 8 lanes, which loads
    per lane; 4 and 8 lanes: whole warps, 8 lanes with 8-byte row copies of 16-bit inputs),
    sequences of several 16-token tiles plus a tail, whole-sequence and split plans."""
    h, n, T = 72, 16, 87
    qsl = torch.tensor([0, 37, 37, 87], **i32)
    for split_len, lanes in ((0, 1), (24, 1), (0, 4), (0, 8), (24, 8)):
        for dtype in (torch.float32, torch.bfloat16):
            rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
            ops.selective_scan(
                rnd(T, h), rnd(T, h), -torch.rand(h, n, device=dev), rnd(T, 1, n), rnd(T, 1, n),
                torch.randn(h, device=dev), rnd(T, h), torch.randn(h, device=dev),
                delta_softplus=True, ssm_states=torch.randn(4, h, n, device=dev),
                query_start_loc=qsl, cache_indices=torch.tensor([2, 0, 3], **i32),
                has_initial_state=torch.tensor([1, 0, 1], dtype=torch.bool, device=dev),
                split_len=split_len, lanes_per_channel=lanes)


def ssd_cases():
    """The SSD kernel (Mamba2 form, 16-bit, headdim / dstate 64 or 128): its shared-memory tiles,
    varlen with empty and one-token sequences, a padded row, the split plan."""
    for split_len in (0, 40):
        for dtype, (h, p, n, g) in ((torch.bfloat16, (2, 64, 64, 1)),
                                    (torch.float16, (2, 128, 128, 2))):
            dim, T = h * p, 150
            rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
            ops.selective_scan(
                rnd(T, dim), rnd(T, h), -torch.rand(h, device=dev), rnd(T, g, n), rnd(T, g, n),
                torch.randn(h, device=dev), rnd(T, dim), torch.randn(h, device=dev),
                delta_softplus=True, ssm_states=torch.randn(5, h, p, n, device=dev),
                query_start_loc=torch.tensor([0, 70, 70, 71, 150], **i32),
                cache_indices=torch.tensor([0, 1, -1, 4], **i32),
                has_initial_state=torch.tensor([1, 0, 1, 1], dtype=torch.bool, device=dev),
                algorithm="ssd", split_len=split_len)


# query_start_loc values for 10 tokens in 4 sequences: negative, past the end, int32 extremes,
# gaps, out of order, descending.
BAD_QSL = ([-4, 3, 5, 6, 10], [0, 3, 1000, 6, 10], [0, 3, 5, 6, 2 ** 31 - 1],
           [-2 ** 31, 3, 5, 6, 2 ** 31 - 1], [2, 3, 5, 6, 8], [0, 6, 3, 9, 10], [0, 2, 1, 3, 4],
           [10, 7, 3, 1, 0], [100, 200, 300, 400, 500], [-9, -5, -3, -2, -1])
# Slots for a pool of 5: one past the end, negative (not the pad id), the int32 extremes.
BAD_SLOTS = ([0, 5, 2, 3], [-3, 1, 2, 3], [0, 1, 2 ** 31 - 1, 3], [0, 1, 2, -2 ** 31])


def malformed_index_cases():
    dim, width, T = 40, 4, 10
    flags = torch.tensor([1, 0, 1, 1], dtype=torch.bool, device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
        w = rnd(dim, width)
        conv_states = rnd(5, dim, width - 1)
        for chunk_len in (0, 2):
            for qsl in BAD_QSL:
                ops.causal_conv1d(rnd(T, dim), w, rnd(dim), conv_states=conv_states,
                                  query_start_loc=torch.tensor(qsl, **i32),
                                  cache_indices=torch.tensor([0, 1, 2, 3], **i32),
                                  has_initial_state=flags, activation="silu",
                                  chunk_len=chunk_len)
            for slots in BAD_SLOTS:
                ops.causal_conv1d(rnd(T, dim), w, None, conv_states=conv_states,
                                  query_start_loc=torch.tensor([0, 3, 5, 6, 10], **i32),
                                  cache_indices=torch.tensor(slots, **i32),
                                  has_initial_state=flags, chunk_len=chunk_len)
        for slots in BAD_SLOTS:
            ops.causal_conv1d_update(rnd(4, 2, dim), conv_states, w, rnd(dim),
                                     cache_indices=torch.tensor(slots, **i32), activation="silu")
        # Recurrent kernels (Mamba1 staged tiles, Mamba2 groups), whole-sequence and split plans.
        for form, h, p, n in (("mamba1", 40, 1, 16), ("mamba2", 4, 8, 16)):
            d = h * p
            A = -torch.rand(h, n, device=dev) if form == "mamba1" else -torch.rand(h, device=dev)
            st_shape = (5, d, n) if form == "mamba1" else (5, h, p, n)
            states = torch.randn(st_shape, device=dev)
            for split_len in (0, 2):
                for qsl, slots in [(q, [0, 1, 2, 3]) for q in BAD_QSL] + [
                        ([0, 3, 5, 6, 10], s) for s in BAD_SLOTS]:
                    ops.selective_scan(
                        rnd(T, d), rnd(T, h), A, rnd(T, 1, n), rnd(T, 1, n),
                        torch.randn(h, device=dev), rnd(T, d), torch.randn(h, device=dev),
                        delta_softplus=True, ssm_states=states,
                        query_start_loc=torch.tensor(qsl, **i32),
                        cache_indices=torch.tensor(slots, **i32), has_initial_state=flags,
                        algorithm="recurrent", split_len=split_len)
            for src, dst in [(s, None) for s in BAD_SLOTS] + [([0, 1, 2, 3], s)
                                                               for s in BAD_SLOTS]:
                ops.selective_state_update(
                    states, rnd(4, d), rnd(4, h), A, rnd(4, 1, n), rnd(4, 1, n),
                    torch.randn(h, device=dev), rnd(4, d), torch.randn(h, device=dev),
                    dt_softplus=True, state_batch_indices=torch.tensor(src, **i32),
                    dst_state_batch_indices=None if dst is None else torch.tensor(dst, **i32))
    # The SSD kernel (16-bit, headdim / dstate 64): whole-sequence and split plans.
    h, p, n = 2, 64, 64
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)  # noqa: E731
    states = torch.randn(5, h, p, n, device=dev)
    for split_len in (0, 2):
        for qsl, slots in [(q, [0, 1, 2, 3]) for q in BAD_QSL] + [
                ([0, 3, 5, 6, 10], s) for s in BAD_SLOTS]:
            ops.selective_scan(
                rnd(T, h * p), rnd(T, h), -torch.rand(h, device=dev), rnd(T, 1, n), rnd(T, 1, n),
                torch.randn(h, device=dev), rnd(T, h * p), torch.randn(h, device=dev),
                delta_softplus=True, ssm_states=states, query_start_loc=torch.tensor(qsl, **i32),
                cache_indices=torch.tensor(slots, **i32), has_initial_state=flags,
                algorithm="ssd", split_len=split_len)


def decode_cases():
    """gemv at every launch option over odd sizes (a part block, a part K trip), the element path
    (K % 8, misaligned x), strided operands; its conv epilogue (gemv_conv_update) at every
    option with padded and out-of-range slots, with and without the norm prologue (a strided
    residual stream); decode attention with and without key splits over bad rows and lengths;
    then the decode-step kernels with programmatic launch on (each waits for the one before)."""
    for dtype in (torch.bfloat16, torch.float32):
        for m, n, k in ((1, 45, 2056), (3, 45, 264), (8, 7, 40), (5, 37, 100)):
            x = torch.randn(m, k + 8, device=dev, dtype=dtype)  # rows stay 16-byte aligned
            w = torch.randn(n, k, device=dev, dtype=dtype)
            b = torch.randn(n, device=dev, dtype=dtype)
            for xs in (x[:, :k], x[:, 1:k + 1]):
                for wpr in (0, 1, 2, 4, 8):
                    for rpw in (1, 2, 4):
                        ops.gemv(xs, w, b, warps_per_row=wpr, rows_per_warp=rpw)
            # a conv over columns inside the product, so that blocks straddle both of its edges
            start, dim = (5, n - 8) if n > 8 else (1, n - 2)
            cw = torch.randn(dim, 4, device=dev, dtype=dtype)
            state = torch.randn(6, dim, 3, device=dev, dtype=dtype)
            slots = torch.tensor([5, -1, 9, 0, -4, 2, 1, 3][:m], device=dev, dtype=torch.int32)
            stream = torch.randn(m, k + 4, device=dev)
            norm = dict(norm_weight=torch.rand(k, device=dev, dtype=dtype),
                        residual=stream[:, 3:k + 3], residual_out=torch.empty(m, k, device=dev))
            for wpr in (0, 1, 2, 4, 8):
                for rpw in (1, 2, 4):
                    for prologue in ({}, norm):
                        ops.gemv_conv_update(x[:, 1:k + 1], w, b, state, cw, None,
                                             conv_start=start, activation="silu",
                                             cache_indices=slots, warps_per_row=wpr,
                                             rows_per_warp=rpw, **prologue)
    # decode attention: one block per (row, head) and key splits (shares with and without keys),
    # a strided cache, bad rows and lengths (negative, zero, past max_len)
    for dtype in (torch.bfloat16, torch.float32):
        for hd in (80, 200):
            cache = torch.randn(2, 4, 6, 70, hd, device=dev, dtype=dtype)
            k, v = cache[0, :, 1::2][:, :2], cache[1, :, :2]
            q = torch.randn(5, 2, hd, device=dev, dtype=dtype)
            rows = torch.tensor([3, -1, 0, 4, 1], device=dev)
            lengths = torch.tensor([70, 5, 0, 3, 999], device=dev, dtype=torch.int32)
            for splits in (1, 3, 32):
                ops.decode_attention(q, k, v, rows, lengths, 0.1, num_splits=splits)
    previous = ops.set_programmatic_launch(True)
    try:
        h = torch.randn(2, 64, device=dev, dtype=torch.bfloat16)
        res = torch.randn(2, 64, device=dev)
        normed = ops.add_rms_norm(h, torch.rand(64, device=dev, dtype=torch.bfloat16), 1e-5,
                                  residual=res)
        xz = ops.gemv(normed, torch.randn(96, 64, device=dev, dtype=torch.bfloat16))
        x = ops.causal_conv1d_update(xz[:, :48], torch.randn(2, 48, 3, device=dev,
                                                              dtype=torch.bfloat16),
                                     torch.randn(48, 4, device=dev, dtype=torch.bfloat16),
                                     activation="silu")
        xz = ops.gemv_conv_update(normed, torch.randn(96, 64, device=dev, dtype=torch.bfloat16),
                                  None, torch.randn(2, 48, 3, device=dev, dtype=torch.bfloat16),
                                  torch.randn(48, 4, device=dev, dtype=torch.bfloat16),
                                  conv_start=0, activation="silu")
        xz = ops.gemv_conv_update(h, torch.randn(96, 64, device=dev, dtype=torch.bfloat16),
                                  None, torch.randn(2, 48, 3, device=dev, dtype=torch.bfloat16),
                                  torch.randn(48, 4, device=dev, dtype=torch.bfloat16),
                                  conv_start=0, activation="silu",
                                  norm_weight=torch.rand(64, device=dev, dtype=torch.bfloat16),
                                  residual=res, residual_out=torch.empty_like(res))
        x = xz[:, :48]
        dbl = ops.gemv(x, torch.randn(36, 48, device=dev, dtype=torch.bfloat16))
        y = ops.selective_state_update(
            torch.randn(2, 48, 16, device=dev), x, dbl[:, :4], -torch.rand(48, 16, device=dev),
            dbl[:, 4:20], dbl[:, 20:], torch.randn(48, device=dev), xz[:, 48:],
            torch.randn(48, device=dev), dt_proj_weight=torch.randn(48, 4, device=dev,
                                                                     dtype=torch.bfloat16),
            dt_softplus=True)
        ops.gated_rms_norm(y, torch.rand(48, device=dev, dtype=torch.bfloat16), 1e-6, z=x,
                           group_size=16)
    finally:
        ops.set_programmatic_launch(previous)


GROUPS = {"conv": conv_cases, "scan": scan_cases, "staged": staged_scan_cases, "ssd": ssd_cases,
          "malformed": malformed_index_cases, "decode": decode_cases}

if __name__ == "__main__":
    names = sys.argv[1:] or list(GROUPS)
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        sys.exit(f"sanitize_cases: unknown groups {unknown}, choose from {list(GROUPS)}")
    for name in names:
        GROUPS[name]()
    torch.cuda.synchronize()
    print("sanitize_cases: all ops ran")
