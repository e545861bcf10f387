"""benchmarks/profile_decode.py end to end on the CPU (its GPU run lists CUDA kernels instead of
CPU ops): a tiny Mamba and a tiny Zamba2, JSON fields and the per-layer count."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("profile_decode",
                                                  ROOT / "benchmarks" / "profile_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("config", [
    dict(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=128, hidden_size=64,
         num_hidden_layers=3, state_size=16, expand=2, conv_kernel=4),
    dict(architectures=["Zamba2ForCausalLM"], model_type="zamba2", vocab_size=128,
         hidden_size=64, num_hidden_layers=3, num_attention_heads=4, n_mamba_heads=8,
         mamba_d_state=16, intermediate_size=96, adapter_rank=4,
         layers_block_type=["mamba", "hybrid", "mamba"])])
def test_profile_decode_counts_a_steps_ops(tmp_path, config):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "profile.json"
    assert _script().main(["--preset", str(cfg), "--batch", "2", "--steps", "2", "--dtype",
                           "float32", "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_layers"] == 3 and res["kind"] == "cpu ops"
    names = {r["name"] for r in res["kernels"]}
    assert "tpssm::selective_state_update" in names and "tpssm::causal_conv1d_update" in names
    state_updates = next(r for r in res["kernels"]
                         if r["name"] == "tpssm::selective_state_update")
    assert state_updates["launches_per_step"] == 3  # one per layer
    assert res["kernels_per_layer"] == pytest.approx(res["kernels_per_step"] / 3)
    assert res["kernels_per_step"] == pytest.approx(sum(r["launches_per_step"]
                                                        for r in res["kernels"]))
    assert torch.isfinite(torch.tensor(res["device_us_per_step"]))
