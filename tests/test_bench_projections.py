"""benchmarks/bench_projections.py's shapes are the shapes the models' rank shards hold (tiny
configs of each family at tp 1 / 2 / 3, rank 0 of an uneven split included); its rows' logic runs
on the CPU with the timing stubbed; the script exits 0 without a GPU and rejects bad arguments."""

import pytest
import torch

from script_loader import load_script
from tpssm.models import build_model, parse_config
from tpssm.parallel import TPContext

CONFIGS = {
    "mamba": dict(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=100,
                  hidden_size=48, num_hidden_layers=1, state_size=8, expand=2, conv_kernel=4),
    "falcon_mamba": dict(architectures=["FalconMambaForCausalLM"], model_type="falcon_mamba",
                         vocab_size=100, hidden_size=48, num_hidden_layers=1, state_size=8,
                         expand=2, conv_kernel=4),
    "mamba2": dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", vocab_size=100,
                   hidden_size=64, num_hidden_layers=1, state_size=8, expand=2, head_dim=16,
                   num_heads=8, n_groups=2, conv_kernel=4),
}


def _script():
    return load_script("benchmarks/bench_projections.py")


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_shapes_are_the_rank_shards(family, tp):
    config = parse_config(CONFIGS[family])
    model = build_model(config, TPContext.local_shard(tp) if tp > 1 else TPContext(),
                        torch.float32)
    mixer = model.layers[0].mixer
    held = {"in_proj": mixer.in_proj.weight.shape, "out_proj": mixer.out_proj.weight.shape,
            "lm_head": model.lm_head.shape}
    if family != "mamba2":
        held["x_proj"] = mixer.x_proj.weight.shape
        held["dt_proj"] = mixer.dt_proj_weight.shape
    listed = {name: (n_out, n_in) for name, n_out, n_in in _script().projections(config, tp)}
    assert listed == {k: tuple(v) for k, v in held.items()}


def test_cli(capsys):
    mod = _script()
    with pytest.raises(SystemExit) as e:
        mod.main(["--tokens", "0"])
    assert e.value.code == 2
    if not torch.cuda.is_available():
        assert mod.main(["--presets", "mamba-2.8b"]) == 0
        assert "CUDA is required" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(torch.ops.tpssm, "gemv_conv_update"), reason="needs the ops")
def test_rows_on_the_cpu(monkeypatch):
    """run() on CPU tensors, each variant called once per weight set instead of timed: every
    row is produced, and the fused rows' one-off checks against the separate ops come out 0 (the
    CPU ops compose the same arithmetic)."""
    mod = _script()
    import bench_ssm_ops  # on sys.path once the script is loaded

    def called_once(fn, sets, reps):
        for s in sets:
            fn(s)
        return 0.01

    monkeypatch.setattr(bench_ssm_ops, "time_graph", called_once)
    monkeypatch.setattr(bench_ssm_ops, "l2_bytes", lambda: 1 << 16)
    rows = mod.run("mamba-2.8b", 1, "in_proj", 96, 64, 3, 1000.0, 1, ["torch", "gemv"], True,
                   conv=(8, 40, 4), device="cpu")
    kernels = [r["kernel"] for r in rows]
    assert kernels[:2] == ["torch", "gemv"]
    assert sum(k.startswith("gemv w") for k in kernels) == len(mod.GEMV_OPTIONS)
    assert kernels[-5:] == ["torch + conv_update", "gemv + conv_update", "gemv_conv_update",
                            "add_rms_norm + gemv_conv_update", "gemv_conv_update + norm prologue"]
    by = {r["kernel"]: r for r in rows}
    whole = by["gemv_conv_update + norm prologue"]
    assert by["gemv_conv_update"]["conv_max_abs_diff_vs_separate"] == 0
    assert whole["norm_max_abs_diff_vs_separate"] == 0
    assert whole["speedup_vs_separate_norm"] == 1.0 and whole["speedup_vs_torch"] is None
    assert whole["bytes"] > by["gemv_conv_update"]["bytes"] > by["gemv"]["bytes"]
    assert by["gemv"]["max_abs_diff_vs_fp32"] < 1.0  # bf16 products of 64 terms
