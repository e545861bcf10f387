"""The tpssm command line: `python -m tpssm {demo,generate,score,bench}` (also the `tpssm` script).

- demo: a small random Mamba at tp 1 and tp N (gloo processes on a CPU-only machine, NCCL with
  N GPUs): generates for a batch of prompts, prints tokens/s, checks the tp N tokens equal tp 1.
- generate: a local Hugging Face checkpoint at --tp N.
- score: each token's log-probability under a checkpoint, and the perplexity, at --tp N (long
  texts in chunks through the state cache).
- bench: throughput, time to first token and decode latency over a sweep of prompt lengths and
  batch sizes, for a preset at its real dimensions (random weights) or a checkpoint.

This module is the parser and the commands' checks: every rule an option's value must meet is
checked here, before a model is built or a rank is spawned. The work itself lives in
tpssm.runner (models and rank jobs), tpssm.bench (the sweep) and tpssm.plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional, Sequence

import torch

from tpssm.ops import SCAN_ALGORITHMS
from tpssm.parallel import PROJECTION_KERNELS
from tpssm.presets import PRESETS, preset_config
from tpssm.runner import (DTYPES, CLIError, GenerateJob, ModelSpec, ScoreJob, UsageError,
                          generate_rank, is_primary, log, one_line, score_rank, spawn)

__all__ = ["main", "build_parser"]

EXIT_STATUS = """\
exit status:
  0    success
  1    the run failed after it started (a rank raised, died or timed out)
  2    the command was rejected before any work began: an option's value, or a file or
       directory an option names (missing, unreadable, not a checkpoint)
  130  interrupted
Every error is one line on stderr: "tpssm: error: " and what to change."""


# ----------------------------------------------------------------------------------- option types
# argparse calls these on the option's text (and on string defaults); an ArgumentTypeError
# becomes "argument --name: <message>", exit status 2.
def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def float_rule(lo: float, inclusive: bool):
    rule = f"{'>=' if inclusive else '>'} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text!r}") from None
        if not (value >= lo if inclusive else value > lo) or value != value:
            raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text}")
        return value
    parse.__name__ = f"number {rule}"
    return parse


def probability(text: str) -> float:
    """A number in (0, 1] (--top-p)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def int_list(lo: int, what: str):
    """Comma-separated integers >= lo; an empty item ("1,,2") is an error, not skipped."""
    def parse(text: str) -> List[int]:
        items = [t.strip() for t in text.split(",")]
        try:
            values = [int(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated {what}, e.g. 1,2,3; got {text!r}") from None
        if any(v < lo for v in values):
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")
        return values
    parse.__name__ = f"list of {what}"
    return parse


def input_file(text: str) -> str:
    """A file the CLI reads (--text-file): it must exist and be readable."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


def output_file(text: str) -> str:
    """The rule for every file the CLI writes (--json, --plot): its directory must exist (it is
    not created), and the path must not be a directory."""
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the directory {parent} does not exist (create it "
                                         f"first; output directories are not created)")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"the directory {parent} is not writable")
    return text


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)


# ----------------------------------------------------------------------------------- checks
def check_checkpoint(path: str, option: str = "--model"):
    """The checkpoint directory's config, checked in this process before any rank starts: the
    directory, its config.json (readable JSON of a supported family) and its weights."""
    import glob

    from tpssm.models import load_config

    if not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is not a directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UsageError(f"{option} {path}: no config.json (a Hugging Face checkpoint directory "
                         f"holds config.json and *.safetensors weights)")
    try:
        with open(config_file) as f:
            json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} {path}: {config_file} is not valid JSON ({exc.msg} at line "
                         f"{exc.lineno} column {exc.colno}; is the file complete?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {path}: cannot read {config_file} ({exc})") from None
    try:
        config = load_config(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{option} {path}: {one_line(str(exc))}") from None
    if not (os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
            or glob.glob(os.path.join(path, "*.safetensors"))):
        raise UsageError(f"{option} {path}: no *.safetensors weights (model.safetensors, or "
                         f"shards listed in model.safetensors.index.json)")
    return config


def check_scan_algorithm(config, algorithm: str) -> None:
    """--scan-algorithm ssd runs only the Mamba-2 form (one decay per head): refused here for
    other models, before any rank loads them."""
    mixer = getattr(config, "mixer", config)  # a hybrid's Mamba layers, or the SSM itself
    if algorithm == "ssd" and not mixer.is_mamba2:
        raise UsageError(f"--scan-algorithm ssd needs a Mamba-2 model (one decay per head), and "
                         f"this one's mixers are {mixer.family}: use auto or recurrent")


def check_plot(path: Optional[str]) -> None:
    from tpssm.plot import have_matplotlib

    if path and not have_matplotlib():
        raise UsageError("--plot needs matplotlib, which is not installed (pip install "
                         "matplotlib), or leave --plot out")


def _load_tokenizer(path: str):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError("the checkpoint ships tokenizer.json but the `tokenizers` package is "
                         "not installed: pip install tokenizers, or pass --input-ids") from None
    tokenizer = Tokenizer.from_file(file)
    # A tokenizer.json may carry a truncation or padding setting (for training batches): it
    # would cut a long prompt or text, or add tokens, without a word.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


# ----------------------------------------------------------------------------------- commands
# Why the demo's timings on a CPU say little about tensor parallelism, for either outcome.
CPU_TP_SLOWER = """\
note: tp {tp} is slower than tp 1 here, as expected on a CPU: tp {tp} is {tp} gloo processes
sharing this machine's {cores} cores, each rank gets 1/{tp} of the threads, every layer's
all-reduce crosses a process boundary, and the demo's layers are too small for the split compute
to pay for that. The speedup needs one GPU per rank; on a CPU the demo shows that the tokens
match."""
CPU_TP_FASTER = """\
note: on a CPU, tp {tp} is {tp} gloo processes sharing this machine's {cores} cores; its timing
here mostly reflects how busy the machine is (other work slows tp 1's multi-threaded process more
than single-threaded ranks), not tensor parallelism. The speedup needs one GPU per rank; on a
CPU the demo shows that the tokens match."""


def cmd_demo(args) -> int:
    from tpssm.presets import DEMO_CONFIG

    g = torch.Generator().manual_seed(args.seed)
    lens = [int(v) for v in torch.randint(4, 48, (args.num_prompts,), generator=g)]
    prompts = [torch.randint(DEMO_CONFIG["vocab_size"], (n,), generator=g).tolist() for n in lens]
    device = args.device
    if device == "auto":  # both runs on the same kind of device, so their tokens compare
        device = "cuda" if torch.cuda.device_count() >= args.tp else "cpu"
    spec = ModelSpec(config=DEMO_CONFIG, seed=args.seed, device=device)
    results = {}
    for tp in (1, args.tp):
        log(f"demo: {len(prompts)} prompts, {args.max_new_tokens} new tokens each, tp {tp}")
        job = GenerateJob(spec, prompts, args.max_new_tokens, max_batch_size=args.num_prompts,
                          warmup=True)
        results[tp] = spawn(generate_rank, tp, job, args.timeout)[0]
    if not is_primary():
        return 0
    print(f"{'tp':>3} {'device':>8} {'requests':>8} {'new tokens':>10} {'seconds':>8} "
          f"{'tokens/s':>9}")
    for tp, r in results.items():
        print(f"{tp:>3} {r['device']:>8} {len(prompts):>8} {r['new_tokens']:>10} "
              f"{r['seconds']:>8.3f} {r['new_tokens'] / r['seconds']:>9.1f}")
    same = results[1]["outputs"] == results[args.tp]["outputs"]
    print(f"tp {args.tp} tokens equal tp 1 tokens: {'yes' if same else 'NO'}")
    if device == "cpu":
        speed = {tp: r["new_tokens"] / r["seconds"] for tp, r in results.items()}
        note = CPU_TP_SLOWER if speed[args.tp] < speed[1] else CPU_TP_FASTER
        print(note.format(tp=args.tp, cores=os.cpu_count()))
    if not same:
        for i, (a, b) in enumerate(zip(results[1]["outputs"], results[args.tp]["outputs"])):
            if a != b:
                print(f"  request {i}: tp 1 {a}\n  request {i}: tp {args.tp} {b}")
        return 1
    return 0


def _prompt_ids(args, config, tokenizer) -> List[int]:
    """The token ids of --input-ids, or of --prompt / --text-file through the checkpoint's
    tokenizer.json, checked against the vocabulary."""
    if args.input_ids is not None:
        ids = args.input_ids
    else:
        text, option = args.prompt, "--prompt"
        if getattr(args, "text_file", None) is not None:
            option = "--text-file"
            try:
                # The text as written: a byte-order mark dropped, line ends kept.
                with open(args.text_file, encoding="utf-8-sig", newline="") as f:
                    text = f.read()
            except UnicodeDecodeError as exc:
                raise UsageError(f"--text-file {args.text_file} is not UTF-8 text: "
                                 f"{exc.reason} at byte {exc.start}") from None
        if tokenizer is None:
            raise UsageError(f"{args.model} ships no tokenizer.json: pass --input-ids instead "
                             f"of {option}")
        ids = tokenizer.encode(text).ids
        if not ids:
            raise UsageError(f"{option} encodes to no tokens")
    bad = [t for t in ids if not t < config.vocab_size]
    if bad:
        raise UsageError(f"token ids must be in [0, {config.vocab_size}) (the model's "
                         f"vocabulary), got {bad[:5]}")
    return ids


def _model_spec(args, sequence_parallel: int) -> ModelSpec:
    return ModelSpec(path=args.model, dtype=args.dtype, device=args.device,
                     allreduce=args.allreduce, allreduce_min_bytes=args.allreduce_min_bytes,
                     scan_algorithm=args.scan_algorithm, projection_kernel=args.projection_kernel,
                     programmatic_launch=args.programmatic_launch,
                     sequence_parallel_min_tokens=sequence_parallel)


def _sequence_parallel(args) -> int:
    """ModelSpec.sequence_parallel_min_tokens from --sequence-parallel (0: off)."""
    if not args.sequence_parallel:
        return 0
    if args.allreduce != "exact":
        raise UsageError(f"--sequence-parallel reduce-scatters exactly: it needs --allreduce "
                         f"exact, not {args.allreduce}")
    return args.sequence_parallel_min_tokens


def _stop_tokens(eos):
    """The checkpoint config's eos_token_id: an int, a list of ints (as transformers writes
    several stop tokens) or anything else, which sets no stop token."""
    if isinstance(eos, int) and not isinstance(eos, bool):
        return eos
    if isinstance(eos, list) and eos and all(
            isinstance(t, int) and not isinstance(t, bool) for t in eos):
        return tuple(eos)
    return None


def cmd_generate(args) -> int:
    sequence_parallel = _sequence_parallel(args)
    config = check_checkpoint(args.model)
    check_scan_algorithm(config, args.scan_algorithm)
    tokenizer = _load_tokenizer(args.model)
    ids = _prompt_ids(args, config, tokenizer)
    if len(ids) > args.max_prompt_tokens:
        raise UsageError(f"the prompt has {len(ids)} tokens, more than --max-prompt-tokens "
                         f"{args.max_prompt_tokens}")
    eos = _stop_tokens(config.eos_token_id)
    job = GenerateJob(_model_spec(args, sequence_parallel), [ids], args.max_new_tokens,
                      temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed,
                      eos_token_id=None if args.ignore_eos else eos,
                      max_prompt_tokens=args.max_prompt_tokens, num_slots=args.num_slots)
    result = spawn(generate_rank, args.tp, job, args.timeout)[0]
    out = result["outputs"][0]
    record = {"model": args.model, "tp": args.tp, "input_ids": ids, "output_ids": out,
              "seconds": result["seconds"], "allreduce": args.allreduce,
              "allreduce_calls": result["allreduce_calls"]}
    if tokenizer is not None:
        record["text"] = tokenizer.decode(out)
    if not is_primary():
        return 0
    if args.json:
        print(json.dumps(record))
    else:
        print(" ".join(str(t) for t in out))
        if "text" in record:
            print(record["text"])
    return 0


def cmd_score(args) -> int:
    sequence_parallel = _sequence_parallel(args)
    config = check_checkpoint(args.model)
    check_scan_algorithm(config, args.scan_algorithm)
    ids = _prompt_ids(args, config, _load_tokenizer(args.model))
    if len(ids) < 2:
        raise UsageError(f"scoring needs at least 2 tokens (the first is only context), got "
                         f"{len(ids)}")
    if sequence_parallel > args.chunk_tokens:
        raise UsageError(f"--sequence-parallel splits steps of at least "
                         f"--sequence-parallel-min-tokens {sequence_parallel} tokens, and "
                         f"--chunk-tokens {args.chunk_tokens} makes every step shorter")
    job = ScoreJob(_model_spec(args, sequence_parallel), ids, chunk_tokens=args.chunk_tokens)
    result = spawn(score_rank, args.tp, job, args.timeout)[0]
    logprobs = result["token_logprobs"]
    nll = -math.fsum(logprobs)
    mean = nll / len(logprobs)
    record = {"model": args.model, "tp": args.tp, "dtype": args.dtype,
              "chunk_tokens": args.chunk_tokens, "input_ids": ids, "num_tokens": len(ids),
              "tokens_scored": len(logprobs), "nll_sum": nll, "nll_mean": mean,
              # exp overflows a float past ~709 nats a token (a model that has it all wrong)
              "perplexity": math.exp(mean) if mean < 700 else float("inf"),
              # the whole run, first kernel launches included (no warm-up)
              "seconds": result["seconds"],
              "allreduce": args.allreduce, "allreduce_calls": result["allreduce_calls"],
              "token_logprobs": logprobs}
    if not is_primary():
        return 0
    if args.json:
        print(json.dumps(record))
    else:
        print(f"scored {len(logprobs)} tokens (the first of {len(ids)} is context only) in "
              f"{result['seconds']:.2f} s")
        print(f"cross-entropy {record['nll_mean']:.4f} nats/token, perplexity "
              f"{record['perplexity']:.4g}")
    return 0


def cmd_bench(args) -> int:
    from tpssm import bench, plot

    sequence_parallel = _sequence_parallel(args)

    config = (check_checkpoint(args.model) if args.model is not None
              else preset_config(args.preset))
    check_scan_algorithm(config, args.scan_algorithm)
    check_plot(args.plot)
    if args.num_layers is not None and args.model is not None:
        raise UsageError("--num-layers shortens a --preset; a --model checkpoint runs at its "
                         "own depth")
    if args.rank_shard:
        from tpssm.launch import under_torchrun

        if under_torchrun():
            raise UsageError("--rank-shard times one process on its own: run it without "
                             "torchrun")
    spec = ModelSpec(path=args.model, preset=args.preset, num_layers=args.num_layers,
                     dtype=args.dtype, device=args.device, allreduce=args.allreduce,
                     allreduce_min_bytes=args.allreduce_min_bytes,
                     scan_algorithm=args.scan_algorithm, projection_kernel=args.projection_kernel,
                     programmatic_launch=args.programmatic_launch,
                     sequence_parallel_min_tokens=sequence_parallel)
    modes = [True, False] if args.compare_state_cache else [not args.no_state_cache]
    job = bench.BenchJob(spec, args.prompt_lens, args.batch_sizes, args.gen_tokens,
                         args.max_prefill_tokens, modes, args.repeats)
    full_layers = preset_config(args.preset).num_hidden_layers if args.preset else None
    report = {"model": spec.describe(),
              "num_layers": args.num_layers or full_layers, "full_num_layers": full_layers,
              "dtype": args.dtype, "allreduce": args.allreduce,
              "allreduce_min_bytes": args.allreduce_min_bytes,
              "scan_algorithm": args.scan_algorithm, "projection_kernel": args.projection_kernel,
              "programmatic_launch": args.programmatic_launch,
              "sequence_parallel_min_tokens": sequence_parallel,
              "gen_tokens": args.gen_tokens, "max_prefill_tokens": args.max_prefill_tokens,
              "complete": False,
              "environment": bench.environment(), "rows": []}
    bench.run_sweep(job, args.tp, args.rank_shard or [], report, args.json if is_primary()
                    else None, args.timeout, args.compare_state_cache)
    if not is_primary():
        return 0
    print(bench.format_table(report))
    if args.compare_state_cache:
        print(bench.format_speedups(report))
    if args.plot:
        plot.plot_bench(report["rows"], args.plot, bench.describe_run(report))
        log(f"bench: wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, except where there is none to show (None, a flag off) or
    the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in`: 0 == False, and a default of 0 is one to show.
        if "default" in text or any(action.default is v for v in (None, False,
                                                                    argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other error, and exit status 2."""
        self.exit(2, f"tpssm: error: {message} (see: {self.prog} --help)\n")


def _allreduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allreduce", choices=["exact", "int8", "fp8", "fp16"], default="exact",
                   help="TP aggregation: exact, or quantized (int8 / fp8 two-shot, the paper's "
                        "fp16 cast)")
    p.add_argument("--allreduce-min-bytes", type=NON_NEGATIVE, default=1 << 20,
                   help="messages below this many bytes use the exact all-reduce (decode "
                        "messages are latency-bound; quantization pays on prefill's large ones)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="prefill steps of at least --sequence-parallel-min-tokens tokens split "
                        "the residual stream and the layer norms by tokens over the tp ranks "
                        "(out_proj's all-reduce becomes a reduce-scatter, the norm runs on a "
                        "rank's tokens, an all-gather follows); needs --allreduce exact; "
                        "default off")
    p.add_argument("--sequence-parallel-min-tokens", type=POSITIVE, default=1024,
                   help="with --sequence-parallel: the shortest prefill step that runs "
                        "sequence-parallel")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU per rank when there are enough, else the CPU")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and activations (the SSM state stays float32)")
    _device_arg(p)
    p.add_argument("--timeout", type=float_rule(0, inclusive=False), default=1800.0,
                   help="seconds before a run (all ranks) is declared dead")
    p.add_argument("--scan-algorithm", choices=SCAN_ALGORITHMS, default="auto",
                   help="prefill selective scan: auto (the chunked SSD kernel for Mamba-2 where "
                        "it covers the shape, else the recurrence), or force one")
    p.add_argument("--projection-kernel", choices=PROJECTION_KERNELS, default="torch",
                   help="decode-sized projections (at most 8 tokens) and the LM head: torch "
                        "(F.linear, cuBLAS on CUDA) or gemv (tpssm's kernel); larger steps "
                        "always use F.linear")
    p.add_argument("--programmatic-launch", action="store_true",
                   help="launch the decode-step kernels with programmatic dependent launch "
                        "(sm_90+ GPUs; each overlaps the tail of the one before it; default off)")


def _checkpoint_args(p: argparse.ArgumentParser, what: str, text_file: bool = False) -> None:
    """--model, --tp and where the tokens come from, for a command that runs a checkpoint."""
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json and *.safetensors)")
    p.add_argument("--tp", type=POSITIVE, default=1,
                   help="tensor-parallel degree: local processes, or torchrun's ranks")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, encoded with the checkpoint's tokenizer.json")
    if text_file:
        src.add_argument("--text-file", type=input_file,
                         help="a UTF-8 text file, encoded with the checkpoint's tokenizer.json")
    src.add_argument("--input-ids", type=int_list(0, "non-negative integers"),
                     help=f"the {what} as comma-separated token ids, e.g. 1,2,3")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpssm", description=__doc__.split("\n\n")[0],
                     epilog=EXIT_STATUS, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EXIT_STATUS,
                              formatter_class=_HelpFormatter)

    p = command("demo", "tp N vs tp 1 on a small random Mamba: tokens/s and equal tokens")
    p.add_argument("--tp", type=int_at_least(2), default=2,
                   help="the tp degree compared with tp 1")
    p.add_argument("--num-prompts", type=POSITIVE, default=8,
                   help="requests generated together (random prompts of 4-47 tokens)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=24,
                   help="tokens generated per request")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0,
                   help="seed of the prompts and of the random weights")
    _device_arg(p)
    p.add_argument("--timeout", type=float_rule(0, inclusive=False), default=600.0,
                   help="seconds before a run (all ranks) is declared dead")
    p.set_defaults(func=cmd_demo)

    p = command("generate", "generate from a local Hugging Face checkpoint")
    _checkpoint_args(p, "prompt")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32,
                   help="tokens to generate (fewer when the model emits its eos token)")
    p.add_argument("--greedy", action="store_true",
                   help="argmax decoding, whatever --temperature says")
    p.add_argument("--temperature", type=float_rule(0, inclusive=True), default=0.0,
                   help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0,
                   help="sample among the k most likely tokens; 0 keeps every token")
    p.add_argument("--top-p", type=probability, default=1.0,
                   help="sample among the most likely tokens whose probabilities sum to p "
                        "(nucleus sampling); 1 keeps every token")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampling seed")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate --max-new-tokens even past the eos token")
    p.add_argument("--max-prompt-tokens", type=POSITIVE, default=32768,
                   help="longest prompt accepted")
    p.add_argument("--num-slots", type=POSITIVE, default=None,
                   help="state cache slots (default: 1, the one prompt)")
    _allreduce_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (ids, text, seconds) instead of plain lines")
    _common(p)
    p.set_defaults(func=cmd_generate)

    p = command("score", "each token's log-probability and the perplexity of a text under a "
                         "local Hugging Face checkpoint")
    _checkpoint_args(p, "text", text_file=True)
    p.add_argument("--chunk-tokens", type=POSITIVE, default=2048,
                   help="tokens a forward step takes; the state carries from chunk to chunk, "
                        "so memory does not grow with the text (a hybrid's KV cache does)")
    _allreduce_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the sums, the perplexity and every token's "
                        "log-probability) instead of two lines")
    _common(p)
    p.set_defaults(func=cmd_score)

    p = command("bench", "throughput / TTFT / decode latency sweep")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS),
                       help="a public checkpoint's dimensions with random weights")
    which.add_argument("--model", help="checkpoint directory (config.json and *.safetensors)")
    p.add_argument("--tp", type=int_list(1, "integers >= 1"), default="1",
                   help="tp degree(s), comma-separated, e.g. 1,2,4; one run each")
    p.add_argument("--num-layers", type=POSITIVE, default=None,
                   help="shorten the preset to this many layers (default: its full depth, "
                        "38-81 layers; a CPU has no time for that)")
    p.add_argument("--prompt-lens", type=int_list(1, "integers >= 1"), default="128,512,2048",
                   help="prompt lengths of the sweep, in tokens")
    p.add_argument("--batch-sizes", type=int_list(1, "integers >= 1"), default="1,8",
                   help="batch sizes of the sweep (requests generated together)")
    p.add_argument("--gen-tokens", type=POSITIVE, default=32,
                   help="new tokens per request")
    p.add_argument("--max-prefill-tokens", type=POSITIVE, default=8192,
                   help="prompt tokens per engine step; longer prompts prefill in chunks")
    p.add_argument("--repeats", type=POSITIVE, default=1,
                   help="timed runs per point (the median is reported)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-state-cache", action="store_true",
                       help="baseline: recompute the whole prefix for every new token")
    cache.add_argument("--compare-state-cache", action="store_true",
                       help="run with and without the state cache and print the speedups")
    p.add_argument("--rank-shard", type=int_list(1, "integers >= 1"), default=None,
                   help="tp degree(s): also time rank 0's shard of a tp-way model alone on one "
                        "device, collectives skipped (per-rank compute at tp shard sizes)")
    _allreduce_args(p)
    p.add_argument("--json", type=output_file,
                   help="write the results as JSON to this file (rewritten after every tp "
                        "degree; its directory must exist)")
    p.add_argument("--plot", type=output_file,
                   help="write a PNG of throughput, TTFT and decode latency against prompt "
                        "length (needs matplotlib; its directory must exist)")
    _common(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns the exit status (see EXIT_STATUS)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"tpssm: error: {exc}", file=sys.stderr)
        return 2
    except CLIError as exc:
        print(f"tpssm: error: {exc}", file=sys.stderr)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        print(f"tpssm: error: {one_line(str(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        print("tpssm: interrupted", file=sys.stderr)
        return 130
    return 1
