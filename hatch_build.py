"""Hatchling build hook: compile csrc/bcast.c into the cffi extension ``aegis._bcast``.

The extension links libmpi by soname and carries no rpath, so at import time it binds to the
libmpi that ``mpi4py.MPI`` already loaded (``aegis.bcast`` imports mpi4py first). The MPI
compiler wrapper is found in this order: ``$MPICC``, ``mpicc`` on PATH (PyPI ``mpich`` in
``[build-system].requires`` puts one there inside pip's isolated build env), the running
interpreter's scripts directory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "aegis._bcast"
C_SOURCE = "csrc/bcast.c"
C_HEADER = "csrc/bcast.h"


class MPICompilerNotFound(RuntimeError):
    pass


def find_mpicc() -> str:
    if os.environ.get("MPICC"):
        return os.environ["MPICC"]
    on_path = shutil.which("mpicc")
    if on_path:
        return on_path
    beside_python = Path(sysconfig.get_path("scripts")) / "mpicc"
    if beside_python.is_file():
        return str(beside_python)
    raise MPICompilerNotFound(
        "aegis: no MPI C compiler wrapper found; set MPICC=/path/to/mpicc "
        "(or install PyPI mpich: pip install mpich)"
    )


def mpicc_flags(mpicc: str) -> dict[str, list[str]]:
    """Turn ``mpicc -show`` (MPICH, Intel MPI, Cray) or ``--showme`` (Open MPI) into cffi
    keyword arguments. RPATHs are dropped on purpose: the extension must bind by soname to the
    libmpi mpi4py loaded, not to a path inside a build environment that pip deletes."""
    shown = None
    for option in ("-show", "--showme"):
        try:
            run = subprocess.run([*shlex.split(mpicc), option], capture_output=True, text=True,
                                 check=True)
        except (OSError, subprocess.CalledProcessError):
            continue
        if run.stdout.strip():
            shown = run.stdout
            break
    if shown is None:
        raise MPICompilerNotFound(f"aegis: could not query MPICC={mpicc} for its flags "
                                  "(tried -show and --showme)")
    flags: dict[str, list[str]] = {"include_dirs": [], "library_dirs": [], "libraries": [],
                                   "extra_compile_args": [], "extra_link_args": []}
    tokens = shlex.split(shown)[1:]  # the first token is the underlying compiler
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("-I", "-L", "-l") and i + 1 < len(tokens):
            tok, i = tok + tokens[i + 1], i + 1
        if tok.startswith("-I"):
            flags["include_dirs"].append(tok[2:])
        elif tok.startswith("-L"):
            flags["library_dirs"].append(tok[2:])
        elif tok.startswith("-l"):
            flags["libraries"].append(tok[2:])
        elif tok in ("-Wl,-rpath", "-Xlinker"):
            i += 1  # its argument is the path
        elif tok.startswith(("-Wl,-rpath", "-Wl,--enable-new-dtags", "-Wl,-R")):
            pass
        elif tok.startswith("-Wl,"):
            flags["extra_link_args"].append(tok)
        elif tok == "-pthread":
            flags["extra_compile_args"].append(tok)
            flags["extra_link_args"].append(tok)
        else:
            flags["extra_compile_args"].append(tok)
        i += 1
    return flags


def cdef_from_header(header: str) -> str:
    """The declarations between CFFI-BEGIN and CFFI-END, without comments (cffi's parser)."""
    match = re.search(r"/\* CFFI-BEGIN \*/(.*)/\* CFFI-END \*/", header, re.S)
    if not match:
        raise RuntimeError(f"{C_HEADER}: CFFI-BEGIN/CFFI-END markers missing")
    text = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)
    return text


def install_atomically(built: Path, target: Path) -> None:
    """Put the built module at target by rename, never by rewriting the file in place.

    Running processes (an mpiexec job, an ``aegis`` command) keep the old .so mmapped. Truncating
    and rewriting that inode swaps pages under them: code faults past the new end of file raise
    SIGBUS, and at exit ld.so runs the new file's unrelocated .fini_array (SIGSEGV in
    ld-linux-x86-64.so.2, or a jump to the raw link-time address). A rename gives the new build a
    new inode; the old one lives on until its last mapping goes away.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(built, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def compile_extension(root: Path, tmpdir: str, mpicc: str, verbose: bool = False) -> Path:
    from cffi import FFI

    flags = mpicc_flags(mpicc)
    # e.g. AEGIS_EXTRA_CFLAGS="-fsanitize=address -g" for a sanitizer build (docs/staging.md)
    extra = shlex.split(os.environ.get("AEGIS_EXTRA_CFLAGS", ""))
    ffi = FFI()
    ffi.cdef(cdef_from_header((root / C_HEADER).read_text()))
    ffi.set_source(
        MODULE,
        '#include "bcast.h"',
        sources=[str(root / C_SOURCE)],
        include_dirs=[str(root / "csrc"), *flags["include_dirs"]],
        library_dirs=flags["library_dirs"],
        libraries=flags["libraries"],
        extra_compile_args=["-O2", "-pthread", *flags["extra_compile_args"], *extra],
        # -lrt: shm_open lives in librt before glibc 2.34 (SLES 15 on Aurora)
        extra_link_args=["-pthread", *flags["extra_link_args"], "-lrt", *extra],
    )
    return Path(ffi.compile(tmpdir=tmpdir, verbose=verbose))


class CFFIMPIBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return  # the sdist ships sources only
        root = Path(self.root)
        self._tmp = tempfile.mkdtemp(prefix="aegis-cffi-")
        try:
            mpicc = find_mpicc()
            self.app.display_info(f"[aegis] MPI compiler wrapper: {mpicc}")
            so_path = compile_extension(root, self._tmp, mpicc,
                                        verbose=bool(os.environ.get("AEGIS_BUILD_VERBOSE")))
        except MPICompilerNotFound as exc:
            self.app.abort(str(exc))
            raise
        rel = "aegis/" + so_path.name
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version == "editable":
            # hatchling's editable wheel is a .pth pointing at src/ (force_include is ignored),
            # so the compiled module has to sit in the source tree.
            install_atomically(so_path, root / "src" / rel)
        else:
            build_data["force_include"][str(so_path)] = rel

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    # Developer shortcut: build the extension in place (src/aegis/) without pip.
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="aegis-cffi-") as tmp:
        built = compile_extension(here, tmp, find_mpicc(), verbose=True)
        install_atomically(built, here / "src" / "aegis" / built.name)
        print(here / "src" / "aegis" / built.name)
