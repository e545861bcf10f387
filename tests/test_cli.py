"""The command line end to end on the CPU (gloo ranks): demo, generate against transformers'
greedy generation, bench JSON, continuous batching with a real model, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_models import build_hf_model, hf_greedy, save_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "python")] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "tpssm", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    model = build_hf_model("mamba", seed=11)
    path = str(tmp_path_factory.mktemp("ckpt") / "mamba")
    save_hf_model(model, path)
    return model, path


@pytest.mark.timeout(600)
def test_demo_tp2_equals_tp1():
    code, out, err = run_cli("demo", "--num-prompts", "3", "--max-new-tokens", "6")
    assert code == 0, err
    assert "tp 2 tokens equal tp 1 tokens: yes" in out
    assert "tokens/s" in out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [1, 2])
def test_generate_matches_transformers_greedy(mamba_dir, tp):
    model, path = mamba_dir
    prompt = [5, 17, 99, 3, 250, 42, 7]
    steps = 8
    expected, _ = hf_greedy(model, prompt, steps - 1)
    code, out, err = run_cli("generate", "--model", path, "--tp", str(tp), "--input-ids",
                             ",".join(map(str, prompt)), "--max-new-tokens", str(steps),
                             "--greedy", "--ignore-eos", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["input_ids"] == prompt
    assert record["output_ids"] == expected


@pytest.mark.timeout(600)
def test_bench_tiny_sweep_writes_json(mamba_dir, tmp_path):
    _, path = mamba_dir
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli("bench", "--model", path, "--tp", "1,2", "--prompt-lens", "4,9",
                             "--batch-sizes", "1,2", "--gen-tokens", "3",
                             "--compare-state-cache", "--json", str(out_json),
                             "--plot", str(tmp_path / "bench.png"))
    assert code == 0, err
    try:
        import matplotlib  # noqa: F401
        with open(tmp_path / "bench.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib is not installed" in err
    report = json.loads(out_json.read_text())
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 2 * 2
    assert {(r["tp"], r["state_cache"], r["batch"], r["prompt_len"]) for r in rows} == {
        (tp, c, b, p) for tp in (1, 2) for c in (True, False) for b in (1, 2) for p in (4, 9)}
    for r in rows:
        assert r["throughput_tok_s"] > 0 and r["ttft_ms"] > 0 and r["seconds"] > 0
    assert len(report["state_cache_ratios"]) == 8
    assert report["environment"]["torch"] == torch.__version__
    assert report["complete"] is True


def test_bench_keeps_finished_degrees_when_a_later_one_fails(mamba_dir, tmp_path):
    """The JSON is rewritten after every tp degree: a sweep that dies part way keeps its rows."""
    _, path = mamba_dir
    out_json = tmp_path / "bench.json"
    # A shard of tp 4096 has no channel to hold: the second run fails at model build.
    code, out, err = run_cli("bench", "--model", path, "--tp", "1", "--rank-shard", "4096",
                             "--prompt-lens", "5", "--batch-sizes", "1", "--gen-tokens", "2",
                             "--json", str(out_json))
    assert code != 0
    assert "4096" in err.strip().splitlines()[-1]
    report = json.loads(out_json.read_text())
    assert report["complete"] is False
    assert [(r["tp"], r["rank_shard_only"]) for r in report["rows"]] == [(1, False)]


def test_bench_rank_shard_times_one_shard_alone(mamba_dir, tmp_path):
    """--rank-shard 2: rank 0's half of the model in this one process, no group."""
    _, path = mamba_dir
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli("bench", "--model", path, "--tp", "1", "--rank-shard", "2",
                             "--prompt-lens", "5", "--batch-sizes", "2", "--gen-tokens", "3",
                             "--json", str(out_json))
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    full, = [r for r in rows if not r["rank_shard_only"]]
    shard, = [r for r in rows if r["rank_shard_only"]]
    assert (full["tp"], shard["tp"]) == (1, 2)
    assert shard["throughput_tok_s"] > 0 and shard["ttft_ms"] > 0
    # The mixers are split in two; embedding, norms and the LM head stay whole.
    assert shard["param_bytes_per_rank"] < full["param_bytes_per_rank"]
    assert "2 shard" in out


def test_continuous_batching_more_requests_than_slots(mamba_dir):
    from tpssm.engine import CachedModel, GenerationEngine, SamplingParams
    from tpssm.models import SSMForCausalLM

    _, path = mamba_dir
    model = SSMForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(256, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 20, (7,), generator=g)]
    sampling = SamplingParams(max_new_tokens=5)

    def run(batch_prompts, slots, max_prefill_tokens):
        engine = GenerationEngine(CachedModel(model, model.allocate_cache(slots)),
                                  max_batch_size=slots, max_prefill_tokens=max_prefill_tokens)
        for p in batch_prompts:
            engine.add_request(p, sampling)
        return [r.output for r in engine.run()]

    alone = [run([p], 1, 4096)[0] for p in prompts]
    together = run(prompts, 3, 8)  # 3 slots for 7 requests, prompts chunked by 8 tokens
    assert together == alone


@pytest.mark.timeout(300)
def test_errors_are_one_line(mamba_dir, tmp_path):
    _, path = mamba_dir
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    with open(os.path.join(path, "config.json")) as f:
        (no_weights / "config.json").write_text(f.read())
    cases = [
        (["generate", "--model", str(tmp_path / "missing"), "--input-ids", "1"],
         "is not a directory"),
        (["generate", "--model", str(bad_json), "--input-ids", "1"], "JSON"),
        (["generate", "--model", str(llama), "--input-ids", "1"], "unsupported model"),
        (["generate", "--model", str(no_weights), "--input-ids", "1"], "safetensors"),
        (["generate", "--model", path, "--input-ids", "1,2,3", "--max-prompt-tokens", "2"],
         "more than --max-prompt-tokens 2"),
        (["generate", "--model", path, "--input-ids", "1,2", "--num-slots", "0"],
         "at least one slot"),
        (["generate", "--model", path, "--input-ids", "1,999"], r"token ids must be in \[0, 256\)"),
        (["generate", "--model", path, "--prompt", "hello"], "no tokenizer.json"),
        (["generate", "--model", path, "--tp", "0", "--input-ids", "1"], "--tp must be >= 1"),
        (["bench", "--tp", "1"], "exactly one of --preset NAME or --model DIR"),
        (["bench", "--preset", "mamba-9b"], "unknown preset"),
    ]
    import re
    for args, pattern in cases:
        code, out, err = run_cli(*args)
        assert code != 0, (args, out, err)
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("loading")]
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("tpssm: error:"), (args, err)
        assert re.search(pattern, lines[0]), (args, pattern, err)


@pytest.mark.timeout(300)
def test_generate_with_quantized_allreduce(mamba_dir):
    """--allreduce int8 reaches the model: its reductions take the quantized path (counted by
    the model's strategy), and with the default threshold decode-sized messages stay exact."""
    _, path = mamba_dir
    common = ("generate", "--model", path, "--tp", "2", "--input-ids", "1,2,3,4",
              "--max-new-tokens", "5", "--ignore-eos", "--json")
    code, out, err = run_cli(*common, "--allreduce", "int8", "--allreduce-min-bytes", "0")
    assert code == 0, err
    record = json.loads(out)
    assert len(record["output_ids"]) == 5
    assert all(0 <= t < 256 for t in record["output_ids"])
    calls = record["allreduce_calls"]
    # out_proj (width 64) quantizes; x_proj's 36-wide output no group size divides stays exact.
    assert calls["quantized"] > 0 and calls["exact"] == calls["quantized"], calls
    code, out, err = run_cli(*common, "--allreduce", "exact")
    assert code == 0, err
    calls = json.loads(out)["allreduce_calls"]
    assert calls["quantized"] == 0 and calls["exact"] > 0, calls


@pytest.mark.timeout(300)
def test_generate_runs_unchanged_under_torchrun(mamba_dir):
    from dist_utils import free_port_for_tests

    model, path = mamba_dir
    prompt = [5, 17, 99, 3]
    expected, _ = hf_greedy(model, prompt, 4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port_for_tests()), "-m", "tpssm", "generate", "--model", path,
         "--tp", "2", "--input-ids", "5,17,99,3", "--max-new-tokens", "5", "--greedy",
         "--ignore-eos", "--json"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    assert json.loads(lines[0])["output_ids"] == expected


@pytest.mark.timeout(300)
def test_generate_text_prompt_uses_the_checkpoint_tokenizer(mamba_dir, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    model, path = mamba_dir
    with_tok = str(tmp_path / "with_tokenizer")
    shutil.copytree(path, with_tok)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(with_tok, "tokenizer.json"))
    expected, _ = hf_greedy(model, [5, 17, 99], 3)
    code, out, err = run_cli("generate", "--model", with_tok, "--prompt", "w5 w17 w99",
                             "--max-new-tokens", "4", "--ignore-eos", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["input_ids"] == [5, 17, 99]
    assert record["output_ids"] == expected
    assert record["text"] == " ".join(f"w{t}" for t in expected)
