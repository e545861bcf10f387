"""The CUDA kernels of the four SSM ops against their pure-PyTorch references and against the CPU
ops: the CPU tests' case matrix, the same cases with tiny forced chunks (so small inputs cross
chunk boundaries of the chunked scan and conv), large shapes (L up to 16K) against the CPU op,
chunk consistency, and CUDA-graph capture / replay of both decode ops with padded batches.
Skipped without a GPU or without the CUDA kernels in the build."""

from __future__ import annotations

import os

import pytest
import torch

import tpssm

if not (torch.cuda.is_available() and tpssm.has_cuda_kernels()):
    pytest.skip("needs a CUDA device and a build with the CUDA kernels", allow_module_level=True)

from conftest import (  # noqa: E402
    EPS,
    SENTINEL,
    assert_slots_untouched,
    conv_inputs,
    conv_update_inputs,
    on_cpu_kernels,
    query_start_loc,
    run_vs_ref,
    scan_inputs,
    ssu_inputs,
    token_rows,
)
from test_ops_compile import OPCHECK_CASES  # noqa: E402
from test_ops_cpu import (  # noqa: E402
    CONV_CASES,
    CONV_UPDATE_CASES,
    SCAN_CASES,
    SSU_CASES,
    SSU_DT_PROJ_CASES,
)
from tpssm import ops  # noqa: E402
from tpssm.reference import (  # noqa: E402
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

f16, bf16 = torch.float16, torch.bfloat16
CUDA = torch.device("cuda")

# CUDA vs CPU op: both are within 2x the same-dtype baseline of the truth; differences come from
# exp2 vs exp and summation order, then at most one rounding of the stored dtype.
CPU_TOL = {torch.float32: 1e-4, f16: 2 * EPS[f16], bf16: 2 * EPS[bf16]}


def _ids(cases):
    return [name for name, _ in cases]


def to_cuda(t):
    """A CUDA copy with the same sizes, strides and storage offset (strided views stay strided
    and keep their misalignment, which decides the kernels' vector paths)."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.numel() == 0:
        return t.to(CUDA)
    span = t.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    buf = torch.empty(span, dtype=t.dtype, device=CUDA)
    view = buf.as_strided(t.shape, t.stride(), t.storage_offset())
    view.copy_(t)
    return view


def _check_scan_row_copies(kw, dtype, eight_byte):
    """check_op of the scan; under the kernel emulator (which counts cp.async by size,
    tools/cuda_emu) with `eight_byte`, also that 8-byte row copies ran. On a GPU the check
    alone."""
    take = getattr(ops._ops, "take_cp_async_counts", None)
    if take is not None:
        take()  # reset
    check_op(ops.selective_scan, kw, ("out", "ssm_states"), dtype)
    if take is not None and eight_byte:
        assert take()[8] > 0, "the 16-bit rows of a warp of 4 channels took no 8-byte copies"


def _device_sm_count() -> int:
    """The SM count the launchers plan for: the GPU's, or the kernel emulator's (EMU_SMS,
    tools/cuda_emu/emu_plugin.py, where CUDA is the CPU)."""
    if CUDA.type == "cpu":
        return int(os.environ.get("EMU_SMS", "132"))
    return torch.cuda.get_device_properties(CUDA).multi_processor_count


def assert_matches_cpu(gpu: torch.Tensor, cpu: torch.Tensor, dtype, what: str) -> None:
    g, c = gpu.cpu().double(), cpu.double()
    assert g.shape == c.shape, what
    if c.numel() == 0:
        return
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    err = (g - c).abs().max().item()
    bound = CPU_TOL[dtype] * max(1.0, c.abs().max().item())
    assert err <= bound, f"{what}: CUDA vs CPU max error {err:.3g} > {bound:.3g}"


def _cpu_op(op, kw):
    with on_cpu_kernels():
        op(**kw)


def check_op(op, kw_cpu, mutable, dtype):
    """Runs the CUDA op against the fp64 reference (run_vs_ref) and against the CPU op on the
    same inputs. Returns (CUDA kwargs after the call, mutable tensors before it, on the CPU)."""
    kw_gpu = {k: to_cuda(v) for k, v in kw_cpu.items()}
    kw_ref_cpu = {k: (v.clone() if isinstance(v, torch.Tensor) and k in mutable else v)
                  for k, v in kw_cpu.items()}
    before = run_vs_ref(op, kw_gpu, mutable, dtype)
    _cpu_op(op, kw_ref_cpu)
    for n in mutable:
        if kw_gpu.get(n) is not None:
            assert_matches_cpu(kw_gpu[n], kw_ref_cpu[n], dtype, n)
    return kw_gpu, {k: v.cpu() for k, v in before.items()}


def _padded_out_rows(out, seqlens, varlen, padded_rows):
    if varlen:
        return out[token_rows(seqlens, padded_rows)]
    return out[list(padded_rows)]


CHUNKINGS = [None, 1, 3]  # launcher heuristic, or forced chunk lengths
CHUNK_IDS = ["auto", "chunk1", "chunk3"]


# ---------------------------------------------------------------------------------------------
# causal_conv1d


def aligned_slice(t: torch.Tensor, channel_dims: int = 1) -> torch.Tensor:
    """t's values as a column slice of a wider buffer at an offset of 8 elements, with a row
    stride of the width rounded up to a multiple of 8, + 16: strided like the x | B | C pieces
    of a fused projection, yet every row stays 16-byte aligned, so the kernels' 16-byte paths
    must take it where the width allows. channel_dims trailing dims (2 for (ngroups, dstate))
    form the sliced channel axis."""
    lead = t.shape[:t.dim() - channel_dims]
    flat = t.reshape(*lead, -1)
    wide = torch.empty(*lead, (flat.shape[-1] + 7) // 8 * 8 + 16, dtype=t.dtype)
    view = wide[..., 8:8 + flat.shape[-1]]
    view.copy_(flat)
    return view.unflatten(-1, t.shape[t.dim() - channel_dims:])


def _check_conv(kw, params, chunk):
    kw["chunk_len"] = chunk or 0
    kw_gpu, before = check_op(ops.causal_conv1d, kw, ("out", "conv_states"), kw["x"].dtype)
    out = kw_gpu["out"].cpu()
    slots = params.get("slots", (3, 0))
    seqlens = params.get("seqlens", (9, 9))
    padded = [b for b, s in enumerate(slots or ()) if s == -1]
    if padded:
        rows = _padded_out_rows(out, seqlens, params.get("varlen", False), padded)
        assert (rows == SENTINEL).all(), "padded output rows were written"
    if kw_gpu["conv_states"] is not None:
        used = slots if slots is not None else range(len(seqlens))
        assert_slots_untouched(kw_gpu["conv_states"].cpu(), before["conv_states"], used)


@pytest.mark.parametrize("chunk", CHUNKINGS, ids=CHUNK_IDS)
@pytest.mark.parametrize("name,params", CONV_CASES, ids=_ids(CONV_CASES))
def test_causal_conv1d_cuda(name, params, chunk):
    _check_conv(conv_inputs(**params), params, chunk)


# The case matrix above uses dim 37 (1, 130): always the scalar path. These take the 16-byte path
# (4 fp32 / 8 16-bit channels per thread), including its halo and conv-state window at chunk
# boundaries, on contiguous tensors and on aligned column slices; "misaligned" slices at an odd
# offset must fall back to the scalar path instead of faulting.
CONV_VEC_CASES = [
    ("f32_varlen", dict(dim=64, varlen=True, seqlens=(5, 1, 0, 2, 7), slots=(0, 2, 4, 1, 3),
                        initial=(True, False, True, True, False))),
    ("bf16_varlen", dict(dtype=bf16, dim=64, varlen=True, seqlens=(3, 1, 0, 6),
                         slots=(0, 2, 4, 1), initial=(True, True, False, False))),
    ("f16_dense_width3", dict(dtype=f16, dim=64, width=3)),
    ("bf16_dense_padded", dict(dtype=bf16, dim=136, slots=(3, -1))),
]


@pytest.mark.parametrize("layout", ["contiguous", "aligned_slice", "misaligned"])
@pytest.mark.parametrize("chunk", CHUNKINGS, ids=CHUNK_IDS)
@pytest.mark.parametrize("name,params", CONV_VEC_CASES, ids=_ids(CONV_VEC_CASES))
def test_causal_conv1d_cuda_vector_path(name, params, chunk, layout):
    kw = conv_inputs(**params, strided=layout == "misaligned")
    if layout == "aligned_slice":
        kw["x"], kw["out"] = aligned_slice(kw["x"]), aligned_slice(kw["out"])
    _check_conv(kw, params, chunk)


def test_causal_conv1d_cuda_state_is_exact_copy_of_inputs():
    kw = {k: to_cuda(v) for k, v in conv_inputs(
        dtype=bf16, varlen=True, seqlens=(6, 2), slots=(1, 0), initial=(False, True)).items()}
    prev = kw["conv_states"][0].clone()
    ops.causal_conv1d(**kw)
    x = kw["x"]
    assert torch.equal(kw["conv_states"][1], x[3:6].t())
    assert torch.equal(kw["conv_states"][0], torch.cat([prev[:, 2:], x[6:8].t()], dim=1))


# The prefill kernel works in shared-memory tiles of 128 channels x T tokens (T = 64 for 16-bit,
# 32 for fp32) plus a halo of width - 1 tokens; a block walks chunk_len tokens (0: one tile).
# These cross tile boundaries in tokens and channels (dim 72: one partial channel tile; 136 and
# 264: a partial second one; 130 with 16-bit and 37: the scalar path). The varlen batch puts a
# sequence with an initial state at a tile start, one shorter than the halo across a tile start,
# and empty, length-1 and padded sequences inside one tile.
def _tile_seqlens(tile):
    # starts: 0, T (tile start), 2T-1 (crosses 2T, 2 tokens), 2T+1, 2T+2 (empty), 2T+2, 2T+3,
    # 3T-1 (crosses 3T)
    return (tile, tile - 1, 2, 1, 0, 1, tile - 4, 4)


def _tile_case(dtype, dim, width=4, varlen=True, **extra):
    tile = 32 if dtype == torch.float32 else 64
    if varlen:
        seqlens = _tile_seqlens(tile)
        params = dict(dtype=dtype, dim=dim, width=width, varlen=True, seqlens=seqlens,
                      num_slots=10, slots=(0, 2, 9, 4, 7, 5, -1, 1),
                      initial=(True, True, False, True, True, False, True, True))
    else:
        params = dict(dtype=dtype, dim=dim, width=width, seqlens=(tile + 7,) * 3, num_slots=4,
                      slots=(3, -1, 0), initial=(False, True, True))
    params.update(extra)
    return params


CONV_TILE_CASES = [
    ("bf16_dim72_varlen", _tile_case(bf16, 72)),
    ("bf16_dim136_dense", _tile_case(bf16, 136, varlen=False)),
    ("f16_dim130_scalar_varlen_w3", _tile_case(f16, 130, width=3)),
    ("f16_dim264_dense_w2", _tile_case(f16, 264, width=2, varlen=False)),
    ("f32_dim72_varlen_w2", _tile_case(torch.float32, 72, width=2)),
    ("f32_dim37_scalar_dense_w3", _tile_case(torch.float32, 37, width=3, varlen=False)),
    ("bf16_dim136_no_bias_no_silu", _tile_case(bf16, 136, bias=False, activation=None)),
    ("f32_dim136_no_states", _tile_case(torch.float32, 136, states=False, slots=None)),
]
TILE_CHUNKS = [None, 5, 100]  # one tile per block, tiny tiles, several tiles per block
TILE_CHUNK_IDS = ["auto", "chunk5", "chunk100"]


@pytest.mark.parametrize("chunk", TILE_CHUNKS, ids=TILE_CHUNK_IDS)
@pytest.mark.parametrize("name,params", CONV_TILE_CASES, ids=_ids(CONV_TILE_CASES))
def test_causal_conv1d_cuda_tiles(name, params, chunk):
    _check_conv(conv_inputs(**params), params, chunk)


@pytest.mark.parametrize("layout", ["aligned_slice", "misaligned", "weight_transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, bf16], ids=["f32", "bf16"])
def test_causal_conv1d_cuda_tiles_strided(dtype, layout):
    params = _tile_case(dtype, 72, varlen=False)
    kw = conv_inputs(**params, strided=layout == "misaligned",
                     weight_t=layout == "weight_transposed")
    if layout == "aligned_slice":
        kw["x"], kw["out"] = aligned_slice(kw["x"]), aligned_slice(kw["out"])
    _check_conv(kw, params, None)


def test_causal_conv1d_cuda_chunk_len_in_tiles_agree():
    """Any chunk_len gives the same result: the tiles only change where the halo is re-read."""
    kw = conv_inputs(**_tile_case(bf16, 136))
    outs = []
    for chunk in (0, 1, 7, 64, 65, 1000):
        k = {n: (v.clone() if isinstance(v, torch.Tensor) else v)
             for n, v in kw.items()}
        k = {n: to_cuda(v) for n, v in k.items()}
        ops.causal_conv1d(**k, chunk_len=chunk)
        outs.append((k["out"].cpu(), k["conv_states"].cpu()))
    for out, states in outs[1:]:
        assert torch.equal(out, outs[0][0])
        assert torch.equal(states, outs[0][1])


# ---------------------------------------------------------------------------------------------
# causal_conv1d_update


def _check_conv_update(kw, slots):
    """The op against the reference; padded rows' outputs and unused slots untouched."""
    kw_gpu, before = check_op(ops.causal_conv1d_update, kw, ("out", "conv_state"),
                              kw["x"].dtype)
    out = kw_gpu["out"].cpu()
    for b, s in enumerate(slots or ()):
        if s == -1:
            assert (out[b] == SENTINEL).all(), "padded output row was written"
    used = slots if slots is not None else range(kw["x"].shape[0])
    assert_slots_untouched(kw_gpu["conv_state"].cpu(), before["conv_state"], used)


@pytest.mark.parametrize("name,params", CONV_UPDATE_CASES, ids=_ids(CONV_UPDATE_CASES))
def test_causal_conv1d_update_cuda(name, params):
    _check_conv_update(conv_update_inputs(**params), params.get("slots", (4, 1, 2)))


# The update kernel: a warp per batch row (4 rows a block), 16-byte channel groups (8 x 16-bit /
# 4 x fp32) where x / out allow, the state rows of a group as one 16-byte run where the state is
# (slots, dim, width - 1) contiguous; scalar fallbacks otherwise.
CONV_UPDATE_VEC_CASES = [
    ("bf16_dim72_batch7", dict(dtype=bf16, dim=72, batch=7, num_slots=9,
                               slots=(8, 0, -1, 3, 5, 1, 2))),
    ("bf16_dim264_seqlen3", dict(dtype=bf16, dim=264, batch=6, seqlen=3, num_slots=8,
                                 slots=(7, 1, 2, -1, 0, 4))),
    ("f16_w2_seqlen1", dict(dtype=f16, dim=64, width=2, batch=5, seqlen=1, num_slots=6,
                            slots=(5, 4, 3, 2, 1))),
    ("f32_dim136_w3", dict(dim=136, width=3, batch=9, num_slots=12,
                           slots=(11, 0, 1, 2, -1, 3, 4, 5, 6))),
    ("f32_odd_dim_scalar", dict(dim=37, batch=6, seqlen=3, num_slots=7,
                                slots=(6, 5, -1, 3, 2, 1))),
    ("bf16_state_transposed", dict(dtype=bf16, dim=72, batch=5, seqlen=3, num_slots=6,
                                   slots=(5, 4, -1, 2, 1), state_layout="transposed")),
    ("bf16_state_offset", dict(dtype=bf16, dim=72, batch=5, num_slots=6,
                               slots=(5, 4, 3, 2, -1), state_layout="offset")),
    ("f32_weight_transposed_no_bias", dict(dim=72, batch=5, num_slots=6, slots=None,
                                          weight_t=True, bias=False, activation=None)),
]


@pytest.mark.parametrize("layout", ["contiguous", "aligned_slice", "misaligned"])
@pytest.mark.parametrize("name,params", CONV_UPDATE_VEC_CASES, ids=_ids(CONV_UPDATE_VEC_CASES))
def test_causal_conv1d_update_cuda_vector_path(name, params, layout):
    kw = conv_update_inputs(**params, strided=layout == "misaligned")
    if layout == "aligned_slice":
        kw["x"], kw["out"] = aligned_slice(kw["x"]), aligned_slice(kw["out"])
    _check_conv_update(kw, params.get("slots"))


@pytest.mark.usefixtures("_device_index_checks_only")
@pytest.mark.parametrize("dtype", [torch.float32, bf16], ids=["f32", "bf16"])
def test_causal_conv1d_update_cuda_bad_slots_in_a_block(dtype):
    """Padded and out-of-range slots among the rows of one block, on the 16-byte path: those rows
    write nothing, the others match the CPU op with the bad rows padded."""
    kw = conv_update_inputs(dtype=dtype, dim=72, batch=7, seqlen=3, num_slots=8,
                            slots=(7, 0, 1, 2, 3, 4, 5))
    bad = {1: -1, 2: 8, 4: -5, 6: 2 ** 31 - 1}
    expect = _cpu_copy(kw)
    expect["cache_indices"] = torch.tensor(
        [-1 if b in bad else s for b, s in enumerate(kw["cache_indices"].tolist())],
        dtype=torch.int32)
    _cpu_op(ops.causal_conv1d_update, expect)
    kw_gpu = {k: to_cuda(v) for k, v in kw.items()}
    kw_gpu["cache_indices"] = torch.tensor(
        [bad.get(b, s) for b, s in enumerate(kw["cache_indices"].tolist())],
        dtype=torch.int32, device=CUDA)
    ops.causal_conv1d_update(**kw_gpu)
    for n in ("out", "conv_state"):
        assert_matches_cpu(kw_gpu[n], expect[n], dtype, n)
    out = kw_gpu["out"].cpu()
    for b in bad:
        assert (out[b] == SENTINEL).all(), f"row {b} with a bad slot was written"


# ---------------------------------------------------------------------------------------------
# selective_scan


@pytest.mark.parametrize("chunk", CHUNKINGS, ids=CHUNK_IDS)
@pytest.mark.parametrize("name,params", SCAN_CASES, ids=_ids(SCAN_CASES))
def test_selective_scan_cuda(name, params, chunk):
    kw = scan_inputs(**params, split_len=chunk or 0)
    kw_gpu, before = check_op(ops.selective_scan, kw, ("out", "ssm_states"), kw["u"].dtype)
    out = kw_gpu["out"].cpu()
    slots = params.get("slots", (1, 3))
    seqlens = params.get("seqlens", (7, 7))
    padded = [b for b, s in enumerate(slots or ()) if s == -1]
    if padded:
        rows = _padded_out_rows(out, seqlens, params.get("varlen", False), padded)
        assert (rows == SENTINEL).all(), "padded output rows were written"
    if kw_gpu["ssm_states"] is not None:
        used = slots if slots is not None else range(len(seqlens))
        assert_slots_untouched(kw_gpu["ssm_states"].cpu(), before["ssm_states"], used)


SCAN_DSTATE_CASES = [
    ("mamba2_n16", dict(dstate=16)),
    ("mamba2_n64", dict(dstate=64, nheads=4, headdim=8)),
    ("mamba2_n128", dict(dstate=128, nheads=2, headdim=16, ngroups=1)),
    ("mamba2_n40", dict(dstate=40, nheads=2, headdim=4, ngroups=1)),
    ("mamba2_n48", dict(dstate=48, nheads=2, headdim=4, ngroups=1)),
    ("mamba1_n16", dict(form="mamba1", nheads=33, dstate=16, ngroups=1, group_dim=False)),
    # 32 threads per channel (full-warp shuffles), 15 of them past dstate.
    ("mamba2_n272", dict(dstate=272, nheads=2, headdim=2, ngroups=1)),
    # dstate % 16 == 0 but B / C at an odd offset: the scalar fallback, not a misaligned vector.
    ("mamba2_n16_misaligned", dict(dstate=16, nheads=4, headdim=2, strided=True)),
]


@pytest.mark.parametrize("chunk", [None, 2], ids=["auto", "chunk2"])
@pytest.mark.parametrize("name,params", SCAN_DSTATE_CASES, ids=_ids(SCAN_DSTATE_CASES))
def test_selective_scan_cuda_dstate(name, params, chunk):
    """dstate values that select 1, 4, 8 threads per channel and the vectorised B / C path."""
    kw = scan_inputs(dtype=bf16, seqlens=(5, 8, 0), varlen=True, slots=(1, 0, 3),
                     initial=(True, False, True), **params)
    kw["split_len"] = chunk or 0
    check_op(ops.selective_scan, kw, ("out", "ssm_states"), bf16)


@pytest.mark.parametrize("chunk", [None, 2], ids=["auto", "chunk2"])
@pytest.mark.parametrize("dtype", [torch.float32, bf16], ids=["f32", "bf16"])
def test_selective_scan_cuda_bc_aligned_slice(dtype, chunk):
    """B and C as aligned column slices (Mamba-2's x | B | C): the 16-byte B / C path on views
    with free token and group strides."""
    kw = scan_inputs(dtype=dtype, seqlens=(5, 8, 0), varlen=True, slots=(1, 0, 3),
                     initial=(True, False, True), dstate=64, nheads=4, headdim=4, ngroups=2)
    kw["B"], kw["C"] = aligned_slice(kw["B"], 2), aligned_slice(kw["C"], 2)
    kw["split_len"] = chunk or 0
    check_op(ops.selective_scan, kw, ("out", "ssm_states"), dtype)


# Lanes per channel of the staged walk, forced (the launcher's pick has its own tests).
STAGED_LANES = [1, 2, 4, 8]


@pytest.mark.parametrize("lanes", STAGED_LANES, ids=[f"lanes{v}" for v in STAGED_LANES])
@pytest.mark.parametrize("chunk", [None, 24], ids=["auto", "chunk24"])
@pytest.mark.parametrize("dtype", [torch.float32, bf16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["aligned", "strided", "dense"])
def test_selective_scan_cuda_staged_tiles(layout, dtype, chunk, lanes):
    """The Mamba1 form's staged token tiles: 72 channels (two full warps and a part one of 8
    channels at 1 and 2 lanes a channel; whole warps at 4 and 8), sequences of several whole
    tiles plus a tail (tiles of 16 tokens; tails that are not whole groups of 2 / 4 / 8
    tokens), chunk boundaries inside tiles; aligned inputs take the tile copies (16-byte, or
    8-byte rows of 4 16-bit channels at 8 lanes; B / C also in the part warp), strided ones the
    per-lane loads."""
    varlen = layout != "dense"
    kw = scan_inputs(dtype=dtype, form="mamba1", nheads=72, dstate=16, ngroups=1,
                     group_dim=False, seqlens=(70, 33, 0, 16) if varlen else (67, 67),
                     varlen=varlen, slots=(1, 0, 3, 2) if varlen else (1, 3),
                     initial=(True, False, True, False) if varlen else (True, False),
                     strided=layout == "strided")
    kw["split_len"] = chunk or 0
    kw["lanes_per_channel"] = lanes
    _check_scan_row_copies(kw, dtype, lanes == 8 and dtype == bf16 and layout != "strided")


@pytest.mark.parametrize("lanes", STAGED_LANES, ids=[f"lanes{v}" for v in STAGED_LANES])
@pytest.mark.parametrize("chunk", [None, 24], ids=["auto", "chunk24"])
@pytest.mark.parametrize("dtype", [torch.float16, bf16], ids=["f16", "bf16"])
def test_selective_scan_cuda_staged_tiles_short_dstate(dtype, chunk, lanes):
    """dstate 5 (Mamba1 models may have fewer than 16 states): aligned u / delta / z tiles by
    row copies (8-byte at 8 lanes) beside B / C rows loaded per element with zeros past dstate,
    in one tile; at 4 lanes a channel two lanes hold no state at all, at 8 five."""
    kw = scan_inputs(dtype=dtype, form="mamba1", nheads=72, dstate=5, ngroups=1,
                     group_dim=False, seqlens=(70, 33, 0, 16), varlen=True, slots=(1, 0, 3, 2),
                     initial=(True, False, True, False))
    kw["split_len"] = chunk or 0
    kw["lanes_per_channel"] = lanes
    check_op(ops.selective_scan, kw, ("out", "ssm_states"), dtype)


# Many short sequences over 64 channels (1 block a sequence at one lane): 132 of 1-6 tokens,
# where 4 lanes give 132 SMs 4 blocks each; 100 of 10 tokens, where no lane count does and the
# split would not outnumber the sequences, so the most lanes run in one pass.
AUTO_LANES_SEQLENS = [
    ("132_seqs", tuple(1 + (b * 7) % 6 for b in range(132))),
    ("100_seqs", (10,) * 100),
]


@pytest.mark.parametrize("name,lens", AUTO_LANES_SEQLENS, ids=_ids(AUTO_LANES_SEQLENS))
@pytest.mark.parametrize("dtype", [torch.float32, bf16], ids=["f32", "bf16"])
def test_selective_scan_cuda_staged_lanes_auto_pick(dtype, name, lens):
    """The launcher's lane choice for many short sequences: 4 lanes on a device of more than 66
    SMs (with fewer, 2 or 1 lane fills it). The result matches the CPU op and, there, equals the
    forced 4-lane one bit for bit (1 lane sums y in another order)."""
    n = len(lens)
    kw = scan_inputs(dtype=dtype, form="mamba1", nheads=64, dstate=16, ngroups=1,
                     group_dim=False, seqlens=lens, varlen=True, num_slots=n,
                     slots=tuple(range(n - 1, -1, -1)), initial=tuple(b % 3 == 0 for b in range(n)))
    kw_auto, _ = check_op(ops.selective_scan, kw, ("out", "ssm_states"), dtype)
    if _device_sm_count() > 66:
        kw4 = {k: to_cuda(v) for k, v in kw.items()}
        kw4["lanes_per_channel"] = 4
        ops.selective_scan(**kw4)
        for n in ("out", "ssm_states"):
            assert torch.equal(kw4[n], kw_auto[n]), f"{n}: the automatic plan is not 4 lanes"


@pytest.mark.parametrize("lanes", STAGED_LANES, ids=[f"lanes{v}" for v in STAGED_LANES])
@pytest.mark.parametrize("dtype,nheads", [(torch.float32, 76), (bf16, 68)], ids=["f32", "bf16"])
def test_selective_scan_cuda_staged_part_warp(dtype, nheads, lanes):
    """A part last warp at every lane count (76 fp32 channels: aligned rows, so the full warps
    take the tile copies; 68 bf16: per-lane loads; a warp of 4 channels, so at 8 lanes 2 more
    channels, in rows padded to 16-byte alignment: row copies in the full warps, 8-byte ones for
    bf16, beside per-lane loads in the part one), whole and partial groups of tokens, the
    one-pass and the chunked plans."""
    if lanes == 8:
        nheads += 2
    for split in (0, 24):
        kw = scan_inputs(dtype=dtype, form="mamba1", nheads=nheads, dstate=16, ngroups=1,
                         group_dim=False, seqlens=(37, 19, 0, 6), varlen=True,
                         slots=(1, 0, 3, 2), initial=(True, False, True, False), split_len=split,
                         lanes_per_channel=lanes)
        if lanes == 8:
            for name in ("u", "delta", "z", "out"):
                kw[name] = aligned_slice(kw[name])
        _check_scan_row_copies(kw, dtype, lanes == 8 and dtype == bf16)


@pytest.mark.parametrize("name,params", [
    ("mamba2_form", dict()),
    ("mamba1_dstate32", dict(form="mamba1", nheads=40, dstate=32, ngroups=1, group_dim=False)),
    ("mamba1_direct", dict(form="mamba1", nheads=40, dstate=16, ngroups=1, group_dim=False,
                           algorithm="recurrent_direct")),
], ids=["mamba2_form", "mamba1_dstate32", "mamba1_direct"])
def test_selective_scan_cuda_lanes_need_staged_walk(name, params):
    """More than one lane a channel is a form of the staged walk: asked of a scan that does not
    take it, the op says so instead of ignoring the option."""
    kw = {k: to_cuda(v) for k, v in scan_inputs(lanes_per_channel=2, **params).items()}
    with pytest.raises(RuntimeError, match="lanes_per_channel 2 needs the staged walk"):
        ops.selective_scan(**kw)


@pytest.mark.parametrize("lanes", STAGED_LANES, ids=[f"lanes{v}" for v in STAGED_LANES])
@pytest.mark.parametrize("chunk", [None, 24], ids=["auto", "chunk24"])
@pytest.mark.parametrize("dtype", [torch.float32, bf16], ids=["f32", "bf16"])
def test_selective_scan_cuda_staged_softplus_range(dtype, chunk, lanes):
    """The staged walk computes softplus(dt) from the exp2 / log2 units with a series where
    e^x < 1/32 (the CPU op: log1p(exp(x))). Raw dt from -30 to 25, shuffled over tokens and
    channels, crosses the series, the log branch and the identity above 20."""
    kw = scan_inputs(dtype=dtype, form="mamba1", nheads=64, dstate=16, ngroups=1,
                     group_dim=False, seqlens=(40, 40), slots=(1, 3), initial=(True, False))
    g = torch.Generator().manual_seed(5)
    n = kw["delta"].numel()
    raw = torch.linspace(-30.0, 25.0, n)[torch.randperm(n, generator=g)]
    kw["delta"] = raw.reshape(kw["delta"].shape).to(dtype)
    kw["split_len"] = chunk or 0
    kw["lanes_per_channel"] = lanes
    check_op(ops.selective_scan, kw, ("out", "ssm_states"), dtype)


@pytest.mark.parametrize("chunk", [None, 5], ids=["auto", "chunk5"])
def test_selective_scan_cuda_16bit_state_rounds_only_when_stored(chunk):
    kw16 = {k: to_cuda(v) for k, v in scan_inputs(dtype=bf16, state_dtype=bf16).items()}
    kw16["split_len"] = chunk or 0
    kw32 = dict(kw16, ssm_states=kw16["ssm_states"].float(), out=kw16["out"].clone())
    ops.selective_scan(**kw16)
    ops.selective_scan(**kw32)
    assert torch.equal(kw16["out"], kw32["out"])
    assert torch.equal(kw16["ssm_states"], kw32["ssm_states"].to(bf16))


# ---------------------------------------------------------------------------------------------
# The chunked SSD kernel: the Mamba2 form with 16-bit activations, headdim and dstate 64 or 128.
#
# Tolerance against the fp64 reference, max norm relative to max(1, |truth|): EPS[dtype], one
# rounding of a stored value. The kernel rounds three intermediates to the activation dtype for the
# tensor cores - the state entering a chunk (C H), the decayed C B^T tile and the B rows scaled by
# their decay weights - each one relative rounding on terms summed in fp32, so its error is a few
# roundings of the terms' magnitude, which the decaying state keeps of the order of the result
# (measured with the emulated kernel: 3.5e-3 - 5.7e-3 for bf16 outputs, 4e-4 - 5e-4 for fp16, 2-3x
# under EPS). The recurrent kernel and the reference rounding of the baseline rule (run_vs_ref)
# are checked too.

SSD_BASE = dict(dtype=bf16, nheads=2, headdim=64, dstate=64, ngroups=1, varlen=True,
                seqlens=(130, 0, 1, 64, 65), num_slots=6, slots=(1, 0, -1, 3, 5),
                initial=(True, False, True, False, True))
SSD_CASES = [
    ("base", {}),
    ("f16", dict(dtype=f16)),
    ("headdim128", dict(headdim=128)),
    ("dstate128", dict(dstate=128)),
    ("p128_n128_bf16_state", dict(headdim=128, dstate=128, state_dtype=bf16)),
    ("ngroups2", dict(nheads=4, ngroups=2)),
    ("ngroups8", dict(nheads=8, ngroups=8, seqlens=(70, 3), slots=(1, 0),
                      initial=(True, False))),
    ("dense", dict(varlen=False, seqlens=(100, 100), slots=(2, 0), initial=(True, False))),
    ("chunk_edges", dict(seqlens=(128, 63, 129, 192), slots=(1, 0, 3, 2),
                         initial=(False, True, True, False))),
    # Rows not 16-byte aligned: element loads and stores instead of the 16-byte copies.
    ("strided", dict(strided=True)),
    ("no_z_no_D", dict(z=False, D=False)),
    ("dt_limits", dict(dt_min=0.05, dt_max=0.4)),
    ("no_states", dict(states=False, slots=None, initial=None, seqlens=(100, 7))),
]
# Forced split lengths cross pieces inside and at the edges of chunks and sequences: every case
# with the launcher's plan, the split plan on the cases that exercise its boundaries.
SSD_SPLIT_CASES = ("base", "dstate128", "dense", "chunk_edges", "strided")
SSD_RUNS = ([(name, params, 0) for name, params in SSD_CASES]
            + [(name, params, split) for name, params in SSD_CASES if name in SSD_SPLIT_CASES
               for split in (64, 100)])


def _ssd_truth(kw):
    """The fp64 reference's out and ssm_states for the op's inputs (CPU copies)."""
    ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    selective_scan_ref(**ref, compute_dtype=torch.float64)
    return ref


def _assert_within(actual, truth, tol, what):
    a, t = actual.cpu().double(), truth.double()
    if t.numel() == 0:
        return
    err = (a - t).abs().max().item()
    bound = tol * max(1.0, t.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name,params,split", SSD_RUNS,
                         ids=[f"{n}-split{s}" if s else n for n, _, s in SSD_RUNS])
def test_selective_scan_cuda_ssd(name, params, split):
    cfg = {**SSD_BASE, **params}
    dtype = cfg["dtype"]
    kw = scan_inputs(**cfg, algorithm="ssd", split_len=split)
    truth = _ssd_truth(kw)
    kw_gpu, before = check_op(ops.selective_scan, kw, ("out", "ssm_states"), dtype)
    _assert_within(kw_gpu["out"], truth["out"], EPS[dtype], "out vs fp64")
    rec = {k: to_cuda(v) for k, v in kw.items()}
    for k in ("out", "ssm_states"):
        if before.get(k) is not None:
            rec[k] = to_cuda(before[k])
    ops.selective_scan(**dict(rec, algorithm="recurrent"))
    _assert_within(kw_gpu["out"], rec["out"].cpu(), 2 * EPS[dtype], "out vs recurrent")
    if kw["ssm_states"] is None:
        return
    _assert_within(kw_gpu["ssm_states"], truth["ssm_states"], EPS[dtype], "state vs fp64")
    _assert_within(kw_gpu["ssm_states"], rec["ssm_states"].cpu(), 2 * EPS[dtype],
                   "state vs recurrent")
    slots = cfg["slots"]
    padded = [b for b, s in enumerate(slots) if s == -1]
    if padded:
        rows = _padded_out_rows(kw_gpu["out"].cpu(), cfg["seqlens"], cfg["varlen"], padded)
        assert (rows == SENTINEL).all(), "padded output rows were written"
    assert_slots_untouched(kw_gpu["ssm_states"].cpu(), before["ssm_states"], slots)


@pytest.mark.parametrize("split", [0, 3], ids=["auto", "split3"])
def test_selective_scan_cuda_auto_takes_ssd_only_with_nonnegative_dt(split):
    """The SSD kernel's 16-bit operands assume decays exp(dt * A) <= 1. Raw dt without softplus
    may be negative (here down to -0.3: growing states; with dt down to -0.9 the SSD kernel was
    found 2-40% off in fp16), so 'auto' runs the recurrence there - bit for bit the 'recurrent'
    result, within the tolerance of the CPU op and the fp64 reference; with dt_min = 0 or
    softplus, dt >= 0 is certain and 'auto' is the SSD kernel."""
    kw = scan_inputs(dtype=torch.float16, nheads=2, headdim=128, dstate=128, ngroups=2,
                     seqlens=(3, 9, 0, 1, 1), varlen=True, num_slots=7, slots=(6, 0, 3, 5, 1),
                     initial=(True, False, True, True, False), delta_softplus=False,
                     delta_bias=False, state_dtype=torch.float16, split_len=split)
    g = torch.Generator().manual_seed(3)
    kw["delta"] = (torch.rand(kw["delta"].shape, generator=g) * 0.9 - 0.3).half()

    def run(**options):
        args = {k: to_cuda(v) for k, v in {**kw, **options}.items()}
        ops.selective_scan(**args)
        return args["out"].cpu(), args["ssm_states"].cpu()

    auto, _ = check_op(ops.selective_scan, kw, ("out", "ssm_states"), torch.float16)
    for got, want in zip((auto["out"].cpu(), auto["ssm_states"].cpu()),
                         run(algorithm="recurrent")):
        assert torch.equal(got, want), "'auto' without a sign guarantee did not take the recurrence"
    for options in (dict(dt_min=0.0), dict(delta_softplus=True)):
        for got, want in zip(run(**options), run(algorithm="ssd", **options)):
            assert torch.equal(got, want), f"'auto' with {options} did not take the SSD kernel"


def _one_shot_and_split_scan(kw, params, seqlens, first, init):
    """The scan once over the packed batch, and again as two prefills split after first[b] tokens
    of each sequence (the second continuing from the slots), both on copies of the state pool
    `init`. Returns (one-shot out, its states, the two prefills' outputs merged, their states)."""
    packed = ("u", "delta", "B", "C", "z")
    fresh = torch.zeros(len(seqlens), dtype=torch.bool, device=CUDA)
    starts = query_start_loc(seqlens).tolist()
    rest = tuple(n - f for n, f in zip(seqlens, first))
    rows = range(len(seqlens))
    head_idx = [t for b in rows for t in range(starts[b], starts[b] + first[b])]
    tail_idx = [t for b in rows for t in range(starts[b] + first[b], starts[b + 1])]
    states_full = init.clone()
    out_full = ops.selective_scan(**{k: kw[k] for k in packed}, **params, ssm_states=states_full,
                                  has_initial_state=fresh,
                                  query_start_loc=query_start_loc(seqlens).to(CUDA))
    states = init.clone()
    out_head = ops.selective_scan(**{k: kw[k][head_idx] for k in packed}, **params,
                                  ssm_states=states, has_initial_state=fresh,
                                  query_start_loc=query_start_loc(first).to(CUDA))
    out_tail = ops.selective_scan(**{k: kw[k][tail_idx] for k in packed}, **params,
                                  ssm_states=states, has_initial_state=~fresh,
                                  query_start_loc=query_start_loc(rest).to(CUDA))
    merged = torch.empty_like(out_full)
    merged[head_idx] = out_head
    merged[tail_idx] = out_tail
    return out_full, states_full, merged, states


@pytest.mark.parametrize("split", [0, 64], ids=["auto", "split64"])
@pytest.mark.parametrize("first", [(17, 64, 0), (1, 100, 63)], ids=["at17_64_0", "at1_100_63"])
def test_selective_scan_cuda_ssd_chunk_consistency(first, split):
    """A prefill split at arbitrary points (the second part continuing from the slots) equals the
    one-shot prefill, and the one-shot prefill followed by decode steps equals a longer prefill
    (tails of 1..3 tokens as selective_state_update steps)."""
    seqlens, slots = (80, 140, 66), (2, 0, 3)
    kw = {k: to_cuda(v) for k, v in scan_inputs(
        dtype=bf16, nheads=2, headdim=64, dstate=64, ngroups=1, seqlens=seqlens, varlen=True,
        slots=slots, initial=(False, False, False), num_slots=4).items()}
    packed = ("u", "delta", "B", "C", "z")
    params = {k: kw[k] for k in ("A", "D", "delta_bias", "delta_softplus", "cache_indices")}
    params.update(algorithm="ssd", split_len=split)
    init = torch.randn_like(kw["ssm_states"])
    out_full, states_full, merged, states = _one_shot_and_split_scan(kw, params, seqlens, first,
                                                                     init)
    # Different chunk boundaries round different intermediates: agreement to the SSD tolerance.
    _assert_within(merged, out_full.cpu(), EPS[bf16], "split prefill out")
    _assert_within(states, states_full.cpu(), EPS[bf16], "split prefill state")

    # Decode: the last `steps` tokens of each sequence as single-token steps after a prefill of
    # the rest must equal the one-shot prefill's outputs and states.
    steps = 3
    fresh = torch.zeros(len(seqlens), dtype=torch.bool, device=CUDA)
    starts = query_start_loc(seqlens).tolist()
    pre = tuple(n - steps for n in seqlens)
    pre_idx = [t for b in range(3) for t in range(starts[b], starts[b] + pre[b])]
    states = init.clone()
    ops.selective_scan(**{k: kw[k][pre_idx] for k in packed}, **params, ssm_states=states,
                       has_initial_state=fresh, query_start_loc=query_start_loc(pre).to(CUDA))
    h, hd = kw["A"].shape[0], 64
    for i in range(steps):
        tok = [starts[b] + pre[b] + i for b in range(3)]
        y = ops.selective_state_update(
            states, kw["u"][tok].view(3, h, hd), kw["delta"][tok], kw["A"], kw["B"][tok],
            kw["C"][tok], kw["D"], kw["z"][tok].view(3, h, hd), kw["delta_bias"],
            dt_softplus=True, state_batch_indices=kw["cache_indices"])
        _assert_within(y.view(3, -1), out_full[tok].cpu(), EPS[bf16], f"decode step {i}")
    _assert_within(states, states_full.cpu(), EPS[bf16], "state after decode")


# ---------------------------------------------------------------------------------------------
# selective_state_update


SSU_EXTRA_CASES = [
    ("mamba2_n128", dict(nheads=4, headdim=8, dstate=128, ngroups=1)),
    ("mamba2_n128_state_bf16", dict(nheads=4, headdim=8, dstate=128, ngroups=2, dtype=bf16,
                                    state_dtype=bf16)),
    ("mamba1_n16", dict(form="mamba1", nheads=40, dstate=16, ngroups=1, group_dim=False)),
    ("mamba2_n40", dict(nheads=2, headdim=3, dstate=40, ngroups=1)),
    # headdim % 4 == 0: four headdim rows per thread group.
    ("mamba2_rows4_strided_dst", dict(nheads=4, headdim=8, dstate=16, ngroups=2, strided=True,
                                      x3d=True, dst=(5, 1, 3))),
    ("mamba2_rows4_f16_state", dict(nheads=2, headdim=12, dstate=32, ngroups=1, dtype=f16,
                                    state_dtype=f16, src=(2, -1, 4))),
]


# Tile boundaries of the kernel (selective_state_update.cu): flat tiles of 128 Mamba-1 channels
# (fp32 state: 4 lanes a channel, 4 channels a thread; 16-bit state: 2 lanes, so lanes write
# several outputs each), head tiles of 32 (fp32, dstate 128) or 64 rows of one head, several
# passes over dstate past 32 chunks, the scalar path when dstate is not a multiple of the
# vector width, B / C groups changing inside a thread's rows (Zamba's Mamba-1 form with ngroups
# > 1), and padded rows and distinct write slots next to valid rows.
M1 = dict(form="mamba1", dstate=16, ngroups=1, group_dim=False)
M1_PAD = dict(batch=5, num_slots=8, src=(2, -1, 0, 7, 4), dst=(1, 3, -1, 5, 6))
SSU_TILE_CASES = [
    ("m1_dim37", dict(M1, nheads=37)),
    ("m1_dim130_bf16_padded", dict(M1, nheads=130, dtype=bf16, **M1_PAD)),
    ("m1_dim130_f16_state", dict(M1, nheads=130, dtype=f16, state_dtype=f16)),
    ("m1_dim130_bf16_state_padded", dict(M1, nheads=130, dtype=bf16, state_dtype=bf16,
                                         **M1_PAD)),
    ("m1_ngroups5", dict(M1, nheads=130, ngroups=5, group_dim=True)),
    ("m1_group_per_channel", dict(M1, nheads=40, ngroups=40, group_dim=True, dtype=bf16)),
    ("m1_scalar_n18", dict(M1, nheads=37, dstate=18)),
    ("m1_no_optional", dict(M1, nheads=130, D=False, z=False, dt_bias=False,
                            dt_softplus=False)),
    ("m1_strided", dict(M1, nheads=130, strided=True, dtype=f16)),
    ("m2_p64_n128", dict(nheads=3, headdim=64, dstate=128, ngroups=3)),
    ("m2_p64_n128_bf16_state", dict(nheads=2, headdim=64, dstate=128, ngroups=1, dtype=bf16,
                                    state_dtype=bf16, src=(2, -1, 4), dst=(1, 0, 3))),
    ("m2_p50_n128_f16", dict(nheads=4, headdim=50, dstate=128, ngroups=2, dtype=f16)),
    ("m2_p37_n64_padded", dict(nheads=2, headdim=37, dstate=64, ngroups=1, **M1_PAD)),
    ("m2_p18_n64_flat", dict(nheads=2, headdim=18, dstate=64, ngroups=2, x3d=True)),
    ("m2_n256_two_passes", dict(nheads=2, headdim=16, dstate=256, ngroups=1, dst=(1, 3, 5))),
    ("m2_scalar_n18", dict(nheads=3, headdim=6, dstate=18, ngroups=1, dtype=bf16)),
    ("m2_no_optional", dict(nheads=2, headdim=64, dstate=128, ngroups=2, D=False, z=False,
                            dt_bias=False, dt_softplus=False)),
    ("m2_a_per_state_p4", dict(nheads=6, headdim=4, dstate=16, ngroups=2, a_per_state=True)),
    ("m2_a_per_state_p64_f16_state", dict(nheads=2, headdim=64, dstate=16, ngroups=1,
                                          a_per_state=True, dtype=f16, state_dtype=f16)),
]
# The fused dt_proj (project_dt) on the kernel's flat tiles: the CPU cases (dt_rank 1, 7, 16,
# 160; vector chunks, the scalar tail and, strided, the unaligned scalar path) plus every
# activation / state dtype pair, dt_rank 160 on 16-bit states (one chunk in flight), a rank
# spread unevenly over 4 lanes, lanes with no chunk at all (dt_rank 8 in fp32: 2 chunks over 4
# lanes), several passes over dstate and the scalar state path.
SSU_DT_PROJ_CUDA_CASES = SSU_DT_PROJ_CASES + [
    ("dtp_r160_f32_dim130", dict(M1, nheads=130, dt_rank=160)),
    ("dtp_r160_bf16_state_bf16", dict(M1, nheads=130, dt_rank=160, dtype=bf16,
                                      state_dtype=bf16)),
    ("dtp_r160_f16", dict(M1, nheads=37, dt_rank=160, dtype=f16)),
    ("dtp_r7_f32", dict(M1, nheads=130, dt_rank=7)),
    ("dtp_r8_f32_idle_lanes", dict(M1, nheads=37, dt_rank=8)),
    ("dtp_r48_bf16_strided_padded", dict(M1, nheads=130, dt_rank=48, dtype=bf16, strided=True,
                                         **M1_PAD)),
    ("dtp_r16_n256_two_passes", dict(M1, nheads=37, dstate=256, dt_rank=16, dtype=bf16)),
    ("dtp_r16_scalar_n18", dict(M1, nheads=37, dstate=18, dt_rank=16)),
    ("dtp_r16_ngroups5", dict(M1, nheads=130, ngroups=5, group_dim=True, dt_rank=16)),
]
SSU_CUDA_CASES = SSU_CASES + SSU_EXTRA_CASES + SSU_TILE_CASES + SSU_DT_PROJ_CUDA_CASES


@pytest.mark.parametrize("name,params", SSU_CUDA_CASES, ids=_ids(SSU_CUDA_CASES))
def test_selective_state_update_cuda(name, params):
    kw = ssu_inputs(**params)
    kw_gpu, before = check_op(ops.selective_state_update, kw, ("out", "ssm_state"),
                              kw["x"].dtype)
    src = params.get("src", (2, 0, 4))
    dst = params.get("dst")
    rows = range(kw["x"].shape[0])
    padded = [b for b in rows if (src is not None and src[b] == -1)
              or (dst is not None and dst[b] == -1)]
    out = kw_gpu["out"].cpu()
    for b in padded:
        assert (out[b] == SENTINEL).all(), "padded output row was written"
    written = [(dst if dst is not None else src or list(rows))[b] for b in rows
               if b not in padded]
    assert_slots_untouched(kw_gpu["ssm_state"].cpu(), before["ssm_state"], written)


def test_selective_state_update_cuda_strided_A():
    """A (dim, dstate) as a transposed view: the 16-byte state path with element-wise A loads."""
    kw = ssu_inputs(**dict(M1, nheads=37))
    kw["A"] = kw["A"].t().contiguous().t()
    check_op(ops.selective_state_update, kw, ("out", "ssm_state"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, bf16])
def test_selective_state_update_cuda_dt_proj_vector_tail(dtype):
    """dt_rank 13 with 16-byte aligned rows (strides padded to 16 elements): whole 16-byte chunks
    of the projection, then a scalar tail, on the same lanes."""
    kw = ssu_inputs(**dict(M1, nheads=130, dt_rank=13, dtype=dtype))

    def padded(t):
        return torch.zeros(t.shape[0], 16, dtype=t.dtype)[:, :13].copy_(t)

    kw["dt"], kw["dt_proj_weight"] = padded(kw["dt"]), padded(kw["dt_proj_weight"])
    check_op(ops.selective_state_update, kw, ("out", "ssm_state"), dtype)


@pytest.mark.parametrize("form", ["mamba1", "mamba2"])
def test_selective_state_update_cuda_batch_beyond_grid_y(form):
    """Batches beyond the device's gridDim.y limit: blocks loop over batch rows. Emulator only,
    where the limit can be lowered (65535 on real devices)."""
    emu = ops._ops
    if not hasattr(emu, "set_max_grid_y"):
        pytest.skip("needs the emulator's adjustable grid limit")
    params = dict(M1, nheads=130) if form == "mamba1" else dict(nheads=2, headdim=64,
                                                                 dstate=128, ngroups=1)
    kw = ssu_inputs(dtype=bf16, **M1_PAD, **params)
    emu.set_max_grid_y(2)
    try:
        kw_gpu, before = check_op(ops.selective_state_update, kw, ("out", "ssm_state"), bf16)
    finally:
        emu.set_max_grid_y(65535)
    out = kw_gpu["out"].cpu()
    assert (out[1] == SENTINEL).all() and (out[2] == SENTINEL).all()
    assert_slots_untouched(kw_gpu["ssm_state"].cpu(), before["ssm_state"], (1, 5, 6))


# ---------------------------------------------------------------------------------------------
# Large shapes: against the CPU op (the Python reference is too slow at 16K tokens).


def _large_check(op, kw, mutable, dtype):
    kw_gpu = {k: to_cuda(v) for k, v in kw.items()}
    op(**kw_gpu)
    _cpu_op(op, kw)
    for n in mutable:
        assert_matches_cpu(kw_gpu[n], kw[n], dtype, n)


LARGE_SCAN = [
    ("mamba1_1x16384", dict(form="mamba1", nheads=256, dstate=16, ngroups=1, group_dim=False,
                            seqlens=(16384,))),
    # bf16: the SSD kernel (its split plan at batch 1); fp32: the recurrence.
    ("mamba2_1x16384", dict(form="mamba2", nheads=4, headdim=64, dstate=128, ngroups=1,
                            seqlens=(16384,))),
    ("mamba2_ssd_varlen", dict(form="mamba2", nheads=8, headdim=64, dstate=64, ngroups=2,
                               seqlens=(5000, 1, 0, 9000, 383, 2), varlen=True)),
    ("mamba1_8x2048", dict(form="mamba1", nheads=512, dstate=16, ngroups=1, group_dim=False,
                           seqlens=(2048,) * 8)),
    # 5120 channels x 8 sequences fill an H100 without chunking: the one-row-per-sequence plan.
    ("mamba1_8x512_seq_plan", dict(form="mamba1", nheads=5120, dstate=16, ngroups=1,
                                   group_dim=False, seqlens=(512,) * 8)),
    ("mamba2_varlen", dict(form="mamba2", nheads=8, headdim=16, dstate=128, ngroups=2,
                           seqlens=(5000, 1, 0, 9000, 383, 2), varlen=True)),
    ("mamba1_varlen_many_channels", dict(form="mamba1", nheads=5120, dstate=16, ngroups=1,
                                         group_dim=False, seqlens=(700, 0, 1300, 48),
                                         varlen=True)),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", [torch.float32, bf16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,params", LARGE_SCAN, ids=_ids(LARGE_SCAN))
def test_selective_scan_cuda_large(name, params, dtype):
    batch = len(params["seqlens"])
    kw = scan_inputs(dtype=dtype, num_slots=batch + 1, slots=tuple(range(1, batch + 1)),
                     initial=tuple(b % 2 == 0 for b in range(batch)), **params)
    _large_check(ops.selective_scan, kw, ("out", "ssm_states"), dtype)


LARGE_CONV = [
    ("1x16384", dict(dim=1280, seqlens=(16384,))),
    ("8x2048", dict(dim=2560, seqlens=(2048,) * 8)),
    ("varlen", dict(dim=1280, seqlens=(3000, 1, 0, 2, 5000), varlen=True)),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,params", LARGE_CONV, ids=_ids(LARGE_CONV))
def test_causal_conv1d_cuda_large(name, params):
    batch = len(params["seqlens"])
    kw = conv_inputs(dtype=bf16, num_slots=batch + 1, slots=tuple(range(1, batch + 1)),
                     initial=tuple(b % 2 == 1 for b in range(batch)), **params)
    _large_check(ops.causal_conv1d, kw, ("out", "conv_states"), bf16)


@pytest.mark.parametrize("form", ["mamba1", "mamba2"])
def test_selective_state_update_cuda_large_batch(form):
    params = (dict(form="mamba1", nheads=2048, dstate=16, ngroups=1, group_dim=False)
              if form == "mamba1" else dict(nheads=20, headdim=64, dstate=128, ngroups=1))
    batch = 256
    kw = ssu_inputs(dtype=bf16, batch=batch, num_slots=2 * batch,
                    src=tuple(range(0, 2 * batch, 2)), dst=tuple(range(1, 2 * batch, 2)),
                    **params)
    _large_check(ops.selective_state_update, kw, ("out", "ssm_state"), bf16)


# ---------------------------------------------------------------------------------------------
# Chunk consistency on the GPU: one prefill == two chunked prefills == prefill + decode.


@pytest.mark.parametrize("chunk", [None, 3], ids=["auto", "chunk3"])
@pytest.mark.parametrize("form", ["mamba1", "mamba2"])
def test_selective_scan_cuda_chunk_consistency(form, chunk):
    seqlens, first, slots = (40, 23), (17, 0), (2, 0)
    extra = (dict(nheads=5, dstate=16, ngroups=1, group_dim=False) if form == "mamba1"
             else dict(nheads=4, headdim=8, dstate=32, ngroups=2))
    kw = {k: to_cuda(v) for k, v in scan_inputs(
        form=form, seqlens=seqlens, varlen=True, slots=slots, initial=(False, False),
        num_slots=3, **extra).items()}
    params = {k: kw[k] for k in ("A", "D", "delta_bias", "delta_softplus", "cache_indices")}
    params["split_len"] = chunk or 0
    out_full, states_full, merged, states = _one_shot_and_split_scan(
        kw, params, seqlens, first, torch.randn_like(kw["ssm_states"]))
    torch.testing.assert_close(merged, out_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[list(slots)], states_full[list(slots)], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 2], ids=["auto", "chunk2"])
def test_causal_conv1d_cuda_chunk_consistency(chunk):
    seqlens, first, slots = (30, 9), (2, 0), (1, 0)
    dim, width = 40, 4
    x = torch.randn(sum(seqlens), dim, device=CUDA)
    weight = torch.randn(dim, width, device=CUDA) * 0.5
    bias = torch.randn(dim, device=CUDA) * 0.5
    idx = torch.tensor(slots, dtype=torch.int32, device=CUDA)
    fresh = torch.zeros(2, dtype=torch.bool, device=CUDA)
    common = dict(weight=weight, bias=bias, cache_indices=idx, activation="silu",
                  chunk_len=chunk or 0)
    starts = query_start_loc(seqlens).tolist()
    head_idx = [t for b in range(2) for t in range(starts[b], starts[b] + first[b])]
    tail_idx = [t for b in range(2) for t in range(starts[b] + first[b], starts[b + 1])]
    rest = tuple(n - f for n, f in zip(seqlens, first))
    init = torch.randn(2, dim, width - 1, device=CUDA)
    states_full = init.clone()
    out_full = ops.causal_conv1d(x, conv_states=states_full, has_initial_state=fresh,
                                 query_start_loc=query_start_loc(seqlens).to(CUDA), **common)
    states = init.clone()
    out_head = ops.causal_conv1d(x[head_idx], conv_states=states, has_initial_state=fresh,
                                 query_start_loc=query_start_loc(first).to(CUDA), **common)
    out_tail = ops.causal_conv1d(x[tail_idx], conv_states=states, has_initial_state=~fresh,
                                 query_start_loc=query_start_loc(rest).to(CUDA), **common)
    merged = torch.empty_like(out_full)
    merged[head_idx] = out_head
    merged[tail_idx] = out_tail
    torch.testing.assert_close(merged, out_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states, states_full, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# opcheck on the CUDA implementations (schema and mutation annotations, fake impls, AOT dispatch).


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,op,make_args", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_cuda(name, op, make_args):
    torch.library.opcheck(op, tuple(to_cuda(a) for a in make_args()))


# ---------------------------------------------------------------------------------------------
# CUDA graphs: both decode ops capture (no host sync, no allocation) and replay correctly with a
# padded batch; with TPSSM_DEBUG_CHECKS=1 too (its host check of the indices is skipped under
# capture, where it would be a synchronisation capture forbids).

DEBUG_CHECKS = pytest.mark.parametrize("debug_checks", ["0", "1"],
                                       ids=["plain", "debug_checks"])


def _replay_and_check(capture, refresh, reference, outputs):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        capture()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capture()
    for _ in range(3):
        refresh()
        expected = reference()
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outputs(), expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@DEBUG_CHECKS
def test_causal_conv1d_update_cuda_graph(debug_checks, monkeypatch):
    monkeypatch.setenv("TPSSM_DEBUG_CHECKS", debug_checks)
    batch, dim, width, num_slots = 8, 96, 4, 10
    slots = torch.tensor([3, 0, -1, 7, 9, -1, 1, 2], dtype=torch.int32, device=CUDA)
    x = torch.randn(batch, dim, device=CUDA)
    state = torch.randn(num_slots, dim, width - 1, device=CUDA)
    weight = torch.randn(dim, width, device=CUDA) * 0.5
    bias = torch.randn(dim, device=CUDA)
    out = torch.full_like(x, SENTINEL)
    shadow = {}

    def capture():
        ops.causal_conv1d_update(x, state, weight, bias, activation="silu", cache_indices=slots,
                                 out=out)

    def refresh():
        x.copy_(torch.randn_like(x))
        state.copy_(torch.randn_like(state))
        out.fill_(SENTINEL)
        shadow["state"] = state.clone()

    def reference():
        ref_state = shadow["state"].clone()
        ref_out = torch.full_like(x, SENTINEL)
        causal_conv1d_update_ref(x, ref_state, weight, bias, activation="silu",
                                 cache_indices=slots, out=ref_out)
        return ref_out, ref_state

    _replay_and_check(capture, refresh, reference, lambda: (out, state))
    assert (out[slots == -1] == SENTINEL).all()


@DEBUG_CHECKS
@pytest.mark.parametrize("form", ["mamba1", "mamba2"])
def test_selective_state_update_cuda_graph(form, debug_checks, monkeypatch):
    monkeypatch.setenv("TPSSM_DEBUG_CHECKS", debug_checks)
    kw = {k: to_cuda(v) for k, v in ssu_inputs(
        form=form, batch=6, num_slots=9, src=(4, -1, 0, 8, -1, 2), dst=(5, -1, 1, 8, -1, 3),
        **(dict(nheads=24, dstate=16, ngroups=1, group_dim=False) if form == "mamba1"
           else dict(nheads=4, headdim=16, dstate=64, ngroups=2))).items()}
    shadow = {}

    def capture():
        ops.selective_state_update(**kw)

    def refresh():
        for name in ("x", "dt", "B", "C", "z"):
            kw[name].copy_(torch.randn_like(kw[name]) * (0.5 if name == "dt" else 1.0))
        kw["ssm_state"].copy_(torch.randn_like(kw["ssm_state"]))
        kw["out"].fill_(SENTINEL)
        shadow["state"] = kw["ssm_state"].clone()

    def reference():
        ref = dict(kw, ssm_state=shadow["state"].clone(), out=torch.full_like(kw["out"], SENTINEL))
        selective_state_update_ref(**ref)
        return ref["out"], ref["ssm_state"]

    _replay_and_check(capture, refresh, reference, lambda: (kw["out"], kw["ssm_state"]))


# ---------------------------------------------------------------------------------------------
# Malformed index values. The CUDA ops do not read index values back to the host (unless
# TPSSM_DEBUG_CHECKS=1), so whatever the values the kernels must stay in bounds and give the
# documented result (tpssm.ops): an index that is neither pad_slot_id nor a slot of the pool makes
# its row a padded row; query_start_loc entries act clamped to [0, total_tokens], a sequence
# ending before its start is empty, and tokens outside every sequence keep their out rows; with
# the clamped starts out of order, the rows involved get unspecified values but nothing outside
# their token rows and slots is written. The CPU ops reject all of these (test_ops_errors.py).
# Under the emulator with EMU_ASAN=1, an access outside any tensor fails the run.

BAD_SLOTS = [("num_slots", None), ("negative", -3), ("int32_max", 2 ** 31 - 1),
             ("int32_min", -2 ** 31)]
QSL_T = 9  # total tokens of the malformed query_start_loc cases (seqlens (3, 2, 4))
QSL_CASES = [
    ("first_negative", [-4, 3, 5, 9]),
    ("interior_negative", [0, -7, 5, 9]),
    ("entry_past_total", [0, 3, 1000, 9]),
    ("last_past_total", [0, 3, 5, 2 ** 31 - 1]),
    ("int32_extremes", [-2 ** 31, 3, 5, 2 ** 31 - 1]),
    ("gaps_at_both_ends", [2, 3, 5, 7]),
    ("all_past_total", [100, 200, 300, 400]),
    ("all_negative", [-9, -5, -3, -1]),
    ("out_of_order", [0, 5, 3, 9]),
    ("out_of_order_gap", [0, 2, 1, 3]),
    ("descending", [9, 6, 3, 0]),
]


@pytest.fixture
def _device_index_checks_only(monkeypatch):
    monkeypatch.delenv("TPSSM_DEBUG_CHECKS", raising=False)


def _cpu_copy(kw):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _clamped_ranges(qsl, total):
    """Each sequence's token range as the kernels read query_start_loc (see kernel_utils.cuh)."""
    begins = [min(max(v, 0), total) for v in qsl[:-1]]
    ends = [max(min(max(v, 0), total), b) for v, b in zip(qsl[1:], begins)]
    return list(zip(begins, ends))


def _with_bad_slot(values, b, bad, num_slots):
    values = list(values)
    values[b] = num_slots if bad is None else bad
    return values


def _check_bad_slot(op, kw, index_name, b, bad, num_slots, mutable, dtype):
    """Row b's index replaced by a bad value on the device must give the CPU op's result with
    that row padded."""
    expect = _cpu_copy(kw)
    expect[index_name] = torch.tensor(_with_bad_slot(kw[index_name].tolist(), b, -1, num_slots),
                                      dtype=torch.int32)
    _cpu_op(op, expect)
    kw_gpu = {k: to_cuda(v) for k, v in kw.items()}
    kw_gpu[index_name] = torch.tensor(_with_bad_slot(kw[index_name].tolist(), b, bad, num_slots),
                                      dtype=torch.int32, device=CUDA)
    op(**kw_gpu)
    for n in mutable:
        assert_matches_cpu(kw_gpu[n], expect[n], dtype, n)
    return kw_gpu


@pytest.mark.usefixtures("_device_index_checks_only")
@pytest.mark.parametrize("bad_name,bad", BAD_SLOTS, ids=[n for n, _ in BAD_SLOTS])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_causal_conv1d_cuda_bad_slot_is_padding(varlen, bad_name, bad):
    kw = conv_inputs(varlen=True, seqlens=(3, 2, 4), slots=(1, 0, 4),
                     initial=(True, True, False)) if varlen else conv_inputs()
    kw_gpu = _check_bad_slot(ops.causal_conv1d, kw, "cache_indices", 1, bad, 5,
                                ("out", "conv_states"), kw["x"].dtype)
    rows = kw_gpu["out"].cpu()[3:5] if varlen else kw_gpu["out"].cpu()[1]
    assert (rows == SENTINEL).all(), "the out rows of a row with a bad slot were written"


@pytest.mark.usefixtures("_device_index_checks_only")
@pytest.mark.parametrize("bad_name,bad", BAD_SLOTS, ids=[n for n, _ in BAD_SLOTS])
def test_causal_conv1d_update_cuda_bad_slot_is_padding(bad_name, bad):
    kw = conv_update_inputs(seqlen=2)
    kw_gpu = _check_bad_slot(ops.causal_conv1d_update, kw, "cache_indices", 2, bad, 5,
                                ("out", "conv_state"), kw["x"].dtype)
    assert (kw_gpu["out"].cpu()[2] == SENTINEL).all()


SCAN_PLANS = [
    ("recurrent", dict(), 0),
    ("recurrent_split2", dict(), 2),
    ("mamba1_staged", dict(form="mamba1", nheads=40, dstate=16, ngroups=1, group_dim=False,
                           lanes_per_channel=1), 0),
    ("mamba1_staged_split2",
     dict(form="mamba1", nheads=40, dstate=16, ngroups=1, group_dim=False), 2),
    ("mamba1_staged_lanes4", dict(form="mamba1", nheads=40, dstate=16, ngroups=1,
                                  group_dim=False, lanes_per_channel=4), 0),
    ("mamba1_staged_lanes2_split2", dict(form="mamba1", nheads=40, dstate=16, ngroups=1,
                                         group_dim=False, lanes_per_channel=2), 2),
    ("mamba1_staged_lanes8", dict(form="mamba1", nheads=40, dstate=16, ngroups=1,
                                  group_dim=False, lanes_per_channel=8), 0),
    ("ssd", dict(dtype=bf16, nheads=2, headdim=64, dstate=64, ngroups=1, algorithm="ssd"), 0),
    ("ssd_split2", dict(dtype=bf16, nheads=2, headdim=64, dstate=64, ngroups=1,
                        algorithm="ssd"), 2),
]


@pytest.mark.usefixtures("_device_index_checks_only")
@pytest.mark.parametrize("bad_name,bad", BAD_SLOTS[:2], ids=[n for n, _ in BAD_SLOTS[:2]])
@pytest.mark.parametrize("plan,params,split", SCAN_PLANS, ids=[c[0] for c in SCAN_PLANS])
def test_selective_scan_cuda_bad_slot_is_padding(plan, params, split, bad_name, bad):
    kw = scan_inputs(varlen=True, seqlens=(3, 2, 4), slots=(1, 0, 3),
                     initial=(True, True, False), split_len=split, **params)
    kw_gpu = _check_bad_slot(ops.selective_scan, kw, "cache_indices", 1, bad, 4,
                                ("out", "ssm_states"), kw["u"].dtype)
    assert (kw_gpu["out"].cpu()[3:5] == SENTINEL).all()


SSU_BAD_SLOT_SHAPES = [
    ("base", {}),
    ("mamba1_dim130", dict(M1, nheads=130, dtype=bf16)),
    ("mamba2_p64_n128", dict(nheads=2, headdim=64, dstate=128, ngroups=1)),
    ("mamba1_dt_proj", dict(M1, nheads=130, dtype=bf16, dt_rank=160)),
]


@pytest.mark.usefixtures("_device_index_checks_only")
@pytest.mark.parametrize("bad_name,bad", BAD_SLOTS, ids=[n for n, _ in BAD_SLOTS])
@pytest.mark.parametrize("index_name", ["state_batch_indices", "dst_state_batch_indices"])
@pytest.mark.parametrize("shape,params", SSU_BAD_SLOT_SHAPES, ids=_ids(SSU_BAD_SLOT_SHAPES))
def test_selective_state_update_cuda_bad_slot_is_padding(shape, params, index_name, bad_name,
                                                         bad):
    """The bad row in the middle of the batch: its neighbours on both sides are updated."""
    kw = ssu_inputs(dst=(1, 3, 5), **params)
    kw_gpu = _check_bad_slot(ops.selective_state_update, kw, index_name, 1, bad, 6,
                                ("out", "ssm_state"), kw["x"].dtype)
    assert (kw_gpu["out"].cpu()[1] == SENTINEL).all()


def _check_malformed_qsl(op, kw, qsl, packed, states_name, dtype):
    """Runs op on the device with query_start_loc = qsl. Clamped starts in order: the result is
    the CPU op's over the tokens of the clamped sequences. Otherwise: token rows outside every
    clamped sequence and slots of no row keep their values."""
    ranges = _clamped_ranges(qsl, QSL_T)
    kw_gpu = {k: to_cuda(v) for k, v in kw.items()}
    kw_gpu["query_start_loc"] = torch.tensor(qsl, dtype=torch.int32, device=CUDA)
    before_states = kw[states_name].clone()
    op(**kw_gpu)
    out = kw_gpu["out"].cpu()
    covered = {t for b, e in ranges for t in range(b, e)}
    untouched = [t for t in range(QSL_T) if t not in covered]
    assert (out[untouched] == SENTINEL).all(), "out rows outside every sequence were written"
    assert_slots_untouched(kw_gpu[states_name].cpu(), before_states, kw["cache_indices"].tolist())
    begins = [b for b, _ in ranges]
    if begins != sorted(begins):
        return
    first, last = ranges[0][0], ranges[-1][1]
    expect = _cpu_copy(kw)
    for n in packed:
        if expect.get(n) is not None:
            expect[n] = expect[n][first:last]
    expect["out"] = kw["out"][first:last].clone()
    expect["query_start_loc"] = torch.tensor([b - first for b in begins] + [last - first],
                                             dtype=torch.int32)
    _cpu_op(op, expect)
    assert_matches_cpu(kw_gpu["out"][first:last], expect["out"], dtype, "out")
    assert_matches_cpu(kw_gpu[states_name], expect[states_name], dtype, states_name)


@pytest.mark.usefixtures("_device_index_checks_only")
@pytest.mark.parametrize("chunk", [None, 2], ids=["auto", "chunk2"])
@pytest.mark.parametrize("name,qsl", QSL_CASES, ids=[c[0] for c in QSL_CASES])
def test_causal_conv1d_cuda_malformed_query_start_loc(name, qsl, chunk):
    kw = conv_inputs(varlen=True, seqlens=(3, 2, 4), slots=(1, 0, 4), initial=(True, True, False))
    kw["chunk_len"] = chunk or 0
    _check_malformed_qsl(ops.causal_conv1d, kw, qsl, ("x",), "conv_states", kw["x"].dtype)


@pytest.mark.usefixtures("_device_index_checks_only")
@pytest.mark.parametrize("plan,params,split", SCAN_PLANS, ids=[c[0] for c in SCAN_PLANS])
@pytest.mark.parametrize("name,qsl", QSL_CASES, ids=[c[0] for c in QSL_CASES])
def test_selective_scan_cuda_malformed_query_start_loc(name, qsl, plan, params, split):
    kw = scan_inputs(varlen=True, seqlens=(3, 2, 4), slots=(1, 0, 3),
                     initial=(True, True, False), split_len=split, **params)
    _check_malformed_qsl(ops.selective_scan, kw, qsl, ("u", "delta", "B", "C", "z"),
                         "ssm_states", kw["u"].dtype)
