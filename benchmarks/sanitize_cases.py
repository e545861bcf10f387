"""Small runs of every CUDA op for compute-sanitizer (memcheck, racecheck): dense and varlen
batches with empty and length-1 sequences, padded rows, distinct read / write slots, 16-bit
states and forced tiny chunks, so that every kernel and every boundary path runs once.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_cases.py
"""

import sys
from pathlib import Path

import torch

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


if __name__ == "__main__":
    conv_cases()
    scan_cases()
    ssd_cases()
    torch.cuda.synchronize()
    print("sanitize_cases: all ops ran")
