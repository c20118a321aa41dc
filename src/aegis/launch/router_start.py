"""Start vllm-router with its own client authentication switched on.

    python -I router_start.py VLLM-ROUTER-ARGS...      (AEGIS_ROUTER_KEY_CHECK=<url> in the env)

vllm-router checks every request it gets, management calls (/add_worker, /remove_worker,
/workers, /list_workers) as well as completions, against `api_key_validation_urls`: a request
passes when one of those URLs answers 200 to its `Authorization` header. Its command line does
not offer that setting, its Python API does; so this file parses the command line with
vllm-router's own parser and starts the router through its own launcher, with the launcher's
key check (aegis.launch.router.KeyCheck) as the one validation URL. Should the installed
vllm-router not take that setting, it exits 3 rather than serve with its management API open.

It also keeps colour codes out of the router's log (the router writes ANSI escapes whatever
NO_COLOR says). Run as a file, like the keeper: it imports nothing of aegis.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading

KEY_CHECK_VAR = "AEGIS_ROUTER_KEY_CHECK"
EXIT_NO_AUTH = 3
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _plain_output() -> threading.Thread:
    """fds 1 and 2 into a pipe whose reader writes them, colour codes removed, to the log."""
    log = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def copy() -> None:
        pending = b""
        while True:
            data = os.read(read_end, 65536)
            if not data:
                break
            pending += data
            lines, _, pending = pending.rpartition(b"\n")
            if lines:
                os.write(log, _ANSI.sub(b"", lines + b"\n"))
        if pending:
            os.write(log, _ANSI.sub(b"", pending))

    thread = threading.Thread(target=copy, name="plain-log", daemon=True)
    thread.start()
    return thread


def _flush(thread: threading.Thread) -> None:
    """The last lines into the log before exit: close the pipe, let the reader finish."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.close(1)
    os.close(2)
    thread.join(timeout=2)


def main(argv: list[str]) -> int:
    url = os.environ.get(KEY_CHECK_VAR, "")
    if not url:
        print(f"router_start: {KEY_CHECK_VAR} is not set", file=sys.stderr)
        return 2
    copier = _plain_output()
    try:
        import vllm_router.router as router_module
        from vllm_router.launch_router import launch_router, parse_router_args

        rust_router = router_module._Router
        if "api_key_validation_urls" not in (rust_router.__text_signature__ or ""):
            print("aegis: this vllm-router cannot check clients' keys (no "
                  "api_key_validation_urls); refusing to serve with an open management API",
                  file=sys.stderr)
            return EXIT_NO_AUTH
        router_module._Router = functools.partial(rust_router, api_key_validation_urls=[url])
        launch_router(parse_router_args(argv))
        return 0
    finally:
        _flush(copier)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
