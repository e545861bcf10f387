"""benchmarks/tp_report.py: the wire-byte formulas, the collectives per family, the engine
schedule it replays, a synthetic engine JSON through the whole report against hand-computed
speedups, and the "modelled" labels of its outputs. Pure Python: no GPU, no extension needed."""

import json
import os

import pytest

from script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
tp_report = load_script("benchmarks/tp_report.py")

MiB = 1 << 20


def close(x):
    """The report's JSON keeps 6 significant digits."""
    return pytest.approx(x, rel=1e-5)


def test_wire_bytes_qallreduce_md_example():
    # docs/qallreduce.md: 2048 tokens x 4096, tp 4 -> 24 MiB bf16 vs ~12.4 MiB int8 per rank.
    M = 2048 * 4096
    assert tp_report.wire_bytes(M, 4, "exact") == 24 * MiB
    assert tp_report.wire_bytes(M, 4, "fp16") == 24 * MiB  # a bf16 payload gains nothing
    assert tp_report.wire_bytes(M, 4, "int8", 128) == 12976128  # 12.375 MiB
    assert tp_report.wire_bytes(M, 4, "fp8", 128) == 12976128
    assert tp_report.wire_bytes(M, 4, "exact_fp32") == 48 * MiB
    assert tp_report.wire_bytes(M, 4, "int8") / tp_report.wire_bytes(M, 4, "exact") == \
        pytest.approx(0.515625)
    assert tp_report.wire_bytes(M, 2, "exact") == 16 * MiB
    assert tp_report.wire_bytes(M, 1, "exact") == 0
    with pytest.raises(ValueError):
        tp_report.wire_bytes(M, 2, "int4")


def test_wire_bytes_equal_the_measured_buffers():
    # bench_qallreduce.py checked its wire_bytes against the buffers it sent.
    with open(os.path.join(RESULTS, "h100_20261127T025608Z_bench_qallreduce.json")) as f:
        rows = json.load(f)["rows"]
    assert rows
    for r in rows:
        assert r["wire_bytes_checked_against_buffers"]
        n, M, G = r["world_size"], r["numel"], r["group_size"]
        assert tp_report.wire_bytes(M, n, "exact") == r["wire_bytes"]["exact"]
        assert tp_report.wire_bytes(M, n, "int8", G) == r["wire_bytes"]["int8"]


def test_quant_group_size_follows_tpssm():
    assert tp_report.quant_group_size(2560) == 128
    assert tp_report.quant_group_size(160 + 2 * 16) == 64   # mamba-2.8b x_proj
    assert tp_report.quant_group_size(256 + 2 * 16) == 32   # falcon-mamba-7b x_proj
    assert tp_report.quant_group_size(100) == 0             # reduced exactly


@pytest.fixture(scope="module")
def configs():
    return tp_report.load_preset_configs()


def test_preset_dims(configs):
    d = tp_report.ModelDims.from_config("mamba-2.8b", configs["mamba-2.8b"])
    assert (d.family, d.num_layers, d.hidden, d.inner, d.dt_rank, d.d_state) == \
        ("mamba1", 64, 2560, 5120, 160, 16)
    f = tp_report.ModelDims.from_config("falcon-mamba-7b", configs["falcon-mamba-7b"], 4)
    assert (f.family, f.num_layers, f.hidden, f.dt_rank) == ("mamba1", 4, 4096, 256)
    m = tp_report.ModelDims.from_config("mamba2-2.7b", configs["mamba2-2.7b"])
    assert (m.family, m.hidden, m.num_heads, m.head_dim, m.norm_groups) == \
        ("mamba2", 2560, 80, 64, 1)


def test_collectives_per_family(configs):
    dims = {k: tp_report.ModelDims.from_config(k, configs[k])
            for k in ("mamba-2.8b", "falcon-mamba-7b", "mamba2-2.7b")}
    T = 8192
    got = {k: [(c.name, c.rows, c.width, c.elem_bytes, c.quantizable)
               for c in tp_report.layer_collectives(d, T, 2)] for k, d in dims.items()}
    # docs/tp-design.md: Mamba-1 192 + 2560 and 288 + 4096 elements per token, two all-reduces.
    assert got["mamba-2.8b"] == [("x_proj", T, 192, 2, True), ("out_proj", T, 2560, 2, True)]
    assert got["falcon-mamba-7b"] == [("x_proj", T, 288, 2, True),
                                      ("out_proj", T, 4096, 2, True)]
    # Mamba-2 with one norm group: out_proj plus the fp32 per-token sum of squares.
    assert got["mamba2-2.7b"] == [("out_proj", T, 2560, 2, True),
                                  ("gated_norm_sumsq", T, 1, 4, False)]
    for d in dims.values():
        assert tp_report.layer_collectives(d, T, 1) == []
    # Per-group norm, 8 groups of 16 heads: local at tp 2 and 4, spanning ranks at tp 3.
    grouped = tp_report.ModelDims("g", "mamba2", 2, 4096, 8192, d_state=128, num_heads=128,
                                  head_dim=64, norm_groups=8)
    assert [c.name for c in tp_report.layer_collectives(grouped, 4, 2)] == ["out_proj"]
    assert [c.name for c in tp_report.layer_collectives(grouped, 4, 4)] == ["out_proj"]
    assert [c.name for c in tp_report.layer_collectives(grouped, 4, 3)] == \
        ["out_proj", "gated_norm_sumsq"]


def test_hybrid_preset_dims(configs):
    z = tp_report.ModelDims.from_config("zamba-7b-v1", configs["zamba-7b-v1"])
    assert (z.family, z.num_layers, z.hidden, z.inner, z.dt_rank, z.d_state, z.mixer_heads,
            z.hybrid_layers) == ("zamba", 76, 3712, 7424, 232, 16, 2, 13)
    z2 = tp_report.ModelDims.from_config("zamba2-2.7b", configs["zamba2-2.7b"])
    assert (z2.family, z2.num_layers, z2.hidden, z2.inner, z2.num_heads, z2.head_dim,
            z2.norm_groups, z2.d_state, z2.hybrid_layers) == \
        ("zamba2", 54, 2560, 5120, 80, 64, 1, 64, 9)
    # Cut to its first layers: Zamba2-2.7B's first hybrid layer is its seventh.
    assert tp_report.ModelDims.from_config("zamba2-2.7b", configs["zamba2-2.7b"],
                                           6).hybrid_layers == 0
    assert tp_report.ModelDims.from_config("zamba2-2.7b", configs["zamba2-2.7b"],
                                           7).hybrid_layers == 1


def test_preset_configs_read_as_the_library_parses_them(configs):
    """The report reads the presets from source; the library parses the same dictionaries."""
    registry = pytest.importorskip("tpssm.models.registry")
    assert set(configs) == set(registry.presets())
    for name, cfg in configs.items():
        lib = registry.preset_config(name)
        dims = tp_report.ModelDims.from_config(name, cfg)
        if dims.family in ("zamba", "zamba2"):
            assert cfg["layers_block_type"] == lib.layer_types, name
            assert dims.hybrid_layers == len(lib.hybrid_layers), name
            m = lib.mixer
            assert (dims.hidden, dims.inner, dims.d_state) == \
                (m.hidden_size, m.intermediate_size, m.state_size), name
            if dims.family == "zamba":
                assert (dims.dt_rank, dims.mixer_heads) == \
                    (m.time_step_rank, lib.n_mamba_heads), name
            else:
                assert (dims.num_heads, dims.head_dim, dims.norm_groups) == \
                    (m.num_heads, m.head_dim, m.n_groups), name
        else:
            assert (dims.num_layers, dims.hidden, dims.inner) == \
                (lib.num_hidden_layers, lib.hidden_size, lib.intermediate_size), name


def test_hybrid_collectives(configs):
    T = 4096
    names = lambda d, n, hybrid: [(c.name, c.width, c.elem_bytes, c.quantizable)  # noqa: E731
                                  for c in tp_report.layer_collectives(d, T, n, 2, hybrid)]
    z = tp_report.ModelDims.from_config("zamba-7b-v1", configs["zamba-7b-v1"])
    # Two mixer heads of 3712 channels: whole on each rank at tp 2, each split over two ranks at
    # tp 4, where every rank sums its heads' x_proj products (2 x (232 + 2 x 16) columns).
    assert names(z, 2, False) == [("out_proj", 3712, 2, True)]
    assert names(z, 2, True) == [("block_o_proj", 3712, 2, True),
                                 ("block_down_proj", 3712, 2, True), ("out_proj", 3712, 2, True)]
    assert names(z, 4, False) == [("x_proj", 528, 2, True), ("out_proj", 3712, 2, True)]
    z2 = tp_report.ModelDims.from_config("zamba2-2.7b", configs["zamba2-2.7b"])
    assert names(z2, 2, True) == [("block_o_proj", 2560, 2, True),
                                  ("block_down_proj", 2560, 2, True), ("out_proj", 2560, 2, True),
                                  ("gated_norm_sumsq", 1, 4, False)]
    # Zamba2-7B: two norm groups of 56 heads: local at tp 2, spanning ranks at tp 4.
    z7 = tp_report.ModelDims.from_config("zamba2-7b", configs["zamba2-7b"])
    assert names(z7, 2, False) == [("out_proj", 3584, 2, True)]
    assert names(z7, 4, False) == [("out_proj", 3584, 2, True), ("gated_norm_sumsq", 2, 4, False)]
    assert tp_report.layer_collectives(z, T, 1, 2, True) == []
    # A step: the mamba layers' reductions, and the hybrid layers' with their blocks.
    link = tp_report.Link("test", 10.0, 10.0, "test")
    kt = tp_report.KernelTimes("k", {2: [(4096, 5.0), (1 << 23, 5.0)]})
    cs = tp_report.CommSettings(min_bytes=1 << 20, broadcast_per_step=False)
    one = tp_report.collective_us(tp_report.Collective("x", T, 2560, 2, True), "exact", 2, link,
                                  kt, cs)
    sumsq = tp_report.collective_us(tp_report.Collective("s", T, 1, 4, False), "exact", 2, link,
                                    kt, cs)
    assert tp_report.step_comm_us(z2, T, 8, "exact", 2, link, kt, cs) == pytest.approx(
        54 * (one + sumsq) + 9 * 2 * one)


def test_engine_schedule_batch8_prompt2048():
    s = tp_report.engine_schedule(8, 2048, 16, 8192)
    # Four prompts fill the first step; the other four ride with the first four's next token.
    assert s.step_tokens == [8192, 8196] + [8] * 14 + [4]
    assert s.step_rows == [4, 8] + [8] * 14 + [4]
    assert s.first_step == [1] * 4 + [2] * 4
    assert s.finish_step == [16] * 4 + [17] * 4
    assert s.step_prefill == [True, True] + [False] * 15
    one = tp_report.engine_schedule(1, 20000, 3, 8192)  # a prompt over three chunks
    assert one.step_tokens == [8192, 8192, 3616, 1, 1]
    assert (one.first_step, one.finish_step) == ([3], [5])


def test_collective_time_and_fallbacks():
    link = tp_report.Link("test", 10.0, 10.0, "test")  # 1e4 bytes per us
    kt = tp_report.KernelTimes("k", {2: [(4096, 5.0), (1 << 23, 5.0)]})
    cs = tp_report.CommSettings(min_bytes=1 << 20)
    big = tp_report.Collective("out_proj", 512, 2560, 2, True)       # 2.5 MiB
    small = tp_report.Collective("x_proj", 512, 192, 2, True)        # 192 KiB: under min_bytes
    assert tp_report.collective_us(big, "exact", 2, link, kt, cs) == pytest.approx(
        10 + 2621440 / 1e4)
    assert tp_report.collective_us(big, "int8", 2, link, kt, cs) == pytest.approx(
        2 * 10 + 1310720 * (1 + 4 / 128) / 1e4 + 5.0)
    assert tp_report.collective_us(small, "int8", 2, link, kt, cs) == \
        tp_report.collective_us(small, "exact", 2, link, kt, cs)
    # fp16: same bytes as bf16 plus two casts of 4 bytes per element at 3 TB/s.
    assert tp_report.collective_us(big, "fp16", 2, link, kt, cs) == pytest.approx(
        10 + 2621440 / 1e4 + 2 * 1310720 * 4 / 3e6)
    assert tp_report.collective_us(big, "exact", 1, link, kt, cs) == 0.0


def test_kernel_times_interpolate_and_extrapolate():
    kt = tp_report.KernelTimes("k", {2: [(100, 2.0), (200, 4.0), (400, 5.0)],
                                     4: [(100, 3.0), (400, 6.0)]})
    assert kt.total_us(10, 2) == 2.0          # launch floor below the measured sizes
    assert kt.total_us(150, 2) == pytest.approx(3.0)
    assert kt.total_us(800, 2) == pytest.approx(7.0)  # last segment's slope
    assert kt.total_us(250, 4) == pytest.approx(4.5)
    assert kt.total_us(250, 3) == kt.total_us(250, 2)  # nearest measured world size, lower first
    assert kt.slope_us_per_melem(2) == pytest.approx(5e3)


def test_sequence_parallel_collectives(configs):
    m = tp_report.ModelDims.from_config("mamba-2.8b", configs["mamba-2.8b"])
    T = 8190  # padded to 8192 rows at tp 4
    got = lambda d, hybrid, first: [  # noqa: E731
        (c.name, c.kind, c.rows, c.width)
        for c in tp_report.sequence_parallel_layer_collectives(d, T, 4, 2, hybrid, first)]
    # The first layer normalises the replicated embedding itself: no all-gather.
    assert got(m, False, True) == [("x_proj", "all_reduce", T, 192),
                                   ("out_proj", "reduce_scatter", 8192, 2560)]
    assert got(m, False, False) == [("mixer_input_gather", "all_gather", 8192, 2560),
                                    ("x_proj", "all_reduce", T, 192),
                                    ("out_proj", "reduce_scatter", 8192, 2560)]
    z2 = tp_report.ModelDims.from_config("zamba2-2.7b", configs["zamba2-2.7b"])
    assert got(z2, True, False) == [("block_input_gather", "all_gather", 8192, 5120),
                                    ("block_o_proj", "reduce_scatter", 8192, 2560),
                                    ("block_ff_gather", "all_gather", 8192, 2560),
                                    ("block_down_proj", "reduce_scatter", 8192, 2560),
                                    ("mixer_input_gather", "all_gather", 8192, 2560),
                                    ("out_proj", "reduce_scatter", 8192, 2560),
                                    ("gated_norm_sumsq", "all_reduce", T, 1)]
    assert tp_report.sequence_parallel_layer_collectives(m, T, 1) == []
    # Bandwidth only (no latency): a Mamba layer's reduce-scatter + all-gather send what its
    # all-reduce sends; a hybrid layer sends 7/6 of its three all-reduces (its block input is
    # 2D wide). docs/tp-design.md derives both.
    link = tp_report.Link("bandwidth only", 100.0, 0.0, "test")
    kt = tp_report.KernelTimes("k", {4: [(1, 0.0)]})
    cs = tp_report.CommSettings()
    us = lambda cs_: sum(tp_report.collective_us(c, "exact", 4, link, kt, cs)  # noqa: E731
                         for c in cs_ if c.name not in ("x_proj", "gated_norm_sumsq"))
    d8 = tp_report.ModelDims.from_config("zamba2-2.7b", configs["zamba2-2.7b"])
    for dims, hybrid, ratio in ((m, False, 1.0), (d8, True, 7 / 6)):
        sp = us(tp_report.sequence_parallel_layer_collectives(dims, 8192, 4, 2, hybrid))
        ar = us(tp_report.layer_collectives(dims, 8192, 4, 2, hybrid))
        assert sp == pytest.approx(ratio * ar)
    # A reduce-scatter / all-gather: one latency + (N - 1) / N of the message per rank.
    lat = tp_report.Link("t", 10.0, 10.0, "test")
    ag = tp_report.Collective("g", 8192, 2560, 2, False, "all_gather")
    assert tp_report.collective_us(ag, "exact", 4, lat, kt, cs) == pytest.approx(
        10 + 0.75 * 8192 * 2560 * 2 / 1e4)
    with pytest.raises(ValueError, match="exact scheme only"):
        tp_report.step_comm_us(m, T, 8, "int8", 4, lat, kt, cs, sequence_parallel=True)


# tp 2 on one link of 10 GB/s and 10 us, so that the expected times are easy to write by hand.
SLOW_LINK_TP2 = ["--tp", "2", "--links", "pcie4-a6000", "--link", "pcie4-a6000:bw=10,lat=10"]


def _synthetic_inputs(tmp_path, with_shards=True, sequence_parallel_min_tokens=0,
                      model="mamba-2.8b", num_layers=2):
    rows = [{"tp": 1, "rank_shard_only": False, "state_cache": True, "batch": 1,
             "prompt_len": 512, "gen_tokens": 2, "seconds": 0.02, "throughput_tok_s": 100.0,
             "ttft_ms": 10.0, "decode_ms_per_token": 5.0},
            {"tp": 1, "rank_shard_only": False, "state_cache": False, "batch": 1,
             "prompt_len": 512, "gen_tokens": 2, "seconds": 0.5, "throughput_tok_s": 4.0,
             "ttft_ms": 10.0, "decode_ms_per_token": 400.0}]
    if with_shards:
        rows.append({"tp": 2, "rank_shard_only": True, "state_cache": True, "batch": 1,
                     "prompt_len": 512, "gen_tokens": 2, "seconds": 0.012,
                     "throughput_tok_s": 2 / 0.012, "ttft_ms": 6.0, "decode_ms_per_token": 3.0})
    engine = {"model": model, "num_layers": num_layers, "dtype": "bfloat16",
              "allreduce": "exact", "allreduce_min_bytes": 0, "gen_tokens": 2,
              "environment": {"device_name": "Synthetic GPU"}, "rows": rows}
    if sequence_parallel_min_tokens:
        engine["sequence_parallel_min_tokens"] = sequence_parallel_min_tokens
    qar = {"device_name": "Synthetic GPU", "kernel_timing": "synthetic",
           "rows": [{"tokens": t, "hidden": 4096, "world_size": 2, "group_size": 128,
                     "dtype": "bfloat16", "numel": t * 4096,
                     "kernel_us_measured": {"quantize_us": 2.0, "reduce_us": 1.0,
                                            "dequant_us": 2.0, "total_us": 5.0}}
                    for t in (1, 2048)]}
    e = tmp_path / "engine_synthetic.json"
    q = tmp_path / "qar_synthetic.json"
    e.write_text(json.dumps(engine))
    q.write_text(json.dumps(qar))
    return str(e), str(q)


def _report_on_slow_link(tmp_path, e, q, capsys):
    """The report at tp 2 on the slow link, with its plot: the one result, the report, what was
    printed, the plot's path."""
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert tp_report.main(["--engine-json", e, "--qallreduce-json", q, *SLOW_LINK_TP2,
                           "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    (r,) = report["results"]
    return r, report, printed, png


def test_synthetic_report_end_to_end(tmp_path, capsys):
    e, q = _synthetic_inputs(tmp_path)
    r, report, printed, png = _report_on_slow_link(tmp_path, e, q, capsys)
    assert (r["preset"], r["tp"], r["link"], r["batch"], r["prompt_len"]) == \
        ("mamba-2.8b", 2, "pcie4-a6000", 1, 512)
    # By hand, 2 layers, tp 2, 10 us + bytes / (1e4 B/us). Step 1 (512-token prefill):
    # x_proj 512*192*2 B -> 10 + 19.6608, out_proj 512*2560*2 B -> 10 + 262.144, the greedy
    # pairs' all-gather (1 row, 16 B from the other rank) 10 + 0.0016. Step 2 (one decode
    # token): x_proj 384 B, out_proj 5120 B.
    step1 = 2 * ((10 + 19.6608) + (10 + 262.144)) + 10.0016
    step2 = 2 * ((10 + 0.0384) + (10 + 0.512)) + 10.0016
    ex = r["modelled"]["schemes"]["exact"]
    assert ex["ttft_ms"] == close(6.0 + step1 / 1e3)
    assert ex["decode_ms_per_token"] == close(3.0 + step2 / 1e3)
    secs = 0.012 + (step1 + step2) / 1e6
    assert ex["seconds"] == close(secs)
    assert ex["speedup"]["prefill_ttft"] == close(10.0 / (6.0 + step1 / 1e3))
    assert ex["speedup"]["decode_per_token"] == close(5.0 / (3.0 + step2 / 1e3))
    assert ex["speedup"]["throughput"] == close((2 / secs) / 100.0)
    assert ex["speedup"]["throughput"] == pytest.approx(1.5792, abs=1e-4)
    # int8 (allreduce_min_bytes 0 in the JSON: every payload quantized; x_proj in groups of
    # 64): two latencies, 1 + 4/G bytes per element, the measured 5 us of kernels.
    i8_step1 = 2 * ((20 + 98304 * 1.0625 / 1e4 + 5) + (20 + 1310720 * 1.03125 / 1e4 + 5)) \
        + 10.0016
    i8 = r["modelled"]["schemes"]["int8"]
    assert i8["ttft_ms"] == close(6.0 + i8_step1 / 1e3)
    assert r["modelled"]["gains"]["int8_vs_exact"]["prefill_ttft"] == close(
        (6.0 + step1 / 1e3) / (6.0 + i8_step1 / 1e3) - 1)
    assert r["no_comm_bound"]["throughput"] == close(0.02 / 0.012)
    assert r["shard_compute"]["source"].startswith("measured")
    assert png.stat().st_size > 10_000
    assert "1.58" in printed


def test_hybrid_run_end_to_end(tmp_path):
    """zamba2-2.7b cut to 7 layers: six mamba layers, then its first hybrid layer."""
    e, q = _synthetic_inputs(tmp_path, model="zamba2-2.7b", num_layers=7)
    out = tmp_path / "r.json"
    tp_report.main(["--engine-json", e, "--qallreduce-json", q, *SLOW_LINK_TP2, "--json",
                    str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert (r["preset"], r["family"]) == ("zamba2-2.7b", "zamba2")
    # Step 1 (512 tokens), 10 us + bytes / (1e4 B/us): out_proj and the block's o_proj and
    # down_proj 512 x 2560 x 2 B each -> 10 + 262.144; the fp32 norm sum 512 x 4 B -> 10.2048;
    # the greedy pairs 10.0016.
    ar, sumsq = 10 + 262.144, 10 + 0.2048
    step1 = 6 * (ar + sumsq) + (3 * ar + sumsq) + 10.0016
    assert r["modelled"]["schemes"]["exact"]["ttft_ms"] == close(6.0 + step1 / 1e3)


def test_sequence_parallel_run_end_to_end(tmp_path, capsys):
    """A run measured with --sequence-parallel: its 512-token prefill step (over the 256-token
    threshold) is modelled with the sequence-parallel collectives, the decode step with the
    all-reduces; exact only, no gains."""
    e, q = _synthetic_inputs(tmp_path, sequence_parallel_min_tokens=256)
    r, report, printed, png = _report_on_slow_link(tmp_path, e, q, capsys)
    assert r["sequence_parallel_min_tokens"] == 256
    assert set(r["modelled"]["schemes"]) == {"exact"} and r["modelled"]["gains"] == {}
    # By hand, 2 layers, tp 2, 10 us + bytes / (1e4 B/us), as the all-reduce test above. Step 1
    # (512 tokens): layer 0 x_proj all-reduce 10 + 19.6608 and out_proj reduce-scatter of half
    # of 512 x 2560 x 2 B, 10 + 131.072; layer 1 adds the all-gather of its normalised input,
    # 10 + 131.072; the last-token row's all-reduce (1 x 2560 x 2 B) 10 + 0.512; the greedy
    # pairs 10.0016. Step 2 (decode): the all-reduces.
    step1 = ((10 + 19.6608) + (10 + 131.072)) + ((10 + 131.072) + (10 + 19.6608)
                                                 + (10 + 131.072)) + (10 + 0.512) + 10.0016
    step2 = 2 * ((10 + 0.0384) + (10 + 0.512)) + 10.0016
    ex = r["modelled"]["schemes"]["exact"]
    assert ex["ttft_ms"] == close(6.0 + step1 / 1e3)
    assert ex["decode_ms_per_token"] == close(3.0 + step2 / 1e3)
    assert report["inputs"]["measured"]["engine"][0]["sequence_parallel_min_tokens"] == 256
    line = next(x for x in printed.splitlines() if x.startswith("mamba-2.8b +SP"))
    assert line.split()[-3:] == ["n/a", "n/a", "n/a"]
    assert png.stat().st_size > 10_000
    # A decode batch over the threshold keeps the all-reduces (the library never runs one
    # sequence-parallel): 300 requests decoding are 300-token steps.
    run = tp_report.load_engine_json(e, tp_report.load_preset_configs())
    run.tp1[(300, 16)] = run.tp1[(1, 512)]
    link = tp_report.Link("t", 10.0, 10.0, "test")
    kt = tp_report.KernelTimes.from_json(q)
    m = tp_report.model_setting(run, (300, 16), 2, run.shards[2][(1, 512)], link, kt,
                                tp_report.CommSettings(min_bytes=0), 8192)
    sched = tp_report.engine_schedule(300, 16, 2, 8192)
    assert sched.step_prefill == [True, False] and sched.step_tokens == [4800, 300]
    cs0 = tp_report.CommSettings(min_bytes=0)
    want = [tp_report.step_comm_us(run.dims, 4800, 300, "exact", 2, link, kt, cs0, 2, True),
            tp_report.step_comm_us(run.dims, 300, 300, "exact", 2, link, kt, cs0, 2, False)]
    assert m["schemes"]["exact"]["comm_ms"]["run"] == close(sum(want) / 1e3)


def test_outputs_are_labelled_modelled(tmp_path, capsys):
    e, q = _synthetic_inputs(tmp_path)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    tp_report.main(["--engine-json", e, "--qallreduce-json", q, "--tp", "2", "--json",
                    str(out)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("Modelled")
    assert "MODELLED" in printed
    report = json.loads(out.read_text())
    assert report["label"] == "modelled"
    assert report["inputs"]["measured"]["engine"][0]["file"] == "engine_synthetic.json"
    assert report["inputs"]["measured"]["qallreduce_kernels"]["file"] == "qar_synthetic.json"
    links = report["inputs"]["assumed"]["links"]
    assert set(links) == {"nvlink-h100", "nvlink-a100", "pcie4-a6000"}
    assert all(v["source"] for v in links.values())
    assert len(report["results"]) == 3
    for r in report["results"]:
        # Every predicted number sits under "modelled"; the rest are inputs.
        assert set(r) == {"preset", "family", "sequence_parallel_min_tokens", "batch",
                          "prompt_len", "gen_tokens",
                          "state_cache", "tp", "link", "tp1_measured", "shard_compute",
                          "no_comm_bound", "modelled"}
        assert set(r["modelled"]["schemes"]) == {"exact", "fp16", "int8", "fp8", "exact_fp32"}
    info = tp_report.plot_report(report, str(png))
    assert "MODELLED" in info["title"]
    predicted = [x for x in info["legend"] if x.startswith(("NVLink", "PCIe"))]
    assert len(predicted) == 6 and all(x.endswith("(modelled)") for x in predicted)


def test_missing_shards_not_modelled_unless_borrowed(tmp_path, capsys):
    e, q = _synthetic_inputs(tmp_path, with_shards=False)
    (tmp_path / "ref").mkdir()
    ref, _ = _synthetic_inputs(tmp_path / "ref")
    out = tmp_path / "r.json"
    tp_report.main(["--engine-json", e, "--qallreduce-json", q, "--tp", "2", "--json",
                    str(out)])
    report = json.loads(out.read_text())
    assert report["results"] == []
    assert report["not_modelled"] == ["mamba-2.8b tp 2: no rank-shard rows"]
    # Borrowing another run's shard / tp 1 ratio is labelled assumed.
    configs = tp_report.load_preset_configs()
    target = tp_report.load_engine_json(e, configs)
    donor = tp_report.load_engine_json(ref, configs)
    donor.model = "donor"
    compute, source = tp_report.shard_compute(target, 2, (1, 512), donor)
    assert source.startswith("assumed")
    assert compute["ttft_ms"] == pytest.approx(10.0 * 6.0 / 10.0)
    assert tp_report.shard_compute(target, 4, (1, 512), donor) == (None, "not measured")


def test_link_overrides():
    assert tp_report.parse_link_override("nvlink-h100:bw=400,lat=9") == \
        ("nvlink-h100", {"bus_gbs": 400.0, "latency_us": 9.0})
    with pytest.raises(ValueError):
        tp_report.parse_link_override("infiniband:bw=50")
    with pytest.raises(ValueError):
        tp_report.parse_link_override("nvlink-h100:speed=1")
