"""`python -m aegis` is the `aegis` command."""

from .cli import main

main()
