"""Quantized all-reduce through the composed path on real gloo process groups (N = 1..4):
every rank's output is bitwise identical and equals the single-process reference."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tpssm.launch import run_ranks
from tpssm.reference.qallreduce import fp16_all_reduce_ref, qar_all_reduce_ref

TOKENS, HIDDEN, G = 7, 256, 64
SPAWN_TIMEOUT_S = 90
# One message of TOKENS tokens (bf16) is above the threshold, a one-token message below it.
MIN_BYTES = 2 * HIDDEN * 2


def _inputs(n):
    g = torch.Generator().manual_seed(100 + n)
    xs = (torch.randn(n, TOKENS, HIDDEN, generator=g)
          * torch.exp(torch.randn(n, TOKENS, 1, generator=g))).to(torch.bfloat16)
    res = torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    return xs, res


def _gloo_case(n):
    import tpssm.qallreduce as Q

    rank = dist.get_rank()
    xs, res = _inputs(n)
    x = xs[rank]
    out = {}
    for scheme in Q.SCHEMES:
        out[scheme] = Q.all_reduce(x, scheme=scheme, group_size=G)
    out["int8_residual"] = Q.all_reduce(x, scheme="int8", group_size=G, residual=res)
    out["fp8_residual"] = Q.all_reduce(x, scheme="fp8", group_size=G, residual=res)
    out["int8_fp32_g128"] = Q.all_reduce(x.float(), scheme="int8", group_size=128)
    qar = Q.QuantizedAllReduce(None, max_tokens=16, hidden=HIDDEN, dtype=torch.bfloat16,
                               device="cpu", scheme="int8", group_size=G,
                               min_bytes=MIN_BYTES)
    out["object"] = qar(x)
    out["object_again"] = qar(x)
    out["object_residual"] = qar(x, residual=res)
    out["object_small"] = qar(x[:1].contiguous())
    out["exact_small"] = Q.all_reduce(x[:1].contiguous(), scheme="exact")
    out["threshold_small"] = Q.all_reduce(x[:1].contiguous(), scheme="int8", group_size=G,
                                          min_bytes=MIN_BYTES)
    out["threshold_large"] = Q.all_reduce(x, scheme="int8", group_size=G,
                                          min_bytes=MIN_BYTES)
    errors = []
    for bad in (torch.zeros(17, HIDDEN, dtype=torch.bfloat16),
                torch.zeros(2, HIDDEN // 2, dtype=torch.bfloat16),
                torch.zeros(2, HIDDEN, dtype=torch.float16)):
        try:
            qar(bad)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


def _strategy_case(n):
    import tpssm.qallreduce as Q
    from tpssm.capture import marked
    from tpssm.parallel import AllReduce, TPContext

    rank = dist.get_rank()
    out = {}
    # fp16 casts every width, also one that no int8 / fp8 group divides.
    x48 = torch.randn(3, 48, generator=torch.Generator().manual_seed(rank)) * 1e-3 + 1
    strategy = AllReduce(TPContext(), "fp16")
    out["fp16_48"] = strategy(x48.clone())
    out["fp16_48_ref"] = Q.all_reduce(x48, scheme="fp16")
    out["exact_48"] = Q.all_reduce(x48, scheme="exact")
    out["fp16_calls"] = dict(strategy.calls)
    # Buffers a graph captured stay alive when a larger message replaces them; others do not.
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(10 + rank))
    for captured in (True, False):
        qar = Q.QuantizedAllReduce(None, hidden=None, dtype=None, scheme="int8", group_size=64,
                                   max_elements=x.numel())
        if captured:
            with marked():
                qar(x)
        else:
            qar(x)
        old = qar.send.data_ptr()
        qar.reserve(64 * x.numel())
        out[f"retired_{captured}"] = [b.data_ptr() for bufs in qar._retired for b in bufs][:1]
        out[f"old_{captured}"] = old
        out[f"grown_{captured}"] = qar.send.data_ptr() != old
    errors = []
    for bad in (lambda: qar(x, residual=x.double()),
                lambda: Q.QuantizedAllReduce(None, hidden=128, group_size=0),
                lambda: AllReduce(TPContext(), "int8", backend="nccl")):
        try:
            bad()
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
def test_strategy_widths_captured_buffers_and_arguments():
    """The AllReduce strategy's fp16 scheme casts at any width; QuantizedAllReduce keeps the
    buffers a graph captured alive when it grows; bad arguments are refused up front."""
    y = _run(_strategy_case, 2)[0]
    assert torch.equal(y["fp16_48"], y["fp16_48_ref"])
    assert not torch.equal(y["fp16_48"], y["exact_48"])   # the values do not fit fp16 exactly
    assert y["fp16_calls"]["quantized"] == 1 and y["fp16_calls"]["exact"] == 0
    assert y["grown_True"] and y["retired_True"] == [y["old_True"]]
    assert y["grown_False"] and y["retired_False"] == []
    assert len(y["errors"]) == 3, y["errors"]
    assert "residual must have the dtype of x (torch.float32), got torch.float64" in y["errors"][0]
    assert "group_size must be one of" in y["errors"][1]
    assert "allreduce backend must be 'auto', 'composed' or 'fused', got 'nccl'" in y["errors"][2]


def _run(case, n, backend="gloo", collective_timeout_s=60):
    """case(n) on n spawned ranks (tpssm.launch: a rank that fails, dies or hangs fails the
    test with its cause); the ranks' return values in rank order."""
    return run_ranks(case, n, (n,), backend=backend, timeout_s=SPAWN_TIMEOUT_S,
                     collective_timeout_s=collective_timeout_s)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gloo_composed_all_reduce(n):
    outs = _run(_gloo_case, n)
    xs, res = _inputs(n)
    for key in outs[0]:
        if key == "errors":
            continue
        for r in range(1, n):
            assert torch.equal(_bits(outs[r][key]), _bits(outs[0][key])), (key, r)
    y = outs[0]
    if n == 1:
        for scheme in ("exact", "int8", "fp8", "fp16"):
            assert torch.equal(_bits(y[scheme]), _bits(xs[0])), scheme
        assert torch.equal(y["int8_residual"], (xs[0].float() + res.float()).to(torch.bfloat16))
    else:
        for codec in ("int8", "fp8"):
            assert torch.equal(_bits(y[codec]), _bits(qar_all_reduce_ref(list(xs), G, codec)[0]))
            assert torch.equal(_bits(y[f"{codec}_residual"]),
                               _bits(qar_all_reduce_ref(list(xs), G, codec, res)[0]))
        ref32 = qar_all_reduce_ref([x.float() for x in xs], 128, "int8")[0]
        assert torch.equal(_bits(y["int8_fp32_g128"]), _bits(ref32))
        assert torch.equal(_bits(y["object"]), _bits(y["int8"]))
        assert torch.equal(_bits(y["object_residual"]), _bits(y["int8_residual"]))
        exact = xs.double().sum(0)
        mag = xs.double().abs().sum(0)
        # gloo sums in the message dtype in its own order: at most n roundings of partial sums.
        assert bool(((y["exact"].double() - exact).abs() <= n * 2 ** -8 * mag).all())
        # fp16: the casts and the fp16 partial sums, then one rounding back to bf16.
        fp16_bound = (n + 1) * 2 ** -11 * mag + 2 ** -8 * exact.abs()
        assert bool(((y["fp16"].double() - exact).abs() <= fp16_bound).all())
        fp16_ref = fp16_all_reduce_ref(list(xs))[0].double()
        assert bool(((y["fp16"].double() - fp16_ref).abs() <= 2 * fp16_bound).all())
    assert torch.equal(_bits(y["object"]), _bits(y["object_again"]))
    # Below min_bytes the object falls back to the exact all-reduce.
    assert torch.equal(_bits(y["object_small"]), _bits(y["exact_small"]))
    assert torch.equal(_bits(y["threshold_small"]), _bits(y["exact_small"]))
    assert torch.equal(_bits(y["threshold_large"]), _bits(y["int8"]))
    assert len(y["errors"]) == 3
    assert "more than max_tokens" in y["errors"][0]
    assert "must have hidden dim" in y["errors"][1]
    assert "must have dtype" in y["errors"][2]


def _nccl_case(n):
    import tpssm.qallreduce as Q

    handle = Q.init_nccl_comm(None)
    xs, res = _inputs(n)
    x = xs[dist.get_rank()].cuda()
    cb = Q.chunk_bytes(x.numel(), n, G)
    bufs = [torch.zeros(n * cb, dtype=torch.uint8, device="cuda") for _ in range(4)]
    out = torch.empty_like(x)
    torch.ops.tpssm.qar_nccl_all_reduce(handle, x, G, 0, res.cuda(), *bufs, out)
    composed = Q.all_reduce(x, scheme="int8", group_size=G, residual=res.cuda())
    torch.cuda.synchronize()
    torch.ops.tpssm.qar_nccl_destroy(handle)
    return {"fused": out.cpu(), "composed": composed.cpu()}


def _num_gpus():
    import tpssm

    return torch.cuda.device_count() if tpssm.has_cuda_kernels() else 0


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_nccl_fused_matches_reference(n):
    if _num_gpus() < n:
        pytest.skip(f"needs {n} GPU(s) and the CUDA build")
    outs = _run(_nccl_case, n, backend="nccl")
    xs, res = _inputs(n)
    ref = qar_all_reduce_ref(list(xs), G, "int8", res)[0]
    for y in outs:
        assert torch.equal(_bits(y["fused"]), _bits(ref))
        if n > 1:
            assert torch.equal(_bits(y["composed"]), _bits(ref))


# ------------------------------------------------------ NCCL unique-id exchange (fake NCCL ops)


class _FakeNcclOps:
    """Stands in for the NCCL ops on a machine without a GPU: the unique id is 128 random bytes and
    init returns a digest of the id it was given, so each rank reports which id it joined with."""

    def __init__(self):
        self.joined = 0

    def qar_nccl_unique_id(self):
        return torch.tensor(list(os.urandom(128)), dtype=torch.uint8)

    def qar_nccl_init(self, uid, rank, n):
        assert uid.dtype == torch.uint8 and uid.numel() == 128
        self.joined += 1
        return int.from_bytes(bytes(uid[:8].tolist()), "little")


def _patch_fake_nccl():
    import contextlib

    import tpssm
    import tpssm.qallreduce as Q

    fake = _FakeNcclOps()
    Q._ops = fake
    tpssm.has_cuda_kernels = lambda: True
    torch.cuda.device = lambda device: contextlib.nullcontext()
    return Q, fake


def _uid_exchange_case(n):
    Q, _ = _patch_fake_nccl()
    out = {"world_a": Q.init_nccl_comm(None, device="cuda:0")}
    sub = dist.new_group([0, 1])
    if dist.get_rank() in (0, 1):  # the last rank creates no communicator for this subgroup
        out["sub"] = Q.init_nccl_comm(sub, device="cuda:0")
    out["world_b"] = Q.init_nccl_comm(None, device="cuda:0")
    return out


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
def test_nccl_unique_id_exchange_keys_per_group():
    # Every rank joins with rank 0's id, for each communicator, even when only some ranks create
    # one for a subgroup in between (the keys must not depend on per-process call counts).
    n = 3
    outs = _run(_uid_exchange_case, n, collective_timeout_s=30)
    for key in ("world_a", "world_b"):
        assert len({o[key] for o in outs}) == 1, key
    assert outs[0]["sub"] == outs[1]["sub"] and "sub" not in outs[2]
    assert len({outs[0]["world_a"], outs[0]["world_b"], outs[0]["sub"]}) == 3


def _missing_rank_case(n):
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() != 0:  # never calls init_nccl_comm
        store.wait(["test/done"], timedelta(seconds=60))
        return {}
    # Short only now: the rendezvous before must tolerate slow process starts.
    store.set_timeout(timedelta(seconds=3))
    Q, fake = _patch_fake_nccl()
    error = None
    try:
        Q.init_nccl_comm(None, device="cuda:0")
    except Exception as e:  # the store's timeout error (its type varies across versions)
        error = str(e) or type(e).__name__
    store.set("test/done", b"1")
    return {"error": error, "joined": fake.joined}


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
def test_nccl_init_raises_when_a_rank_is_missing():
    # ncclCommInitRank would block forever: init_nccl_comm must time out before it.
    outs = _run(_missing_rank_case, 2, collective_timeout_s=30)
    assert outs[0]["error"] is not None and "timeout" in outs[0]["error"].lower()
    assert outs[0]["joined"] == 0
