"""CPU demo / benchmark of the four SSM ops: median time of the CPU kernel vs the pure-PyTorch
reference on the same inputs, with the bytes each kernel must move and the bandwidth achieved.
A second table times the Mamba2 scan's chunked (SSD) form against its recurrence on the same
inputs, at Mamba2 layer shapes and SSD chunks of 64 (the CPU default), 128 and 256 tokens.

    PYTHONPATH=python python benchmarks/bench_ops_cpu.py [--repeats 5] [--threads N]

Mutated states are reset (copied back) outside the timed region. Sizes in the first table are
small so the Python reference loops finish in seconds; it is a sanity check, not a tuned CPU
benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tpssm import ops, reference

BF16 = torch.bfloat16


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _median_seconds(fn, reset, repeats: int) -> float:
    reset()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cases():
    """(name, op, reference, kwargs, names of the mutated tensors, bytes one call must move)."""
    tokens, seqs, dim, width = 512, 2, 1024, 4
    qsl = torch.tensor([0, 300, tokens], dtype=torch.int32)
    slots = torch.tensor([1, 0], dtype=torch.int32)
    init = torch.tensor([True, False])
    x = torch.randn(tokens, dim, dtype=BF16)
    conv = dict(x=x, weight=torch.randn(dim, width, dtype=BF16), bias=torch.randn(dim, dtype=BF16),
                conv_states=torch.randn(3, dim, width - 1, dtype=BF16), query_start_loc=qsl,
                cache_indices=slots, has_initial_state=init, activation="silu",
                out=torch.empty_like(x))
    conv_bytes = _nbytes(x, conv["out"], conv["weight"]) + 2 * seqs * dim * (width - 1) * 2
    yield ("causal_conv1d (bf16, 2 seqs, 512 tok, 1024 ch)", ops.causal_conv1d,
           reference.causal_conv1d_ref, conv, ("conv_states",), conv_bytes)

    batch = 32
    xd = torch.randn(batch, dim, dtype=BF16)
    upd = dict(x=xd, conv_state=torch.randn(batch, dim, width - 1, dtype=BF16),
               weight=conv["weight"], bias=conv["bias"], activation="silu",
               cache_indices=torch.arange(batch, dtype=torch.int32), out=torch.empty_like(xd))
    upd_bytes = 2 * _nbytes(xd) + 2 * _nbytes(upd["conv_state"])
    yield ("causal_conv1d_update (bf16, batch 32)", ops.causal_conv1d_update,
           reference.causal_conv1d_update_ref, upd, ("conv_state",), upd_bytes)

    nheads, headdim, dstate, ngroups, stok = 8, 16, 16, 2, 128
    sqsl = torch.tensor([0, 80, stok], dtype=torch.int32)
    u = torch.randn(stok, nheads * headdim, dtype=BF16)
    scan = dict(u=u, delta=torch.randn(stok, nheads, dtype=BF16) * 0.5,
                A=-torch.rand(nheads), B=torch.randn(stok, ngroups, dstate, dtype=BF16),
                C=torch.randn(stok, ngroups, dstate, dtype=BF16), D=torch.randn(nheads),
                z=torch.randn_like(u), delta_bias=torch.randn(nheads), delta_softplus=True,
                ssm_states=torch.randn(3, nheads, headdim, dstate), query_start_loc=sqsl,
                cache_indices=slots, has_initial_state=init, out=torch.empty_like(u))
    scan_bytes = (_nbytes(u, scan["delta"], scan["B"], scan["C"], scan["z"], scan["out"])
                  + 2 * seqs * nheads * headdim * dstate * 4)
    yield ("selective_scan mamba2 (bf16, 128 tok, fp32 state)", ops.selective_scan,
           reference.selective_scan_ref, scan, ("ssm_states",), scan_bytes)

    m1dim, m1state = 256, 16
    u1 = torch.randn(stok, m1dim, dtype=BF16)
    scan1 = dict(u=u1, delta=torch.randn(stok, m1dim, dtype=BF16) * 0.5,
                 A=-torch.rand(m1dim, m1state), B=torch.randn(stok, m1state, dtype=BF16),
                 C=torch.randn(stok, m1state, dtype=BF16), D=torch.randn(m1dim),
                 z=torch.randn_like(u1), delta_bias=torch.randn(m1dim), delta_softplus=True,
                 ssm_states=torch.randn(3, m1dim, m1state), query_start_loc=sqsl,
                 cache_indices=slots, has_initial_state=init, out=torch.empty_like(u1))
    scan1_bytes = (_nbytes(u1, scan1["delta"], scan1["B"], scan1["C"], scan1["z"], scan1["out"])
                   + 2 * seqs * m1dim * m1state * 4)
    yield ("selective_scan mamba1 (bf16, 128 tok, 256 ch)", ops.selective_scan,
           reference.selective_scan_ref, scan1, ("ssm_states",), scan1_bytes)

    xs = torch.randn(batch, nheads * headdim, dtype=BF16)
    ssu = dict(ssm_state=torch.randn(batch, nheads, headdim, dstate), x=xs,
               dt=torch.randn(batch, nheads, dtype=BF16), A=-torch.rand(nheads),
               B=torch.randn(batch, ngroups, dstate, dtype=BF16),
               C=torch.randn(batch, ngroups, dstate, dtype=BF16), D=torch.randn(nheads),
               z=torch.randn_like(xs), dt_bias=torch.randn(nheads), dt_softplus=True,
               state_batch_indices=torch.arange(batch, dtype=torch.int32),
               out=torch.empty_like(xs))
    ssu_bytes = 2 * _nbytes(ssu["ssm_state"]) + 3 * _nbytes(xs)
    yield ("selective_state_update (bf16, batch 32, fp32 state)", ops.selective_state_update,
           reference.selective_state_update_ref, ssu, ("ssm_state",), ssu_bytes)


# Mamba2 layer shapes: (name, nheads, headdim, dstate, ngroups, sequence lengths).
SSD_SHAPES = [
    ("32 heads x 64, N 128, 1 group, 2 x 1024 tok", 32, 64, 128, 1, (1024, 1024)),
    ("20 heads x 64, N 128, 1 group, 1 x 2048 tok", 20, 64, 128, 1, (2048,)),
    ("32 heads x 64, N 128, 8 groups, 4 x 512 tok", 32, 64, 128, 8, (512,) * 4),
    ("16 heads x 128, N 64, 2 groups, 2 x 1024 tok", 16, 128, 64, 2, (1024, 1024)),
    ("32 heads x 64, N 128, 1 group, 2048+3x256 tok", 32, 64, 128, 1, (256, 2048, 256, 256)),
]
SSD_CHUNKS = (64, 128, 256)


def _ssd_cases():
    """(name, kwargs, bytes one call must move, SSD flops at each chunk of SSD_CHUNKS): bf16
    activations, fp32 states continued from their slots."""
    for name, nheads, headdim, dstate, ngroups, seqlens in SSD_SHAPES:
        tokens, dim = sum(seqlens), nheads * headdim
        qsl = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32)
        u = torch.randn(tokens, dim, dtype=BF16)
        kw = dict(u=u, delta=torch.randn(tokens, nheads, dtype=BF16) * 0.5,
                  A=-torch.rand(nheads) - 0.5, B=torch.randn(tokens, ngroups, dstate, dtype=BF16),
                  C=torch.randn(tokens, ngroups, dstate, dtype=BF16), D=torch.randn(nheads),
                  z=torch.randn_like(u), delta_bias=torch.randn(nheads) - 1.0,
                  delta_softplus=True,
                  ssm_states=torch.randn(len(seqlens), nheads, headdim, dstate),
                  query_start_loc=qsl, cache_indices=torch.arange(len(seqlens), dtype=torch.int32),
                  has_initial_state=torch.ones(len(seqlens), dtype=torch.bool),
                  out=torch.empty_like(u))
        nbytes = (_nbytes(u, kw["delta"], kw["B"], kw["C"], kw["z"], kw["out"])
                  + 2 * _nbytes(kw["ssm_states"]))
        flops = []
        for q in SSD_CHUNKS:
            # per chunk: C B^T per group; per head the masked (q x q) (q x P) product, C H^T and
            # the state update (x B^T), 2 flops per multiply-add.
            chunks = [min(q, n - c0) for n in seqlens for c0 in range(0, n, q)]
            flops.append(sum(2 * c * c * (ngroups * dstate + nheads * headdim)
                             + 4 * c * nheads * headdim * dstate for c in chunks))
        yield name, kw, nbytes, flops


def _ssd_table(repeats: int) -> None:
    print()
    header = (f"{'selective_scan mamba2 (bf16, fp32 state)':46s} {'recur ms':>9s} "
              + " ".join(f"{f'ssd{q} ms':>9s}" for q in SSD_CHUNKS)
              + f" {'rec/ssd':>8s} {'ssd GFLOP/s':>11s} {'MB':>6s}")
    print(header)
    print("-" * len(header))
    for name, kw, nbytes, flops in _ssd_cases():
        saved = kw["ssm_states"].clone()

        def reset():
            kw["ssm_states"].copy_(saved)

        t_rec = _median_seconds(lambda: ops.selective_scan(**kw, algorithm="recurrent"), reset,
                                max(1, repeats // 2))
        t_ssd = [_median_seconds(lambda: ops.selective_scan(**kw, algorithm="ssd", chunk_size=q),
                                 reset, repeats) for q in SSD_CHUNKS]
        print(f"{name:46s} {t_rec * 1e3:9.1f} " + " ".join(f"{t * 1e3:9.1f}" for t in t_ssd)
              + f" {t_rec / t_ssd[0]:7.1f}x {flops[0] / t_ssd[0] / 1e9:11.1f} {nbytes / 1e6:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    header = f"{'op':54s} {'kernel ms':>10s} {'ref ms':>10s} {'speedup':>8s} {'MB':>7s} {'GB/s':>7s}"
    print(header)
    print("-" * len(header))
    for name, op, ref, kw, mutated, nbytes in _cases():
        saved = {n: kw[n].clone() for n in mutated}

        def reset():
            for n in mutated:
                kw[n].copy_(saved[n])

        t_op = _median_seconds(lambda: op(**kw), reset, args.repeats)
        t_ref = _median_seconds(lambda: ref(**kw), reset, max(1, args.repeats // 2))
        print(f"{name:54s} {t_op * 1e3:10.3f} {t_ref * 1e3:10.1f} {t_ref / t_op:7.0f}x "
              f"{nbytes / 1e6:7.2f} {nbytes / t_op / 1e9:7.2f}")
    _ssd_table(args.repeats)


if __name__ == "__main__":
    main()
