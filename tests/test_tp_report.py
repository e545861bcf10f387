"""benchmarks/tp_report.py: the wire-byte formulas, the collectives per family, the engine
schedule it replays, a synthetic engine JSON through the whole report against hand-computed
speedups, and the "modelled" labels of its outputs. Pure Python: no GPU, no extension needed."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
_spec = importlib.util.spec_from_file_location(
    "tp_report", os.path.join(ROOT, "benchmarks", "tp_report.py"))
tp_report = importlib.util.module_from_spec(_spec)
sys.modules["tp_report"] = tp_report  # dataclasses look their module up while it loads
_spec.loader.exec_module(tp_report)

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


def test_engine_schedule_batch8_prompt2048():
    s = tp_report.engine_schedule(8, 2048, 16, 8192)
    # Four prompts fill the first step; the other four ride with the first four's next token.
    assert s.step_tokens == [8192, 8196] + [8] * 14 + [4]
    assert s.step_rows == [4, 8] + [8] * 14 + [4]
    assert s.first_step == [1] * 4 + [2] * 4
    assert s.finish_step == [16] * 4 + [17] * 4
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


def _synthetic_inputs(tmp_path, with_shards=True):
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
    engine = {"model": "mamba-2.8b", "num_layers": 2, "dtype": "bfloat16",
              "allreduce": "exact", "allreduce_min_bytes": 0, "gen_tokens": 2,
              "environment": {"device_name": "Synthetic GPU"}, "rows": rows}
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


def test_synthetic_report_end_to_end(tmp_path, capsys):
    e, q = _synthetic_inputs(tmp_path)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert tp_report.main(["--engine-json", e, "--qallreduce-json", q, "--tp", "2",
                           "--links", "pcie4-a6000", "--link", "pcie4-a6000:bw=10,lat=10",
                           "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    (r,) = report["results"]
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
        assert set(r) == {"preset", "family", "batch", "prompt_len", "gen_tokens",
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
