"""Random cases of the four ops through the emulated CUDA kernels against the fp64 references:
dtypes, Mamba1 / Mamba2 forms, dstate 1..128, dense and varlen batches with empty and short
sequences, padded rows, aligned and misaligned column slices, 16-bit and strided state pools,
forced scan / conv chunk lengths and both scan plans; and gemv_conv_update (half the time with its
norm prologue, then after add_rms_norm) against gemv followed by the conv update (bit for bit)
and the fp64 reference; decode_attention (key splits, bad rows and lengths, misaligned slices)
against the fp64 reference.  Usage: fuzz.py SEED ITERATIONS"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
import torch

import build as emu_build

emu = emu_build.build()
import tpssm.ops as tops
from tpssm import ops
from tpssm.reference import (causal_conv1d_ref, causal_conv1d_update_ref, decode_attention_ref,
                             gemv_ref, selective_scan_ref, selective_state_update_ref)
tops._ops = emu
SENT = 7.0
rng = random.Random(int(sys.argv[1]))
torch.manual_seed(int(sys.argv[1]))  # the tensors' values too: a failing seed reproduces
N = int(sys.argv[2])
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

def act(shape, dtype, layout, scale=1.0, offset=0.0):
    v = (torch.randn(*shape) * scale + offset)
    if layout == "contig":
        return v.to(dtype)
    C = shape[-1]
    lead, pad = (8, 16) if layout == "aligned" else (rng.choice([1, 2, 3]), 5)
    wide = torch.zeros(*shape[:-1], C + pad, dtype=dtype)
    view = wide[..., lead:lead + C]
    view.copy_(v.to(dtype))
    return view

def close(a, b, dtype, what):
    a, b = a.double(), b.double()
    # Without softplus a negative dt grows the state: 16-bit outputs may overflow in the
    # reference too. Near the type's maximum, rounding decides whether an element overflows, so
    # there one side may be inf and the other finite (same sign); any other mismatch (a NaN, an
    # inf far from the limit) fails. The elements finite on both sides are compared.
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    diff = fa != fb
    if diff.any():
        finite_side, other = torch.where(fa, a, b)[diff], torch.where(fa, b, a)[diff]
        edge = torch.finfo(dtype).max / 2
        ok = (torch.isinf(other) & (finite_side.abs() >= edge)
              & (torch.sign(other) == torch.sign(finite_side)))
        assert ok.all(), f"{what}: non-finite values differ"
    fin = fa & fb
    a, b = a[fin], b[fin]
    tol = {f32: 2e-4, bf16: 3e-2, f16: 4e-3}[dtype] * max(1.0, b.abs().max().item() if b.numel() else 1)
    err = (a - b).abs().max().item() if a.numel() else 0
    assert err <= tol and not torch.isnan(a).any(), f"{what}: err {err} tol {tol}"

def seqs():
    varlen = rng.random() < 0.6
    if varlen:
        L = [rng.choice([0, 0, 1, 1, 2, 3, 5, 9, 17]) for _ in range(rng.randint(1, 5))]
    else:
        L = [rng.choice([1, 2, 3, 6, 11])] * rng.randint(1, 3)
    return varlen, L

def qsl_of(L):
    q = [0]
    for n in L: q.append(q[-1] + n)
    return torch.tensor(q, dtype=torch.int32)

def slots_for(nb, num_slots, allow_pad=True):
    s = list(range(num_slots)); rng.shuffle(s); s = s[:nb]
    return [x if (not allow_pad or rng.random() < 0.75) else -1 for x in s]

def fuzz_scan(it):
    dtype = rng.choice([f32, f32, bf16, f16])
    m1 = rng.random() < 0.4
    # The SSD kernel's shapes: 16-bit Mamba2 form with headdim and dstate 64 or 128.
    ssd = not m1 and dtype != f32 and rng.random() < 0.4
    dstate = rng.choice([64, 128] if ssd else [1, 4, 5, 16, 16, 32, 40, 48, 64])
    if m1:
        # 40 channels: rows of whole 16-byte packs, so the staged walk's row copies run.
        nheads = rng.choice([3, 7, 33, 40]); headdim = rng.choice([1, 1, 2]); ngroups = 1
    else:
        nheads = rng.choice([1, 2] if ssd else [2, 4, 6])
        headdim = rng.choice([64, 128] if ssd else [1, 2, 4, 8])
        ngroups = rng.choice([g for g in (1, 2, 3, 6) if nheads % g == 0])
    dim = nheads * headdim
    varlen, L = seqs(); nb = len(L)
    tok = (sum(L),) if varlen else (nb, L[0])
    lay = lambda: rng.choice(["contig", "contig", "aligned", "mis"])
    u = act(tok + (dim,), dtype, lay())
    delta = act(tok + (nheads,), dtype, lay(), 0.5)
    A = (-torch.rand(nheads, dstate) * 2) if m1 else -torch.rand(nheads) * 2
    gd = rng.random() < 0.7 or ngroups > 1
    B = act(tok + (ngroups * dstate,), dtype, lay()); C = act(tok + (ngroups * dstate,), dtype, lay())
    if gd:
        B = B.unflatten(-1, (ngroups, dstate)); C = C.unflatten(-1, (ngroups, dstate))
    D = torch.randn(nheads) if rng.random() < 0.7 else None
    z = act(tok + (dim,), dtype, lay()) if rng.random() < 0.7 else None
    db = torch.randn(nheads) * 0.5 if rng.random() < 0.7 else None
    sp = rng.random() < 0.7
    num_slots = nb + 2
    sdt = rng.choice([f32, f32, dtype])
    states = None
    if rng.random() < 0.85:
        shape = (num_slots, dim, dstate) if (headdim == 1 and rng.random() < 0.5) else (num_slots, nheads, headdim, dstate)
        states = torch.randn(shape).to(sdt)
    ci = torch.tensor(slots_for(nb, num_slots), dtype=torch.int32) if (rng.random() < 0.8) else None
    his = torch.tensor([rng.random() < 0.5 for _ in range(nb)]) if states is not None and rng.random() < 0.8 else None
    qsl = qsl_of(L) if varlen else None
    pad = -1
    out = act(tok + (dim,), dtype, lay()).fill_(SENT)
    kw = dict(D=D, z=z, delta_bias=db, delta_softplus=sp, query_start_loc=qsl, cache_indices=ci,
              has_initial_state=his, pad_slot_id=pad)
    rs = None if states is None else states.clone(); ro = out.clone()
    selective_scan_ref(u, delta, A, B, C, ssm_states=rs, out=ro, compute_dtype=torch.float64, **kw)
    # The staged walk (A per state, dstate <= 16, one group) also runs forced to 2 / 4 / 8 lanes
    # a channel; with 1 SM the launcher picks more lanes by itself.
    lanes = rng.choice([0, 2, 4, 8]) if m1 and dstate <= 16 and ngroups == 1 else 0
    for chunk in rng.sample([None, 1, 2, 3, 7], 2):
        for sms in ([132, 1] if chunk is None else [132]):
            emu.set_sm_count(sms)
            st = None if states is None else states.clone(); o = out.clone()
            ops.selective_scan(u, delta, A, B, C, ssm_states=st, out=o, split_len=chunk or 0,
                               lanes_per_channel=lanes, **kw)
            tag = (f"scan it {it} chunk {chunk} sms {sms} m1 {m1} N {dstate} dt {dtype} "
                   f"lanes {lanes}")
            close(o, ro, dtype, tag + " out")
            if st is not None: close(st.float(), rs.float(), sdt if sdt != f32 else dtype, tag + " state")

def fuzz_conv(it):
    dtype = rng.choice([f32, bf16, f16]); W = rng.choice([2, 3, 4])
    dim = rng.choice([1, 8, 37, 64, 136, 256])
    varlen, L = seqs(); nb = len(L)
    tok = (sum(L),) if varlen else (nb, L[0])
    lay = rng.choice(["contig", "aligned", "mis"])
    x = act(tok + (dim,), dtype, lay)
    w = (torch.randn(dim, W) * 0.5).to(dtype)
    if rng.random() < 0.3: w = (torch.randn(W, dim) * 0.5).to(dtype).t()
    bias = (torch.randn(dim) * 0.5).to(dtype) if rng.random() < 0.7 else None
    num_slots = nb + 2
    states = torch.randn(num_slots, dim, W - 1).to(dtype) if rng.random() < 0.85 else None
    if states is not None and rng.random() < 0.3:
        states = torch.randn(num_slots, W - 1, dim).to(dtype).transpose(1, 2)
    ci = torch.tensor(slots_for(nb, num_slots, True), dtype=torch.int32) if rng.random() < 0.8 else None
    his = torch.tensor([rng.random() < 0.5 for _ in range(nb)]) if states is not None and rng.random() < 0.8 else None
    act_ = rng.choice([None, "silu"])
    out = act(tok + (dim,), dtype, rng.choice(["contig", "aligned", "mis"])).fill_(SENT)
    kw = dict(query_start_loc=qsl_of(L) if varlen else None, cache_indices=ci, has_initial_state=his, activation=act_)
    rs = None if states is None else states.clone(); ro = out.clone()
    causal_conv1d_ref(x, w, bias, conv_states=rs, out=ro, compute_dtype=torch.float64, **kw)
    for chunk in rng.sample([None, 1, 2, 3, 5], 2):
        st = None if states is None else states.clone(); o = out.clone()
        ops.causal_conv1d(x, w, bias, conv_states=st, out=o, chunk_len=chunk or 0, **kw)
        close(o, ro, dtype, f"conv it {it} chunk {chunk}")
        if st is not None: assert torch.equal(st, rs), f"conv state it {it} chunk {chunk}"
    # decode update
    b = rng.randint(1, 4); sl = rng.choice([None, 1, 3])
    xs = act((b,) + (() if sl is None else (sl,)) + (dim,), dtype, rng.choice(["contig", "mis", "aligned"]))
    st0 = torch.randn(b + 2, dim, W - 1).to(dtype)
    ci = torch.tensor(slots_for(b, b + 2), dtype=torch.int32) if rng.random() < 0.8 else None
    o0 = torch.full_like(xs, SENT)
    rs = st0.clone(); ro = o0.clone()
    causal_conv1d_update_ref(xs, rs, w, bias, activation=act_, cache_indices=ci, out=ro, compute_dtype=torch.float64)
    st = st0.clone(); o = o0.clone()
    ops.causal_conv1d_update(xs, st, w, bias, activation=act_, cache_indices=ci, out=o)
    close(o, ro, dtype, f"conv_update it {it}"); assert torch.equal(st, rs), f"conv_update state {it}"

def fuzz_ssu(it):
    dtype = rng.choice([f32, bf16, f16])
    m1 = rng.random() < 0.4
    dstate = rng.choice([1, 5, 8, 16, 40, 64, 128])
    if m1:
        nheads = rng.choice([3, 16, 33]); headdim = rng.choice([1, 1, 4]); ngroups = 1
    else:
        nheads = rng.choice([2, 4]); headdim = rng.choice([1, 3, 4, 8, 12]); ngroups = rng.choice([1, 2])
    dim = nheads * headdim
    b = rng.randint(1, 5); num_slots = 2 * b + 1
    sdt = rng.choice([f32, dtype])
    state = torch.randn(num_slots, nheads, headdim, dstate).to(sdt)
    if rng.random() < 0.3:  # a strided pool: slots interleaved with another buffer
        big = torch.randn(num_slots, 2, nheads, headdim, dstate).to(sdt); state = big[:, 1]
    x3 = rng.random() < 0.5 and not m1
    lay = lambda: rng.choice(["contig", "mis", "aligned"])
    def a(ch, **k):
        t = act((b, ch), dtype, lay(), **k)
        return t
    x = a(dim); z = a(dim) if rng.random() < 0.7 else None
    if x3:
        x = x.unflatten(-1, (nheads, headdim)); z = None if z is None else z.unflatten(-1, (nheads, headdim))
    dt = a(nheads, scale=0.5)
    A = (-torch.rand(nheads, dstate) * 2) if m1 else -torch.rand(nheads) * 2
    B = a(ngroups * dstate).unflatten(-1, (ngroups, dstate)); C = a(ngroups * dstate).unflatten(-1, (ngroups, dstate))
    D = torch.randn(nheads) if rng.random() < 0.7 else None
    db = torch.randn(nheads) * 0.5 if rng.random() < 0.7 else None
    perm = list(range(num_slots)); rng.shuffle(perm)
    src = perm[:b]; dst = perm[b:2 * b] if rng.random() < 0.5 else None
    src = [s if rng.random() < 0.8 else -1 for s in src]
    if dst is not None: dst = [d if rng.random() < 0.8 else -1 for d in dst]
    srct = torch.tensor(src, dtype=torch.int32) if rng.random() < 0.9 else None
    if srct is None: src = list(range(b)); dst = None
    dstt = None if dst is None else torch.tensor(dst, dtype=torch.int32)
    out = torch.full_like(x, SENT)
    kw = dict(D=D, z=z, dt_bias=db, dt_softplus=rng.random() < 0.7, state_batch_indices=srct,
              dst_state_batch_indices=dstt)
    rs = state.clone(); ro = out.clone()
    selective_state_update_ref(rs, x, dt, A, B, C, out=ro, compute_dtype=torch.float64, **kw)
    st = state.clone(); o = out.clone()
    ops.selective_state_update(st, x, dt, A, B, C, out=o, **kw)
    close(o, ro, dtype, f"ssu it {it} m1 {m1} N {dstate} hd {headdim}")
    close(st.float(), rs.float(), sdt if sdt != f32 else dtype, f"ssu state it {it}")

def fuzz_gemv_conv(it):
    dtype = rng.choice([f32, bf16, f16]); W = rng.choice([2, 3, 4])
    m = rng.randint(1, 8); k = rng.choice([8, 40, 100, 264, 776]); n = rng.choice([3, 19, 45, 96])
    start = rng.randint(0, n - 1); dim = rng.randint(1, n - start)
    x = act((m, k), dtype, rng.choice(["contig", "aligned", "mis"]))
    w = act((n, k), dtype, rng.choice(["contig", "aligned", "mis"]), scale=k ** -0.5)
    bias = torch.randn(n).to(dtype) if rng.random() < 0.5 else None
    cw = (torch.randn(dim, W) * 0.5).to(dtype)
    if rng.random() < 0.3: cw = (torch.randn(W, dim) * 0.5).to(dtype).t()
    cb = (torch.randn(dim) * 0.5).to(dtype) if rng.random() < 0.7 else None
    num_slots = m + 2
    st0 = torch.randn(num_slots, dim, W - 1).to(dtype)
    if rng.random() < 0.3: st0 = torch.randn(num_slots, W - 1, dim).to(dtype).transpose(1, 2)
    ci = torch.tensor(slots_for(m, num_slots), dtype=torch.int32) if rng.random() < 0.8 else None
    act_ = rng.choice([None, "silu"])
    opts = dict(warps_per_row=rng.choice([0, 1, 2, 4, 8]), rows_per_warp=rng.choice([0, 1, 2, 4]))
    out = act((m, n), dtype, rng.choice(["contig", "aligned", "mis"])).fill_(SENT)
    # half the time with the norm prologue: the product of add_rms_norm(x, ...), x the raw input
    h, norm, stream = x, {}, None
    if rng.random() < 0.5:
        nw = (1 + torch.randn(k) / 4).to(dtype)
        rdt = rng.choice([None, f32, dtype])
        res = None if rdt is None else (2 * torch.randn(m, k)).to(rdt)
        eps = rng.choice([1e-5, 1e-6])
        norm = dict(norm_weight=nw, residual=res, norm_eps=eps,
                    residual_out=None if res is None else torch.full_like(res, SENT))
        stream = None if res is None else res.clone()
        h = ops.add_rms_norm(x, nw, eps, residual=stream)
    st = st0.clone(); o = out.clone()
    ops.gemv_conv_update(x, w, bias, st, cw, cb, conv_start=start, activation=act_,
                         cache_indices=ci, out=o, **opts, **norm)
    if stream is not None:
        assert torch.equal(norm["residual_out"], stream), f"gemv_conv residual it {it}"
    # (add_rms_norm,) gemv, then the conv update of the conv columns (a padded row keeps the
    # product there)
    sep_st = st0.clone(); sep = ops.gemv(h, w, bias, **opts)
    cols = sep[:, start:start + dim]
    ops.causal_conv1d_update(cols.clone(), sep_st, cw, cb, activation=act_, cache_indices=ci,
                             out=cols)
    assert torch.equal(o, sep) and torch.equal(st, sep_st), f"gemv_conv it {it}"
    ref_st = st0.clone(); ref = gemv_ref(h, w, bias)
    rcols = ref[:, start:start + dim]
    causal_conv1d_update_ref(rcols.clone(), ref_st, cw, cb, activation=act_, cache_indices=ci,
                             out=rcols, compute_dtype=torch.float64)
    close(o, ref, dtype, f"gemv_conv ref it {it}"); close(st, ref_st, dtype, f"gemv_conv st {it}")

def fuzz_attention(it):
    dtype = rng.choice([f32, bf16, f16]); B = rng.randint(1, 6); H = rng.randint(1, 4)
    hd = rng.choice([1, 7, 32, 64, 80, 129, 160, 256]); L = rng.choice([1, 5, 64, 65, 200])
    slots = rng.randint(1, 5)
    k, v = (act((slots, H, L, hd), dtype, rng.choice(["contig", "aligned", "mis"]))
            for _ in range(2))
    q = act((B, H, hd), dtype, rng.choice(["contig", "aligned", "mis"]))
    index_dtype = rng.choice([torch.int32, torch.int64])
    rows = torch.tensor([rng.randint(-2, slots + 1) for _ in range(B)], dtype=index_dtype)
    lengths = torch.tensor([rng.randint(-1, L + 3) for _ in range(B)], dtype=index_dtype)
    splits, scale = rng.choice([0, 1, 2, 3, 8, 32]), rng.uniform(0.05, 1.0)
    out = act((B, H, hd), dtype, rng.choice(["contig", "aligned", "mis"])).fill_(SENT)
    ops.decode_attention(q, k, v, rows, lengths, scale, out=out, num_splits=splits)
    ref = decode_attention_ref(q, k, v, rows, lengths, scale)
    close(out, ref, dtype, f"attention it {it} ({splits} splits)")

for it in range(N):
    fuzz_conv(it); fuzz_scan(it); fuzz_ssu(it); fuzz_gemv_conv(it); fuzz_attention(it)
print("fuzz ok", N)
