"""The bad-input corpus: every entry must fail with exactly this one line and exit code 2,
print nothing on stdout and write nothing (aegis submit --dry-run -c c.yaml [flags]).

Each row: (id, config file text or None for flags only, extra flags, message after
"aegis: error: ")."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from aegis.cli import main

CORPUS = [
    ('missing-file', None, ['-c', 'nope.yaml'],
     'nope.yaml: config file not found'),
    ('yaml-syntax', 'model: [a, b\ninstances: 2\n', [],
     "c.yaml:2:10: invalid YAML: did not find expected ',' or ']'"),
    ('yaml-bad-indent', 'model: m\n  instances: 2\n', [],
     'c.yaml:2:12: invalid YAML: mapping values are not allowed in this context'),
    ('yaml-duplicate-key', 'model: m\ninstances: 1\ninstances: 2\n', [],
     "c.yaml:3:1: invalid YAML: duplicate key 'instances'"),
    ('top-level-list', '- model: m\n', [],
     'config: expected a mapping of keys at the top level, got list'),
    ('empty-file', '', [],
     "model: missing; set 'model' (single-model form, or --model) or a non-empty 'models' list"),
    ('unknown-key-hint', 'model: m\ntensor_paralel_size: 6\n', [],
     "tensor_paralel_size: unknown key (did you mean 'tensor_parallel_size'?)"),
    ('unknown-key-nohint', 'model: m\nfrobnicate: 1\n', [],
     'frobnicate: unknown key; see docs/config.md for the keys'),
    ('unknown-model-key', 'models:\n  - model: m\n    instnces: 2\n', [],
     "models[0].instnces: unknown key (did you mean 'instances'?)"),
    ('empty-models', 'models: []\n', [],
     "models: the list is empty; give at least one entry with 'model'"),
    ('models-not-list', 'models: m\n', [],
     "models: expected a list of model entries, got 'm' (string)"),
    ('models-entry-not-mapping', 'models:\n  - m\n', [],
     "models[0]: expected a mapping with at least 'model', got 'm' (string)"),
    ('models-entry-missing-model', 'models:\n  - model: a\n  - instances: 2\n', [],
     "models[1].model: missing; name the model to serve (e.g. 'meta-llama/Llama-3.1-8B-Instruct')"),
    ('model-and-name', 'models:\n  - model: a\n    name: b\n', [],
     "models[0]: has both 'model' and 'name'; keep 'model'"),
    ('model-with-models', 'model: a\nmodels:\n  - model: b\n', [],
     'model: cannot be combined with a models: list; set models[*].model in each entry instead'),
    ('per-model-flag-with-models', 'models:\n  - model: b\n', ['--instances', '2'],
     '--instances: per-model flags apply to the single-model form only; this config has a models: list (edit models[*] in the file)'),
    ('instances-zero', 'model: m\ninstances: 0\n', [],
     'instances: 0 is out of range; must be between 1 and 65535'),
    ('instances-string', 'model: m\ninstances: two\n', [],
     "instances: expected an integer, got 'two' (string)"),
    ('instances-bool', 'model: m\ninstances: true\n', [],
     'instances: expected an integer, got True (boolean)'),
    ('instances-float', 'model: m\ninstances: 1.5\n', [],
     'instances: expected an integer, got 1.5 (number)'),
    ('tp-zero', 'model: m\ntensor_parallel_size: 0\n', [],
     'tensor_parallel_size: 0 is out of range; must be between 1 and 4096'),
    ('tp-not-placeable', 'model: m\ntensor_parallel_size: 18\n', [],
     'tensor_parallel_size: 18 cannot be placed on aurora (12 devices per node); allowed: 1-12, or a multiple of 12 (whole nodes)'),
    ('tp-not-placeable-multi', 'models:\n  - model: a\n  - model: b\n    tensor_parallel_size: 20\n', [],
     'models[1].tensor_parallel_size: 20 cannot be placed on aurora (12 devices per node); allowed: 1-12, or a multiple of 12 (whole nodes)'),
    ('tp-not-placeable-frontier', 'model: m\nplatform: frontier\ntensor_parallel_size: 12\n', [],
     'tensor_parallel_size: 12 cannot be placed on frontier (8 devices per node); allowed: 1-8, or a multiple of 8 (whole nodes)'),
    ('walltime-short', "model: m\nwalltime: '1:00'\n", [],
     "walltime: '1:00' is not a walltime; expected HH:MM:SS such as '01:30:00'"),
    ('walltime-zero', "model: m\nwalltime: '00:00:00'\n", [],
     "walltime: '00:00:00' is not a walltime; expected HH:MM:SS such as '01:30:00'"),
    ('walltime-minutes-60', "model: m\nwalltime: '01:60:00'\n", [],
     "walltime: '01:60:00' is not a walltime; expected HH:MM:SS such as '01:30:00'"),
    ('walltime-int', 'model: m\nwalltime: 90\n', [],
     'walltime: expected a walltime string HH:MM:SS, got 90 (integer)'),
    ('port-too-high', 'model: m\nport_start: 70000\n', [],
     'port_start: 70000 is out of range; must be between 1 and 65535'),
    ('port-zero', 'model: m\nport_start: 0\n', [],
     'port_start: 0 is out of range; must be between 1 and 65535'),
    ('ports-run-past-65535', 'model: m\ninstances: 12\nport_start: 65530\n', [],
     'port_start: 65530 + 12 instances and 1 router(s) runs past 65535 (last port 65542); '
     'allowed: port_start <= 65523'),
    ('ports-overlap-internal', 'model: m\nport_start: 30100\n', [],
     'port_start: HTTP ports 30100 overlap the internal port range 30000-30191 (internal_port_start); move one of them'),
    ('internal-ports-past-65535', 'model: m\ninternal_port_start: 65500\n', [],
     'internal_port_start: 65500 + 12 slots x 16 ports runs past 65535; allowed: internal_port_start <= 65344'),
    ('account-space', 'model: m\naccount: my project\n', [],
     "account: 'my project' is not allowed; use letters, digits and . _ - + @"),
    ('account-newline', 'model: m\naccount: "proj\\n#PBS -q evil"\n', [],
     "account: 'proj\\n#PBS -q evil' contains a control character ('\\n'); newlines and other control characters are not allowed"),
    ('queue-shell', 'model: m\nqueue: debug;rm -rf ~\n', [],
     "queue: 'debug;rm -rf ~' is not allowed; use letters, digits and . _ - + @"),
    ('filesystems-space', 'model: m\nfilesystems: flare home\n', [],
     "filesystems: 'flare home' is not allowed; use names joined by ':' such as 'flare:home'"),
    ('job-name-digit', 'model: m\njob_name: 1abc\n', [],
     "job_name: '1abc' is not allowed; start with a letter, then letters, digits and . _ - (max 63)"),
    ('job-name-subst', 'model: m\njob_name: a$(id)\n', [],
     "job_name: 'a$(id)' is not allowed; start with a letter, then letters, digits and . _ - (max 63)"),
    ('run-dir-space', 'model: m\nrun_dir: my runs\n', [],
     "run_dir: 'my runs' is not allowed; use a path of letters, digits and . _ - / + @ % , = (no spaces, quotes or shell characters)"),
    ('run-dir-subst', 'model: m\nrun_dir: $(whoami)/runs\n', [],
     "run_dir: '$(whoami)/runs' is not allowed; use a path of letters, digits and . _ - / + @ % , = (no spaces, quotes or shell characters)"),
    ('platform-typo', 'model: m\nplatform: auroa\n', [],
     "platform: 'auroa' is not one of aurora, frontier, local, polaris (did you mean 'aurora'?)"),
    ('scheduler-unknown', 'model: m\nscheduler: lsf\n', [],
     "scheduler: 'lsf' is not one of pbs, slurm"),
    ('startup-timeout-negative', 'model: m\nstartup_timeout: -5\n', [],
     'startup_timeout: -5 is out of range; must be > 0 and <= 604800 seconds'),
    ('startup-timeout-string', 'model: m\nstartup_timeout: soon\n', [],
     "startup_timeout: expected a number of seconds, got 'soon' (string)"),
    ('max-restarts-negative', 'model: m\nmax_restarts: -1\n', [],
     'max_restarts: -1 is out of range; must be between 0 and 1000000'),
    ('allow-partial-string', "model: m\nallow_partial: 'yes'\n", [],
     "allow_partial: expected true or false, got 'yes' (string)"),
    ('api-key-env-dash', 'model: m\napi_key_env: MY-KEY\n', [],
     "api_key_env: 'MY-KEY' is not allowed; expected an environment variable name"),
    ('instance-env-managed', 'model: m\ninstance_env: {VLLM_PORT: 1}\n', [],
     'instance_env: VLLM_PORT is set by aegis for every instance; use its config key'),
    ('instance-env-bad-name', 'model: m\ninstance_env: {2X: a}\n', [],
     "instance_env: '2X' is not an environment variable name"),
    ('instance-env-list', 'model: m\ninstance_env: [A=1]\n', [],
     "instance_env: expected a mapping of NAME: value, got ['A=1'] (list)"),
    ('instance-env-flag-no-equals', 'model: m\n', ['--instance-env', 'A=1 B'],
     "instance_env (--instance-env): 'B' is not NAME=VALUE"),
    ('vllm-command-unbalanced', 'model: m\nvllm_command: vllm "serve\n', [],
     'vllm_command: cannot split \'vllm "serve\' into a command: No closing quotation'),
    ('extra-args-unbalanced', 'model: m\nextra_vllm_args: "--x \'y"\n', [],
     'extra_vllm_args: cannot split "--x \'y" into arguments: No closing quotation'),
    ('extra-args-mapping-item', 'model: m\nextra_vllm_args:\n  - {a: 1}\n', [],
     "extra_vllm_args: expected each argument to be a string, got {'a': 1} (mapping)"),
    ('extra-args-number', 'model: m\nextra_vllm_args: 5\n', [],
     'extra_vllm_args: expected a list of arguments or one string, got 5 (integer)'),
    ('model-newline', 'model: "a\\nb"\n', [],
     "model: 'a\\nb' contains a control character ('\\n'); newlines and other control characters are not allowed"),
    ('model-empty', "model: ''\n", [],
     'model: must not be empty; expected a model name (Hugging Face id or path)'),
    ('model-list', 'model: [a, b]\n', [],
     "model: expected a model name (Hugging Face id or path), got ['a', 'b'] (list)"),
    ('served-name-int', 'model: m\nserved_model_name: 5\n', [],
     'served_model_name: expected a string, got 5 (integer)'),
    ('hf-home-empty', "model: m\nhf_home: ''\n", [],
     'hf_home: must not be empty; expected a directory path'),
    ('hf-token-space', "model: m\nhf_token: 'hf_abc def'\n", [],
     'hf_token: expected a token string without whitespace or control characters (value not shown)'),
    ('conda-env-newline', 'model: m\nconda_env: "env\\nrm -rf /"\n', [],
     "conda_env: 'env\\nrm -rf /' contains a control character ('\\n'); newlines and other control characters are not allowed"),
    ('flag-instances-zero', None, ['--model', 'm', '--instances', '0'],
     'instances (--instances): 0 is out of range; must be between 1 and 65535'),
    ('flag-instances-text', None, ['--model', 'm', '--instances', 'abc'],
     "Invalid value for '--instances': 'abc' is not a valid integer."),
    ('flag-platform', None, ['--model', 'm', '--platform', 'summit'],
     "Invalid value for '--platform': 'summit' is not one of 'aurora', 'frontier', 'local', 'polaris'."),
    ('flag-walltime', None, ['--model', 'm', '--walltime', '1h'],
     "walltime (--walltime): '1h' is not a walltime; expected HH:MM:SS such as '01:30:00'"),
    ('flag-typo', None, ['--model', 'm', '--instnces', '2'],
     "No such option '--instnces'. (Did you mean one of: '--instance-env', '--instances'?)"),
    ('flag-token-file-missing', None, ['--model', 'm', '--hf-token-file', 'no-such-file'],
     "Invalid value for '--hf-token-file': File 'no-such-file' does not exist."),
    ('flag-extra-args-unbalanced', None, ['--model', 'm', '--extra-vllm-args', "--x 'y"],
     'extra_vllm_args (--extra-vllm-args): cannot split "--x \'y" into arguments: No closing quotation'),
    ('flag-tp-not-placeable', None, ['--model', 'm', '--tensor-parallel-size', '13'],
     'tensor_parallel_size: 13 cannot be placed on aurora (12 devices per node); allowed: 1-12, or a multiple of 12 (whole nodes)'),
    ('flag-no-model', None, ['--instances', '2'],
     "model: missing; set 'model' (single-model form, or --model) or a non-empty 'models' list"),
    ('flag-override-file', 'model: m\ninstances: 2\n', ['--port-start', '65535'],
     'port_start: 65535 + 2 instances and 1 router(s) runs past 65535 (last port 65537); '
     'allowed: port_start <= 65533'),
    # a walltime that leaves no time to serve: the job would drain from its start, exit 0
    ('drain-at-walltime', "model: m\nwalltime: '00:01:00'\ndrain_seconds: 60\n", [],
     "drain_seconds: 60 s is not shorter than the walltime 00:01:00 (60 s); the instances "
     "would drain from the job's start and never serve"),
    ('flag-walltime-below-default-drain', None, ['--model', 'm', '--walltime', '00:00:30'],
     "drain_seconds: 60 s is not shorter than the walltime 00:00:30 (30 s); the instances "
     "would drain from the job's start and never serve"),
    ('walltime-below-stop-grace', "model: m\nwalltime: '00:00:20'\ndrain_seconds: 1\n", [],
     "stop_grace: 15 s plus 10 s to exit do not fit in the walltime 00:00:20 (20 s); the job "
     "would stop as it starts"),
    ('walltime-no-time-to-serve', "model: m\nwalltime: '00:01:00'\ndrain_seconds: 40\n", [],
     "walltime: 00:01:00 (60 s) leaves no time to serve: drain_seconds (40 s) + stop_grace "
     "(15 s) + 10 s to exit take all of it; lengthen walltime or shorten drain_seconds"),
    # endpoints_file: a file, never a directory or another run file
    ('endpoints-file-dot', "model: m\nendpoints_file: .\n", [],
     "endpoints_file: '.' names a directory, not a file; give a file name such as "
     "'endpoints.json'"),
    ('flag-endpoints-file-dot', None, ['--model', 'm', '--endpoints-file', '.'],
     "endpoints_file (--endpoints-file): '.' names a directory, not a file; give a file name "
     "such as 'endpoints.json'"),
    ('endpoints-file-dotdot', "model: m\nendpoints_file: ..\n", [],
     "endpoints_file: '..' names a directory, not a file; give a file name such as "
     "'endpoints.json'"),
    ('endpoints-file-slash', "model: m\nendpoints_file: out/\n", [],
     "endpoints_file: 'out/' names a directory, not a file; give a file name such as "
     "'endpoints.json'"),
    ('endpoints-file-back-to-run-dir', "model: m\nendpoints_file: sub/..\n", [],
     "endpoints_file: 'sub/..' names a directory, not a file; give a file name such as "
     "'endpoints.json'"),
    ('endpoints-file-home', "model: m\nendpoints_file: '~'\n", [],
     "endpoints_file: '~' names a directory, not a file; give a file name such as "
     "'endpoints.json'"),
    ('endpoints-file-root', "model: m\nendpoints_file: /\n", [],
     "endpoints_file: '/' names a directory, not a file; give a file name such as "
     "'endpoints.json'"),
    ('endpoints-file-config', "model: m\nendpoints_file: config.yaml\n", [],
     "endpoints_file: 'config.yaml' would overwrite the run directory's config.yaml; give "
     "another name such as 'endpoints.json'"),
    ('endpoints-file-txt', "model: m\nendpoints_file: e.txt\n", [],
     "endpoints_file: 'e.txt' ends in .txt: the host:port list is written beside it as "
     "<name>.txt; give a name such as 'endpoints.json'"),
]


def test_corpus_is_big_and_ids_unique():
    assert len(CORPUS) >= 40
    assert len({row[0] for row in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case_id,text,flags,message", CORPUS, ids=[row[0] for row in CORPUS])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, case_id, text, flags, message):
    monkeypatch.chdir(tmp_path)
    argv = ["submit", "--dry-run"]
    if text is not None:
        (tmp_path / "c.yaml").write_text(text)
        argv += ["-c", "c.yaml"]
    result = CliRunner().invoke(main, [*argv, *flags])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"aegis: error: {message}\n"
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == (["c.yaml"] if text is not None else [])


def test_missing_account_refuses_real_submit_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["submit", "--model", "m"])
    assert result.exit_code == 2
    assert result.stderr == ("aegis: error: account: missing; aurora charges jobs to a project: "
                             "set 'account' or pass --account (a --dry-run works without it)\n")
    assert os.listdir(tmp_path) == []


def test_hf_token_value_never_appears_in_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("model: m\nhf_token: 'hf_SECRET with space'\n")
    result = CliRunner().invoke(main, ["submit", "--dry-run", "-c", "c.yaml"])
    assert result.exit_code == 2
    assert "SECRET" not in result.output
