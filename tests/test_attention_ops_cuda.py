"""The decode_attention CUDA kernel against the float64 reference and the CPU op (on a GPU, or
emulated on the CPU: make test-cuda-emu). Skipped without either."""

import pytest
import torch

import tpssm
from test_attention_ops import CASES, DTYPE_IDS, DTYPES, _inputs, _lengths, check_vs_ref
from tpssm import ops

if not (torch.cuda.is_available() and tpssm.has_cuda_kernels()):
    pytest.skip("needs a CUDA device and a build with the CUDA kernels", allow_module_level=True)

CUDA = torch.device("cuda")


def dev(t):
    """t on the device with its strides (a slice stays a slice of a copied buffer)."""
    base = t if t._base is None else t._base
    return base.to(CUDA, copy=True).as_strided(t.shape, t.stride(), t.storage_offset())


def run_both(q, k, v, rows, lengths, scale, out=None, num_splits=0):
    """(device result on the CPU, the registered CPU op's result)."""
    cpu = torch.empty(q.shape, dtype=q.dtype)
    torch.ops.tpssm.decode_attention(q, k, v, rows, lengths, scale, cpu)
    got = ops.decode_attention(dev(q), dev(k), dev(v), dev(rows), dev(lengths), scale,
                               out=None if out is None else dev(out), num_splits=num_splits)
    return got.cpu(), cpu


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernel_against_the_reference_and_the_cpu_op(case, dtype):
    batch, heads, hd, max_len, kind = case
    q, k, v = _inputs(batch, heads, hd, 5, max_len, dtype, seed=1)
    rows = torch.tensor([4, 0, 2, 1, 3][:batch])
    lengths = _lengths(kind, batch, max_len)
    got, cpu = run_both(q, k, v, rows, lengths, hd ** -0.5)
    check_vs_ref(got, q, k, v, rows, lengths, hd ** -0.5, dtype, "kernel")
    check_vs_ref(cpu, q, k, v, rows, lengths, hd ** -0.5, dtype, "cpu op")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_strided_caches_repeated_rows_int32(dtype):
    q, k, v = _inputs(6, 4, 80, 4, 21, dtype, strided=True, seed=2)
    rows = torch.tensor([2, 2, 0, 3, 0, 1], dtype=torch.int32)
    lengths = torch.tensor([21, 5, 1, 17, 20, 2], dtype=torch.int32)
    got, _ = run_both(q, k, v, rows, lengths, 0.3)
    check_vs_ref(got, q, k, v, rows, lengths, 0.3, dtype)


def test_cuda_bad_rows_and_lengths_give_zeros_and_lengths_clamp():
    q, k, v = _inputs(6, 2, 37, 3, 10, torch.float32, seed=3)
    rows = torch.tensor([-1, 3, 0, 1, 2, 1])
    lengths = torch.tensor([4, 4, 0, -3, 25, 10])
    got, cpu = run_both(q, k, v, rows, lengths, 0.5, out=torch.full_like(q, 7.0))
    assert (got[:4] == 0).all()
    check_vs_ref(got, q, k, v, rows, lengths, 0.5, torch.float32)
    assert torch.allclose(got, cpu, rtol=1e-5, atol=1e-6)


@pytest.fixture
def garbage_in_new_memory():
    """New tensors (the split results' workspace) filled with NaN: a share the kernels leave
    unwritten shows up in the result."""
    mode, fill = (torch.are_deterministic_algorithms_enabled(),
                  torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(mode)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [2, 5, 32])
@pytest.mark.parametrize("hd", [80, 200])
def test_cuda_key_splits_against_the_reference(hd, num_splits, dtype, garbage_in_new_memory):
    """Blocks over shares of a row's keys, merged by the second kernel: rows longer and shorter
    than the split count (splits without keys), a bad row and an empty row (zeros), against
    the reference and the one-block launch; both lane widths."""
    q, k, v = _inputs(7, 2, hd, 6, 45, dtype, seed=6)
    rows = torch.tensor([5, 0, 2, 1, -1, 3, 4])
    lengths = torch.tensor([45, 1, 2, 31, 9, 0, 44])
    got, cpu = run_both(q, k, v, rows, lengths, 0.2, out=torch.full_like(q, 7.0),
                        num_splits=num_splits)
    assert (got[4:6] == 0).all()
    check_vs_ref(got, q, k, v, rows, lengths, 0.2, dtype, f"{num_splits} splits")
    one, _ = run_both(q, k, v, rows, lengths, 0.2, num_splits=1)
    check_vs_ref(one, q, k, v, rows, lengths, 0.2, dtype, "one block")


@pytest.mark.parametrize("num_splits", [3, 32])
def test_cuda_key_splits_strided_int32_lengths_past_max_len(num_splits, garbage_in_new_memory):
    """Head slices of wider caches, int32 indices, repeated rows, lengths past max_len and out
    a slice of a wider buffer, with splits."""
    q, k, v = _inputs(5, 4, 64, 4, 33, torch.bfloat16, strided=True, seed=8)
    rows = torch.tensor([2, 2, 0, 3, 1], dtype=torch.int32)
    lengths = torch.tensor([33, 99, 1, 17, 40], dtype=torch.int32)
    wide = torch.full((5, 4, 80), 7.0, dtype=torch.bfloat16)
    got, _ = run_both(q, k, v, rows, lengths, 0.3, out=wide[:, :, 8:72], num_splits=num_splits)
    check_vs_ref(got, q, k, v, rows, lengths, 0.3, torch.bfloat16, f"{num_splits} splits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_automatic_splits_for_long_rows(dtype, garbage_in_new_memory):
    """Two heads over a cache of 700 keys: the automatic plan takes 11 shares on a 132-SM device
    (see test_attention_ops.py's plan test); lengths that divide unevenly into them."""
    q, k, v = _inputs(2, 2, 64, 2, 700, dtype, seed=7)
    rows = torch.tensor([1, 0])
    lengths = torch.tensor([650, 123])
    got, _ = run_both(q, k, v, rows, lengths, 0.125)
    check_vs_ref(got, q, k, v, rows, lengths, 0.125, dtype, "automatic splits")


@pytest.mark.parametrize("num_splits", [1, 4])
def test_cuda_graph_capture(num_splits):
    """The op never syncs and sizes its launch (and its split results' buffer) from the shapes:
    it replays inside a CUDA graph with new lengths."""
    q, k, v = (dev(t) for t in _inputs(3, 4, 64, 4, 32, torch.float16, seed=4))
    rows = torch.tensor([3, 0, 1], device=CUDA)
    lengths = torch.tensor([1, 2, 3], device=CUDA)
    out = torch.empty_like(q)
    ops.decode_attention(q, k, v, rows, lengths, 0.125, out=out, num_splits=num_splits)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode_attention(q, k, v, rows, lengths, 0.125, out=out, num_splits=num_splits)
    lengths.copy_(torch.tensor([32, 17, 5]))
    graph.replay()
    torch.cuda.synchronize()
    check_vs_ref(out.cpu(), q.cpu(), k.cpu(), v.cpu(), rows.cpu(), lengths.cpu(), 0.125,
                 torch.float16)
