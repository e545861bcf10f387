"""decode_attention on the CPU (tpssm.ops.decode_attention): against the float64 reference under
the tolerance rule, the value semantics (bad rows, lengths <= 0 and past max_len), strided
caches, repeated and unordered rows, its argument errors and torch.compile (opcheck:
tests/test_ops_compile.py; the CUDA kernel: tests/test_attention_ops_cuda.py)."""

import pytest
import torch

from conftest import assert_close_to_ref
from tpssm import ops
from tpssm.reference import decode_attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def _inputs(batch, heads, hd, slots, max_len, dtype, strided=False, seed=0):
    """q (B, H, hd); k / v caches (S, H, L, hd). strided: the caches are head slices of a
    cache twice as wide in heads and q a column slice of a qkv-like buffer (strides != dense)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        kb = torch.randn(slots, 2 * heads, max_len, hd, generator=g).to(dtype)
        vb = torch.randn(slots, 2 * heads, max_len, hd, generator=g).to(dtype)
        k, v = kb[:, 1::2], vb[:, :heads]
        qb = torch.randn(batch, 3 * heads * hd, generator=g).to(dtype)
        q = qb[:, heads * hd:2 * heads * hd].view(batch, heads, hd)
        return q, k, v
    q = torch.randn(batch, heads, hd, generator=g).to(dtype)
    k = torch.randn(slots, heads, max_len, hd, generator=g).to(dtype)
    v = torch.randn(slots, heads, max_len, hd, generator=g).to(dtype)
    return q, k, v


def check_vs_ref(out, q, k, v, rows, lengths, scale, dtype, what=""):
    truth = decode_attention_ref(q, k, v, rows, lengths, scale)
    base = decode_attention_ref(q, k, v, rows, lengths, scale, compute_dtype=dtype)
    assert_close_to_ref(out, truth, base, dtype, what)


# (batch, heads, head_dim, max_len, lengths: "one" / "full" / "mixed")
BASE = (3, 4, 64, 40, "mixed")
CASES = [BASE, (3, 1, 64, 40, "mixed"), (3, 4, 80, 40, "mixed"), (3, 4, 128, 40, "mixed"),
         (3, 4, 37, 40, "mixed"), (3, 4, 64, 40, "one"), (3, 4, 64, 40, "full"),
         (2, 2, 256, 9, "mixed"), (5, 4, 64, 1, "full")]


def _lengths(kind, batch, max_len):
    if kind == "one":
        return torch.ones(batch, dtype=torch.int64)
    if kind == "full":
        return torch.full((batch,), max_len, dtype=torch.int64)
    return torch.tensor([(7 * b + 1) % max_len + 1 for b in range(batch)], dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES)
def test_against_the_reference(case, dtype):
    batch, heads, hd, max_len, kind = case
    q, k, v = _inputs(batch, heads, hd, 5, max_len, dtype)
    rows = torch.tensor([4, 0, 2, 1, 3][:batch])
    lengths = _lengths(kind, batch, max_len)
    out = ops.decode_attention(q, k, v, rows, lengths, hd ** -0.5)
    check_vs_ref(out, q, k, v, rows, lengths, hd ** -0.5, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_caches_repeated_rows_int32(dtype):
    """Head slices of wider caches, q a column slice, rows repeated and out of order, int32
    indices, out a slice of a wider buffer."""
    q, k, v = _inputs(6, 4, 64, 4, 33, dtype, strided=True)
    assert not k.is_contiguous() and not q.is_contiguous()
    rows = torch.tensor([2, 2, 0, 3, 0, 1], dtype=torch.int32)
    lengths = torch.tensor([33, 5, 1, 17, 32, 2], dtype=torch.int32)
    wide = torch.full((6, 4, 80), 7.0, dtype=dtype)
    out = ops.decode_attention(q, k, v, rows, lengths, 0.3, out=wide[:, :, 8:72])
    check_vs_ref(out, q, k, v, rows, lengths, 0.3, dtype)
    assert (wide[:, :, :8] == 7).all() and (wide[:, :, 72:] == 7).all()


def test_bad_rows_and_lengths_give_zeros_and_lengths_clamp():
    q, k, v = _inputs(6, 2, 32, 3, 10, torch.float32)
    rows = torch.tensor([-1, 3, 0, 1, 2, 1])
    lengths = torch.tensor([4, 4, 0, -3, 25, 10])
    out = ops.decode_attention(q, k, v, rows, lengths, 0.5, out=torch.full_like(q, 7.0))
    assert (out[:4] == 0).all()
    # A length past max_len attends to all max_len keys.
    full = ops.decode_attention(q[4:], k, v, rows[4:], torch.tensor([10, 10]), 0.5)
    assert torch.equal(out[4:], full)
    check_vs_ref(out, q, k, v, rows, lengths, 0.5, torch.float32)


def test_automatic_split_plan():
    """About four blocks an SM for one row, shares of at least 64 cache keys, at most 32 - the
    batch plays no part."""
    assert ops.decode_attention_splits(32, 4096, 132) == 17   # zamba2-2.7b at tp 1
    assert ops.decode_attention_splits(8, 4096, 132) == 32    # its tp 4 shard: the cap
    assert ops.decode_attention_splits(8, 300, 132) == 5      # 300 keys: shares of >= 64
    assert ops.decode_attention_splits(4, 64, 132) == 1
    assert ops.decode_attention_splits(600, 4096, 132) == 1   # the heads alone fill the SMs
    assert ops.decode_attention_splits(32, 4096, 0) == 1


def test_the_cpu_op_ignores_key_splits():
    """num_splits shapes the CUDA launch only: the CPU op's exact softmax is the same."""
    q, k, v = _inputs(2, 3, 16, 2, 70, torch.float32)
    rows, lengths = torch.tensor([1, 0]), torch.tensor([70, 9])
    base = ops.decode_attention(q, k, v, rows, lengths, 0.25)
    for splits in (1, 7, 32):
        assert torch.equal(ops.decode_attention(q, k, v, rows, lengths, 0.25,
                                                num_splits=splits), base)


def test_single_key_returns_its_value():
    q, k, v = _inputs(2, 3, 16, 2, 4, torch.float32)
    out = ops.decode_attention(q, k, v, torch.tensor([1, 0]), torch.tensor([1, 1]), 1.0)
    assert torch.allclose(out, torch.stack([v[1, :, 0], v[0, :, 0]]), rtol=0, atol=1e-6)


def test_argument_errors_name_the_rule():
    q, k, v = _inputs(2, 2, 16, 3, 8, torch.float32)
    rows, lengths = torch.tensor([0, 1]), torch.tensor([3, 4])
    with pytest.raises(RuntimeError, match="q must be 3-D"):
        ops.decode_attention(q[0], k, v, rows, lengths, 1.0)
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16"):
        ops.decode_attention(q.double(), k.double(), v.double(), rows, lengths, 1.0)
    with pytest.raises(RuntimeError, match="k_cache must have shape"):
        ops.decode_attention(q, k[:, :1], v, rows, lengths, 1.0)
    with pytest.raises(RuntimeError, match="v_cache must have k_cache's shape"):
        ops.decode_attention(q, k, v[:2], rows, lengths, 1.0)
    with pytest.raises(RuntimeError, match="k_cache must have q's dtype"):
        ops.decode_attention(q, k.half(), v, rows, lengths, 1.0)
    with pytest.raises(RuntimeError, match="k_cache must have a contiguous last dim"):
        ops.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, rows,
                             lengths, 1.0)
    with pytest.raises(RuntimeError, match="rows must be int64 or int32"):
        ops.decode_attention(q, k, v, rows.float(), lengths, 1.0)
    with pytest.raises(RuntimeError, match="lengths must have shape \\(B,\\)"):
        ops.decode_attention(q, k, v, rows, lengths[:1], 1.0)
    with pytest.raises(RuntimeError, match="head_dim must be in \\[1, 256\\]"):
        big = torch.zeros(2, 2, 264)
        ops.decode_attention(big, torch.zeros(3, 2, 8, 264), torch.zeros(3, 2, 8, 264), rows,
                             lengths, 1.0)
    with pytest.raises(RuntimeError, match="out must have q's shape"):
        ops.decode_attention(q, k, v, rows, lengths, 1.0, out=torch.empty(2, 2, 8))
    with pytest.raises(RuntimeError, match="out must not overlap q"):
        ops.decode_attention(q, k, v, rows, lengths, 1.0, out=q)
    with pytest.raises(RuntimeError, match="out must not overlap k_cache"):
        ops.decode_attention(q, k, v, rows, lengths, 1.0, out=k[0, :, :2])
    for bad in (-1, 33):
        with pytest.raises(RuntimeError, match="num_splits must be in \\[0, 32\\]"):
            ops.decode_attention(q, k, v, rows, lengths, 1.0, num_splits=bad)
    with pytest.raises(RuntimeError, match="out's \\(batch, head\\) rows must not overlap"):
        ops.decode_attention(q, k, v, rows, lengths, 1.0,
                             out=torch.empty(16).as_strided((2, 2, 16), (0, 0, 1)))


def test_compile_fullgraph():
    q, k, v = _inputs(2, 2, 16, 3, 8, torch.float32)
    rows, lengths = torch.tensor([2, 0]), torch.tensor([3, 8])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, rows, lengths):
        return ops.decode_attention(q * 1, k, v, rows, lengths + 0, 0.25)

    assert torch.equal(f(q, k, v, rows, lengths), ops.decode_attention(q, k, v, rows, lengths,
                                                                        0.25))


def test_reference_backend_matches_the_op():
    """The models' reference backend (gather + masked SDPA) computes the same attention."""
    from tpssm.models.kernels import get_backend

    q, k, v = _inputs(4, 3, 64, 5, 12, torch.float32)
    rows, lengths = torch.tensor([4, 1, 1, 0]), torch.tensor([12, 1, 7, 3])
    want = ops.decode_attention(q, k, v, rows, lengths, 0.125)
    got = get_backend("reference").decode_attention(q, k, v, rows, lengths, 0.125)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
