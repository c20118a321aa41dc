"""Hostile input is refused fast, in bounded memory, with one line per problem and exit 2.

The table runs `aegis submit --dry-run` in process; a few rows also run through the installed
entry point in a subprocess under a memory limit (RLIMIT_AS) and a timeout, which is where
today's failures showed (MemoryError, RecursionError tracebacks, minutes of work)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aegis.cli import main

AEGIS = str(Path(sys.executable).parent / "aegis")
MEMORY_LIMIT = 1 << 30  # the interpreter with click and PyYAML needs well under 100 MB


def _alias_bomb() -> str:
    """'Billion laughs': 9 levels of 9 aliases each, 9**9 values once expanded."""
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "model: [" + ", ".join(levels) + "]\n"


def _merge_bomb() -> str:
    """The same through merge keys (<<), which PyYAML copies instead of sharing."""
    lines = ["base0: &m0 {a: 1, b: 2, c: 3, d: 4}"]
    for i in range(1, 30):
        lines.append(f"base{i}: &m{i} {{<<: [*m{i - 1}], k{i}a: *m{i - 1}, k{i}b: *m{i - 1}}}")
    return "\n".join(lines) + "\n"


# (id, config text or None, flags, expected stderr lines after "aegis: error: ")
CASES = [
    ("alias-bomb", _alias_bomb(), [],
     ["c.yaml:1:213: invalid YAML: aliases expand to more than 100000 values"]),
    ("merge-key-bomb", _merge_bomb(), [],
     ["c.yaml:9:42: invalid YAML: aliases expand to more than 100000 values"]),
    ("nested-flow-20000", "model: " + "[" * 20000 + "]" * 20000 + "\n", [],
     ["c.yaml:1:1007: invalid YAML: exceeded maximum nesting depth"]),  # libyaml's own cap
    ("nested-block-500", "".join(" " * i + f"k{i}:\n" for i in range(500)), [],
     ["c.yaml:65:65: invalid YAML: nested deeper than 64 levels"]),
    ("python-object-tag", "model: !!python/object/apply:os.system ['echo owned']\n", [],
     ["c.yaml:1:8: invalid YAML: could not determine a constructor for the tag "
      "'tag:yaml.org,2002:python/object/apply:os.system'"]),
    ("binary-tag", "model: !!binary aGVsbG8=\n", [],
     ["model: expected a model name (Hugging Face id or path), got b'hello' (bytes)"]),
    ("binary-file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", [],
     ["c.yaml: cannot read config file: not UTF-8 text (byte 0x89 at offset 0)"]),
    ("nul-bytes", "model: m\n\0\0\0\n", [],
     ["c.yaml: invalid YAML: unacceptable character #x0000 at offset 9"]),
    ("config-dev-zero", None, ["-c", "/dev/zero"],
     ["/dev/zero: cannot read config file: larger than 256 KiB"]),
    ("config-directory", None, ["-c", "."],
     [".: cannot read config file: Is a directory"]),
    ("config-symlink-loop", None, ["-c", "loop.yaml"],
     ["loop.yaml: cannot read config file: Too many levels of symbolic links"]),
    ("config-too-large", "model: m\n" + "# padding\n" * 30_000, [],
     ["c.yaml: cannot read config file: larger than 256 KiB"]),
    ("token-dev-zero", None, ["--model", "m", "--hf-token-file", "/dev/zero"],
     ["--hf-token-file: cannot read /dev/zero: larger than 64 KiB"]),
    ("token-nul", None, ["--model", "m", "--hf-token-file", "token-nul"],
     ["hf_token (--hf-token-file): expected a token string without whitespace or control "
      "characters (value not shown)"]),
    ("token-binary", None, ["--model", "m", "--hf-token-file", "token-bin"],
     ["--hf-token-file: cannot read token-bin: not UTF-8 text (byte 0xff at offset 3)"]),
    ("tp-huge", "model: m\ntensor_parallel_size: 12000000000\n", [],
     ["tensor_parallel_size: 12000000000 is out of range; must be between 1 and 4096"]),
    ("tp-huge-flag", None, ["--model", "m", "--tensor-parallel-size", "12000000000"],
     ["tensor_parallel_size (--tensor-parallel-size): 12000000000 is out of range; must be "
      "between 1 and 4096"]),
    ("instances-huge", "model: m\ninstances: 10000000000000000000000\n", [],
     ["instances: 10000000000000000000000 is out of range; must be between 1 and 65535"]),
    ("plan-too-many-nodes", "model: m\ninstances: 300\ntensor_parallel_size: 4092\n", [],
     ["instances: the models need up to 102300 nodes of aurora; at most 100000 are supported"]),
    ("max-restarts-huge", "model: m\nmax_restarts: 99999999999999\n", [],
     ["max_restarts: 99999999999999 is out of range; must be between 0 and 1000000"]),
    ("startup-timeout-inf", "model: m\nstartup_timeout: .inf\n", [],
     ["startup_timeout: inf is out of range; must be > 0 and <= 604800 seconds"]),
    ("startup-timeout-nan", "model: m\nstartup_timeout: .nan\n", [],
     ["startup_timeout: nan is out of range; must be > 0 and <= 604800 seconds"]),
    ("startup-timeout-zero", "model: m\nstartup_timeout: 0\n", [],
     ["startup_timeout: 0 is out of range; must be > 0 and <= 604800 seconds"]),
    ("startup-timeout-flag-inf", None, ["--model", "m", "--startup-timeout", "inf"],
     ["startup_timeout (--startup-timeout): inf is out of range; must be > 0 and <= 604800 "
      "seconds"]),
    ("startup-timeout-flag-nan", None, ["--model", "m", "--startup-timeout", "nan"],
     ["startup_timeout (--startup-timeout): nan is out of range; must be > 0 and <= 604800 "
      "seconds"]),
    *[(f"timing-key-{key}-{text}", f"model: m\n{key}: {text}\n", [],
       [f"{key}: {shown} is out of range; must be > 0 and <= {limit} seconds"])
      for key, limit in (("restart_backoff", 3600), ("stop_grace", 3600),
                         ("poll_interval", 1), ("probe_timeout", 3600),
                         ("liveness_interval", 86400))
      for text, shown in ((".nan", "nan"), (".inf", "inf"), ("0", "0"))],
    *[(f"instance-env-{var}", f"model: m\ninstance_env: {{{var}: '0'}}\n", [],
       [f"instance_env: {var} is set by aegis for every instance from the plan's devices; "
        "devices follow from tensor_parallel_size"])
      for var in ("VLLM_CPU_OMP_THREADS_BIND", "ZE_AFFINITY_MASK", "CUDA_VISIBLE_DEVICES",
                  "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")],
    ("instance-env-platform-var", "model: m\ninstance_env: {ZE_FLAT_DEVICE_HIERARCHY: COMPOSITE}\n",
     [], ["instance_env: ZE_FLAT_DEVICE_HIERARCHY is set by aegis for every instance; use its "
          "config key"]),
    ("several-mistakes", "model: m\ninstances: 0\nport_start: 99999\nwalltime: 5\nfoo: 1\n"
     "startup_timeout: .nan\n", [],
     ["foo: unknown key; see docs/config.md for the keys",
      "instances: 0 is out of range; must be between 1 and 65535",
      "port_start: 99999 is out of range; must be between 1 and 65535",
      "walltime: expected a walltime string HH:MM:SS, got 5 (integer)",
      "startup_timeout: nan is out of range; must be > 0 and <= 604800 seconds"]),
    ("several-mistakes-models", "models:\n  - model: a\n    instances: -1\n  - instnces: 2\n"
     "  - 7\nplatform: auroa\n", [],
     ["models[0].instances: -1 is out of range; must be between 1 and 65535",
      "models[1].instnces: unknown key (did you mean 'instances'?)",
      "models[1].model: missing; name the model to serve (e.g. "
      "'meta-llama/Llama-3.1-8B-Instruct')",
      "models[2]: expected a mapping with at least 'model', got 7 (integer)",
      "platform: 'auroa' is not one of aurora, frontier, local, polaris (did you mean "
      "'aurora'?)"]),
    ("several-placement-mistakes", "model: m\ntensor_parallel_size: 18\nport_start: 30100\n", [],
     ["tensor_parallel_size: 18 cannot be placed on aurora (12 devices per node); allowed: "
      "1-12, or a multiple of 12 (whole nodes)",
      "port_start: HTTP ports 30100 overlap the internal port range 30000-30191 "
      "(internal_port_start); move one of them"]),
    # found by attacking it: FIFOs, long or odd keys and values, floods of mistakes
    ("config-fifo-without-writer", None, ["-c", "fifo"],
     ["model: missing; set 'model' (single-model form, or --model) or a non-empty 'models' "
      "list"]),
    ("config-random-bytes", bytes(range(256)) * 64, [],
     ["c.yaml: cannot read config file: not UTF-8 text (byte 0x80 at offset 128)"]),
    ("key-with-newline", 'model: m\n"x\\n#PBS -q evil": 1\n', [],
     ["'x\\n#PBS -q evil': unknown key; see docs/config.md for the keys"]),
    ("key-long", "model: m\n" + "k" * 1000 + ": 1\n", [],
     ["'" + "k" * 27 + "..." + "k" * 28 + "': unknown key; see docs/config.md for the keys"]),
    ("key-longer-than-yaml-allows", "model: m\n" + "k" * 100_000 + ": 1\n", [],
     ["c.yaml:2:100001: invalid YAML: could not find expected ':'"]),
    ("key-in-model-entry-with-tab", 'models:\n  - model: m\n    "a\\tb": 1\n', [],
     ["models[0].'a\\tb': unknown key; see docs/config.md for the keys"]),
    ("thousands-of-mistakes", "model: m\n" + "".join(f"k{i}: 1\n" for i in range(5000)), [],
     [f"k{i}: unknown key; see docs/config.md for the keys" for i in range(20)]
     + ["config: 4980 more problems not shown"]),
    ("model-name-too-long", "model: " + "m" * 5000 + "\n", [],
     ["model: '" + "m" * 27 + "..." + "m" * 28 + "' is 5000 characters long; at most 4096"]),
    ("too-many-extra-args", "model: m\nextra_vllm_args: [" + ", ".join(["-x"] * 5000) + "]\n", [],
     ["extra_vllm_args: 5000 arguments; at most 1000"]),
    ("extra-arg-too-long", "model: m\nextra_vllm_args: ['" + "x" * 40_000 + "']\n", [],
     ["extra_vllm_args: argument '" + "x" * 27 + "..." + "x" * 28 + "' is 40000 characters "
      "long; at most 32768"]),
    ("instance-env-value-too-long", "model: m\ninstance_env: {A: '" + "x" * 40_000 + "'}\n", [],
     ["instance_env: A: the value is 40000 characters long; at most 32768"]),
    ("instance-env-too-many", "model: m\ninstance_env: {"
     + ", ".join(f"V{i}: 1" for i in range(2000)) + "}\n", [],
     ["instance_env: 2000 variables; at most 1000"]),
    ("binary-int-without-digits", "model: m\naccount: 0b_\n", [],
     ["c.yaml:2:10: invalid YAML: '0b_' is not a valid int (invalid literal for int() with "
      "base 2: '')"]),
    ("impossible-date", "model: m\nwalltime: 2001-13-45\n", [],
     ["c.yaml:2:11: invalid YAML: '2001-13-45' is not a valid timestamp (month must be in "
      "1..12)"]),
    ("float-tag-on-text", "model: !!float abc\n", [],
     ["c.yaml:1:8: invalid YAML: 'abc' is not a valid float (could not convert string to "
      "float: 'abc')"]),
    ("huge-value-shown-short", "model: m\ninstance_env: [" + "x, " * 50_000 + "x]\n", [],
     ["instance_env: expected a mapping of NAME: value, got ['x', 'x', 'x', 'x', 'x', 'x', "
      "...] (list)"]),
    # a walltime with no time to serve, and every other problem of the file, at once
    ("walltime-too-short-and-ports", "model: m\ninstances: 2\nwalltime: '00:00:20'\n"
     "port_start: 65535\n", [],
     ["drain_seconds: 60 s is not shorter than the walltime 00:00:20 (20 s); the instances "
      "would drain from the job's start and never serve",
      "stop_grace: 15 s plus 10 s to exit do not fit in the walltime 00:00:20 (20 s); the job "
      "would stop as it starts",
      "port_start: 65535 + 2 instances and 1 router(s) runs past 65535 (last port 65537); "
      "allowed: port_start <= 65533"]),
]


def _prepare(tmp_path: Path, text) -> None:
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.symlink("loop.yaml", tmp_path / "loop.yaml")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "token-nul").write_bytes(b"hf_abc\0def\n")
    (tmp_path / "token-bin").write_bytes(b"hf_\xff\xfe")


@pytest.mark.parametrize("case_id,text,flags,lines", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_one_line_per_problem(tmp_path, monkeypatch, case_id, text,
                                                       flags, lines):
    monkeypatch.chdir(tmp_path)
    _prepare(tmp_path, text)
    before = sorted(os.listdir(tmp_path))
    argv = ["submit", "--dry-run", *(["-c", "c.yaml"] if text is not None else []), *flags]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"aegis: error: {line}" for line in lines]
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


SUBPROCESS_CASES = ["alias-bomb", "merge-key-bomb", "nested-flow-20000", "config-dev-zero",
                    "token-dev-zero", "tp-huge", "plan-too-many-nodes", "several-mistakes",
                    "config-fifo-without-writer", "thousands-of-mistakes"]


def test_a_pipe_whose_writer_stays_silent_is_refused_not_waited_on(tmp_path, monkeypatch):
    import aegis.files

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(aegis.files, "READ_TIMEOUT", 0.5)
    read, write = os.pipe()  # a writer that never writes nor closes
    try:
        result = CliRunner().invoke(main, ["submit", "--dry-run", "-c", f"/dev/fd/{read}"])
    finally:
        os.close(read)
        os.close(write)
    assert result.exit_code == 2
    assert result.stderr == (f"aegis: error: /dev/fd/{read}: cannot read config file: nothing "
                             "more to read for 0.5 s\n")


def test_process_substitution_still_works(tmp_path):
    proc = subprocess.run(["bash", "-c", f"{AEGIS} plan --format json -c <(sleep 0.3; printf "
                           "'model: m\\nplatform: local\\n')"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert '"nodes_needed": 1' in proc.stdout


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_hostile_input_through_the_installed_command_in_bounded_memory(tmp_path, case_id):
    _, text, flags, lines = next(c for c in CASES if c[0] == case_id)
    _prepare(tmp_path, text)
    argv = [AEGIS, "submit", "--dry-run", *(["-c", "c.yaml"] if text is not None else []),
            *flags]
    # The timeout is a hang guard, not a speed claim: before the bounds these ran for up to
    # 49 s and died of MemoryError or RecursionError with a traceback.
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=20,
                          preexec_fn=_limited)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"aegis: error: {line}" for line in lines]
    assert proc.stdout == ""
