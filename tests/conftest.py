"""Shared test helpers (tests/ports.py, tests/standin_vllm.py) import from this folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
