"""`python -m aegis.launch --config FILE ...`: run one launcher rank (start it on every node)."""

import sys

from . import run_rank

sys.exit(run_rank(sys.argv[1:]))
