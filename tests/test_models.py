"""TP models against transformers: Mamba, Falcon-Mamba, Mamba-2 (G = 1 and G = 4) at tp 1-4.

One spawn of `tp` gloo ranks per (family, tp) runs every check on tiny random checkpoints built
and saved here with transformers; the oracle outputs are computed once per family in this
process. Errors are max |ours - hf| / max |hf| over the compared logits (fp32).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import hf_models as H  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

FAMILIES = list(H.FAMILY_SPECS)
TPS = [1, 2, 3, 4]
DECODE_STEPS = 8
TOL = 1e-4          # vs transformers, fp32
SELF_TOL = 1e-5     # ours vs ours along another path (chunking, batching)
BACKEND = H.pick_backend()
LIMIT = (0.02, 0.05)   # a non-default Mamba-2 time_step_limit that bites


def _prompts():
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 5, 17, 1)]


class _Oracles:
    def __init__(self, root):
        self.root = root
        self.cache = {}

    def get(self, family):
        if family not in self.cache:
            self.cache[family] = self._build(family)
        return self.cache[family]

    def _build(self, family):
        model = H.build_hf_model(family, seed=7)
        path = str(self.root / family)
        H.save_hf_model(model, path)
        prompts = _prompts()
        out = dict(path=path, prompts=prompts, family=family)
        out["full"] = [H.hf_full_logits(model, p) for p in prompts]
        greedy = [H.hf_greedy(model, p, DECODE_STEPS) for p in prompts]
        out["tokens"] = [t for t, _ in greedy]
        out["step_logits"] = [lg for _, lg in greedy]
        out["mixer_bytes"] = sum(p.numel() * p.element_size()
                                 for n, p in model.named_parameters() if ".mixer." in n)
        out["all_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        # An untied head is a tensor of its own, split by vocabulary rows under TP.
        out["head_bytes"] = (0 if head.data_ptr() == emb.data_ptr()
                             else head.numel() * head.element_size())
        if family == "mamba2_g4":
            H.per_group_gated_norm(model)
            out["full_per_group"] = [H.hf_full_logits(model, p) for p in prompts]
        if family == "mamba2_g1":
            limited = H.build_hf_model(family, seed=7, time_step_limit=LIMIT)
            lpath = str(self.root / (family + "_limit"))
            H.save_hf_model(limited, lpath)
            out["limit_path"] = lpath
            out["full_limit"] = [H.hf_full_logits(limited, p) for p in prompts]
        return out


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    return _Oracles(tmp_path_factory.mktemp("hf_models"))


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _qsl(lengths):
    return torch.cumsum(_i32([0] + list(lengths)), 0, dtype=torch.int32)


def _rank_checks(rank, world, oracle, backend):
    """Runs on every rank; returns the measured errors and tokens."""
    from tpssm.generate import generate
    from tpssm.models import SSMForCausalLM
    from tpssm.parallel import TPContext

    ctx = TPContext()
    assert ctx.world_size == world and ctx.rank == rank
    model = SSMForCausalLM.from_pretrained(oracle["path"], ctx, backend=backend)
    prompts = oracle["prompts"]
    n = len(prompts)
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    qsl = _qsl(lens)
    res = {}
    err = H.max_rel_err

    with torch.no_grad():
        # Full prefill of every prompt in one packed, stateless batch.
        all_logits = model(ids, qsl, return_all_logits=True)
        per_prompt = list(all_logits.split(lens))
        res["full"] = max(err(a, b) for a, b in zip(per_prompt, oracle["full"]))
        last = model(ids, qsl)
        res["last_vs_all"] = err(last, torch.stack([a[-1] for a in per_prompt]))
        # The same requests one by one.
        res["batch_vs_single"] = max(
            err(model(torch.tensor(p), _qsl([len(p)]), return_all_logits=True), a)
            for p, a in zip(prompts, per_prompt))

        # Prefill through the cache, then 8 decode steps fed with transformers' greedy tokens;
        # the decode batch carries a padding row (slot -1) that must not disturb the others.
        cache = model.allocate_cache(n + 2)
        cache.allocate()  # slots in use by someone else: the requests get slots 1..n
        slots = cache.allocate(n)
        logits = model(ids, qsl, _i32(slots), torch.zeros(n, dtype=torch.bool), cache)
        errs = [err(logits[i], oracle["step_logits"][i][0]) for i in range(n)]
        ours = [[int(logits[i].argmax())] for i in range(n)]
        for step in range(DECODE_STEPS):
            toks = [oracle["tokens"][i][step] for i in range(n)]
            step_ids = torch.tensor(toks[:1] + [0] + toks[1:])
            step_slots = _i32(slots[:1] + [-1] + slots[1:])
            out = model.decode(step_ids, step_slots, cache)
            out = torch.cat([out[:1], out[2:]])
            for i in range(n):
                errs.append(err(out[i], oracle["step_logits"][i][step + 1]))
                ours[i].append(int(out[i].argmax()))
        res["decode"] = max(errs)
        res["greedy_tokens"] = ours
        res["generate"] = generate(model, prompts, DECODE_STEPS + 1)

        # Chunked prefill (3 chunks through the cache) vs our one-shot prefill, then decode.
        p = prompts[2]
        c2 = model.allocate_cache(2)
        s = c2.allocate()
        chunks = [(0, 6), (6, 11), (11, len(p))]
        parts = [model(torch.tensor(p[a:b]), _qsl([b - a]), _i32([s]), torch.tensor([k > 0]),
                       c2, return_all_logits=True) for k, (a, b) in enumerate(chunks)]
        res["chunked"] = err(torch.cat(parts), per_prompt[2])
        errs = []
        for step in range(DECODE_STEPS):
            out = model.decode(torch.tensor([oracle["tokens"][2][step]]), _i32([s]), c2)
            errs.append(err(out[0], oracle["step_logits"][2][step + 1]))
        res["chunked_decode"] = max(errs)

        # One batch mixing a decode token, a continuation chunk and a new request.
        def mixed_batch():
            c3 = model.allocate_cache(3)
            sa, sb, sc = c3.allocate(3)
            model(torch.tensor(prompts[0]), _qsl([lens[0]]), _i32([sa]), torch.tensor([False]),
                  c3)
            model(torch.tensor(p[:9]), _qsl([9]), _i32([sb]), torch.tensor([False]), c3)
            mixed_ids = torch.tensor([oracle["tokens"][0][0]] + p[9:] + prompts[1])
            return model(mixed_ids, _qsl([1, len(p) - 9, lens[1]]), _i32([sa, sb, sc]),
                         torch.tensor([True, True, False]), c3), c3

        mixed, mixed_cache = mixed_batch()
        res["mixed"] = max(err(mixed[0], oracle["step_logits"][0][1]),
                           err(mixed[1], per_prompt[2][-1]), err(mixed[2], per_prompt[1][-1]))

        if world > 1:  # at tp 1 there is nothing to split
            # Sequence parallelism on every prefill step (min_tokens=1, so the steps of 1-34 tokens
            # leave ranks with padding rows, some with nothing but padding): the all-reduce path's
            # results, with out_proj reduce-scattered (counted) and the norms on a rank's rows.
            model.set_sequence_parallel(True, min_tokens=1)
            res.update(H.sequence_parallel_errors(model, ids, qsl, lens, oracle, all_logits, last,
                                                  model.allocate_cache(n), DECODE_STEPS))
            c5 = model.allocate_cache(1)
            s5 = c5.allocate()
            sp_parts = [model(torch.tensor(p[a:b]), _qsl([b - a]), _i32([s5]),
                              torch.tensor([k > 0]), c5, return_all_logits=True)
                        for k, (a, b) in enumerate(chunks)]
            res["sp_chunked"] = err(torch.cat(sp_parts), torch.cat(parts))
            sp_mixed, sp_mixed_cache = mixed_batch()
            res["sp_mixed"] = err(sp_mixed, mixed)
            res["sp_states"] = max(
                err(a.float(), b.float())
                for a, b in zip(sp_mixed_cache.conv_states + sp_mixed_cache.ssm_states,
                                mixed_cache.conv_states + mixed_cache.ssm_states))
            model.set_sequence_parallel(False)

        # Slot reuse after free gives what a fresh cache gives, bit for bit.
        def run(c, slot):
            outs = [model(torch.tensor(prompts[0]), _qsl([lens[0]]), _i32([slot]),
                          torch.tensor([False]), c)]
            for step in range(DECODE_STEPS):
                outs.append(model.decode(torch.tensor([oracle["tokens"][0][step]]),
                                         _i32([slot]), c))
            return torch.cat(outs)

        c4 = model.allocate_cache(1)
        s = c4.allocate()
        model(torch.tensor(p), _qsl([len(p)]), _i32([s]), torch.tensor([False]), c4)
        model.decode(torch.tensor([5]), _i32([s]), c4)
        c4.free(s)
        reused = run(c4, c4.allocate())
        fresh_cache = model.allocate_cache(1)
        res["reuse_equal"] = bool(torch.equal(reused, run(fresh_cache, fresh_cache.allocate())))

        res["mixer_bytes"] = sum(
            t.numel() * t.element_size() for layer in model.layers
            for name, t in list(layer.mixer.named_parameters()) + list(layer.mixer.named_buffers())
            if name != "norm_group_index")
        res["bytes_read"] = model.bytes_read
        res["ssm_bytes_per_slot"] = sum(t[0].numel() * t.element_size()
                                        for t in cache.ssm_states)

        if "full_per_group" in oracle:
            pg = SSMForCausalLM.from_pretrained(oracle["path"], ctx, backend=backend,
                                                gated_norm="per_group")
            lg = pg(ids, qsl, return_all_logits=True).split(lens)
            res["full_per_group"] = max(err(a, b) for a, b in zip(lg, oracle["full_per_group"]))
        if "full_limit" in oracle:
            lm = SSMForCausalLM.from_pretrained(oracle["limit_path"], ctx, backend=backend)
            lg = lm(ids, qsl, return_all_logits=True).split(lens)
            res["full_limit"] = max(err(a, b) for a, b in zip(lg, oracle["full_limit"]))
    return res


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_model_matches_transformers(family, tp, oracles, record_property):
    oracle = oracles.get(family)
    results = run_distributed(_rank_checks, tp, oracle, BACKEND, timeout=540)
    r = results[0]
    summary = (f"LOGIT_ERR backend={BACKEND} family={family} tp={tp} full={r['full']:.2e} "
               f"decode={r['decode']:.2e} chunked={r['chunked']:.2e} mixed={r['mixed']:.2e}")
    for key in ("full_per_group", "full_limit"):
        if key in r:
            summary += f" {key}={r[key]:.2e}"
    print(summary)
    record_property("logit_errors", summary)

    for rank, other in enumerate(results):
        assert other["greedy_tokens"] == r["greedy_tokens"], f"rank {rank} disagrees"
        assert other["generate"] == r["generate"], f"rank {rank} disagrees"
    assert r["full"] <= TOL, summary
    assert r["decode"] <= TOL, summary
    assert r["greedy_tokens"] == oracle["tokens"]
    assert r["generate"] == oracle["tokens"]
    assert r["last_vs_all"] <= SELF_TOL
    assert r["batch_vs_single"] <= SELF_TOL
    assert r["chunked"] <= SELF_TOL, summary
    assert r["chunked_decode"] <= TOL, summary
    assert r["mixed"] <= TOL, summary
    assert r["reuse_equal"]
    if tp > 1:
        assert r["sp_scatters"] == H.FAMILY_SPECS[family]["cfg"]["num_hidden_layers"], summary
        assert r["sp_full"] <= TOL, summary
        assert r["sp_decode"] <= TOL, summary
        for key in ("sp_vs_plain", "sp_last", "sp_chunked", "sp_mixed", "sp_states"):
            assert r[key] <= SELF_TOL, (key, r[key])
    if "full_per_group" in r:
        assert r["full_per_group"] <= TOL, summary
    if "full_limit" in r:
        assert r["full_limit"] <= TOL, summary
    # Per-rank mixer weights are 1/tp of the checkpoint's when every mixer tensor is sharded
    # (everything but the Mamba-2 B / C groups, which G = 1 replicates).
    if tp in (2, 4) and family != "mamba2_g1":
        for rank, other in enumerate(results):
            ratio = other["mixer_bytes"] / (oracle["mixer_bytes"] / tp)
            assert abs(ratio - 1.0) <= 0.05, (rank, ratio)
            # The loader read only the rank's slices (plus the replicated embedding and norms).
            sharded = oracle["mixer_bytes"] + oracle["head_bytes"]
            expect = oracle["all_bytes"] - sharded + sharded / tp
            assert abs(other["bytes_read"] / expect - 1.0) <= 0.05, (rank, other["bytes_read"])
    # The fp32 SSM state is partitioned exactly: the ranks' slots add up to one full slot.
    cfg = H.FAMILY_SPECS[family]["cfg"]
    full_state = (cfg["num_hidden_layers"] * cfg["expand"] * cfg["hidden_size"]
                  * cfg["state_size"] * 4)
    assert sum(o["ssm_bytes_per_slot"] for o in results) == full_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norms_equal_transformers_bit_for_bit(dtype):
    """The block norm and Falcon-Mamba's weightless dt / B / C norms (tpssm.ops.gated_rms_norm:
    three groups of x_proj's row in one op) round exactly like transformers' MambaRMSNorm /
    FalconMambaWeightlessRMSNorm applied to each segment."""
    from transformers.models.falcon_mamba.modeling_falcon_mamba import (
        FalconMambaWeightlessRMSNorm)
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    from tpssm import ops
    from tpssm.models.model import RMSNorm

    g = torch.Generator().manual_seed(7)
    for dim in (37, 2560):
        x = (torch.randn(129, dim, generator=g) * 3).to(dtype)
        weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
        ours = RMSNorm(dim, 1e-5, dtype, "cpu")
        theirs = MambaRMSNorm(dim, eps=1e-5).to(dtype)
        with torch.no_grad():
            ours.weight.copy_(weight)
            theirs.weight.copy_(weight)
            assert torch.equal(ours(x), theirs(x)), dim
    # x_proj's row: dt (R columns), then B and C (N each).
    for R, N in ((5, 4), (160, 16)):
        x = (torch.randn(33, R + 2 * N, generator=g) * 3).to(dtype)
        hf = FalconMambaWeightlessRMSNorm(R + 2 * N, eps=1e-6)
        want = torch.cat([hf(x[:, :R]), hf(x[:, R:R + N]), hf(x[:, R + N:])], 1)
        got = ops.gated_rms_norm(x, None, 1e-6, group_size=N, first_group_size=R)
        assert torch.equal(got, want), (R, N)


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
def test_decode_dt_proj_fused_equals_the_gemm_path(family, oracles):
    """Small decode batches project dt inside the state update; larger ones keep the dt_proj
    GEMM (Mamba1Mixer.fuse_dt_proj_max_batch). Both paths give the same steps (the model test
    against transformers runs the fused one)."""
    from tpssm.models import load_model

    model = load_model(oracles.get(family)["path"], backend=BACKEND)
    prompts = _prompts()
    logits = {}
    for fused in (True, False):
        for layer in model.layers:
            layer.mixer.fuse_dt_proj_max_batch = 8 if fused else 0
        cache = model.allocate_cache(len(prompts))
        slots = _i32(cache.allocate(len(prompts)))
        ids = torch.tensor([t for p in prompts for t in p])
        out = model(ids, _qsl([len(p) for p in prompts]), slots,
                    torch.zeros(len(prompts), dtype=torch.bool), cache)
        steps = []
        for _ in range(DECODE_STEPS):
            out = model.decode(out.argmax(-1), slots, cache)
            steps.append(out)
        logits[fused] = torch.stack(steps)
    err = ((logits[True] - logits[False]).abs().max() / logits[False].abs().max()).item()
    assert err <= 1e-5, err
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
