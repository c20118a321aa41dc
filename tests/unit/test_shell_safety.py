"""Hostile values (spaces, quotes, $(), backticks, ;, newlines) either get rejected by
validation or reach their destination exactly: bash itself runs the rendered script with
stand-in commands that record their arguments, and the config copy round-trips."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.config import ConfigError, dump_yaml, from_mapping, parse_yaml
from aegis.plan import make_plan
from aegis.platforms import Platform
from aegis.scheduler import get_backend

from conftest import bash_path

NASTY = " '\"$()`;\n\\|&<>*?!#~{}=,.:/-_@%+\t"
nasty_text = st.text(alphabet=st.sampled_from(list(NASTY) + list("aZ09")), min_size=1,
                     max_size=24)
# Printable hostile text: shell metacharacters but no control characters, so most examples
# pass validation and reach bash.
printable_nasty = st.text(alphabet=st.sampled_from([c for c in NASTY if c >= " "] + list("aZ09")),
                          min_size=1, max_size=24).filter(str.strip)
name_like = st.text(alphabet=st.sampled_from(list("abcXYZ019_.+@-")), min_size=1, max_size=12)
free = st.one_of(printable_nasty, printable_nasty, nasty_text)
directive = st.one_of(name_like, name_like, nasty_text)

# Stand-in rank launcher: records cwd and argv (NUL-separated) instead of starting ranks.
_RECORDER = r"""#!/bin/bash
pwd > "$OUT/cwd"
printf '%s\0' "$0" "$@" > "$OUT/argv"
"""
# Stand-in conda: `conda shell.bash hook` defines a function that records `conda activate X`.
_CONDA = r"""#!/bin/bash
if [ "$1" = shell.bash ]; then
  printf '%s\n' 'conda() { printf "%s\0" "$@" > "$OUT/conda"; }'
fi
"""


def _tool_dir(base: Path) -> Path:
    tools = base / "tools"
    if not tools.exists():
        tools.mkdir(parents=True)
        for name, body in (("rank-launcher", _RECORDER), ("conda", _CONDA)):
            (tools / name).write_text(body)
            (tools / name).chmod(0o755)
    return tools


def _platform(tools: Path) -> Platform:
    return Platform(name="fuzz", devices_per_node=4, affinity_var="X", scheduler="pbs",
                    rank_launcher=(str(tools / "rank-launcher"), "-n", "{nodes}"),
                    node_local_dir="/tmp", setup_lines=(), requires_account=False)


def _has_control(text: str) -> bool:
    return re.search(r"[\x00-\x1f\x7f]", text) is not None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=free, source=free, served=free, args=st.lists(nasty_text, max_size=4),
       conda=free, queue=directive, account=directive, hf_home=free,
       scheduler=st.sampled_from(["pbs", "slurm"]))
def test_hostile_values_are_rejected_or_arrive_exactly(tmp_path_factory, model, source, served,
                                                       args, conda, queue, account, hf_home,
                                                       scheduler):
    data = {"model": model, "model_source": source, "served_model_name": served,
            "extra_vllm_args": args, "conda_env": conda, "queue": queue, "account": account,
            "hf_home": hf_home, "platform": "aurora", "filesystems": None}
    free_text = [model, source, served, conda, hf_home]
    directive_values = [queue, account]
    try:
        config = from_mapping(data)
    except ConfigError:
        # Rejection is allowed only for a value that is unsafe in its place.
        assert (any(_has_control(v) or not v.strip() for v in free_text)
                or any(not re.fullmatch(r"[A-Za-z0-9_.+@-]+", v) for v in directive_values))
        return
    assert not any(_has_control(v) for v in free_text)

    # The config copy the launcher reads back holds the exact values.
    again = from_mapping(parse_yaml(dump_yaml(config.to_mapping())))
    assert again == config

    base = tmp_path_factory.mktemp("fuzz")
    tools = _tool_dir(base)
    run_dir = base / "run"
    run_dir.mkdir()
    platform = _platform(tools)
    backend = get_backend(scheduler)
    plan = make_plan(config, platform)
    script = backend.render(config, plan, platform, str(run_dir), python="/opt/py/bin/python")

    # Nothing injected a directive: exactly the backend's own lines, in order.
    prefix = backend.directive_prefix + " "
    found = [line[len(prefix):] for line in script.splitlines() if line.startswith(prefix)]
    assert found == backend.directives(config, plan, platform, str(run_dir))

    path = base / "job.sh"
    path.write_text(script)
    assert subprocess.run([bash_path(), "-n", str(path)]).returncode == 0
    out = base / "out"
    out.mkdir()
    result = subprocess.run([bash_path(), str(path)], capture_output=True, text=True,
                            env={"PATH": f"{tools}:/usr/bin:/bin", "OUT": str(out)}, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = (out / "argv").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in argv] == [
        str(tools / "rank-launcher"), "-n", str(plan.nodes_needed), "/opt/py/bin/python", "-m",
        "aegis.launch", "--config", f"{run_dir}/config.yaml", "--run-dir", str(run_dir)]
    assert (out / "cwd").read_text().strip() == str(run_dir)
    conda_args = (out / "conda").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in conda_args] == ["activate", conda]


@settings(max_examples=60, deadline=None)
@given(run_dir=nasty_text, job_name=nasty_text)
def test_directive_paths_and_names_are_validated(run_dir, job_name):
    try:
        config = from_mapping({"model": "m", "run_dir": run_dir, "job_name": job_name})
    except ConfigError:
        return
    # Accepted values carry nothing a directive or shell could misread.
    assert re.fullmatch(r"~?[A-Za-z0-9_./+@%,=-]+", config.run_dir)
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", config.job_name)


def test_known_hostile_example_arrives_exactly(tmp_path):
    # A fixed case so the property above is never the only evidence.
    tools = _tool_dir(tmp_path)
    conda = "env $(touch pwned); `id` 'q' \"d\""
    config = from_mapping({"model": "org/m; rm -rf ~", "conda_env": conda})
    platform = _platform(tools)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = get_backend("pbs").render(config, make_plan(config, platform), platform,
                                       str(run_dir), python="/opt/py/bin/python")
    (tmp_path / "job.sh").write_text(script)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([bash_path(), str(tmp_path / "job.sh")], check=True, cwd=tmp_path,
                   env={"PATH": f"{tools}:/usr/bin:/bin", "OUT": str(out)})
    assert (out / "conda").read_bytes().split(b"\0")[:-1] == [b"activate", conda.encode()]
    assert not (tmp_path / "pwned").exists() and not (run_dir / "pwned").exists()
