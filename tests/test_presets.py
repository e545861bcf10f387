"""Random preset weights: slices equal the whole tensor's rows / columns (so every rank and tp
degree sees one model), chunked generation equals one pass, values are reproducible, tame and
look independent, and the GPU produces the CPU's bits where the arithmetic is exact."""

import math

import pytest
import torch

import tpssm.presets as presets
from tpssm.presets import RandomWeightSource, hf_weight_shapes, preset_config
from tpssm.models.config import parse_config


def _tiny(family="mamba"):
    if family == "mamba2":
        return parse_config(dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2",
                                 vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                 state_size=16, expand=2, conv_kernel=4, num_heads=8,
                                 head_dim=16, n_groups=2, use_bias=True, use_conv_bias=True,
                                 tie_word_embeddings=False))
    return parse_config(presets.DEMO_CONFIG)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_slices_equal_the_whole_tensor(family):
    config = _tiny(family)
    src = RandomWeightSource(config, seed=5)
    for name, shape in hf_weight_shapes(config).items():
        whole = src.get(name)
        assert tuple(whole.shape) == shape and whole.dtype == torch.float32, name
        rows = shape[0]
        ranges = [(1, rows // 3), (rows // 2, rows), (1, rows // 3)]  # a repeat, uneven cuts
        expect = torch.cat([whole[a:b] for a, b in ranges])
        assert torch.equal(src.get_rows(name, ranges), expect), name
        if len(shape) == 2:
            cols = shape[1]
            ranges = [(0, 1), (cols // 4, cols - 3)]
            expect = torch.cat([whole[:, a:b] for a, b in ranges], 1)
            assert torch.equal(src.get_cols(name, ranges), expect), name


def test_chunk_boundaries_do_not_change_values(monkeypatch):
    config = _tiny()
    name = "backbone.layers.1.mixer.in_proj.weight"
    one_pass = RandomWeightSource(config, seed=2)
    whole, cols = one_pass.get(name), one_pass.get_cols(name, [(3, 200)])
    monkeypatch.setattr(presets, "_chunk", lambda device: 1000)  # not a multiple of a row
    chunked = RandomWeightSource(config, seed=2)
    assert torch.equal(chunked.get(name), whole)
    assert torch.equal(chunked.get_cols(name, [(3, 200)]), cols)


def test_reproducible_and_distinct_per_seed_and_name():
    config = _tiny()
    a, b = RandomWeightSource(config, seed=1), RandomWeightSource(config, seed=1)
    other = RandomWeightSource(config, seed=2)
    name = "backbone.layers.0.mixer.x_proj.weight"
    assert torch.equal(a.get(name), b.get(name))
    assert not torch.equal(a.get(name), other.get(name))
    # Same shape, different names: different values.
    w0 = a.get("backbone.layers.0.mixer.in_proj.weight")
    w1 = a.get("backbone.layers.1.mixer.in_proj.weight")
    assert (w0 == w1).float().mean() < 1e-3


def test_values_are_tame_and_look_independent():
    config = preset_config("mamba-2.8b", num_layers=1)
    src = RandomWeightSource(config, seed=0)
    w = src.get_rows("backbone.layers.0.mixer.in_proj.weight", [(0, 512)])  # 512 x 2560
    std = 1 / math.sqrt(2560)
    assert abs(w.mean().item()) < 0.01 * std
    assert abs(w.std().item() / std - 1) < 0.01
    assert w.abs().max().item() <= math.sqrt(3) * std * (1 + 1e-6)  # uniform, unit variance
    # Neighbouring rows and columns uncorrelated (|r| ~ 1/sqrt(n) for independent values).
    c = torch.corrcoef(torch.stack([w[:-1].flatten(), w[1:].flatten()]))[0, 1]
    assert abs(c.item()) < 5e-3
    c = torch.corrcoef(torch.stack([w[:, :-1].flatten(), w[:, 1:].flatten()]))[0, 1]
    assert abs(c.item()) < 5e-3
    # Uniform in deciles over 1.3M draws (each decile within 1% of its expected count).
    u = (w.flatten() / (math.sqrt(3) * std) + 1) / 2
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert ((counts / u.numel() - 0.1).abs() < 1e-3).all(), counts
    A = -torch.exp(src.get("backbone.layers.0.mixer.A_log"))
    assert A.min() >= -16 and A.max() <= -1
    dt = torch.nn.functional.softplus(src.get("backbone.layers.0.mixer.dt_proj.bias"))
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


def test_positions_must_fit_32_bits():
    config = parse_config(dict(presets.DEMO_CONFIG, vocab_size=1 << 24, hidden_size=256))
    with pytest.raises(ValueError, match="32 bits"):
        RandomWeightSource(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_generates_the_cpu_bits():
    config = preset_config("falcon-mamba-7b", num_layers=1)
    cpu, gpu = RandomWeightSource(config, seed=4), RandomWeightSource(config, seed=4,
                                                                       device="cuda")
    for name in ("backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.D",
                 "backbone.embeddings.weight"):
        # Integer hash, exact fp32 scaling: bit-identical.
        assert torch.equal(gpu.get_rows(name, [(7, 1000)]).cpu(), cpu.get_rows(name, [(7, 1000)]))
    name = "backbone.layers.0.mixer.dt_proj.bias"  # exp / log: equal to an ulp or two
    torch.testing.assert_close(gpu.get(name).cpu(), cpu.get(name), rtol=1e-6, atol=0)
