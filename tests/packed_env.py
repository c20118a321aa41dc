"""A real packed Python environment holding the stand-in server, for the env_source tests and
benchmark: `python -m venv --copies` (a relocatable interpreter copy), the stand-in installed
as the environment's `vllm` command, packed with venv-pack (PyPI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "standin_vllm.py"


def make_env(workdir: Path, name: str = "standin-env", packages: tuple[str, ...] = ()) -> Path:
    """An environment whose `vllm` is the stand-in; it first imports `packages` (installed
    into it with pip), so starting it costs what importing a real stack costs."""
    venv = workdir / name
    subprocess.run([sys.executable, "-m", "venv", "--copies",
                    *([] if packages else ["--without-pip"]), str(venv)], check=True)
    if packages:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", *packages], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    site = venv / "lib" / f"python{sysconfig.get_python_version()}" / "site-packages"
    shutil.copy(STANDIN, site / "standin_vllm.py")
    imports = "".join(f"import {p.replace('-', '_')}\n" for p in packages)
    vllm = venv / "bin" / "vllm"
    # A console script as pip writes it (absolute shebang into the environment); venv-pack
    # rewrites such shebangs so the unpacked copy runs its own interpreter.
    vllm.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\n{imports}"
                    "from standin_vllm import main\nsys.exit(main(sys.argv[1:]))\n")
    vllm.chmod(0o755)
    return venv


def pack(venv: Path) -> Path:
    out = venv.parent / f"{venv.name}.tar.gz"
    subprocess.run([str(Path(sys.executable).parent / "venv-pack"), "-p", str(venv), "-o",
                    str(out), "-q"], check=True)
    return out


def make_packed_env(workdir: Path, name: str = "standin-env") -> Path:
    """Build workdir/<name>.tar.gz; only the tarball stays, so nothing can run from the
    source by accident."""
    venv = make_env(workdir, name)
    out = pack(venv)
    shutil.rmtree(venv)
    return out
