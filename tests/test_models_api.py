"""Model API around the TP numerics: config parsing, checkpoint formats, backends, generate,
the engine adapter, and the errors a caller can hit."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import hf_models as H  # noqa: E402
from dist_utils import run_distributed  # noqa: E402
from tpssm.generate import generate, select_tokens  # noqa: E402
from tpssm.models import SSMForCausalLM, load_config, parse_config  # noqa: E402

BACKEND = H.pick_backend()
PROMPTS = [[5, 100, 27, 3, 9, 200, 14], [77, 1, 2], [31]]


def _qsl(lengths):
    return torch.cumsum(torch.tensor([0] + list(lengths), dtype=torch.int32), 0,
                        dtype=torch.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in ("mamba", "mamba2_g4"):
        model = H.build_hf_model(family, seed=3)
        path = str(root / family)
        H.save_hf_model(model, path)
        out[family] = (model, path)
    return out


@pytest.mark.parametrize("family", list(H.FAMILY_SPECS))
def test_config_matches_transformers_defaults(family, tmp_path):
    import transformers

    spec = H.FAMILY_SPECS[family]
    cfg_cls = getattr(transformers, spec["cls"].replace("ForCausalLM", "Config"))
    # Only the architecture is given: every other field takes transformers' default.
    hf = cfg_cls()
    hf.architectures = [spec["cls"]]
    hf.save_pretrained(tmp_path)
    ours = load_config(str(tmp_path))
    assert ours.hidden_size == hf.hidden_size and ours.vocab_size == hf.vocab_size
    assert ours.num_hidden_layers == hf.num_hidden_layers and ours.state_size == hf.state_size
    assert ours.conv_kernel == hf.conv_kernel and ours.use_bias == hf.use_bias
    assert ours.use_conv_bias == hf.use_conv_bias
    assert ours.layer_norm_epsilon == hf.layer_norm_epsilon
    assert ours.residual_in_fp32 == hf.residual_in_fp32
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.intermediate_size == int(hf.expand * hf.hidden_size)
    if family.startswith("mamba2"):
        assert (ours.num_heads, ours.head_dim, ours.n_groups) == (hf.num_heads, hf.head_dim,
                                                                  hf.n_groups)
        assert ours.time_step_limit == (0.0, math.inf)
        assert ours.gated_norm == "whole"
    else:
        assert ours.time_step_rank == hf.time_step_rank == math.ceil(hf.hidden_size / 16)
    if family == "falcon_mamba":
        assert ours.mixer_rms_eps == hf.mixer_rms_eps


def test_config_spellings_and_errors():
    base = dict(architectures=["Mamba2ForCausalLM"], hidden_size=64, num_heads=8, head_dim=16,
                n_groups=2, state_size=16)
    # transformers 5.18's spelling of infinity, decoded by parse_config itself (a plain
    # json.load of config.json leaves it a dict).
    txt = json.dumps({**base, "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert parse_config(json.loads(txt)).time_step_limit == (0.0, math.inf)
    assert parse_config({**base, "tpssm_gated_norm": "per_group"}).gated_norm == "per_group"
    assert parse_config(base, gated_norm="per_group").gated_norm == "per_group"
    assert parse_config({"model_type": "mamba", "d_model": 32, "n_layer": 2}).num_hidden_layers == 2
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        parse_config({**base, "num_heads": 4})
    with pytest.raises(ValueError, match="n_groups \\(3\\) must divide num_heads"):
        parse_config({**base, "n_groups": 3, "num_heads": 8})
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        parse_config({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="gated_norm must be one of"):
        parse_config(base, gated_norm="group")
    with pytest.raises(ValueError, match="unsupported model"):
        parse_config({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="conv_kernel must be in 2..4"):
        parse_config({**base, "conv_kernel": 5})
    with pytest.raises(ValueError, match="num_hidden_layers must be >= 1, got 0"):
        parse_config({**base, "num_hidden_layers": 0})


def test_time_step_limit_is_read_from_a_transformers_config(tmp_path):
    model = H.build_hf_model("mamba2_g1", time_step_limit=(0.01, float("inf")))
    H.save_hf_model(model, str(tmp_path))
    assert load_config(str(tmp_path)).time_step_limit == (0.01, math.inf)


@torch.no_grad()
def test_sharded_checkpoint_and_state_dict_load_the_same_weights(checkpoints, tmp_path):
    hf, path = checkpoints["mamba2_g4"]
    hf.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    a = SSMForCausalLM.from_pretrained(path, backend=BACKEND)
    b = SSMForCausalLM.from_pretrained(str(tmp_path), backend=BACKEND)
    c = SSMForCausalLM.from_state_dict(a.config, hf.state_dict(), backend=BACKEND)
    for (na, pa), (_, pb), (_, pc) in zip(a.state_dict().items(), b.state_dict().items(),
                                          c.state_dict().items()):
        assert torch.equal(pa, pb) and torch.equal(pa, pc), na
    ids = torch.tensor(PROMPTS[0])
    assert torch.equal(a(ids, _qsl([len(ids)])), b(ids, _qsl([len(ids)])))
    # tp = 1 reads every tensor once.
    assert a.bytes_read == sum(p.numel() * p.element_size() for p in hf.parameters())


def test_unreadable_or_ambiguous_checkpoint_files_are_named(checkpoints, tmp_path):
    import shutil

    _, path = checkpoints["mamba"]
    for case in ("stale", "truncated", "index", "shard"):
        d = tmp_path / case
        shutil.copytree(path, d)
        if case == "stale":   # a second file holding the same names: which one is meant?
            shutil.copy(d / "model.safetensors", d / "model_old.safetensors")
            match = "is stored in both model.safetensors and model_old.safetensors"
        elif case == "truncated":
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[:len(data) // 2])
            match = f"cannot read {d / 'model.safetensors'}: "
        elif case == "index":
            (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
            match = "has no weight_map"
        else:
            (d / "model.safetensors.index.json").write_text(
                '{"weight_map": {"backbone.norm_f.weight": "model-00002.safetensors"}}')
            match = "lists model-00002.safetensors, which is not in"
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            SSMForCausalLM.from_pretrained(str(d), backend=BACKEND)


def test_untied_checkpoint_without_lm_head_is_rejected(checkpoints):
    hf, path = checkpoints["mamba2_g4"]
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    cfg = load_config(path)
    with pytest.raises(KeyError, match="no lm_head.weight"):
        SSMForCausalLM.from_state_dict(cfg, sd, backend=BACKEND)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SSMForCausalLM.from_pretrained(path + "_missing")


def test_checkpoints_the_config_does_not_describe_are_refused(checkpoints):
    """Stored tensors are checked against the config before loading: a wrong shape (which
    copy_ would broadcast, or row offsets would read shifted), a quantized dtype or a bias the
    config leaves out are errors naming the tensor; unused tensors elsewhere warn; a tied
    config's stored head must equal the embedding."""
    import warnings

    hf, path = checkpoints["mamba2_g4"]
    good = hf.state_dict()
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    cfg = parse_config(raw)

    def load(sd, config=cfg):
        return SSMForCausalLM.from_state_dict(config, sd, backend=BACKEND)

    norm = "backbone.norm_f.weight"
    with pytest.raises(ValueError, match=f"{norm} has shape \\(1,\\), but its config implies "
                                         f"\\(64,\\)"):
        load({**good, norm: good[norm][:1]})      # copy_ would broadcast it
    with pytest.raises(ValueError, match="in_proj.weight has shape \\(328, 64\\), but its "
                                         "config implies \\(296, 64\\)"):
        load(good, parse_config({**raw, "n_groups": 2}))   # the rows would be read shifted
    w = "backbone.layers.0.mixer.out_proj.weight"
    with pytest.raises(ValueError, match=f"{w} is stored as I8; tpssm loads float weights"):
        load({**good, w: good[w].to(torch.int8)})
    with pytest.raises(ValueError, match="out_proj.bias'.* belong to modules the model loads "
                                         "but its config does not expect them"):
        load(good, parse_config({**raw, "use_bias": False}))
    extra = {**good, "backbone.layers.7.norm.weight": good["backbone.norm_f.weight"]}
    with pytest.warns(UserWarning, match="1 checkpoint tensor\\(s\\) that this config does "
                                         "not use are ignored: \\['backbone.layers.7.norm"):
        load(extra)
    tied = parse_config({**raw, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="stores an lm_head.weight \\(256, 64\\) that differs"):
        load(good, tied)
    emb = good["backbone.embeddings.weight"]
    with pytest.raises(ValueError, match="stores an lm_head.weight \\(255, 64\\) that differs"):
        load({**good, "lm_head.weight": emb[:255]}, tied)
    same = {**good, "lm_head.weight": emb.clone()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(same, tied)


@torch.no_grad()
def test_forward_argument_errors(checkpoints):
    _, path = checkpoints["mamba"]
    m = SSMForCausalLM.from_pretrained(path, backend=BACKEND)
    with pytest.raises(ValueError, match="needs a cache"):
        m.forward(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_ids must be 1-D"):
        m.forward(torch.tensor([[1, 2]]), _qsl([2]))
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="sequence 1 spans \\[2, 2\\)"):
        m.forward(ids, _qsl([2, 0, 1]))   # its logits would be the row before's
    with pytest.raises(ValueError, match="every sequence needs at least one token"):
        m.forward(ids, _qsl([0, 3]))
    with pytest.raises(ValueError, match="must run from 0 to the number of tokens \\(3\\)"):
        m.forward(ids, _qsl([2]))
    for bad in (torch.tensor([True]), torch.tensor([1, 0]), [False, False]):
        with pytest.raises(ValueError, match="decode_rows must be a bool tensor of shape \\(2,\\)"):
            m.forward(ids, _qsl([2, 1]), decode_rows=bad)


@pytest.mark.skipif(not H.cpu_kernels_available(), reason="the compiled ops have no CPU kernels "
                    "in this build")
@torch.no_grad()
@pytest.mark.parametrize("family", ["mamba", "mamba2_g4"])
def test_ops_backend_matches_reference_backend(family, checkpoints):
    _, path = checkpoints[family]
    ops = SSMForCausalLM.from_pretrained(path, backend="ops")
    ref = SSMForCausalLM.from_pretrained(path, backend="reference")
    ids = torch.tensor([t for p in PROMPTS for t in p])
    qsl = _qsl([len(p) for p in PROMPTS])
    slots = torch.arange(len(PROMPTS), dtype=torch.int32)
    caches = [m.allocate_cache(len(PROMPTS)) for m in (ops, ref)]
    outs = [m(ids, qsl, slots, torch.zeros(len(PROMPTS), dtype=torch.bool), c,
              return_all_logits=True) for m, c in zip((ops, ref), caches)]
    assert H.max_rel_err(outs[0], outs[1]) <= 1e-5
    step = torch.tensor([1, 2, 3])
    outs = [m.decode(step, slots, c) for m, c in zip((ops, ref), caches)]
    assert H.max_rel_err(outs[0], outs[1]) <= 1e-5
    for a, b in zip(caches[0].ssm_states, caches[1].ssm_states):
        assert H.max_rel_err(a, b) <= 1e-5


@pytest.mark.skipif(not H.cpu_kernels_available(), reason="the compiled ops have no CPU kernels "
                    "in this build")
@torch.no_grad()
@pytest.mark.parametrize("family,per_layer", [("mamba", 2), ("mamba2_g4", 1)])
def test_gemv_projections_match_f_linear(family, per_layer, checkpoints, monkeypatch):
    """set_projection_kernel('gemv'): decode-sized steps (<= 8 tokens) go through ops.gemv - every
    x_proj / out_proj and the head - and in_proj with the conv and the layer's norm in one
    gemv_conv_update, with the same results as F.linear, the separate conv and norm. (The norm
    joins in_proj for steps of at most NORM_PROLOGUE_MAX_ROWS rows: raised here for 3.)"""
    import tpssm.models.model as model_module
    import tpssm.ops
    from tpssm.models.mixers import BatchMeta

    _, path = checkpoints[family]
    base = SSMForCausalLM.from_pretrained(path, backend=BACKEND)
    gemv = SSMForCausalLM.from_pretrained(path, backend=BACKEND)
    gemv.set_projection_kernel("gemv")
    with pytest.raises(ValueError, match="projection kernel must be one of"):
        gemv.set_projection_kernel("cublas")
    decode = BatchMeta(None, None, None)
    limit = model_module.NORM_PROLOGUE_MAX_ROWS
    rows = torch.zeros(limit + 1, base.config.hidden_size)
    assert gemv._norms_in_in_proj(rows[:limit], decode)
    assert not gemv._norms_in_in_proj(rows, decode)
    assert not base._norms_in_in_proj(rows[:1], decode)  # cuBLAS projections: a norm kernel
    monkeypatch.setattr(model_module, "NORM_PROLOGUE_MAX_ROWS", 8)
    calls, fused = [], []
    real = tpssm.ops.gemv

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    def count_fused(real_fused):
        def fn(x, *args, **kwargs):
            fused.append((x.shape[0], kwargs.get("norm_weight") is not None))
            return real_fused(x, *args, **kwargs)
        return fn

    monkeypatch.setattr(tpssm.ops, "gemv", counted)
    for layer in gemv.layers:
        k = layer.mixer.kernels
        monkeypatch.setattr(k, "gemv_conv_update", count_fused(k.gemv_conv_update))
    ids = torch.tensor([t for p in PROMPTS for t in p])  # 11 tokens: F.linear, but the head's 3
    qsl = _qsl([len(p) for p in PROMPTS])
    slots = torch.arange(len(PROMPTS), dtype=torch.int32)
    no = torch.zeros(len(PROMPTS), dtype=torch.bool)
    caches = [m.allocate_cache(len(PROMPTS)) for m in (base, gemv)]
    outs = [m(ids, qsl, slots, no, c) for m, c in zip((base, gemv), caches)]
    assert calls == [3] and fused == []  # the head on each request's last token
    assert H.max_rel_err(outs[1], outs[0]) <= 1e-5
    calls.clear()
    # The same steps with the layers' norms outside in_proj (add_rms_norm between the layers).
    separate = gemv.allocate_cache(len(PROMPTS))
    for mine, theirs in ((separate.conv_states, caches[1].conv_states),
                         (separate.ssm_states, caches[1].ssm_states)):
        for a, b in zip(mine, theirs):
            a.copy_(b)
    step = torch.tensor([1, 2, 3])
    outs = [m.decode(step, slots, c) for m, c in zip((base, gemv), caches)]
    assert calls == [3] * (per_layer * base.config.num_hidden_layers + 1)
    assert fused == [(3, True)] * base.config.num_hidden_layers  # with the norm prologue
    assert H.max_rel_err(outs[1], outs[0]) <= 1e-5
    monkeypatch.setattr(gemv, "_norms_in_in_proj", lambda *args: False)
    # bit for bit: the CPU op is add_rms_norm's arithmetic followed by the product
    assert torch.equal(gemv.decode(step, slots, separate), outs[1])
    for a, b in zip(separate.ssm_states + separate.conv_states,
                    caches[1].ssm_states + caches[1].conv_states):
        assert torch.equal(a, b)
    for a, b in zip(caches[1].ssm_states, caches[0].ssm_states):
        assert H.max_rel_err(a, b) <= 1e-5
    for a, b in zip(caches[1].conv_states, caches[0].conv_states):
        assert H.max_rel_err(a, b) <= 1e-5


@torch.no_grad()
def test_bfloat16_model_tracks_float32(checkpoints):
    _, path = checkpoints["mamba2_g4"]
    f32 = SSMForCausalLM.from_pretrained(path, backend=BACKEND)
    b16 = SSMForCausalLM.from_pretrained(path, backend=BACKEND, dtype=torch.bfloat16)
    assert b16.layers[0].mixer.A.dtype == torch.float32  # A, D, dt bias stay fp32
    ids = torch.tensor(PROMPTS[0])
    c = b16.allocate_cache(1)
    assert c.ssm_states[0].dtype == torch.float32 and c.conv_states[0].dtype == torch.bfloat16
    lb = b16(ids, _qsl([len(ids)]), torch.tensor([0], dtype=torch.int32),
             torch.tensor([False]), c)
    lf = f32(ids, _qsl([len(ids)]))
    assert H.max_rel_err(lb, lf) <= 5e-2
    # 16-bit SSM state (the activation dtype): prefill then decode still track fp32.
    c16 = b16.allocate_cache(1, ssm_dtype=torch.bfloat16)
    c32 = f32.allocate_cache(1)
    slot, no = torch.tensor([0], dtype=torch.int32), torch.tensor([False])
    b16(ids, _qsl([len(ids)]), slot, no, c16)
    f32(ids, _qsl([len(ids)]), slot, no, c32)
    step = torch.tensor([42])
    assert H.max_rel_err(b16.decode(step, slot, c16), f32.decode(step, slot, c32)) <= 5e-2


@torch.no_grad()
@pytest.mark.parametrize("family", ["mamba", "mamba2_g4"])
def test_converted_model_equals_one_built_in_that_dtype(family, checkpoints):
    """model.to(torch.bfloat16) converts the weights but keeps the fp32 buffers exact: it then
    computes what a model built in bfloat16 does, bit for bit, and its caches follow."""
    _, path = checkpoints[family]
    moved = SSMForCausalLM.from_pretrained(path, backend=BACKEND).to(torch.bfloat16)
    built = SSMForCausalLM.from_pretrained(path, backend=BACKEND, dtype=torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.layers[0].mixer.A.dtype == torch.float32
    ids = torch.tensor(PROMPTS[0])
    slot, no = torch.tensor([0], dtype=torch.int32), torch.tensor([False])
    outs = []
    for m in (moved, built):
        c = m.allocate_cache(1)
        assert c.conv_states[0].dtype == torch.bfloat16
        outs.append((m(ids, _qsl([len(ids)]), slot, no, c), m.decode(torch.tensor([7]), slot, c)))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with pytest.raises(ValueError, match="conv_dtype must be the model's dtype"):
        moved.allocate_cache(1, conv_dtype=torch.float32)
    with pytest.raises(ValueError, match="lives on its TP context's device \\(cpu\\)"):
        moved.to("meta")
    assert moved.embeddings.device.type == "cpu"


@torch.no_grad()
def test_generate_sampling_options(checkpoints):
    _, path = checkpoints["mamba"]
    m = SSMForCausalLM.from_pretrained(path, backend=BACKEND)
    greedy = generate(m, PROMPTS, 6)
    assert [len(g) for g in greedy] == [6, 6, 6]
    assert generate(m, PROMPTS, 6, do_sample=True, top_k=1) == greedy
    s1 = generate(m, PROMPTS, 6, do_sample=True, temperature=1.5,
                  generator=torch.Generator().manual_seed(5))
    s2 = generate(m, PROMPTS, 6, do_sample=True, temperature=1.5,
                  generator=torch.Generator().manual_seed(5))
    assert s1 == s2 and s1 != greedy
    assert all(0 <= t < 256 for g in s1 for t in g)
    # A request stops at its eos token (included); the others go on.
    eos = greedy[0][2]
    stopped = generate(m, PROMPTS, 6, eos_token_id=eos)
    assert stopped[0] == greedy[0][:greedy[0].index(eos) + 1]
    cache = m.allocate_cache(5)
    generate(m, PROMPTS, 2, cache=cache)
    assert cache.num_free == 5  # generate frees the slots it took
    with pytest.raises(ValueError, match="non-empty"):
        generate(m, [[]], 3)
    # Bad arguments name themselves before any work (a negative temperature with sampling
    # used to pass as greedy; top_p 0 ended in multinomial's error; an id past the
    # vocabulary reached the embedding).
    for kwargs, match in [(dict(do_sample=True, temperature=-1.0), "temperature must be"),
                          (dict(do_sample=True, temperature=float("nan")), "temperature must"),
                          (dict(do_sample=True, top_k=-1), "top_k must be >= 0"),
                          (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
                          (dict(do_sample=True, top_p=1.5), "top_p must be")]:
        with pytest.raises(ValueError, match=match):
            generate(m, PROMPTS, 2, cache=cache, **kwargs)
        with pytest.raises(ValueError, match=match):
            select_tokens(torch.zeros(1, 4), **kwargs)
    for bad in (256, -1):
        with pytest.raises(ValueError, match=r"prompts: token ids must be in \[0, 256\)"):
            generate(m, [[1, bad]], 2, cache=cache)
    assert cache.num_free == 5  # a refused call takes no slot


@torch.no_grad()
def test_generate_refuses_logits_that_are_not_finite(tmp_path):
    """float16 overflow makes every logit inf or NaN: generate raises, naming the prompt and
    the token, instead of returning the argmax of NaN (token 0 every step), and frees its
    slots; float32 generates."""
    path = str(tmp_path / "overflow")
    H.save_overflowing_checkpoint(path)
    m = SSMForCausalLM.from_pretrained(path, dtype=torch.float16, backend=BACKEND)
    cache = m.allocate_cache(3)
    for kwargs in (dict(), dict(do_sample=True, temperature=0.8)):
        with pytest.raises(RuntimeError, match=r"prompt 0, new token 0: the model's logits "
                                               r"are not finite \(NaN or inf\)"):
            generate(m, PROMPTS, 4, cache=cache, **kwargs)
        assert cache.num_free == 3
    fine = SSMForCausalLM.from_pretrained(path, dtype=torch.float32, backend=BACKEND)
    assert [len(g) for g in generate(fine, PROMPTS, 4)] == [4, 4, 4]


@pytest.mark.parametrize("family", ["mamba", "mamba2_g4", "zamba", "zamba2_2blk"])
def test_decode_weight_bytes_do_not_depend_on_tying(family):
    """A decode step reads the same weights whether the head is tied to the embedding or not,
    and whether a Zamba2 shared block is one weight set visited again (tied) or a block per
    visit (untied): the embedding's batch rows, the head's rows (a tp 4 shard's quarter), each
    block at every visit. parameter_bytes differs by the head and the blocks."""
    from tpssm.models import build_model
    from tpssm.parallel import TPContext

    meta = torch.device("meta")
    for ctx in (TPContext(device=meta), TPContext.local_shard(4, meta)):
        tied, untied = (build_model(H.tpssm_config(family, tie_word_embeddings=t), ctx,
                                    torch.bfloat16) for t in (True, False))
        assert untied.parameter_bytes() > tied.parameter_bytes()
        row = tied.config.hidden_size * 2
        for batch in (1, 5):
            assert tied.decode_weight_bytes(batch) == untied.decode_weight_bytes(batch)
            extra_rows = (batch - 1) * row
            assert tied.decode_weight_bytes(batch) == tied.decode_weight_bytes(1) + extra_rows
        if family == "zamba2_2blk" and ctx.tp == 1:  # two blocks over more visits: re-read
            assert tied.decode_weight_bytes(1) > tied.parameter_bytes()


def test_select_tokens_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(select_tokens(logits, True, 1.0, 0, 0.6, g)) for _ in range(50)}
    assert picks <= {1, 2} and len(picks) == 2
    assert int(select_tokens(logits)) == 1


def test_sequence_parallel_arguments_and_tp1(checkpoints):
    _, path = checkpoints["mamba"]
    m = SSMForCausalLM.from_pretrained(path, backend=BACKEND)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="min_tokens must be an int >= 1"):
            m.set_sequence_parallel(True, min_tokens=bad)
    assert m.sequence_parallel is False
    ids = torch.tensor([t for p in PROMPTS for t in p])
    qsl = _qsl([len(p) for p in PROMPTS])
    with torch.no_grad():
        plain = m(ids, qsl, return_all_logits=True)
        m.set_sequence_parallel(True, min_tokens=1)
        # tp 1: nothing to split, the same computation.
        assert torch.equal(m(ids, qsl, return_all_logits=True), plain)
    assert m.allreduce.calls["scatter"] == 0
    q = SSMForCausalLM.from_pretrained(path, backend=BACKEND, allreduce="int8")
    with pytest.raises(ValueError, match="scheme is 'int8' \\(use allreduce='exact'\\)"):
        q.set_sequence_parallel(True)


@torch.no_grad()
@pytest.mark.parametrize("family", ["mamba", "mamba2_g4"])
def test_sequence_parallel_shrinks_the_norms_of_a_rank_shard(family, checkpoints, monkeypatch):
    """A tp 4 local shard (rank 0's compute, no group: how the benchmarks time a rank) with
    sequence parallelism normalises only its ceil(T / 4) rows per layer (all T for the first
    norm, of the replicated embedding), below the threshold all T, and reduce-scatters once
    per layer."""
    from tpssm.parallel import TPContext

    _, path = checkpoints[family]
    m = SSMForCausalLM.from_pretrained(path, TPContext.local_shard(4), backend=BACKEND)
    m.set_sequence_parallel(True, min_tokens=30)
    rows = []
    real = m.add_rms_norm
    m.add_rms_norm = lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k)
    lens = [20, 17]
    ids = torch.arange(37) * 7 % 256
    scattered = []
    assert all(layer.mixer.out_proj.allreduce is m.allreduce for layer in m.layers)
    real_rs = m.allreduce.reduce_scatter
    m.allreduce.reduce_scatter = lambda x: scattered.append(x.shape[0]) or real_rs(x)
    logits = m(ids, _qsl(lens))
    per_rank = -(-len(ids) // 4)
    assert logits.shape[0] == len(lens)
    assert rows == [len(ids)] + [per_rank] * len(m.layers)
    assert scattered == [4 * per_rank] * len(m.layers)
    rows.clear()
    m(ids[:29], _qsl([29]))                     # under min_tokens: the whole stream
    assert rows == [29] * (len(m.layers) + 1)


def _engine_rank(rank, world, path, prompts, backend, sequence_parallel=False):
    from tpssm.engine import CachedModel, GenerationEngine, SamplingParams
    from tpssm.parallel import TPContext

    model = SSMForCausalLM.from_pretrained(path, TPContext(), backend=backend)
    expect = generate(model, prompts, 5)
    # Sequence parallelism on every prefill chunk (min_tokens=1): the same tokens.
    model.set_sequence_parallel(sequence_parallel, min_tokens=1)
    served = CachedModel(model, model.allocate_cache(2))
    engine = GenerationEngine(served, max_batch_size=2, max_prefill_tokens=4)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=5))
    got = [r.output for r in engine.run()]
    return expect, got, served.num_free_slots(), model.allreduce.calls["scatter"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,sequence_parallel", [(1, False), (2, False), (3, True)])
def test_generation_engine_over_the_model_equals_generate(tp, sequence_parallel, checkpoints):
    """More requests than slots, prompts prefilled in chunks of 4 mixed with decode tokens."""
    _, path = checkpoints["mamba2_g4"]
    res = run_distributed(_engine_rank, tp, path, PROMPTS + [[9, 8, 7, 6, 5, 4]], BACKEND,
                          sequence_parallel, timeout=240)
    for expect, got, free, scatters in res:
        assert got == expect
        assert free == 2
        assert (scatters > 0) == sequence_parallel
    assert all(r[1] == res[0][1] for r in res)


def _sequence_parallel_bf16_rank(rank, world, path, backend):
    from tpssm.parallel import TPContext

    model = SSMForCausalLM.from_pretrained(path, TPContext(), dtype=torch.bfloat16,
                                           backend=backend)
    ids = torch.arange(40) * 11 % 256
    qsl = _qsl([13, 27])
    with torch.no_grad():
        plain = model(ids, qsl, return_all_logits=True)
        model.set_sequence_parallel(True, min_tokens=1)
        sp = model(ids, qsl, return_all_logits=True)
        last = model(ids, qsl)
    return (H.max_rel_err(sp, plain), H.max_rel_err(last, sp[[12, 39]]),
            model.allreduce.calls["scatter"])


@pytest.mark.timeout(300)
def test_sequence_parallel_in_bfloat16(checkpoints):
    """bf16 at tp 3 (40 tokens: 14 a rank, the last rank 12 and 2 padding rows): the stream and
    the collectives in bf16 / fp32 as without sequence parallelism, within bf16 rounding of the
    all-reduce path; the last-token rows come back exactly."""
    _, path = checkpoints["mamba"]
    for err, last_err, scatters in run_distributed(_sequence_parallel_bf16_rank, 3, path,
                                                   BACKEND, timeout=240):
        assert err <= 2e-2, err
        assert last_err == 0.0
        assert scatters == 2 * 3


def _quantized_rank(rank, world, path, backend):
    from tpssm.parallel import TPContext

    ctx = TPContext()
    ids = torch.tensor([t for p in PROMPTS for t in p])
    qsl = _qsl([len(p) for p in PROMPTS])
    exact = SSMForCausalLM.from_pretrained(path, ctx, backend=backend)(ids, qsl, None, None,
                                                                       None, True)
    errs = {}
    for scheme in ("int8", "fp8", "fp16"):
        m = SSMForCausalLM.from_pretrained(path, ctx, backend=backend, allreduce=scheme)
        errs[scheme] = H.max_rel_err(m(ids, qsl, return_all_logits=True), exact)
    big = SSMForCausalLM.from_pretrained(path, ctx, backend=backend, allreduce="int8",
                                         allreduce_min_bytes=1 << 30)
    errs["int8_under_threshold"] = H.max_rel_err(big(ids, qsl, return_all_logits=True), exact)
    return errs


@pytest.mark.timeout(300)
def test_quantized_allreduce_schemes_run_through_the_model(checkpoints):
    """Integration smoke test of tpssm.qallreduce in the row-parallel layers (its accuracy is
    tested with the collective itself): the schemes run, perturb the logits a little, and the
    size threshold restores the exact path."""
    _, path = checkpoints["mamba2_g4"]
    res = run_distributed(_quantized_rank, 2, path, BACKEND, timeout=240)
    for errs in res:
        assert 0 < errs["fp16"] <= 5e-3
        assert 0 < errs["int8"] <= 0.1 and 0 < errs["fp8"] <= 0.25
        assert errs["int8_under_threshold"] == 0.0
    print("QALLREDUCE_ERR tp=2 mamba2_g4", res[0])
