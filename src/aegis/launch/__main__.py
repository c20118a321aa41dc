"""`python -m aegis.launch --config FILE ...`: one launcher rank (started on every node by the
batch script's MPI launcher); the flags are `aegis launch`'s."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli  # the entry point parses; the launch package never imports it

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli.main(["launch", *argv], prog_name="aegis", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
