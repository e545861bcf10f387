"""The prepared GPU checks (benchmarks/gpu_*.sh) run on a lent GPU machine whose minutes are
scarce: a stage lost to a renamed flag, a moved test or a typo in an embedded snippet costs a
run. Here each script runs for real under bash on the CPU, in a copy of the tree's layout, with
every program it starts replaced by a recorder: python (the `PYTHON` it honours), nvidia-smi,
ncu, compute-sanitizer, cmake and the CMake benchmark binaries that the fake cmake "builds". The
shell does its own expansion (functions, heredoc loops, defaults), and the recorded command lines
are then checked here:

- a benchmarks/*.py script: its own argument parser, and its own checks of the values up to its
  first CUDA check, accept the arguments (nothing of the script's work runs);
- `-m tpssm`: the command line's parser accepts them;
- `-m pytest`: the test files exist and pytest collects with the arguments given (its options,
  a `-k` that selects at least one test);
- sanitize_cases.py: the group names exist;
- `-c` code and a heredoc on stdin: it compiles;
- a CMake binary: each `--option` is one its source reads;
- ncu and compute-sanitizer: only the options these scripts are known to use.

Each script must exit 0 with every stage ok, and every benchmarks/*.py script and CMake binary
it names must have been started by it, so a stage that silently stopped running shows here too."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GPU_SCRIPTS = ("gpu_check.sh", "gpu_decode_check.sh", "gpu_scan_check.sh")

# Appends one JSON line per start: the program's role, its arguments, the GPU script that started
# it and, for `python -`, stdin.
RECORDER = r'''
import json, os, sys
role, argv = sys.argv[1], sys.argv[2:]
stdin = sys.stdin.read() if role == "python" and argv[:1] == ["-"] else None
with open(os.environ["GPU_SCRIPT_LOG"], "a") as f:
    f.write(json.dumps({"role": role, "argv": argv, "cwd": os.getcwd(), "stdin": stdin,
                        "script": os.environ["GPU_SCRIPT_NAME"]}) + "\n")
'''

# Options that take a value, per wrapper; the program it wraps follows the options.
WRAPPER_OPTIONS = {
    "ncu": {"--clock-control", "--launch-count", "--launch-skip", "--kernel-name", "--section"},
    "compute-sanitizer": {"--tool", "--error-exitcode"},
}
SANITIZER_TOOLS = {"memcheck", "racecheck", "initcheck", "synccheck"}


def _fake(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def _tree(tmp: Path) -> Path:
    """A root of links to the repository's files (benchmarks/out left behind), where the scripts
    run and write their logs; .ci/build_cmake.sh is the real one, run against the fake cmake."""
    root = tmp / "root"
    (root / "benchmarks").mkdir(parents=True)
    for name in ("python", "tests", "tools", "setup.py", ".ci", "csrc"):
        (root / name).symlink_to(ROOT / name)
    for item in BENCH.iterdir():
        if item.name != "out":
            (root / "benchmarks" / item.name).symlink_to(item)
    return root


def _fakes(tmp: Path) -> Path:
    """bin/ with the recording programs; also the fake CUDA_HOME/bin the scripts prepend."""
    bin_dir = tmp / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    recorder = tmp / "recorder.py"
    recorder.write_text(RECORDER)
    record = f'"{sys.executable}" "{recorder}"'
    _fake(bin_dir / "python", f'exec {record} python "$@"')
    _fake(bin_dir / "nvidia-smi", 'echo "Fake GPU, 81559 MiB, 0.0"')
    _fake(bin_dir / "nvcc", 'echo "Cuda compilation tools, fake"')
    binaries = sorted(p.stem for p in (BENCH / "cpp").glob("bench_*.cpp"))
    binary_body = f'exec {record} "binary:$(basename "$0")" "$@"'
    # `cmake --build DIR`: the benchmark binaries appear there, each one a recorder.
    _fake(bin_dir / "cmake", "\n".join([
        'if [ "$1" = --build ]; then',
        '  for b in ' + " ".join(binaries) + '; do',
        "    printf '%s\\n' '#!/usr/bin/env bash' " + shlex.quote(binary_body) + ' > "$2/$b"',
        '    chmod +x "$2/$b"',
        "  done",
        "fi",
        'for ((i = 1; i < $#; i++)); do',
        '  [ "${!i}" = -B ] && { j=$((i + 1)); mkdir -p "${!j}"; }',
        "done",
        "exit 0"]))
    for wrapper, valued in WRAPPER_OPTIONS.items():
        # Records itself, then runs what follows its options (a recorded program).
        _fake(bin_dir / wrapper, "\n".join([
            f'{record} {wrapper} "$@"',
            'while [ $# -gt 0 ]; do',
            '  case "$1" in',
            "    " + "|".join(sorted(valued)) + ") shift 2 ;;",
            "    -*) shift ;;",
            '    *) exec "$@" ;;',
            "  esac",
            "done"]))
    return bin_dir


def _run(script: str, root: Path, bin_dir: Path, log: Path, tag: str = "", **env: str) -> None:
    full_env = dict(os.environ, PYTHON=str(bin_dir / "python"), CUDA_HOME=str(bin_dir.parent),
                    PATH=f"{bin_dir}:{os.environ['PATH']}", GPU_SCRIPT_LOG=str(log),
                    GPU_SCRIPT_NAME=script + tag, OUT=str(root.parent / "out"), **env)
    full_env.pop("PYTHONPATH", None)
    (root.parent / "out").mkdir(exist_ok=True)
    done = subprocess.run(["bash", str(root / "benchmarks" / script)], cwd=root, env=full_env,
                          capture_output=True, text=True, timeout=240)
    # Every stage ends well when each program it starts does (the recorders exit 0); a stage
    # that fails here failed in the shell (a missing file, a bad option of timeout, an unset
    # variable under set -u, ...).
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    for word in ("FAIL", "TIMEOUT", "skipped"):
        assert word not in done.stdout, f"{script}: {word} in\n{done.stdout[-3000:]}"
    for log in list((root / "benchmarks" / "out").glob("*/*.log")) + [None]:
        text = done.stderr if log is None else log.read_text()
        for error in ("command not found", "No such file or directory", "syntax error",
                      "unbound variable"):
            assert error not in text, f"{script}: {error} in {log or 'stderr'}:\n{text[-2000:]}"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> List[Dict]:
    tmp = tmp_path_factory.mktemp("gpu_scripts")
    root, bin_dir, log = _tree(tmp), _fakes(tmp), tmp / "log.jsonl"
    log.touch()
    for script in GPU_SCRIPTS:
        _run(script, root, bin_dir, log, GPU_DECODE_BATCH64="1")
    # The engine sweep again as NOTES plans it: sequence-parallel rank shards.
    _run("gpu_engine_bench.sh", root, bin_dir, log, tag=" sp",
         GPU_ENGINE_EXTRA="--sequence-parallel", GPU_ENGINE_TAG="sp")
    return [json.loads(line) for line in log.read_text().splitlines()]


class _Parsed(BaseException):
    """Raised at a script's first CUDA check after its arguments are parsed (and validated):
    nothing of the script's work runs."""


def _load(path: Path):
    """The script as a module of its own here (its globals are patched by these tests)."""
    return load_script(path, name=f"gpu_scripts_{path.stem}")


def _parse_with_script(path: Path, argv: List[str], monkeypatch) -> None:
    """Runs the script's main until its first torch.cuda.is_available() after parse_args: the
    parsing and whatever the script checks of the arguments before it asks for CUDA. Until
    then CUDA is "there", as on the GPU machine (defaults that depend on it come out alike)."""
    original = argparse.ArgumentParser.parse_args
    parsed = []

    def parse(self, args=None, namespace=None):
        result = original(self, args, namespace)
        parsed.append(True)
        return result

    def cuda_available() -> bool:
        if parsed:
            raise _Parsed()
        return True

    mod = _load(path)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse)
        m.setattr(torch.cuda, "is_available", cuda_available)
        m.setattr(sys, "argv", [str(path)] + argv)
        main = mod.main
        with pytest.raises(_Parsed):
            main(argv) if main.__code__.co_argcount else main()


def _selected(files: List[Path], expression: str) -> List[str]:
    """Test functions of `files` whose "file::Class::name" a pytest -k expression keeps
    (substring matching, as pytest does on names; parametrize ids are not seen)."""
    names = []
    for f in files:
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                names.append(f"{f.stem}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                names += [f"{f.stem}::{node.name}::{m.name}" for m in node.body
                          if isinstance(m, ast.FunctionDef) and m.name.startswith("test")]
    words = re.findall(r"\w+|\S", expression)

    def keeps(name: str) -> bool:
        code = " ".join(w if w in ("and", "or", "not", "(", ")") else repr(w.lower()) +
                        " in name" for w in words)
        return eval(code, {}, {"name": name.lower()})
    return [n for n in names if keeps(n)]


def _check_pytest(argv: List[str]) -> None:
    """pytest itself, collecting only: the options, the files and the -k selection by pytest's
    own rules. -n is pytest-xdist's, which the GPU image has and this machine may not: dropped
    here when xdist is missing. A file skipped whole on a CPU collects nothing: its -k is
    matched against its test functions' names instead."""
    files = [ROOT / a for a in argv if a.startswith("tests/")]
    assert files, f"pytest run with no test file: {argv}"
    for f in files:
        assert f.is_file(), f"pytest names {f.relative_to(ROOT)}, which does not exist"
    args = list(argv)
    if "-n" in args and importlib.util.find_spec("xdist") is None:
        del args[args.index("-n"):args.index("-n") + 2]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs",
                           "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
    out = done.stdout + done.stderr
    skipped_whole = done.returncode == 5 and "SKIPPED" in out and "deselected" not in out
    assert done.returncode == 0 or skipped_whole, f"pytest {shlex.join(argv)}:\n{out[-1500:]}"
    if skipped_whole and "-k" in argv:
        expression = argv[argv.index("-k") + 1]
        assert _selected(files, expression), f"-k {expression!r} selects no test in {argv}"


def _check_binary(name: str, argv: List[str]) -> None:
    source = "".join((BENCH / "cpp" / f).read_text() for f in (f"{name}.cpp", "bench_common.h"))
    known = set(re.findall(r'"(--[a-z0-9-]+)"', source))
    unknown = [a for a in argv if a.startswith("--") and a not in known]
    assert not unknown, f"{name} does not read {unknown} (it reads {sorted(known)})"


def _check_wrapper(role: str, argv: List[str]) -> None:
    valued, i = WRAPPER_OPTIONS[role], 0
    while i < len(argv) and argv[i].startswith("-"):
        assert argv[i] in valued, f"{role} option {argv[i]} is not one these scripts use"
        if role == "compute-sanitizer" and argv[i] == "--tool":
            assert argv[i + 1] in SANITIZER_TOOLS, f"compute-sanitizer --tool {argv[i + 1]}"
        i += 2
    assert i < len(argv), f"{role} with no program: {argv}"


def _check_python(rec: Dict, monkeypatch) -> None:
    argv = rec["argv"]
    if argv[:1] == ["-"]:
        compile(rec["stdin"], "<stdin heredoc>", "exec")
    elif argv[:1] == ["-c"]:
        compile(argv[1], "<-c>", "exec")
    elif argv[:2] == ["-m", "pytest"]:
        _check_pytest(argv[2:])
    elif argv[:2] == ["-m", "tpssm"]:
        from tpssm.cli import build_parser
        build_parser().parse_args(argv[2:])
    elif argv[:2] == ["-m", "pip"] or argv[:1] == ["setup.py"]:
        pass  # the build: nothing to check on the CPU
    elif argv[0] == "benchmarks/sanitize_cases.py":
        groups = _load(BENCH / "sanitize_cases.py").GROUPS
        assert set(argv[1:]) <= set(groups), f"sanitize_cases.py has no group {argv[1:]}"
    elif argv[0].startswith("benchmarks/") and argv[0].endswith(".py"):
        _parse_with_script(ROOT / argv[0], argv[1:], monkeypatch)
    else:
        raise AssertionError(f"a python start this test does not know: {argv}")


def test_every_started_program_accepts_its_arguments(records, monkeypatch):
    failures = []
    for rec in records:
        role = rec["role"]
        try:
            if role == "python":
                monkeypatch.chdir(rec["cwd"])  # relative paths (--json DIR/...) as there
                _check_python(rec, monkeypatch)
            elif role.startswith("binary:"):
                _check_binary(role.split(":", 1)[1], rec["argv"])
            elif role in WRAPPER_OPTIONS:
                _check_wrapper(role, rec["argv"])
        except (AssertionError, SyntaxError, SystemExit) as exc:
            failures.append(f"{role} {shlex.join(rec['argv'])[:300]}\n    -> {exc!r}"[:800])
    assert not failures, "\n".join(failures)


def _named(script: str, pattern: str) -> set:
    """What `pattern` finds in the script's lines outside comments."""
    lines = [line for line in (BENCH / script).read_text().splitlines()
             if not line.lstrip().startswith("#")]
    return set(re.findall(pattern, "\n".join(lines)))


def test_every_named_script_and_binary_ran(records):
    """Per GPU script: each benchmarks/*.py and CMake binary it names was started by it (with
    gpu_engine_bench.sh's starts under gpu_check.sh, which runs it)."""
    by_script: Dict[str, List[Dict]] = {}
    for r in records:
        by_script.setdefault(r["script"], []).append(r)
    assert set(by_script) == set(GPU_SCRIPTS) | {"gpu_engine_bench.sh sp"}, set(by_script)
    for script, recs in by_script.items():
        names = _named(script.split()[0], r"benchmarks/(\w+\.py)") - {"setup.py"}
        if script == "gpu_check.sh":
            names |= _named("gpu_engine_bench.sh", r"benchmarks/(\w+\.py)")
        started = {r["argv"][0].split("/")[-1] for r in recs
                   if r["role"] == "python" and r["argv"] and r["argv"][0].endswith(".py")}
        assert names <= started, (script, names - started)
        binaries = _named(script.split()[0], r"\$B/(bench_\w+)")
        ran = {r["role"].split(":", 1)[1] for r in recs if r["role"].startswith("binary:")}
        assert binaries <= ran, (script, binaries - ran)
    assert _named("gpu_check.sh", r"\$B/(bench_\w+)"), "gpu_check.sh runs no binary"
    engine = [r["argv"] for r in records if r["argv"][:3] == ["-m", "tpssm", "bench"]]
    assert any("--sequence-parallel" in a for a in engine) and len(engine) >= 8, engine
    wrapped = {r["role"] for r in records}
    assert {"ncu", "compute-sanitizer"} <= wrapped, wrapped


def test_a_bad_flag_is_caught(monkeypatch):
    """The checks above can fail: a flag a script lacks, a value its own checks after parsing
    refuse, a binary option its source never reads, a pytest option pytest lacks, a -k
    expression that selects nothing, a test file that is not there."""
    with pytest.raises(SystemExit):
        _parse_with_script(BENCH / "profile_step.py", ["--tp-shardz", "1,4"], monkeypatch)
    with pytest.raises(SystemExit):
        _parse_with_script(BENCH / "profile_step.py", ["--tp-shards", "2,4"], monkeypatch)
    with pytest.raises(AssertionError, match="does not read"):
        _check_binary("bench_gemv", ["--m", "1", "--lanes", "4"])
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        _check_pytest(["tests/test_thread_ranks.py", "--timout=1"])
    with pytest.raises(AssertionError, match="deselected"):
        _check_pytest(["tests/test_thread_ranks.py", "-k", "no_such_test_name"])
    with pytest.raises(AssertionError, match="selects no test"):
        _check_pytest(["tests/test_ops_cuda.py", "-k", "no_such_test_name"])
    with pytest.raises(AssertionError, match="does not exist"):
        _check_pytest(["tests/test_no_such_file.py"])
