"""The command line end to end on the CPU (gloo ranks): demo, generate against transformers'
greedy generation, bench JSON, continuous batching with a real model, and one-line errors.
Most runs call main() in this process (run_in_process); `python -m tpssm` runs where the entry
point itself is under test."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from hf_models import build_hf_model, hf_greedy, save_hf_model, save_overflowing_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "python")] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "tpssm", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def run_in_process(capsys, *args):
    """The command line's main() in this process, its ranks forked from the suite's fork server:
    a fresh interpreter a run (~5 s on a 2-core machine, against ~0.5 s) is spent only where
    the entry point itself is under test (the demo, torchrun, the error lines)."""
    from tpssm.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
    if torch.cuda.device_count() < 2:  # gloo processes: the demo says why tp 2 is slower
        assert "one GPU per rank" in out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp,kernel", [(1, "torch"), (2, "torch"), (2, "gemv")])
def test_generate_matches_transformers_greedy(mamba_dir, tp, kernel, capsys):
    model, path = mamba_dir
    prompt = [5, 17, 99, 3, 250, 42, 7]
    steps = 8
    expected, _ = hf_greedy(model, prompt, steps - 1)
    code, out, err = run_in_process(capsys, "generate", "--model", path, "--tp", str(tp),
                                    "--input-ids", ",".join(map(str, prompt)),
                                    "--max-new-tokens", str(steps), "--greedy", "--ignore-eos",
                                    "--json", "--projection-kernel", kernel)
    assert code == 0, err
    record = json.loads(out)
    assert record["input_ids"] == prompt
    assert record["output_ids"] == expected


@pytest.mark.timeout(600)
def test_bench_tiny_sweep_writes_json(mamba_dir, tmp_path, capsys):
    _, path = mamba_dir
    out_json = tmp_path / "bench.json"
    code, out, err = run_in_process(capsys, "bench", "--model", path, "--tp", "1,2",
                                    "--prompt-lens", "4,9", "--batch-sizes", "1,2",
                                    "--gen-tokens", "3", "--compare-state-cache", "--json",
                                    str(out_json), "--plot", str(tmp_path / "bench.png"),
                                    "--projection-kernel", "gemv", "--programmatic-launch")
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
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * 1e3 / r["decode_ms_per_token"])
        # The floor needs a GPU's copy bandwidth; its bytes are there on the CPU too, and only
        # with the state cache (without it a step recomputes whole sequences).
        assert r["copy_bandwidth_gbs"] is None and r["decode_floor_ms"] is None
        assert r["decode_pct_of_floor"] is None
        if r["state_cache"]:
            assert r["decode_weight_bytes"] > 0
            # mamba (hf_models): 3 layers x 128 / tp channels x (3 conv columns + 16 states)
            # x 4 bytes (float32), read and written, a request.
            channels = 128 // r["tp"]
            assert r["decode_state_bytes"] == 2 * r["batch"] * 3 * channels * (3 + 16) * 4
        else:
            assert r["decode_weight_bytes"] is None
    assert report["max_prefill_tokens"] == 8192
    assert len(report["state_cache_speedups"]) == 8
    assert all(r["throughput"] > 0 and r["ttft"] > 0 and r["decode"] > 0
               for r in report["state_cache_speedups"])
    with open(os.path.join(path, "config.json")) as f:
        layers = json.load(f)["num_hidden_layers"]
    assert {r["num_layers"] for r in rows} == {layers}
    assert {r["dtype"] for r in rows} == {"float32"}
    assert report["num_layers"] == layers
    # The table's heading names what was measured.
    assert f"{path}, {layers} layers, float32, " in out
    assert "state cache speedup (cost without the cache / cost with it" in out
    assert report["environment"]["torch"] == torch.__version__
    assert report["projection_kernel"] == "gemv" and report["programmatic_launch"] is True
    assert report["complete"] is True


def test_bench_keeps_finished_degrees_when_a_later_one_fails(mamba_dir, tmp_path, capsys):
    """The JSON is rewritten after every tp degree: a sweep that dies part way keeps its rows."""
    _, path = mamba_dir
    out_json = tmp_path / "bench.json"
    # A shard of tp 4096 has no channel to hold: the second run fails at model build.
    code, out, err = run_in_process(capsys, "bench", "--model", path, "--tp", "1",
                                    "--rank-shard", "4096", "--prompt-lens", "5",
                                    "--batch-sizes", "1", "--gen-tokens", "2", "--json",
                                    str(out_json))
    assert code == 1  # a run that started and failed
    last = err.strip().splitlines()[-1]
    assert last.startswith("tpssm: error: rank 0 failed:") and "4096" in last
    assert "Error" not in last
    assert "(run 2 of 2)" in err  # the sweep says how much is left
    report = json.loads(out_json.read_text())
    assert report["complete"] is False
    assert [(r["tp"], r["rank_shard_only"]) for r in report["rows"]] == [(1, False)]


def test_bench_rank_shard_times_one_shard_alone(mamba_dir, tmp_path, capsys):
    """--rank-shard 2: rank 0's half of the model in this one process, no group."""
    _, path = mamba_dir
    out_json = tmp_path / "bench.json"
    code, out, err = run_in_process(capsys, "bench", "--model", path, "--tp", "1",
                                    "--rank-shard", "2", "--prompt-lens", "5", "--batch-sizes",
                                    "2", "--gen-tokens", "3", "--json", str(out_json))
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


def _assert_one_error_line(err, pattern, context):
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("loading")]
    assert len(lines) == 1, (context, err)
    assert lines[0].startswith("tpssm: error:"), (context, err)
    assert re.search(pattern, lines[0]), (context, pattern, err)
    assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b", lines[0]), (context, err)


@pytest.mark.timeout(300)
def test_errors_are_one_line(mamba_dir, tmp_path, capsys):
    """One line on stderr and exit status 2 for a command rejected before any work began: each
    case through main(), and an argument error and a checkpoint error also through the real
    entry point (`python -m tpssm`: nothing else printed, the status reaches the shell)."""
    _, path = mamba_dir
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (["generate", "--model", str(tmp_path / "missing"), "--input-ids", "1"],
         "is not a directory"),
        (["generate", "--model", str(bad_json), "--input-ids", "1"], "not valid JSON"),
        (["generate", "--model", str(llama), "--input-ids", "1"], "unsupported model"),
        (["generate", "--model", path, "--input-ids", "1,2,3", "--max-prompt-tokens", "2"],
         "more than --max-prompt-tokens 2"),
        (["generate", "--model", path, "--input-ids", "1,999"], r"token ids must be in \[0, 256\)"),
        (["generate", "--model", path, "--prompt", "hello"], "no tokenizer.json"),
        (["generate", "--model", path, "--tp", "0", "--input-ids", "1"],
         "argument --tp: must be an integer >= 1, got 0"),
        (["bench", "--tp", "1"], "one of the arguments --preset --model is required"),
        (["bench", "--preset", "mamba-9b"], "invalid choice: 'mamba-9b'"),
        (["bench", "--preset", "mamba-2.8b", "--tp", "0"], "argument --tp"),
        (["score", "--model", path, "--prompt", "hello"], "no tokenizer.json: pass --input-ids "
                                                          "instead of --prompt"),
        (["score", "--model", path, "--input-ids", "7"], "scoring needs at least 2 tokens"),
        (["score", "--model", path, "--input-ids", "7,256"], r"token ids must be in \[0, 256\)"),
        (["score", "--model", path, "--text-file", str(tmp_path / "missing.txt")],
         "argument --text-file: .*missing.txt is not a file"),
        (["score", "--model", path, "--input-ids", "1,2", "--chunk-tokens", "0"],
         "argument --chunk-tokens: must be an integer >= 1, got 0"),
        (["score", "--model", path, "--input-ids", "1,2", "--chunk-tokens", "512",
          "--sequence-parallel"], "--sequence-parallel splits steps of at least "
                                  "--sequence-parallel-min-tokens 1024 tokens, and "
                                  "--chunk-tokens 512 makes every step shorter"),
        (["score", "--model", path, "--text-file", str(latin1)],
         r"--text-file .*latin1.txt is not UTF-8 text: unexpected end of data at byte 3"),
    ]
    for args, pattern in cases:
        code, err = run_main(capsys, *args)
        assert code == 2, (args, code, err)
        _assert_one_error_line(err, pattern, args)
    for args, pattern in (cases[1], cases[6]):
        code, out, err = run_cli(*args)
        assert code == 2, (args, code, out, err)
        _assert_one_error_line(err, pattern, args)


# Each rule below is checked before any model is built or rank spawned: main() returns at once
# (the checkpoint, where one is named, is only read for its config).
def run_main(capsys, *argv):
    from tpssm.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("tpssm: error:"), err
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "argument --temperature: must be a number >= 0, got -1"),
    (["--temperature", "nan"], "argument --temperature: must be a number >= 0"),
    (["--top-k", "-2"], "argument --top-k: must be an integer >= 0, got -2"),
    (["--top-p", "0"], "argument --top-p: must be a number in (0, 1], got 0"),
    (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1], got 1.5"),
    (["--top-p", "nan"], "argument --top-p: must be a number in (0, 1], got nan"),
    (["--top-p", "x"], "argument --top-p: must be a number in (0, 1], got 'x'"),
    (["--input-ids", "1,,2"], "argument --input-ids: must be comma-separated non-negative "
                              "integers, e.g. 1,2,3; got '1,,2'"),
    (["--input-ids", "-3"], "argument --input-ids: must be comma-separated non-negative "
                            "integers, got '-3'"),
    (["--input-ids", "1,x"], "argument --input-ids: must be comma-separated non-negative"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
    (["--num-slots", "0"], "argument --num-slots: must be an integer >= 1, got 0"),
    (["--max-prompt-tokens", "0"], "argument --max-prompt-tokens: must be an integer >= 1"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["--timeout", "0"], "argument --timeout: must be a number > 0, got 0"),
    (["--allreduce-min-bytes", "-1"], "argument --allreduce-min-bytes: must be an integer >= 0"),
    (["--sequence-parallel-min-tokens", "0"],
     "argument --sequence-parallel-min-tokens: must be an integer >= 1, got 0"),
    (["--sequence-parallel", "--allreduce", "fp8"],
     "--sequence-parallel reduce-scatters exactly: it needs --allreduce exact, not fp8"),
])
def test_generate_option_rules_fail_before_any_work(capsys, argv, message):
    args = ["generate", "--model", "no-such-dir"] + argv
    if "--input-ids" not in argv:
        args += ["--input-ids", "1"]
    code, err = run_main(capsys, *args)
    assert code == 2
    assert message in err


def test_generate_stops_at_each_of_the_config_eos_tokens(mamba_dir, tmp_path, capsys):
    """transformers' configs may list several eos tokens: generation stops at the first of
    them emitted (a list used to be dropped, and generation ran to --max-new-tokens)."""
    from tpssm.cli import main

    model, path = mamba_dir
    prompt = [5, 17, 99, 3, 250, 42, 7]
    expected, _ = hf_greedy(model, prompt, 7)
    stop = [expected[5], expected[3]]
    first = min(expected.index(t) for t in stop)
    assert first < 7
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in os.listdir(path):
        if name != "config.json":
            (ckpt / name).symlink_to(os.path.join(path, name))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    (ckpt / "config.json").write_text(json.dumps(dict(config, eos_token_id=stop)))
    ids = ",".join(map(str, prompt))
    for extra, want in (([], expected[:first + 1]), (["--ignore-eos"], expected)):
        assert main(["generate", "--model", str(ckpt), "--input-ids", ids, "--greedy",
                     "--max-new-tokens", "8", "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["output_ids"] == want, extra


def test_input_ids_accepts_zero_and_spaces(tmp_path, capsys):
    """0 is a token id; the rule is "non-negative", and the ids parse before the model is read
    (the missing directory is the first thing to fail)."""
    code, err = run_main(capsys, "generate", "--model", str(tmp_path / "none"),
                         "--input-ids", "0, 1 ,2")
    assert code == 2
    assert "is not a directory" in err


def test_checkpoint_problems_name_the_file(tmp_path, capsys, mamba_dir):
    _, path = mamba_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(capsys, "generate", "--model", str(empty), "--input-ids", "1")
    assert code == 2 and "no config.json" in err

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    with open(os.path.join(path, "config.json")) as f:
        (truncated / "config.json").write_text(f.read()[:40])
    code, err = run_main(capsys, "generate", "--model", str(truncated), "--input-ids", "1")
    assert code == 2
    assert f"{truncated / 'config.json'} is not valid JSON" in err and "line" in err

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    with open(os.path.join(path, "config.json")) as f:
        (no_weights / "config.json").write_text(f.read())
    code, err = run_main(capsys, "bench", "--model", str(no_weights))
    assert code == 2 and "no *.safetensors weights" in err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_output_files_need_an_existing_directory(tmp_path, capsys, option):
    """One rule for every file the CLI writes: the directory must exist (nothing is created)."""
    target = tmp_path / "missing-dir" / "out.x"
    code, err = run_main(capsys, "bench", "--preset", "mamba-2.8b", option, str(target))
    assert code == 2
    assert f"argument {option}: the directory {tmp_path / 'missing-dir'} does not exist" in err
    assert not (tmp_path / "missing-dir").exists()
    code, err = run_main(capsys, "bench", "--preset", "mamba-2.8b", option, str(tmp_path))
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize("argv, message", [
    (["--tp", "1,,2"], "argument --tp: must be comma-separated integers >= 1"),
    (["--prompt-lens", "0,8"], "argument --prompt-lens: must be comma-separated integers >= 1"),
    (["--batch-sizes", "a"], "argument --batch-sizes: must be comma-separated integers >= 1"),
    (["--rank-shard", "0"], "argument --rank-shard: must be comma-separated integers >= 1"),
    (["--num-layers", "0"], "argument --num-layers: must be an integer >= 1, got 0"),
    (["--gen-tokens", "0"], "argument --gen-tokens: must be an integer >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["--max-prefill-tokens", "0"], "argument --max-prefill-tokens: must be an integer >= 1"),
    (["--timeout", "-5"], "argument --timeout: must be a number > 0, got -5"),
])
def test_bench_option_rules_fail_before_any_work(capsys, argv, message):
    code, err = run_main(capsys, "bench", "--preset", "mamba-2.8b", *argv)
    assert code == 2
    assert message in err


def test_bench_num_layers_is_for_presets(capsys, mamba_dir):
    _, path = mamba_dir
    code, err = run_main(capsys, "bench", "--model", path, "--num-layers", "2")
    assert code == 2 and "--num-layers shortens a --preset" in err


def test_bench_plot_without_matplotlib_fails_first(capsys, monkeypatch):
    import tpssm.plot

    monkeypatch.setattr(tpssm.plot, "have_matplotlib", lambda: False)
    code, err = run_main(capsys, "bench", "--preset", "mamba-2.8b", "--plot", "out.png")
    assert code == 2 and "--plot needs matplotlib" in err


@pytest.mark.parametrize("argv, message", [
    (["--tp", "1"], "argument --tp: must be an integer >= 2, got 1"),
    (["--num-prompts", "0"], "argument --num-prompts: must be an integer >= 1, got 0"),
])
def test_demo_option_rules(capsys, argv, message):
    code, err = run_main(capsys, "demo", *argv)
    assert code == 2 and message in err


def test_every_option_shows_a_default_or_says_why_not(capsys):
    """Each option of every command has help text; those with a default show it."""
    from tpssm.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
                if not any(action.default is v for v in (None, False)):  # 0 is a default
                    assert "default" in sub._get_formatter()._get_help_string(action), \
                        (name, action.option_strings)
        assert "exit status:" in text and "rejected before any work began" in text


def test_rank_failure_line_drops_the_exception_class():
    from tpssm.runner import one_line

    message = ("rank 1 failed: ValueError: tp 512 does not divide 128 channels\n"
               "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
               "ValueError: tp 512 does not divide 128 channels")
    assert one_line(message) == "rank 1 failed: tp 512 does not divide 128 channels"


@pytest.mark.timeout(300)
def test_generate_with_quantized_allreduce(mamba_dir, capsys):
    """--allreduce int8 reaches the model: its reductions take the quantized path (counted by
    the model's strategy), and with the default threshold decode-sized messages stay exact."""
    _, path = mamba_dir
    common = ("generate", "--model", path, "--tp", "2", "--input-ids", "1,2,3,4",
              "--max-new-tokens", "5", "--ignore-eos", "--json")
    code, out, err = run_in_process(capsys, *common, "--allreduce", "int8",
                                    "--allreduce-min-bytes", "0")
    assert code == 0, err
    record = json.loads(out)
    assert len(record["output_ids"]) == 5
    assert all(0 <= t < 256 for t in record["output_ids"])
    calls = record["allreduce_calls"]
    # out_proj (width 64) quantizes; x_proj's 36-wide output no group size divides stays exact.
    assert calls["quantized"] > 0 and calls["exact"] == calls["quantized"], calls
    code, out, err = run_in_process(capsys, *common, "--allreduce", "exact")
    assert code == 0, err
    calls = json.loads(out)["allreduce_calls"]
    assert calls["quantized"] == 0 and calls["exact"] > 0, calls


@pytest.mark.timeout(300)
def test_generate_with_sequence_parallel(mamba_dir, capsys):
    """--sequence-parallel reaches the model: at tp 3 the prompt's prefill reduce-scatters
    (counted by the model's strategy) and the tokens are those of the all-reduce path; under
    --sequence-parallel-min-tokens the prefill keeps the all-reduce."""
    _, path = mamba_dir
    common = ("generate", "--model", path, "--tp", "3", "--input-ids", "1,2,3,4,5,6,7",
              "--max-new-tokens", "5", "--ignore-eos", "--json")
    runs = {}
    for name, extra in (("plain", ()),
                        ("sp", ("--sequence-parallel", "--sequence-parallel-min-tokens", "7")),
                        ("under", ("--sequence-parallel", "--sequence-parallel-min-tokens", "8"))):
        code, out, err = run_in_process(capsys, *common, *extra)
        assert code == 0, err
        runs[name] = json.loads(out)
    layers = 3  # hf_models' mamba config
    assert runs["sp"]["allreduce_calls"]["scatter"] == layers, runs["sp"]["allreduce_calls"]
    assert runs["plain"]["allreduce_calls"]["scatter"] == 0
    assert runs["under"]["allreduce_calls"]["scatter"] == 0
    assert runs["sp"]["output_ids"] == runs["plain"]["output_ids"] == runs["under"]["output_ids"]


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


@pytest.fixture(scope="module")
def mamba_dir_with_tokenizer(mamba_dir, tmp_path_factory):
    """mamba_dir with a tokenizer.json whose word "w<i>" is token i."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    model, path = mamba_dir
    with_tok = str(tmp_path_factory.mktemp("ckpt") / "with_tokenizer")
    shutil.copytree(path, with_tok)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(with_tok, "tokenizer.json"))
    return model, with_tok


@pytest.mark.timeout(300)
def test_generate_text_prompt_uses_the_checkpoint_tokenizer(mamba_dir_with_tokenizer, capsys):
    model, with_tok = mamba_dir_with_tokenizer
    expected, _ = hf_greedy(model, [5, 17, 99], 3)
    code, out, err = run_in_process(capsys, "generate", "--model", with_tok, "--prompt",
                                    "w5 w17 w99", "--max-new-tokens", "4", "--ignore-eos",
                                    "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["input_ids"] == [5, 17, 99]
    assert record["output_ids"] == expected
    assert record["text"] == " ".join(f"w{t}" for t in expected)


@pytest.mark.timeout(300)
def test_sampled_generation_at_tp2_is_seeded(mamba_dir, capsys):
    """Sampling at tp 2: rank 0's tokens are broadcast, so the ranks stay in lockstep, and the
    same seed gives the same tokens."""
    _, path = mamba_dir
    args = ("generate", "--model", path, "--tp", "2", "--input-ids", "5,17,99",
            "--max-new-tokens", "6", "--ignore-eos", "--temperature", "0.9", "--top-k", "20",
            "--seed", "7", "--json")
    runs = []
    tiny_top_p = ("--temperature", "5", "--top-p", "1e-6")
    for extra in ((), (), ("--seed", "8"), ("--greedy",), tiny_top_p):
        code, out, err = run_in_process(capsys, *args, *extra)
        assert code == 0, err
        runs.append(json.loads(out)["output_ids"])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 6 and all(0 <= t < 256 for t in runs[0])
    # The flags reach the sampler: another seed draws other tokens, and greedy differs; a top-p
    # below every probability leaves the top token alone, even at temperature 5.
    assert runs[2] != runs[0] and runs[3] != runs[0]
    assert runs[4] == runs[3]


@pytest.mark.timeout(300)
def test_logits_that_are_not_finite_end_the_run_with_an_error(tmp_path, capsys):
    """float16 overflow (final norm weights of 1e6): generate exits 1 naming the prompt and the
    cause instead of printing the argmax of NaN; float32 runs."""
    path = str(tmp_path / "overflow")
    save_overflowing_checkpoint(path)
    capsys.readouterr()  # transformers' save progress
    args = ("generate", "--model", path, "--input-ids", "5,17,99", "--max-new-tokens", "3",
            "--ignore-eos")
    code, _, err = run_in_process(capsys, *args, "--dtype", "float16")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "prompt 0: new token 0: the model's logits are not finite (NaN or inf)" in err
    code, out, err = run_in_process(capsys, *args, "--dtype", "float32")
    assert code == 0, err


@pytest.mark.timeout(300)
def test_score_reports_transformers_logprobs_and_perplexity(mamba_dir_with_tokenizer, tmp_path,
                                                            capsys):
    """score: a text file, a prompt and token ids give the same JSON; tp 2 (vocabulary-parallel
    head) equals tp 1; the log-probabilities are transformers' and the perplexity their
    exp(-mean); --allreduce int8 reaches the layers (quantized calls, close results)."""
    from hf_models import hf_full_logits

    model, path = mamba_dir_with_tokenizer
    ids = [5, 17, 99, 3, 250, 42, 7, 11, 64]
    text = " ".join(f"w{t}" for t in ids)
    # A byte-order mark and Windows line ends, as editors write them: the same tokens.
    (tmp_path / "text.txt").write_bytes(("\ufeff" + text + "\r\n").encode("utf-8"))
    expect = hf_full_logits(model, ids).log_softmax(-1)[:-1].gather(
        -1, torch.tensor(ids[1:])[:, None]).squeeze(-1)

    def score(*extra):
        code, out, err = run_in_process(capsys, "score", "--model", path, "--json",
                                        "--chunk-tokens", "4", *extra)
        assert code == 0, err
        return json.loads(out)

    base = score("--text-file", str(tmp_path / "text.txt"))
    assert base["input_ids"] == ids and base["num_tokens"] == len(ids)
    assert base["tokens_scored"] == len(ids) - 1
    assert base["dtype"] == "float32" and base["chunk_tokens"] == 4
    got = torch.tensor(base["token_logprobs"])
    assert float((got - expect).abs().max()) < 3e-5
    assert base["nll_sum"] == pytest.approx(-float(got.double().sum()), rel=1e-12)
    assert base["nll_mean"] == pytest.approx(base["nll_sum"] / (len(ids) - 1), rel=1e-12)
    assert base["perplexity"] == pytest.approx(math.exp(base["nll_mean"]), rel=1e-12)
    assert score("--prompt", text)["token_logprobs"] == base["token_logprobs"]
    assert score("--input-ids", ",".join(map(str, ids)))["token_logprobs"] == \
        base["token_logprobs"]
    tp2 = score("--input-ids", ",".join(map(str, ids)), "--tp", "2")
    assert float((torch.tensor(tp2["token_logprobs"]) - got).abs().max()) < 1e-5
    assert tp2["allreduce_calls"]["quantized"] == 0
    int8 = score("--input-ids", ",".join(map(str, ids)), "--tp", "2", "--allreduce", "int8",
                 "--allreduce-min-bytes", "0")
    assert int8["allreduce_calls"]["quantized"] > 0
    diff = float((torch.tensor(int8["token_logprobs"]) - got).abs().max())
    assert 0 < diff < 0.05, diff
    code, out, err = run_in_process(capsys, "score", "--model", path, "--prompt", text)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"scored {len(ids) - 1} tokens (the first of {len(ids)} is "
                               f"context only)")
    assert lines[1] == (f"cross-entropy {base['nll_mean']:.4f} nats/token, perplexity "
                        f"{base['perplexity']:.4g}")


def test_state_cache_slots_default_to_the_prompts_that_can_run_at_once():
    """`generate` (one prompt) allocates one slot, not max_batch_size of them; --num-slots and
    a batch larger than max_batch_size keep their counts."""
    from types import SimpleNamespace

    from tpssm.runner import GenerateJob, make_engine

    def slots_of(prompts, **job):
        asked = []

        def allocate_cache(slots, max_seq_len):
            asked.append(slots)
            return SimpleNamespace(has_kv=False, max_seq_len=None, num_free=slots)

        model = SimpleNamespace(config=SimpleNamespace(vocab_size=10, hidden_size=4),
                                ctx=SimpleNamespace(device=torch.device("cpu"), group=None),
                                allocate_cache=allocate_cache,
                                allreduce=SimpleNamespace(reserve=lambda n: None))
        make_engine(model, GenerateJob(None, prompts, 3, **job))
        return asked[0]

    assert slots_of([[1, 2]]) == 1
    assert slots_of([[1]] * 3) == 3
    assert slots_of([[1]] * 20) == 8
    assert slots_of([[1]], num_slots=5) == 5
    assert slots_of([], max_batch_size=4) == 4  # bench: prompts come later, batches of 4


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="the message of a machine without a GPU")
def test_device_cuda_without_a_gpu_is_named_before_any_rank_starts():
    from types import SimpleNamespace

    from tpssm.runner import CLIError, spawn

    job = SimpleNamespace(spec=SimpleNamespace(device="cuda"))
    with pytest.raises(CLIError, match="--device cuda was asked for but no GPU is available"):
        spawn(print, 2, job, timeout_s=10)  # print never runs: no rank is started


def test_ssd_scan_on_a_mamba1_model_is_refused_before_any_work(capsys, mamba_dir):
    """The SSD scan needs one decay per head (Mamba-2): a Mamba-1 checkpoint, or a hybrid whose
    mixers are Mamba-1, gets the option's error (exit 2) instead of a rank failure."""
    code, err = run_main(capsys, "generate", "--model", mamba_dir[1], "--input-ids", "1",
                         "--scan-algorithm", "ssd")
    assert code == 2
    assert "--scan-algorithm ssd needs a Mamba-2 model" in err and "mixers are mamba" in err
    code, err = run_main(capsys, "bench", "--preset", "zamba-7b-v1", "--scan-algorithm", "ssd")
    assert code == 2
    assert "--scan-algorithm ssd needs a Mamba-2 model" in err
