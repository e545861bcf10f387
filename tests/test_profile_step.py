"""benchmarks/profile_step.py end to end on the CPU (its GPU run lists CUDA kernels instead of
CPU ops): a tiny Mamba and a tiny Zamba2, decode and prefill, JSON fields, the per-layer count,
the phase grouping and the tp 1 / shard comparison."""

import json

import pytest
import torch

from script_loader import load_script

MAMBA = dict(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=128,
             hidden_size=64, num_hidden_layers=3, state_size=16, expand=2, conv_kernel=4)
ZAMBA2 = dict(architectures=["Zamba2ForCausalLM"], model_type="zamba2", vocab_size=128,
              hidden_size=64, num_hidden_layers=3, num_attention_heads=4, n_mamba_heads=8,
              mamba_d_state=16, intermediate_size=96, adapter_rank=4,
              layers_block_type=["mamba", "hybrid", "mamba"])


def _script():
    return load_script("benchmarks/profile_step.py")


def _run(tmp_path, config, *extra):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "profile.json"
    assert _script().main(["--preset", str(cfg), "--batch", "2", "--steps", "2", "--dtype",
                           "float32", "--device", "cpu", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _one_per_layer(res, op):
    row = next(r for r in res["kernels"] if r["name"] == op)
    assert row["launches_per_step"] == 3, row  # one per layer


@pytest.mark.parametrize("config", [MAMBA, ZAMBA2], ids=["mamba", "zamba2"])
def test_profile_decode_counts_a_steps_ops(tmp_path, config):
    res = _run(tmp_path, config)
    assert res["num_layers"] == 3 and res["kind"] == "cpu ops" and res["phase"] == "decode"
    _one_per_layer(res, "tpssm::selective_state_update")
    _one_per_layer(res, "tpssm::causal_conv1d_update")
    # The step's kernels outside its layers, from the same step at one and two layers:
    # embedding, final norm, head (and the greedy max / exchange) at least; the rest per layer.
    assert 4 <= res["kernels_outside_layers"] < res["kernels_per_step"] / 2
    assert res["kernels_per_layer"] == pytest.approx(
        (res["kernels_per_step"] - res["kernels_outside_layers"]) / 3)
    assert res["kernels_per_step"] == pytest.approx(sum(r["launches_per_step"]
                                                        for r in res["kernels"]))
    # The phases partition the kernels.
    assert sum(p["launches_per_step"] for p in res["phases"].values()) == pytest.approx(
        res["kernels_per_step"])
    assert res["phases"]["scan"]["launches_per_step"] == 3
    assert res["phases"]["conv"]["launches_per_step"] == 3
    assert torch.isfinite(torch.tensor(res["device_us_per_step"]))
    assert res["step_ms_median_unprofiled"] > 0


@pytest.mark.parametrize("config,norm_op,norms", [
    (MAMBA, "tpssm::add_rms_norm", 1),   # the final norm
    (ZAMBA2, "aten::rms_norm", 3),       # the shared block's two and the final norm
], ids=["mamba", "zamba2"])
def test_gemv_decode_fuses_in_proj_and_conv(tmp_path, config, norm_op, norms):
    """With --projection-kernel gemv a decode layer's in_proj and conv are one op
    (gemv_conv_update; one kernel on CUDA), and the models no longer call the conv update. The
    mixers' input norms are that op's prologue too: only the norms outside the mixers remain
    (without the prologue: one more a layer)."""
    res = _run(tmp_path, config, "--projection-kernel", "gemv")
    _one_per_layer(res, "tpssm::gemv_conv_update")
    _one_per_layer(res, "tpssm::selective_state_update")
    assert not any(r["name"] == "tpssm::causal_conv1d_update" for r in res["kernels"])
    norm = next(r for r in res["kernels"] if r["name"] == norm_op)
    assert norm["launches_per_step"] == norms, norm


@pytest.mark.parametrize("config", [MAMBA, ZAMBA2], ids=["mamba", "zamba2"])
def test_profile_prefill_and_shard_comparison(tmp_path, config):
    res = _run(tmp_path, config, "--phase", "prefill", "--prompt-len", "7", "--tp-shards", "1,2")
    assert [r["tp_shard"] for r in res["shards"]] == [1, 2]
    for r in res["shards"]:
        assert r["phase"] == "prefill" and r["prompt_len"] == 7
        _one_per_layer(r, "tpssm::selective_scan")
        _one_per_layer(r, "tpssm::causal_conv1d")
    table = {row["phase"]: row for row in res["per_phase"]}
    assert {"scan", "conv", "projections", "total"} <= set(table)
    total = table["total"]
    assert total["tp1_us"] == pytest.approx(res["shards"][0]["device_us_per_step"])
    assert total["speedup_tp2"] == pytest.approx(total["tp1_us"] / total["tp2_us"])


def test_prefill_shards_sequence_parallel(tmp_path, monkeypatch):
    """--sequence-parallel: the tp 2 shard's prefill norms its ceil(T / 2) rows (here 2 x 7
    tokens: 7 rows, after each of the 3 layers) but the first norm's 14, tp 1 all 14."""
    import tpssm.models.model as model_module

    rows = []
    real = model_module.SSMForCausalLM.forward

    def spy(self, *a, **k):
        norm = self.add_rms_norm
        self.add_rms_norm = lambda x, *b, **c: rows.append((self.ctx.tp, x.shape[0])) or norm(
            x, *b, **c)
        try:
            return real(self, *a, **k)
        finally:
            self.add_rms_norm = norm

    monkeypatch.setattr(model_module.SSMForCausalLM, "forward", spy)
    res = _run(tmp_path, MAMBA, "--phase", "prefill", "--prompt-len", "7", "--tp-shards", "1,2",
               "--sequence-parallel")
    assert [r["sequence_parallel"] for r in res["shards"]] == [False, True]
    assert {n for tp, n in rows if tp == 1} == {14}
    assert [n for tp, n in rows if tp == 2][:4] == [14, 7, 7, 7]


def test_decode_shard_head_split_or_whole(tmp_path):
    """A tp shard's decode step holds the rank's vocabulary rows of the head by default, the
    whole head with --replicated-head; tp 1 has the whole head either way."""
    split = _run(tmp_path, MAMBA, "--tp-shard", "2")
    whole = _run(tmp_path, MAMBA, "--tp-shard", "2", "--replicated-head")
    single = _run(tmp_path, MAMBA, "--replicated-head")
    assert (split["lm_head"], whole["lm_head"], single["lm_head"]) == (
        "vocab-parallel", "whole", "whole")
    assert (split["lm_head_rows"], whole["lm_head_rows"], single["lm_head_rows"]) == (
        64, 128, 128)


def test_phase_names():
    mod = _script()
    assert mod.phase_of("void tpssm::ssd_scan_kernel<...>") == "scan"
    assert mod.phase_of("nvjet_tst_128x64_64x8_1x1_v_bz_TNT") == "projections"
    assert mod.phase_of("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "communication"
    assert mod.phase_of("gated_rms_norm_kernel<__nv_bfloat16>") == "norms"
    assert mod.phase_of("void at::native::vectorized_elementwise_kernel<4, ...>") == mod.OTHER


def test_bad_arguments_exit_2(capsys):
    mod = _script()
    for argv in (["--tp-shards", "2,4"], ["--batch", "0"], ["--tp-shards", "1,x"]):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2
