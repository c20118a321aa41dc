"""A real packed Python environment holding the stand-in server, for the env_source tests:
`python -m venv --copies` (a relocatable interpreter copy), the stand-in installed as the
environment's `vllm` command, packed with venv-pack (PyPI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "standin_vllm.py"


def make_packed_env(workdir: Path, name: str = "standin-env") -> Path:
    """Build workdir/<name>.tar.gz; returns its path."""
    venv = workdir / name
    subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip", str(venv)],
                   check=True)
    site = venv / "lib" / f"python{sysconfig.get_python_version()}" / "site-packages"
    shutil.copy(STANDIN, site / "standin_vllm.py")
    vllm = venv / "bin" / "vllm"
    # A console script as pip writes it (absolute shebang into the environment); venv-pack
    # rewrites such shebangs so the unpacked copy runs its own interpreter.
    vllm.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom standin_vllm import main\n"
                    "sys.exit(main(sys.argv[1:]))\n")
    vllm.chmod(0o755)
    out = workdir / f"{name}.tar.gz"
    subprocess.run([str(Path(sys.executable).parent / "venv-pack"), "-p", str(venv), "-o",
                    str(out), "-q"], check=True)
    shutil.rmtree(venv)  # only the tarball stays: nothing can run from the source by accident
    return out
