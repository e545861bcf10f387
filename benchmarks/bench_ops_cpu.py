"""CPU demo / benchmark of the four SSM ops: median time of the CPU kernel vs the pure-PyTorch
reference on the same inputs, with the bytes each kernel must move and the bandwidth achieved.

    PYTHONPATH=python python benchmarks/bench_ops_cpu.py [--repeats 5] [--threads N]

Mutated states are reset (copied back) outside the timed region. Sizes are small so the Python
reference loops finish in seconds; the table is a sanity check, not a tuned CPU benchmark.
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


if __name__ == "__main__":
    main()
